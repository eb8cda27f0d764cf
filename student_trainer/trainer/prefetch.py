"""Prefetch: fetch every source's distributions for the next micro-batches in parallel, align and fuse
them off the training thread, and hand the trainer ready tensors in order. Rollout micro-batches (on-policy)
need the current weights, so they are not prefetched: ``rollouts`` generates and scores them in the step."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from student_trainer.core.alignment import (
    ALIGNERS,
    SparseTargets,
    TeacherOutput,
    Tokens,
    lookup,
    one_hot_next,
    stack_targets,
    with_gathered,
)
from student_trainer.core.fusion import FUSIONS, SEQUENCE_CE
from student_trainer.trainer.config import MethodConfig
from student_trainer.trainer.data.blocks import Batch, loss_mask
from student_trainer.trainer.sources import Source
from student_trainer.trainer.stats import FusionStats, RolloutStats, SourceStats
from student_trainer.trainer.stopping import Interrupted, StopFlag


@dataclass
class FusedBatch:
    """One micro-batch ready for the step. Arrays are numpy; the trainer moves them to the device."""

    batch: Batch
    loss_mask: np.ndarray                   # (B, T) bool: positions with a real next token
    fuse_ids: np.ndarray | None             # (B, T, K) int64
    fuse_logprobs: np.ndarray | None        # (B, T, K) float32, -inf = no entry
    stats: FusionStats
    aligned: np.ndarray | None = None       # (B, T) bool: a source distribution, not the one-hot fallback
    fetched_at: float = 0.0                 # perf_counter when every source had answered (0: no fetch)
    rollout: RolloutStats | None = None     # set for the student's own samples (loss_mask: what the loss covers)


@dataclass(frozen=True)
class GatherPlan:
    """One sequence's ask for the teachers' log-probs at the student's candidate tokens (on-policy reverse KL /
    JSD): ``positions (m,)`` target positions, ``ends (m,)`` the character where each one's token ends (strictly
    increasing: where a teacher token must end to have read the same text), ``candidates (m, c)`` target ids."""

    positions: np.ndarray
    ends: np.ndarray
    candidates: np.ndarray

    def for_source(self, source: Source) -> tuple[np.ndarray, np.ndarray]:
        """The candidates as the source's ids (-1: no exact counterpart, left out and counted)."""
        assert source.counterparts is not None, "a source connected without gather"
        return self.ends, lookup(source.counterparts, self.candidates, -1)


def fuse_sequence(tokens: Tokens, outputs: Sequence[TeacherOutput | None], sources: Sequence[Source],
                  method: MethodConfig, gather: GatherPlan | None = None
                  ) -> tuple[SparseTargets, np.ndarray, int, list[float]]:
    """Aligns each present source to the target tokens and fuses; with ``gather``, each source's log-probs at the
    student's candidates join its aligned rows first (a union with its top-k).

    Returns (targets, weights (N,), winner or -1 when no source answered, each source's CE (NaN: absent)).
    """
    align, ce_fn = ALIGNERS[method.aligner], SEQUENCE_CE[method.ce_normalization]
    targets: list[SparseTargets | None] = []
    ces: list[float] = []
    for out, source in zip(outputs, sources, strict=True):
        if out is None or len(out.tokens.ids) < 2:
            targets.append(None)
            ces.append(float("nan"))
            continue
        aligned = align(tokens, out, source.pair)
        if gather is not None and out.gathered_logprobs is not None:
            ids = np.where(gather.for_source(source)[1] >= 0, gather.candidates, -1)
            aligned = with_gathered(aligned, gather.positions, ids, out.gathered_logprobs)
        targets.append(aligned)
        ces.append(ce_fn(out.next_logprobs, out.tokens.offsets))
    if all(t is None for t in targets):
        return one_hot_next(tokens.ids, 1), np.zeros(len(sources)), -1, ces
    fused = FUSIONS[method.fusion](targets, ces, weighting=method.avg_weighting, temperature=method.avg_tau)
    return fused.targets, fused.weights, fused.winner, ces


def fuse_batch(batch: Batch, sources: Sequence[Source], method: MethodConfig, pool: ThreadPoolExecutor,
               gather: Sequence[GatherPlan] | None = None) -> FusedBatch:
    """Fetches all sources in parallel for one micro-batch, aligns and fuses every sequence; ``gather``: one plan
    per sequence (on-policy reverse KL / JSD)."""
    mask = loss_mask(batch.attention_mask)
    stats = FusionStats(micro_batches=1, sequences=len(batch.blocks))
    if not sources:
        return FusedBatch(batch, mask, None, None, stats)
    texts = [b.text for b in batch.blocks]
    t0 = time.perf_counter()
    asks = [None if gather is None else [plan.for_source(s) for plan in gather] for s in sources]
    timed = [f.result() for f in [pool.submit(_timed_fetch, s, texts, ask) for s, ask in zip(sources, asks,
                                                                                              strict=True)]]
    outputs = [out for out, _ in timed]
    stats.teacher_seconds = time.perf_counter() - t0
    per_source = {s.name: SourceStats(latency_s=seconds) for s, (_, seconds) in zip(sources, timed, strict=True)}
    seq_targets = []
    for i, block in enumerate(batch.blocks):
        per_seq = [None if o is None else o[i] for o in outputs]
        targets, weights, winner, ces = fuse_sequence(Tokens(block.ids, block.offsets), per_seq, sources, method,
                                                      None if gather is None else gather[i])
        seq_targets.append(_pad_rows(targets, batch.input_ids.shape[1]))
        stats.no_teacher_sequences += winner < 0
        for s, source in enumerate(sources):
            one = per_source[source.name]
            one.selected += winner == s
            one.weight += float(weights[s])
            one.skipped += per_seq[s] is None
            if np.isfinite(ces[s]):
                one.ce_sum, one.ce_count = one.ce_sum + ces[s], one.ce_count + 1
        stats.aligned_positions += int(targets.aligned[: len(block.ids) - 1].sum())
        stats.predicted_positions += max(len(block.ids) - 1, 0)
    ids, logprobs, aligned = stack_targets(seq_targets)
    stats.sources = per_source
    stats.fuse_seconds = time.perf_counter() - t0
    return FusedBatch(batch, mask, ids, logprobs, stats, aligned, t0 + stats.teacher_seconds)


def _timed_fetch(source: Source, texts: list[str], gather: list[tuple[np.ndarray, np.ndarray]] | None
                 ) -> tuple[list[TeacherOutput] | None, float]:
    t0 = time.perf_counter()
    return source.fetch(texts, gather), time.perf_counter() - t0


def _pad_rows(targets: SparseTargets, length: int) -> SparseTargets:
    """Extends a sequence's targets to the padded batch length with empty rows."""
    extra = length - targets.ids.shape[0]
    if extra <= 0:
        return targets
    k = targets.ids.shape[1]
    return SparseTargets(np.concatenate([targets.ids, np.zeros((extra, k), np.int64)]),
                         np.concatenate([targets.logprobs, np.full((extra, k), -np.inf, np.float32)]),
                         np.concatenate([targets.aligned, np.zeros(extra, bool)]))


def waited(future: Future[FusedBatch], stop: StopFlag | None) -> tuple[FusedBatch, float, float]:
    """The future's micro-batch, the seconds waited for it, and of those the seconds after its teachers had
    answered (aligning and fusing). With ``stop``, waiting raises Interrupted as soon as a stop is requested."""
    t0 = time.perf_counter()
    while True:
        try:
            fused = future.result(timeout=None if stop is None else 0.2)
            break
        except FutureTimeout:
            if stop is not None and stop.requested:
                raise Interrupted("stop requested while waiting for the teachers") from None
    t1 = time.perf_counter()
    return fused, t1 - t0, max(0.0, t1 - max(t0, fused.fetched_at)) if fused.fetched_at else 0.0


class Prefetcher:
    """Keeps ``depth`` micro-batches in preparation; ``get`` returns them in index order. Indices for which
    ``rollout`` is true are left out (their step generates them; ``get`` returns the next corpus one)."""

    def __init__(self, make_batch: Callable[[int], Batch], sources: Sequence[Source], method: MethodConfig,
                 start_index: int, depth: int, rollout: Callable[[int], bool] | None = None) -> None:
        self._make_batch, self._sources, self._method = make_batch, list(sources), method
        self._rollout = rollout
        self._workers = ThreadPoolExecutor(max(depth, 1), thread_name_prefix="prefetch")
        self._fetchers = ThreadPoolExecutor(max(len(self._sources) * max(depth, 1), 1), thread_name_prefix="fetch")
        self._next = start_index
        self._queue: deque[Future[FusedBatch]] = deque()
        self._depth = depth
        self.wait_seconds = 0.0  # time the training thread spent waiting on get()
        self.fuse_wait_seconds = 0.0  # of which, after the teachers had answered

    def _fill(self) -> None:
        while len(self._queue) < self._depth:
            if self._rollout is None or not self._rollout(self._next):
                self._queue.append(self._workers.submit(self._job, self._next))
            self._next += 1

    def _job(self, index: int) -> FusedBatch:
        return fuse_batch(self._make_batch(index), self._sources, self._method, self._fetchers)

    def get(self, stop: StopFlag | None = None) -> FusedBatch:
        """The next micro-batch; with ``stop``, waiting raises Interrupted as soon as a stop is requested."""
        self._fill()
        fused, wait, fuse_wait = waited(self._queue.popleft(), stop)
        self.wait_seconds += wait
        self.fuse_wait_seconds += fuse_wait
        self._fill()
        return fused

    def close(self) -> None:
        """Cancels queued work without waiting for jobs already talking to the teachers (see ``join``)."""
        for f in self._queue:
            f.cancel()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._fetchers.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Waits for the running jobs (close their sources first, so that they end at once)."""
        self._workers.shutdown(wait=True)
        self._fetchers.shutdown(wait=True)
