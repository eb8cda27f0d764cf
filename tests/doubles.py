"""The test doubles every suite shares: a real backend wrapped so a test can hold its forwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from teacher_server.backends.base import ScoreOutput


class ControlledBackend:
    """A real backend whose forwards after the first ``hold_after`` wait until ``release`` is set
    (``hold_after=0``: every forward waits); ``held`` is set when one waits, ``scored`` lists the id
    sequences that reached it. Tests use it to fill queues, cancel requests and kill servers mid-forward.
    ``seconds_per_token`` > 0 makes each forward also take that long per padded token: a slower (bigger)
    model with the same, real outputs, so the server's measured scoring rate is known."""

    def __init__(self, inner: Any, hold_after: int | None = None, seconds_per_token: float = 0.0) -> None:
        self.inner, self.hold_after = inner, hold_after
        self.seconds_per_token = seconds_per_token
        self.calls = 0
        self.scored: list[list[int]] = []
        self.held, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        for attr in ("name", "architecture", "vocab_size", "dtype", "device", "max_positions"):
            setattr(self, attr, getattr(inner, attr))
        self.can_gather = getattr(inner, "can_gather", False)

    def hold_after_more(self, calls: int) -> None:
        """Serves ``calls`` more forwards, then holds the next ones (held/release start cleared)."""
        with self._lock:
            self.held.clear()
            self.release.clear()
            self.hold_after = self.calls + calls

    def stop_holding(self) -> None:
        self.hold_after = None
        self.release.set()

    def score(self, batch: Sequence[np.ndarray], top_k: int, gather: Sequence[Any] | None = None
              ) -> list[ScoreOutput]:
        with self._lock:
            self.calls += 1
            self.scored.extend(np.asarray(ids).tolist() for ids in batch)
            hold = self.hold_after is not None and self.calls > self.hold_after
        if hold and not self.release.is_set():
            self.held.set()
            assert self.release.wait(120), "the test never released the held forward"
        if self.seconds_per_token:
            time.sleep(self.seconds_per_token * len(batch) * max(len(ids) for ids in batch))
        return self.inner.score(batch, top_k) if gather is None else self.inner.score(batch, top_k, gather)
