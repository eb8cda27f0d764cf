"""The token-budget batcher: windows fit the budget, the oldest text goes first, results are routed back,
cancelled texts never reach the model, and a full queue refuses instead of growing."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teacher_server.backends.base import ScoreOutput
from teacher_server.batcher import Overloaded, QueueFull, TokenBudgetBatcher, pick_window
from teacher_server.metrics import TeacherMetrics


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), budget=st.integers(64, 512),
       max_texts=st.integers(1, 16), data=st.data())
def test_window_contains_anchor_fits_budget_and_is_maximal(lengths, budget, max_texts, data):
    lengths = sorted(lengths)
    anchor = data.draw(st.integers(0, len(lengths) - 1))
    lo, hi = pick_window(lengths, anchor, budget, max_texts)
    assert lo <= anchor <= hi
    count = hi - lo + 1
    assert count <= max_texts and (count == 1 or count * lengths[hi] <= budget)
    if count < max_texts:  # neither neighbour could have been added
        assert lo == 0 or (count + 1) * lengths[hi] > budget
        assert hi == len(lengths) - 1 or (count + 1) * lengths[hi + 1] > budget


def test_window_prefers_similar_lengths():
    assert pick_window([1, 2, 3, 10, 11, 12, 50], 4, 40, 10) == (3, 5)


class Clock:
    """Fake time for the batcher's forward timings."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingScore:
    """Scores id sequences deterministically (top-1 id = the last id) and records each batch. While ``gate``
    is clear a forward waits for it (``entered`` is set when a forward starts). With a ``clock``, a forward
    "takes" ``seconds_per_token`` per padded token of its fake time."""

    def __init__(self, clock: Clock | None = None, seconds_per_token: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.clock, self.seconds_per_token = clock, seconds_per_token

    def __call__(self, batch, top_k):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.batches.append([len(s) for s in batch])
        if self.clock is not None:
            self.clock.now += self.seconds_per_token * len(batch) * max(len(s) for s in batch)
        return [ScoreOutput(np.full((len(s), top_k), s[-1], np.int32), np.zeros((len(s), top_k), np.float32),
                            np.zeros(len(s) - 1, np.float32)) for s in batch]


async def entered(score: RecordingScore) -> None:
    """Until a forward is running (held at the gate)."""
    assert await asyncio.to_thread(score.entered.wait, 60), "no forward started"


async def until(condition, what: str) -> None:
    """Lets the event loop run until ``condition`` holds (the timeout only guards against a hang)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0)


def gauges(metrics: TeacherMetrics) -> tuple[float | None, float | None]:
    return (metrics.registry.get_sample_value("livefuse_teacher_queue_texts"),
            metrics.registry.get_sample_value("livefuse_teacher_queue_tokens"))


def run(coro):
    return asyncio.run(coro)


def test_results_go_back_to_their_callers_and_batches_fit_the_budget():
    score = RecordingScore()

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=40, max_batch_texts=8, max_queue_tokens=10_000)
        batcher.start()
        seqs = [np.arange(n) + 100 * n for n in (3, 17, 5, 9, 30, 1, 12)]
        outs = await asyncio.gather(*(batcher.submit([s], top_k=2) for s in seqs))
        await batcher.stop()
        return seqs, outs

    seqs, outs = run(main())
    for seq, (out,) in zip(seqs, outs, strict=True):
        assert out.topk_ids.shape == (len(seq), 2) and (out.topk_ids == seq[-1]).all()
    assert all(len(b) * max(b) <= 40 or len(b) == 1 for b in score.batches)
    assert sorted(n for b in score.batches for n in b) == sorted(len(s) for s in seqs)


def test_top_k_is_sliced_per_request():
    async def main():
        batcher = TokenBudgetBatcher(RecordingScore(), max_batch_tokens=100, max_batch_texts=8,
                                     max_queue_tokens=1000)
        batcher.start()
        a, b = await asyncio.gather(batcher.submit([np.arange(4)], 2), batcher.submit([np.arange(4)], 7))
        await batcher.stop()
        return a[0], b[0]

    a, b = run(main())
    assert a.topk_ids.shape == (4, 2) and b.topk_ids.shape == (4, 7)


def test_cancelled_texts_never_reach_the_model_and_full_queue_refuses():
    score, metrics = RecordingScore(), TeacherMetrics()
    score.gate.clear()

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=50,
                                     metrics=metrics)
        batcher.start()
        first = asyncio.create_task(batcher.submit([np.arange(10)], 1))
        await entered(score)  # the first text is in the (held) forward
        doomed = asyncio.create_task(batcher.submit([np.arange(33)], 1))
        waiting = asyncio.create_task(batcher.submit([np.arange(7)], 1))
        await until(lambda: gauges(metrics) == (2, 40), "both texts queued")
        with pytest.raises(QueueFull):
            await batcher.submit([np.arange(20)], 1)  # 40 queued + 20 > 50
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)  # its caller is gone before the forward ends
        score.gate.set()
        await asyncio.gather(first, waiting)
        await batcher.stop()

    run(main())
    assert sorted(n for b in score.batches for n in b) == [7, 10]


def test_a_failing_forward_fails_its_callers_and_the_batcher_goes_on():
    calls = []

    def flaky(batch, top_k):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return RecordingScore()(batch, top_k)

    async def main():
        batcher = TokenBudgetBatcher(flaky, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=1000)
        batcher.start()
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.submit([np.arange(5)], 1)
        out = await batcher.submit([np.arange(5)], 1)
        await batcher.stop()
        return out

    assert run(main())[0].topk_ids.shape == (5, 1)


def test_queue_gauges_drop_as_soon_as_queued_requests_are_cancelled():
    score, metrics = RecordingScore(), TeacherMetrics()
    score.gate.clear()

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=1000,
                                     metrics=metrics)
        batcher.start()
        first = asyncio.create_task(batcher.submit([np.arange(10)], 1))
        await entered(score)  # the first text is in the (held) forward
        queued = [asyncio.create_task(batcher.submit([np.arange(n), np.arange(n + 1)], 1)) for n in (20, 30)]
        await until(lambda: gauges(metrics)[0] == 4, "four texts queued")
        before = gauges(metrics)
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        after = gauges(metrics)  # no new request has arrived, the forward is still held
        score.gate.set()
        await first
        await batcher.stop()
        return before, after

    before, after = run(main())
    assert before == (4, 21 + 31 + 20 + 30)
    assert after == (0, 0)


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once():
    """The scoring cost is measured on the forwards (on a fake clock here: 1 ms per padded token); the work
    queued ahead and the deadline decide, not the queue size; the refusal comes while the forward is held."""
    clock, metrics = Clock(), TeacherMetrics()
    score = RecordingScore(clock, seconds_per_token=0.001)

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=100_000,
                                     metrics=metrics, clock=clock)
        batcher.start()
        for length in (20, 50, 80):
            assert batcher.estimated_wait(50) is None  # fewer than MIN_FORWARDS timed: nothing is refused
            await batcher.submit([np.arange(length)], 1, within_s=1e-9)
        await batcher.submit([np.arange(50)], 1)
        assert batcher.estimated_wait(50) == pytest.approx(0.050)  # 50 tokens at 1 ms, nothing ahead
        score.gate.clear()
        score.entered.clear()
        backlog = [asyncio.create_task(batcher.submit([np.arange(50)], 1)) for _ in range(40)]
        try:
            await entered(score)  # two of them (100 tokens) in the held forward
            await until(lambda: gauges(metrics) == (38, 38 * 50), "the rest queued")
            assert batcher.estimated_wait(50) == pytest.approx(2.050)  # 1,900 queued + 100 in the forward + 50
            too_late = asyncio.create_task(batcher.submit([np.arange(50)], 1, within_s=2.5))  # 2.05 > 80% of 2.5
            await until(lambda: too_late.done() or gauges(metrics)[0] > 38, "an answer or a place in the queue")
            assert too_late.done() and not score.gate.is_set(), "queued instead of refused at once"
            with pytest.raises(Overloaded, match="about 2.0 s of work .* its deadline leaves 2.5 s"):
                too_late.result()
            late_but_fine = asyncio.create_task(batcher.submit([np.arange(50)], 1, within_s=2.6))  # 2.05 <= 2.08
            await until(lambda: late_but_fine.done() or gauges(metrics)[0] > 38, "an answer or a place in the queue")
            assert not late_but_fine.done(), "refused, though its deadline leaves time for the work ahead"
        finally:
            score.gate.set()
            await asyncio.gather(*backlog)
        out = await late_but_fine
        await batcher.stop()
        return out

    assert run(main())[0].topk_ids.shape == (50, 1)
