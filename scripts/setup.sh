#!/usr/bin/env bash
# Creates ./.venv (or $LIVEFUSE_VENV) with the pinned CPU stack and livefuse installed in editable mode.
# Idempotent: a stamp of requirements-ci.txt + pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LIVEFUSE_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.livefuse-stamp"
WANT="$(cat requirements-ci.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies (CPU torch) into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-ci.txt
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$WANT" > "$STAMP"
fi
