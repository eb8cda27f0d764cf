"""Shared fixtures: tiny models of several architectures, each with a different real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from student_trainer.demo.assets import build_tiny_model

# (architecture, tokenizer): the paper's families plus GPT-2.
TINY_MODELS = {
    "llama": ("llama", "llama-spm"),
    "mpt": ("mpt", "mpt"),
    "gpt2": ("gpt2", "gpt-2"),
    "gpt-neox": ("gpt-neox", "mistral-spm"),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> folder with a saved random tiny model + its real tokenizer (loaded like a hub checkpoint)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_tiny_model(arch, tok, root / name, seed=i)
            for i, (name, (arch, tok)) in enumerate(TINY_MODELS.items())}
