"""Admission in front of a backend that batches by itself (an ``EngineBackend``: vLLM's async engine).

The token-budget batcher (batcher.py) forms batches for backends that score one batch per blocking call.
An engine with continuous batching wants every request at once instead: vLLM's scheduler then mixes the
texts of all requests in flight at every step, and a long text never holds back the ones behind it. This
keeps the batcher's interface (``submit`` / ``start`` / ``stop``, ``QueueFull``) so the servicer serves
both the same way, and keeps only what is not the engine's job: the bound on admitted work
(``max_queue_tokens``: tokens submitted and not yet answered) and the queue gauges. The batch histograms
stay empty: vLLM forms the batches (its own stats log says how full they are).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from teacher_server.backends.base import BackendDead, EngineBackend, Gather, ScoreOutput
from teacher_server.batcher import QueueFull
from teacher_server.metrics import TeacherMetrics


class EngineQueue:
    def __init__(self, backend: EngineBackend, *, max_queue_tokens: int, metrics: TeacherMetrics | None = None,
                 on_dead: Callable[[BackendDead], None] | None = None) -> None:
        """``on_dead`` is called (once per failing call) when the backend raises ``BackendDead``."""
        self._backend, self._on_dead = backend, on_dead
        self.max_queue_tokens = max_queue_tokens
        self._metrics = metrics
        self._texts = self._tokens = 0

    def start(self) -> None:
        """Nothing to start: the engine runs its own loop (kept for the batcher's interface)."""

    async def stop(self) -> None:
        """Stops the engine; the server calls it after gRPC has drained."""
        await asyncio.get_running_loop().run_in_executor(None, self._backend.close)

    async def submit(self, seqs: Sequence[np.ndarray], top_k: int, within_s: float | None = None,
                     gather: Sequence[Gather | None] | None = None) -> list[ScoreOutput]:
        """Hands the sequences to the engine and waits for their scores (QueueFull when over the bound).

        ``within_s`` (the caller's time left) is accepted for the batcher's interface but not used: vLLM
        schedules its own requests, so early refusal (``early_refusal``) applies to the HF batcher only.
        So is ``gather``, which never comes: an engine backend cannot gather (TeacherInfo.max_gather_ids = 0).
        """
        assert gather is None, "an engine backend cannot gather; the servicer refuses such requests"
        tokens = sum(len(s) for s in seqs)
        if self._tokens and self._tokens + tokens > self.max_queue_tokens:
            raise QueueFull(f"{self._tokens} tokens are in the engine; the limit is {self.max_queue_tokens}")
        self._admit(len(seqs), tokens)
        try:
            return await self._backend.score_async(seqs, top_k)
        except BackendDead as dead:
            if self._on_dead is not None:
                self._on_dead(dead)
            raise
        finally:
            self._admit(-len(seqs), -tokens)  # also when cancelled: the gauges never stick

    def _admit(self, texts: int, tokens: int) -> None:
        self._texts += texts
        self._tokens += tokens
        if self._metrics is not None:
            self._metrics.queue_texts.set(self._texts)
            self._metrics.queue_tokens.set(self._tokens)
