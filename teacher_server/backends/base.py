"""What every backend is: it deals in token ids only and scores batches of id sequences.

A backend module exposes ``load(config) -> (backend, TeacherTokenizer)``; ``teacher_server.backends.BACKENDS``
names them, and the chosen one is imported only when it is used (vLLM is optional).

Two kinds: a ``Backend`` scores one batch per blocking ``score`` call, and the server's token-budget batcher
forms the batches (HF); an ``EngineBackend`` batches across concurrent ``score_async`` calls itself (vLLM's
async engine), and the server hands it each request at once. Either raises ``BackendDead`` when it can
never score again: the server reports NOT_SERVING and the process exits non-zero, so that its orchestrator
restarts it. Any other exception fails only the requests of that call.

A backend that can also gather log-probs at ids of the caller's choosing (``Gather``: ScoreRequest.gather,
after the server has turned its character ends into token positions) sets ``can_gather = True`` and takes a
``gather`` argument; one without it (vLLM: its engine has no such call) is never asked (TeacherInfo says
max_gather_ids = 0 and the server refuses such requests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Gather:
    """What to gather for one sequence of n tokens: row i asks the log-probs of ``ids[i]`` at position
    ``positions[i]`` (0 <= p < n, any order; -1: no position). An id of -1 is padding."""

    positions: np.ndarray  # (m,) int64
    ids: np.ndarray        # (m, c) int64, each < vocab_size or -1


@dataclass(frozen=True)
class ScoreOutput:
    """One sequence of n tokens; position j predicts token j+1."""

    topk_ids: np.ndarray       # (n, k) int32, by decreasing log-prob
    topk_logprobs: np.ndarray  # (n, k) float32
    next_logprobs: np.ndarray  # (n-1,) float32
    gathered_logprobs: np.ndarray | None = None  # (m, c) float32 for its Gather (-inf: no position or padding)


class BackendDead(RuntimeError):
    """The backend cannot score any more (e.g. vLLM's engine process died); only a restart helps."""


class BackendInfo(Protocol):
    """What the server reports about every backend (TeacherInfo)."""

    name: str
    architecture: str
    vocab_size: int
    dtype: str
    device: str
    max_positions: int | None


class Backend(BackendInfo, Protocol):
    def score(self, batch: Sequence[np.ndarray], top_k: int,
              gather: Sequence[Gather | None] | None = None) -> list[ScoreOutput]:
        """Scores id sequences (each (n,), n >= 1, no BOS; the backend adds it if configured); with ``gather``
        (one per sequence, None: nothing) also the log-probs it asks (a backend with ``can_gather`` only)."""
        ...


class EngineBackend(BackendInfo, Protocol):
    """A backend whose engine batches across concurrent calls (continuous batching)."""

    async def score_async(self, batch: Sequence[np.ndarray], top_k: int) -> list[ScoreOutput]:
        """Scores id sequences (as ``Backend.score``); called concurrently, once per request."""
        ...

    def close(self) -> None:
        """Stops the engine (the server has stopped serving)."""
        ...


def max_positions(config) -> int | None:
    """The longest sequence a model config admits (first of the usual keys), or None if it names none."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
