#!/usr/bin/env bash
# The README's main command: sets everything up, then runs the end-to-end demo on CPU.
#   ./scripts/demo.sh [demo options; see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/${LIVEFUSE_VENV:-.venv}/torch_extensions}"  # built by setup.sh
export PATH="$PWD/${LIVEFUSE_VENV:-.venv}/bin:$PATH"  # the environment's ninja builds the op (another ninja would rebuild it)
exec "${LIVEFUSE_VENV:-.venv}/bin/python" -m student_trainer.demo "$@"
