# The livefuse trainer, launched by DeepSpeed across the GPUs of the container.
#   docker build -f docker/trainer.Dockerfile -t livefuse-trainer .          # context: the repository root
#   docker run --gpus all --shm-size 32g -v hf-cache:/cache/huggingface -v /data:/data:ro \
#       livefuse-trainer --num_gpus 8 --module student_trainer --config /app/configs/paper_llama2.yaml
# The entrypoint is the `deepspeed` launcher: launcher flags, then `--module student_trainer`, then the
# livefuse-train arguments (--config FILE and key=value overrides).
# A CUDA *devel* base: DeepSpeed JIT-compiles its fused optimizer kernels with nvcc on first use.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# livefuse extras: train (DeepSpeed, TensorBoard), track (run.report_to: wandb, trackio); add eval for lm-eval
ARG LIVEFUSE_EXTRAS=train,track

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    LIVEFUSE_CACHE=/cache/livefuse \
    NUMBA_CACHE_DIR=/opt/numba-cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY requirements-ci.txt pyproject.toml README.md ./
COPY protos ./protos
COPY teacher_server ./teacher_server
COPY student_trainer ./student_trainer
RUN pip install -c requirements-ci.txt ".[${LIVEFUSE_EXTRAS}]"
COPY configs ./configs
# The MinED aligner's numba kernels, compiled once into the image (~10 s) instead of in every new container
# (the user below cannot write next to the installed package); readable by every user.
RUN python -c "import numpy as np; from student_trainer.core.alignment import ALIGNERS, TeacherOutput, Tokens, \
make_vocab_pair as pair; t = Tokens(np.arange(4), np.array([[0, 1], [1, 2], [2, 4], [4, 5]])); \
z = np.zeros((4, 1)); ALIGNERS['mined'](t, TeacherOutput(t, z.astype(int), z, np.zeros(3)), pair(list('abcd'), list('abcd'), np.arange(4)))" \
    && chmod -R a+rX /opt/numba-cache

# Non-root (same uid as the teacher image, so the shared HF cache volume works for both).
RUN useradd --create-home --uid 10001 livefuse \
    && mkdir -p /cache/huggingface /cache/livefuse /checkpoints \
    && chown -R livefuse:livefuse /cache /checkpoints
USER livefuse
VOLUME ["/cache/huggingface", "/checkpoints"]

ENTRYPOINT ["deepspeed"]
CMD ["--module", "student_trainer", "--config", "/app/configs/paper_llama2.yaml"]
