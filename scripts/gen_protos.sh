#!/usr/bin/env bash
# Regenerates the Python stubs from protos/teacher.proto (the only definition of the wire format).
#   ./scripts/gen_protos.sh          write protos/teacher_pb2{.py,.pyi,_grpc.py}
#   ./scripts/gen_protos.sh --check  fail if the committed stubs differ from freshly generated ones
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${LIVEFUSE_VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$PY" -m grpc_tools.protoc -I. --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" protos/teacher.proto
if [ "${1:-}" = "--check" ]; then
  for f in teacher_pb2.py teacher_pb2.pyi teacher_pb2_grpc.py; do
    if ! diff -q "$OUT/protos/$f" "protos/$f" >/dev/null 2>&1; then
      echo "protos/$f is out of date: run ./scripts/gen_protos.sh and commit the result" >&2
      exit 1
    fi
  done
  echo "stubs up to date"
else
  cp "$OUT"/protos/teacher_pb2.py "$OUT"/protos/teacher_pb2.pyi "$OUT"/protos/teacher_pb2_grpc.py protos/
  echo "wrote protos/teacher_pb2.py protos/teacher_pb2.pyi protos/teacher_pb2_grpc.py"
fi
