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


# The longest files of the suite (minutes each on 2 cores): collected first, so that with two workers
# (`./scripts/test.sh` runs `--dist loadfile`) one starts them at once while the other works through the rest,
# instead of one of them starting last and the suite waiting on it alone.
LONGEST_FIRST = ("student_trainer/demo/test_demo.py", "student_trainer/trainer/test_processes.py",
                 "student_trainer/experiments/test_compare.py", "student_trainer/trainer/test_multinode.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Moves the files of ``LONGEST_FIRST`` to the front (in that order); everything else keeps its order."""
    root = Path(__file__).parent
    if missing := [f for f in LONGEST_FIRST if not (root / f).exists()]:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")

    def rank(item: pytest.Item) -> int:
        path = Path(str(item.path))
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else ""
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
