"""docs/TRAINER.md, the trainer configuration reference, lists every setting (keeps the docs true)."""

from __future__ import annotations

from student_trainer.trainer.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
)
from tests import REPO


def test_readme_documents_every_trainer_setting():
    readme = (REPO / "docs" / "TRAINER.md").read_text()
    sections = {"target": ModelConfig, "sources[]": SourceConfig, "method": MethodConfig, "data": DataConfig,
                "train": TrainConfig, "run": RunConfig}
    for prefix, cls in sections.items():
        for name in cls.model_fields:
            assert f"| `{prefix}.{name}` |" in readme, f"{prefix}.{name}"
