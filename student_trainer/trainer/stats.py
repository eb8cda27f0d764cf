"""What the trainer learns about fusion, as typed records: per micro-batch from ``prefetch.fuse_batch`` (and
``rollouts`` for the student's own samples), summed over a step by the loop, summed over a window by the text
summary, flattened once for metrics.jsonl.

Counts are kept as sums (sequences, positions, seconds) so any number of records add up exactly; rates
and means are taken only when a record is shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


@dataclass
class SourceStats:
    """One source over some sequences: sums, turned into rates by :meth:`FusionStats.metrics`."""

    selected: int = 0       # sequences where it had the lowest CE (MinCE's pick; AvgCE's largest weight)
    weight: float = 0.0     # summed fusion weight
    skipped: int = 0        # sequences without its output (policy ``skip``)
    ce_sum: float = 0.0     # summed per-sequence CE where it answered
    ce_count: int = 0
    latency_s: float = 0.0  # seconds fetching its outputs, summed over micro-batches

    def __add__(self, other: SourceStats) -> SourceStats:
        return SourceStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def rates(self, sequences: int, micro_batches: int) -> dict[str, float]:
        """Shares of ``sequences`` (selected, weight, skipped), mean CE, latency per micro-batch: the one
        place these are computed (metrics.jsonl and the text summary both read them)."""
        seqs, micro = max(sequences, 1), max(micro_batches, 1)
        return {"selected": self.selected / seqs, "weight": self.weight / seqs, "skipped": self.skipped / seqs,
                "ce": self.ce_sum / self.ce_count if self.ce_count else math.nan, "latency": self.latency_s / micro}


@dataclass
class FusionStats:
    """One micro-batch (or the sum of several): what fetching, aligning and fusing found."""

    micro_batches: int = 0
    sequences: int = 0
    predicted_positions: int = 0  # target positions with a next token
    aligned_positions: int = 0    # of those, filled by a source distribution (not the one-hot fallback)
    no_teacher_sequences: int = 0
    teacher_seconds: float = 0.0  # wall time of the parallel fetch
    fuse_seconds: float = 0.0  # fetch + align + fuse
    sources: dict[str, SourceStats] = field(default_factory=dict)

    def __add__(self, other: FusionStats) -> FusionStats:
        names = list(dict.fromkeys([*self.sources, *other.sources]))
        summed = {n: self.sources.get(n, SourceStats()) + other.sources.get(n, SourceStats()) for n in names}
        plain = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self) if f.name != "sources"}
        return FusionStats(**plain, sources=summed)

    @staticmethod
    def total(records: list[FusionStats]) -> FusionStats:
        out = FusionStats()
        for r in records:
            out = out + r
        return out

    @property
    def aligned_share(self) -> float:
        """Predicted positions filled by a source distribution (not the one-hot fallback)."""
        return self.aligned_positions / max(self.predicted_positions, 1)

    def source_rates(self) -> dict[str, dict[str, float]]:
        """Per source, :meth:`SourceStats.rates` over these sequences and micro-batches."""
        return {name: s.rates(self.sequences, self.micro_batches) for name, s in self.sources.items()}

    def metrics(self) -> dict[str, float]:
        """Rates and means, flat (``selected/<source>``, ...): the keys of metrics.jsonl and TensorBoard."""
        out = {"aligned_share": self.aligned_share, "no_teacher_sequences": float(self.no_teacher_sequences),
               "teacher_seconds": self.teacher_seconds, "fuse_seconds": self.fuse_seconds}
        for name, rates in self.source_rates().items():
            out.update({f"{key}/{name}": value for key, value in rates.items()})
        return out


@dataclass
class RolloutStats:
    """The student's own samples (on-policy micro-batches): what was generated and what the loss covered."""

    micro_batches: int = 0
    sequences: int = 0
    new_tokens: int = 0              # continuation tokens kept (up to the first special token the student sampled)
    continuation_positions: int = 0  # positions that predict a continuation token
    trained_positions: int = 0       # of those, where a source distribution was aligned: the loss covers these
    gather_candidates: int = 0       # reverse_kl / jsd: candidate tokens asked of the teachers (summed over them)
    gather_no_counterpart: int = 0   # of those, left out: no exact counterpart in that teacher's vocabulary

    def __add__(self, other: RolloutStats) -> RolloutStats:
        return RolloutStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def unaligned_positions(self) -> int:
        """Continuation positions left out: no source distribution there, and the one-hot fallback would
        teach the student its own sample."""
        return self.continuation_positions - self.trained_positions

    def metrics(self) -> dict[str, float]:
        out = {"rollouts": float(self.micro_batches), "rollout_new_tokens": float(self.new_tokens),
               "rollout_trained_positions": float(self.trained_positions),
               "rollout_unaligned_positions": float(self.unaligned_positions)}
        if self.gather_candidates:
            out["gather_no_counterpart_share"] = self.gather_no_counterpart / self.gather_candidates
        return out


@dataclass
class StepRecord:
    """One optimizer step: losses (means over the step's predicted tokens), speed and the fusion stats.

    ``loss = λ·clm_loss + (1−λ)·fusion_loss + on_policy_loss``: every part is a sum over the step's positions
    divided by the step's token count (corpus loss positions + the rollouts' continuation positions). The step's
    time splits into ``generate_seconds`` (rollouts), ``teacher_wait_seconds`` (waiting for teacher outputs,
    of which ``fuse_wait_seconds`` waited for aligning and fusing once the teachers had answered),
    ``train_seconds`` (forward, backward, optimizer) and the rest (the step's all-reduce, bookkeeping).
    """

    step: int
    loss: float
    clm_loss: float
    fusion_loss: float
    tokens: float
    step_seconds: float = 0.0
    teacher_wait_seconds: float = 0.0  # time the training thread waited for teacher outputs (corpus and rollouts)
    lr: float = 0.0
    fusion: FusionStats = field(default_factory=FusionStats)
    on_policy_loss: float = 0.0        # the divergence on the rollouts' continuations
    generate_seconds: float = 0.0
    fuse_wait_seconds: float = 0.0     # part of teacher_wait_seconds: the teachers had answered, fusion had not
    train_seconds: float = 0.0
    rollouts: RolloutStats = field(default_factory=RolloutStats)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.step_seconds, 1e-9)

    def metrics(self) -> dict[str, float]:
        """The flat record of metrics.jsonl (without ``step`` and ``time``)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("step", "fusion", "rollouts")}
        return {**plain, "tokens_per_s": self.tokens_per_s, **self.fusion.metrics(), **self.rollouts.metrics()}


def summary(records: list[StepRecord]) -> str:
    """One text block over the steps since the last summary: the numbers a dashboard would show."""
    seconds = sum(r.step_seconds for r in records) or 1e-9
    wait = sum(r.teacher_wait_seconds for r in records)
    tokens = sum(r.tokens for r in records)
    fused = FusionStats.total([r.fusion for r in records])
    loss, clm, fuse = (sum(getattr(r, k) for r in records) / len(records) for k in ("loss", "clm_loss", "fusion_loss"))
    lines = [f"summary steps {records[0].step}-{records[-1].step}: loss {loss:.4f} (clm {clm:.4f}, "
             f"fusion {fuse:.4f}), {tokens / seconds:.0f} tokens/s, waited for teachers "
             f"{100 * wait / seconds:.1f}% of the time, aligned positions {100 * fused.aligned_share:.1f}%"]
    for name, r in fused.source_rates().items():
        lines.append(f"  source {name}: latency {r['latency']:.3f}s/micro-batch, CE {r['ce']:.3f}, "
                     f"selected {100 * r['selected']:.1f}%, weight {r['weight']:.3f}, "
                     f"skipped {100 * r['skipped']:.1f}%")
    return "\n".join(lines + _on_policy_lines(records, seconds))


def _on_policy_lines(records: list[StepRecord], seconds: float) -> list[str]:
    """The rollouts and the step's time split, when the window had rollouts (none: the summary is unchanged)."""
    rolled = sum((r.rollouts for r in records), RolloutStats())
    if not rolled.micro_batches:
        return []
    micro = sum(r.fusion.micro_batches for r in records)
    on_policy = sum(r.on_policy_loss for r in records) / len(records)
    return [f"  on-policy: loss {on_policy:.4f}, {rolled.micro_batches} rollouts "
            f"({100 * rolled.micro_batches / max(micro, 1):.1f}% of micro-batches), {rolled.new_tokens} new tokens, "
            f"trained positions {100 * rolled.trained_positions / max(rolled.continuation_positions, 1):.1f}% "
            f"(no source distribution: {rolled.unaligned_positions})",
            f"  step time: {time_split({k: sum(getattr(r, k) for r in records) for k in TIME_SPLIT}, seconds)}"]


TIME_SPLIT = ("generate_seconds", "teacher_wait_seconds", "fuse_wait_seconds", "train_seconds")


def time_split(parts: Mapping[str, float], total: float) -> str:
    """"generate x%, wait for teachers y%, align and fuse z%, train w%" of ``total`` seconds, from the
    :data:`TIME_SPLIT` sums (the wait for teachers excludes the aligning and fusing after they answered)."""
    share = {k: 100 * parts[k] / total for k in TIME_SPLIT}
    return (f"generate {share['generate_seconds']:.1f}%, wait for teachers "
            f"{share['teacher_wait_seconds'] - share['fuse_wait_seconds']:.1f}%, align and fuse "
            f"{share['fuse_wait_seconds']:.1f}%, train {share['train_seconds']:.1f}%")
