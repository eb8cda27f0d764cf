"""Token-budget dynamic batcher.

Texts from all requests wait in one queue. Each forward pass serves the oldest waiting text together with
the texts closest to it in length, as many as fit the padded-token budget: the oldest text is never
starved and padding stays small. The forward runs on one worker thread, off the event loop; a text whose
caller went away (cancelled, deadline passed) is dropped before it reaches the model.

The batcher also measures what a forward costs (seconds per forward and per token, fitted to the recent
forwards), so a request whose deadline cannot be met given the work queued ahead of it is refused at once
instead of failing late.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from teacher_server.backends.base import Gather, ScoreOutput
from teacher_server.metrics import TeacherMetrics

ScoreFn = Callable[..., list[ScoreOutput]]
"""``score(batch, top_k)``, or ``score(batch, top_k, gather)`` (one Gather or None per sequence) when a text of
the batch gathers (``Backend.score``)."""


class QueueFull(Exception):
    """The queue holds too many tokens to accept this request now."""


class Overloaded(Exception):
    """The work queued ahead of a request would take longer than its deadline leaves."""


RATE_WINDOW = 32  # recent forwards the scoring cost is measured over
MIN_FORWARDS = 4  # forwards timed before any request is refused for its deadline
HEADROOM = 0.8
"""A request is refused when the estimated wait exceeds this share of its time left (read after tokenizing):
the rest is for encoding, the network, and the estimate's own error on a machine whose speed varies."""


@dataclass(order=True)
class _Item:
    length: int
    seq: int
    ids: np.ndarray = field(compare=False)
    top_k: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    gather: Gather | None = field(default=None, compare=False)


def pick_window(lengths: Sequence[int], anchor: int, max_tokens: int, max_texts: int) -> tuple[int, int]:
    """Widest window [lo, hi] of ascending ``lengths`` around ``anchor`` whose padded size fits.

    Grows one step at a time toward the neighbour closest in length; padded size = count * lengths[hi].
    """
    lo = hi = anchor
    while hi - lo + 1 < max_texts:
        options = []
        if lo > 0:
            options.append((lengths[anchor] - lengths[lo - 1], lo - 1, hi))
        if hi + 1 < len(lengths):
            options.append((lengths[hi + 1] - lengths[anchor], lo, hi + 1))
        fitting = [o for o in options if (o[2] - o[1] + 1) * lengths[o[2]] <= max_tokens]
        if not fitting:
            break
        _, lo, hi = min(fitting)
    return lo, hi


class TokenBudgetBatcher:
    def __init__(self, score: ScoreFn, *, max_batch_tokens: int, max_batch_texts: int, max_queue_tokens: int,
                 metrics: TeacherMetrics | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        """``clock`` times the forwards for the cost model (tests pass a fake one)."""
        self._score, self._clock = score, clock
        self.max_batch_tokens, self.max_batch_texts = max_batch_tokens, max_batch_texts
        self.max_queue_tokens = max_queue_tokens
        self._metrics = metrics
        self._pending: list[_Item] = []  # sorted by (length, arrival)
        self._queued_tokens = 0
        self._counter = itertools.count()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self._forward_tokens = 0  # tokens of the batch in the forward now
        self._measured: collections.deque[tuple[int, float]] = collections.deque(maxlen=RATE_WINDOW)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _cost_model(self) -> tuple[float, float] | None:
        """(seconds per forward, seconds per token) fitted to the recent forwards; None before MIN_FORWARDS."""
        if len(self._measured) < MIN_FORWARDS:
            return None
        tokens = np.array([t for t, _ in self._measured], dtype=np.float64)
        seconds = np.array([s for _, s in self._measured], dtype=np.float64)
        if np.ptp(tokens) > 0:
            per_token, per_forward = np.polyfit(tokens, seconds, 1)
            if per_token > 0:
                return max(float(per_forward), 0.0), float(per_token)
        return 0.0, float(seconds.sum() / tokens.sum())

    def estimated_wait(self, tokens: int) -> float | None:
        """Seconds until ``tokens`` more would be scored: everything queued and in the forward first, in
        batches of the token budget, at the measured cost (None until MIN_FORWARDS forwards were timed)."""
        model = self._cost_model()
        if model is None:
            return None
        per_forward, per_token = model
        ahead = self._queued_tokens + self._forward_tokens + tokens
        return -(-ahead // self.max_batch_tokens) * per_forward + ahead * per_token

    async def submit(self, seqs: Sequence[np.ndarray], top_k: int, within_s: float | None = None,
                     gather: Sequence[Gather | None] | None = None) -> list[ScoreOutput]:
        """Queues the sequences and waits for their scores. Raises QueueFull when over the token bound, and
        Overloaded when ``within_s`` (the caller's time left, read just before this call: it is compared
        before any await) is shorter than the estimated wait."""
        tokens = sum(len(s) for s in seqs)
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise QueueFull(f"{self._queued_tokens} tokens are queued; the limit is {self.max_queue_tokens}")
        wait = self.estimated_wait(tokens) if within_s is not None else None
        if wait is not None and within_s is not None and wait > HEADROOM * within_s:
            raise Overloaded(f"about {wait:.1f} s of work is queued ahead of this request and its deadline "
                             f"leaves {within_s:.1f} s")
        loop = asyncio.get_running_loop()
        gathers = gather if gather is not None else [None] * len(seqs)
        items = [_Item(len(s), next(self._counter), s, top_k, loop.create_future(), g)
                 for s, g in zip(seqs, gathers, strict=True)]
        for item in items:
            bisect.insort(self._pending, item)
        self._queued_tokens += tokens
        self._update_gauges()
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            self._drop(items)

    def _drop(self, items: list[_Item]) -> None:
        """Cancels the items not scored yet (the caller went away) and takes them out of the queue now,
        so the queue gauges and the overload estimate never count work nobody waits for."""
        for item in items:
            item.future.cancel()  # no-op when done (gather cancels them too when the caller is cancelled)
        if any(item.future.cancelled() for item in items):
            self._pending = [i for i in self._pending if not i.future.done()]
            self._queued_tokens = sum(i.length for i in self._pending)
            self._update_gauges()

    def _take_batch(self) -> list[_Item]:
        self._pending = [i for i in self._pending if not i.future.done()]
        self._queued_tokens = sum(i.length for i in self._pending)
        if not self._pending:
            return []
        anchor = min(range(len(self._pending)), key=lambda j: self._pending[j].seq)
        lo, hi = pick_window([i.length for i in self._pending], anchor, self.max_batch_tokens, self.max_batch_texts)
        batch = self._pending[lo:hi + 1]
        del self._pending[lo:hi + 1]
        self._queued_tokens -= sum(i.length for i in batch)
        self._update_gauges()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._take_batch()
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            top_k = max(i.top_k for i in batch)
            t0 = self._clock()
            self._forward_tokens = sum(i.length for i in batch)
            gathers = [i.gather for i in batch]
            args = (top_k, gathers) if any(g is not None for g in gathers) else (top_k,)
            try:
                outs = await loop.run_in_executor(self._executor, self._score, [i.ids for i in batch], *args)
            except Exception as exc:  # a failed forward fails its requests, never the server
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._forward_tokens = 0
            self._observe(batch, self._clock() - t0)
            for item, out in zip(batch, outs, strict=True):
                if not item.future.done():
                    item.future.set_result(_slice_k(out, item.top_k))

    def _observe(self, batch: list[_Item], seconds: float) -> None:
        self._measured.append((sum(i.length for i in batch), seconds))
        if self._metrics is not None:
            self._metrics.batch_tokens.observe(len(batch) * batch[-1].length)
            self._metrics.batch_seconds.observe(seconds)

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_texts.set(len(self._pending))
            self._metrics.queue_tokens.set(self._queued_tokens)


def _slice_k(out: ScoreOutput, k: int) -> ScoreOutput:
    if out.topk_ids.shape[1] == k:
        return out
    return replace(out, topk_ids=out.topk_ids[:, :k], topk_logprobs=out.topk_logprobs[:, :k])
