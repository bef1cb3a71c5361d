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

# Headless Chromium, for the test that renders `saferl report`'s HTML (tests/test_report.py,
# skipped without it). Installed from the system package manager only when it is missing and
# apt-get can run (root, or passwordless sudo); otherwise a note, never a failed setup.
# SAFERL_NO_CHROMIUM=1 skips the step.
install_chromium() {
  local b sudo="" log
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null; then echo "[setup] $b is installed"; return 0; fi
  done
  if [ -n "${SAFERL_NO_CHROMIUM:-}" ]; then echo "[setup] chromium skipped (SAFERL_NO_CHROMIUM)"; return 0; fi
  if ! command -v apt-get >/dev/null; then
    echo "[setup] note: no apt-get here; install Chromium by hand to run the report's browser test (skipped until then)"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "[setup] note: installing chromium needs root (apt-get install chromium); the report's browser test is skipped until then"
      return 0
    fi
  fi
  echo "[setup] installing chromium (apt-get) ..."
  log=$(mktemp)
  apt_install() { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium; }
  if apt_install >"$log" 2>&1 || { $sudo apt-get update -q >>"$log" 2>&1 && apt_install >>"$log" 2>&1; }; then
    echo "[setup] chromium ready"
  else
    echo "[setup] note: apt-get could not install chromium (last lines below); the report's browser test is skipped"
    tail -n 3 "$log"
  fi
  rm -f "$log"
}
install_chromium
