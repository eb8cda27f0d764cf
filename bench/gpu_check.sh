#!/usr/bin/env bash
# Issue 2 on one H100-class GPU: teacher throughput, raw backend vs server, Llama-2-7B shape, bf16,
# 2048-token texts, k = 10, plain and --compile. Writes logs and JSON to $OUT (or ./gpu_check_out).
#
#   bash bench/gpu_check.sh [plain|compile|all]      # default: all (H100: plain 114 s incl. the model build,
#                                                    #   compile 394 s, mostly autotuning)
#
# The device machine has no network. Prepare here first (in the repo root), then carry both folders:
#   echo /.whl/ >> .git/info/exclude; echo /.bench-cache/ >> .git/info/exclude
#   mkdir -p .bench-cache/livefuse/tokenizers
#   cp -r ~/.cache/livefuse/tokenizers/llama-spm .bench-cache/livefuse/tokenizers/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   run(command="bash bench/gpu_check.sh plain", carry=[".whl", ".bench-cache"], timeout_s=540)
#   run(command="bash bench/gpu_check.sh compile", carry=[".whl", ".bench-cache"], timeout_s=600)
# The 7B model is built once in $BENCH_MODEL_DIR (default /tmp/livefuse-llama-7b) and reused by a
# later call on the same warm machine.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
OUT=${OUT:-$PWD/gpu_check_out}
MODEL=${BENCH_MODEL_DIR:-/tmp/livefuse-llama-7b}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || echo "gpu_check: installing .whl/*.whl failed"
fi
[ -d .bench-cache/livefuse ] && export LIVEFUSE_CACHE=$PWD/.bench-cache/livefuse

# Fail early, saying exactly what is missing.
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt" || exit 1
import importlib, sys
missing = []
for mod in ("torch", "transformers", "tokenizers", "numpy", "grpc", "grpc_health.v1", "grpc_reflection.v1alpha",
            "google.protobuf", "pydantic", "yaml", "prometheus_client", "psutil"):
    try:
        m = importlib.import_module(mod)
        print(f"ok      {mod} {getattr(m, '__version__', '')}")
    except Exception as e:
        missing.append(mod)
        print(f"MISSING {mod}: {type(e).__name__}: {e}")
try:
    import protos.teacher_pb2_grpc  # noqa: F401  (checks grpcio/protobuf versions against the stubs)
except Exception as e:
    missing.append("protos stubs")
    print(f"MISSING protos stubs: {type(e).__name__}: {e}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
from student_trainer.paths import cache_root
tok = cache_root() / "tokenizers" / "llama-spm" / "tokenizer_config.json"
print(("ok      " if tok.exists() else "MISSING ") + f"llama-spm tokenizer at {tok.parent} (carry .bench-cache)")
if missing or not tok.exists() or not torch.cuda.is_available():
    sys.exit("gpu_check: not runnable here: needs CUDA and everything above ok; carry what is MISSING (see this script's header)")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/env.txt"

if [ ! -f "$MODEL/config.json" ]; then
  echo "gpu_check: building random-weight Llama-2-7B shape in $MODEL"
  timeout 300 $PY -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from teacher_throughput import build_shape
build_shape('llama-7b', Path('$MODEL'), 'cuda', 'bfloat16')" 2>&1 | tail -3 || exit 1
fi

bench() {  # name, timeout, extra flags
  local name=$1 limit=$2; shift 2
  echo "gpu_check: $name"
  timeout "$limit" $PY bench/teacher_throughput.py --model "$MODEL" --device cuda --dtype bfloat16 \
    --seq-len 2048 --batch-texts 8 --top-k 10 --requests 8 --rounds 3 --concurrency 2 \
    --json-out "$OUT/$name.json" "$@" 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/$name.log"
}
case $MODE in
  plain)   bench plain 420 ;;
  compile) TORCH_LOGS=recompiles bench compile 560 --compile --pad-to-multiple-of 64 --warmup 2 --requests 6 --rounds 2 ;;
  all)     bench plain 300
           TORCH_LOGS=recompiles bench compile 560 --compile --pad-to-multiple-of 64 --warmup 2 --requests 6 --rounds 2 ;;
  *)       echo "usage: bash bench/gpu_check.sh [plain|compile|all]"; exit 2 ;;
esac
