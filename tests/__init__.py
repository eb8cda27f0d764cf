"""livefuse's tests: the tree mirrors the packages (protos/, teacher_server/, student_trainer/{core,trainer,experiments,demo})."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root
