#!/usr/bin/env bash
# The README's main command: sets everything up, then runs the end-to-end demo on CPU.
#   ./scripts/demo.sh [demo options; see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${LIVEFUSE_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute: LIVEFUSE_VENV may be either
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"  # built by setup.sh
export PATH="$VENV/bin:$PATH"  # the environment's ninja builds the op (another ninja would rebuild it)
exec "$VENV/bin/python" -m student_trainer.demo "$@"
