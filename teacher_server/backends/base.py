"""What every backend is: it deals in token ids only and scores batches of id sequences.

A backend module exposes ``load(config) -> (backend, TeacherTokenizer)``; ``teacher_server.backends.BACKENDS``
names them, and the chosen one is imported only when it is used (vLLM is optional and CUDA-only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class ScoreOutput:
    """One sequence of n tokens; position j predicts token j+1."""

    topk_ids: np.ndarray       # (n, k) int32, by decreasing log-prob
    topk_logprobs: np.ndarray  # (n, k) float32
    next_logprobs: np.ndarray  # (n-1,) float32


class Backend(Protocol):
    name: str
    architecture: str
    vocab_size: int
    dtype: str
    device: str
    max_positions: int | None

    def score(self, batch: Sequence[np.ndarray], top_k: int) -> list[ScoreOutput]:
        """Scores id sequences (each (n,), n >= 1, no BOS; the backend adds it if configured)."""
        ...


def max_positions(config) -> int | None:
    """The longest sequence a model config admits (first of the usual keys), or None if it names none."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
