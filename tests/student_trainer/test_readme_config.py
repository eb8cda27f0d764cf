"""The README's trainer configuration reference lists every setting (keeps the README true)."""

from __future__ import annotations

from pathlib import Path

from student_trainer.config import DataConfig, MethodConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig


def test_readme_documents_every_trainer_setting():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sections = {"target": ModelConfig, "sources[]": SourceConfig, "method": MethodConfig, "data": DataConfig,
                "train": TrainConfig, "run": RunConfig}
    for prefix, cls in sections.items():
        for name in cls.model_fields:
            assert f"| `{prefix}.{name}` |" in readme, f"{prefix}.{name}"
