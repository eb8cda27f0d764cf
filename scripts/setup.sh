#!/usr/bin/env bash
# Creates ./.venv (or $LIVEFUSE_VENV) with the pinned CPU stack and livefuse installed in editable mode.
# Idempotent: a stamp of requirements-ci.txt + pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LIVEFUSE_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute: LIVEFUSE_VENV may be either
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
# DeepSpeed JIT-builds a small C++ op on its first CPU start (~30 s). Build it here, once, into the venv:
# the project's commands point TORCH_EXTENSIONS_DIR there, and a build killed half-way (which would leave a
# lock that makes every later start wait forever) can only happen in this visible step. A stale lock from
# such a kill is removed first (student_trainer.trainer.extensions).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
export PATH="$VENV/bin:$PATH"  # the environment's ninja builds the op (another ninja would rebuild it)
if ! ls "$TORCH_EXTENSIONS_DIR"/deepspeed_shm_comm/*.so >/dev/null 2>&1; then
  echo "[setup] building DeepSpeed's CPU communication op into $TORCH_EXTENSIONS_DIR (once, ~30 s)"
  "$VENV/bin/python" - <<'PY'
import torch
from student_trainer.trainer.extensions import clear_stale_locks

clear_stale_locks()
if not torch.cuda.is_available():
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)
PY
fi
