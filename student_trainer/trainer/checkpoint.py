"""Checkpoint and resume: DeepSpeed's own checkpoint (model, optimizer, scheduler) plus the data position
and the RNG states, so a resumed run continues with the same next batch."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, directory: Path, step: int, micro_index: int) -> None:
    """Collective: every rank calls it. Writes ``directory/step{N}`` and the ``latest`` pointer."""
    engine.save_checkpoint(str(directory), tag=f"step{step}",
                           client_state={"step": step, "micro_index": micro_index, "rng": rng_state()})


def load(engine, directory: Path) -> tuple[int, int] | None:
    """Restores the latest checkpoint if there is one: returns (step, micro_index), else None."""
    if not (directory / "latest").exists():
        return None
    path, client = engine.load_checkpoint(str(directory))
    if path is None:
        raise RuntimeError(f"{directory}/latest exists but its checkpoint could not be loaded")
    set_rng_state(client["rng"])
    return int(client["step"]), int(client["micro_index"])
