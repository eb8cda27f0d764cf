# One source LLM as a gRPC teacher service (livefuse-teacher) on one GPU.
#   docker build -f docker/teacher.Dockerfile -t livefuse-teacher .          # context: the repository root
#   docker run --gpus '"device=0"' -p 50051:50051 -v hf-cache:/cache/huggingface -e HF_TOKEN \
#       livefuse-teacher --model meta-llama/Llama-2-7b-hf
# Arguments are livefuse-teacher flags (the entrypoint). Health: the standard gRPC health service, probed by
# `python -m teacher_server.healthcheck` (SERVING once the model is loaded and warmed up).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# CUDA build of torch from the PyTorch index (cu128 matches the base image); the version matches
# requirements-ci.txt, which pins the rest of the stack the tests ran with.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    LIVEFUSE_CACHE=/cache/livefuse

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY requirements-ci.txt pyproject.toml README.md ./
COPY protos ./protos
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
RUN pip install -c requirements-ci.txt ".[server]"

# Non-root; the cache folders exist and belong to the user, so a fresh named volume mounted there does too.
RUN useradd --create-home --uid 10001 livefuse \
    && mkdir -p /cache/huggingface /cache/livefuse \
    && chown -R livefuse:livefuse /cache
USER livefuse
VOLUME ["/cache/huggingface"]

EXPOSE 50051 9400
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-m", "teacher_server.healthcheck", "--port", "50051"]
ENTRYPOINT ["livefuse-teacher"]
CMD ["--help"]
