"""The token-budget batcher: windows fit the budget, the oldest text goes first, results are routed back,
cancelled texts never reach the model, and a full queue refuses instead of growing."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teacher_server.backends.base import ScoreOutput
from teacher_server.batcher import QueueFull, TokenBudgetBatcher, pick_window


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


class RecordingScore:
    """Scores id sequences deterministically (top-1 id = the last id) and records each batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch, top_k):
        self.gate.wait(10)
        self.batches.append([len(s) for s in batch])
        return [ScoreOutput(np.full((len(s), top_k), s[-1], np.int32), np.zeros((len(s), top_k), np.float32),
                            np.zeros(len(s) - 1, np.float32)) for s in batch]


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
    score = RecordingScore()
    score.gate.clear()

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=50)
        batcher.start()
        first = asyncio.create_task(batcher.submit([np.arange(10)], 1))  # enters the (blocked) forward
        await asyncio.sleep(0.1)
        doomed = asyncio.create_task(batcher.submit([np.arange(33)], 1))
        waiting = asyncio.create_task(batcher.submit([np.arange(7)], 1))
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull):
            await batcher.submit([np.arange(20)], 1)  # 40 queued + 20 > 50
        doomed.cancel()
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
    from teacher_server.metrics import TeacherMetrics

    score, metrics = RecordingScore(), TeacherMetrics()
    score.gate.clear()

    def gauges() -> tuple[float | None, float | None]:
        return (metrics.registry.get_sample_value("livefuse_teacher_queue_texts"),
                metrics.registry.get_sample_value("livefuse_teacher_queue_tokens"))

    async def main():
        batcher = TokenBudgetBatcher(score, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=1000,
                                     metrics=metrics)
        batcher.start()
        first = asyncio.create_task(batcher.submit([np.arange(10)], 1))  # enters the (blocked) forward
        await asyncio.sleep(0.1)
        queued = [asyncio.create_task(batcher.submit([np.arange(n), np.arange(n + 1)], 1)) for n in (20, 30)]
        await asyncio.sleep(0.1)
        before = gauges()
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        after = gauges()  # no new request has arrived, the forward is still held
        score.gate.set()
        await first
        await batcher.stop()
        return before, after

    before, after = run(main())
    assert before == (4, 21 + 31 + 20 + 30)
    assert after == (0, 0)


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once():
    """The scoring rate is measured on real forwards; the work queued ahead decides, not the queue size."""
    import time

    from teacher_server.batcher import Overloaded

    score = RecordingScore()

    def slow(batch, top_k):  # 1 ms per padded token: 1,000 tokens/s
        time.sleep(0.001 * len(batch) * max(len(s) for s in batch))
        return score(batch, top_k)

    async def main():
        batcher = TokenBudgetBatcher(slow, max_batch_tokens=100, max_batch_texts=8, max_queue_tokens=100_000)
        batcher.start()
        for length in (20, 50, 80):
            assert batcher.estimated_wait(50) is None  # fewer than MIN_FORWARDS timed: nothing is refused
            await batcher.submit([np.arange(length)], 1)
        await batcher.submit([np.arange(50)], 1)
        assert 0.03 < batcher.estimated_wait(50) < 0.5  # ~1 ms per token
        backlog = [asyncio.create_task(batcher.submit([np.arange(50)], 1)) for _ in range(40)]  # ~2 s of work
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded, match="deadline"):
            await batcher.submit([np.arange(50)], 1, within_s=0.5)
        refused_after = time.perf_counter() - t0
        late_but_fine = await batcher.submit([np.arange(50)], 1, within_s=30.0)
        await asyncio.gather(*backlog)
        await batcher.stop()
        return refused_after, late_but_fine

    refused_after, out = run(main())
    assert refused_after < 0.5 and out[0].topk_ids.shape == (50, 1)
