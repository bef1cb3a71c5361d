#!/usr/bin/env bash
# `make typecheck` (run by `make lint`, so by CI): mypy over the modules pyproject.toml's
# [tool.mypy] lists. The design card's top-level folders are subpackages of the one import name
# `saferl` (pyproject's package-dir), a mapping mypy cannot follow in the checkout; so this lays
# the installed layout out as links in a temporary directory, from that same package-dir, and
# checks it there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/saferl"
for f in "$repo"/saferl/*; do ln -s "$f" "$tree/saferl/"; done
# every saferl.<sub> = <folder> entry of package-dir other than saferl itself
"$repo/.venv/bin/python" - "$repo" "$tree" <<'PY'
import os, sys, tomllib
repo, tree = sys.argv[1:]
with open(os.path.join(repo, "pyproject.toml"), "rb") as fh:
    package_dir = tomllib.load(fh)["tool"]["setuptools"]["package-dir"]
for package, folder in package_dir.items():
    if package.startswith("saferl."):
        os.symlink(os.path.join(repo, folder), os.path.join(tree, *package.split(".")))
PY
cd "$tree"
MYPYPATH="$tree" "$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache"
