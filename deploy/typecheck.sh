#!/usr/bin/env bash
# `make typecheck` (run by `make lint`, so by CI): mypy over the modules pyproject.toml's
# [tool.mypy] lists. The design card's top-level folders are subpackages of the one import name
# `saferl` (pyproject's package-dir), a mapping mypy cannot follow in the checkout; so this lays
# the installed layout out as links in a temporary directory and checks it there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/saferl"
for f in "$repo"/saferl/*; do ln -s "$f" "$tree/saferl/"; done
for d in cluster actors learners envs configs; do ln -s "$repo/$d" "$tree/saferl/$d"; done
cd "$tree"
MYPYPATH="$tree" "$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache"
