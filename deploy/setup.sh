#!/usr/bin/env bash
# Create (idempotently) the two interpreter environments saferl needs:
#   .venv     main stack: torch, ray, jax/brax, gymnasium 1.x, cvxpy, wandb, pytest, saferl itself
#   .venv-sg  Safety-Gymnasium stack (numpy 1, mujoco 2.3.3) + the same ray; env hosts run here
# A stamp holding the hash of the requirement files makes a second run a no-op.
# Usage: deploy/setup.sh [ROOT]   (ROOT defaults to the repository containing this script)
set -euo pipefail
ROOT="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
PY="${SAFERL_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
cd "$ROOT"

stamp_of() { cat deploy/setup.sh deploy/requirements-$1.txt pyproject.toml | sha256sum | cut -c1-16; }

# pip's notices about this machine's extra local indexes are noise, not errors.
quiet_pip() {
  local log rc=0; log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"; return "$rc"
}

make_venv() {  # name, requirement set
  local venv=$1 set=$2 want
  want=$(stamp_of "$set")
  if [ -f "$venv/.saferl-stamp" ] && [ "$(cat "$venv/.saferl-stamp")" = "$want" ]; then
    echo "[setup] $venv is up to date"; return 0
  fi
  echo "[setup] building $venv ($set stack) ..."
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  pipi() { quiet_pip "$venv/bin/python" -m pip install -q "$@"; }
  if [ "$set" = sg ]; then
    pipi -r deploy/requirements-sg.txt
    # Their declared pins (pygame 2.1.0, numpy<1.24) have no Python 3.11 wheels; the rest of
    # their dependencies are listed in requirements-sg.txt.
    pipi --no-deps safety-gymnasium==1.0.0 gymnasium-robotics==1.2.2
  else
    pipi -r deploy/requirements-main.txt
  fi
  pipi --no-deps -e .
  echo "$want" > "$venv/.saferl-stamp"
  echo "[setup] $venv ready"
}

make_venv .venv main
make_venv .venv-sg sg
