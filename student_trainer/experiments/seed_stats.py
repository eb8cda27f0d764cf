"""The arithmetic of a multi-seed comparison (``compare.py``), apart from any I/O: metrics.jsonl parsed,
mean ± sd per mode, per-seed paired differences against a baseline, evaluation curves against training
tokens, and how many tokens a curve needs to reach a given perplexity. Seeds are ints everywhere in Python;
only JSON files spell them as strings (the records that write them convert, in one place)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# scores[mode][seed][metric], e.g. scores["min_ce"][0]["code_ppl"]
Scores = dict[str, dict[int, dict[str, float]]]
# curves[mode][seed]: (training tokens so far, validation perplexity) per evaluation
Curves = dict[str, dict[int, list[tuple[float, float]]]]


@dataclass(frozen=True)
class Metrics:
    """A run's metrics.jsonl: step records and evaluations ``(step, {name: value})`` in file order."""

    steps: list[dict[str, float]]
    evals: list[tuple[int, dict[str, float]]]


def parse_metrics(text: str) -> Metrics:
    steps, evals = [], []
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            if "eval" in record:
                evals.append((int(record["step"]), record["eval"]))
            else:
                steps.append(record)
    return Metrics(steps, evals)


def curve_points(metrics: Metrics, key: str) -> list[tuple[float, float]]:
    """(training tokens seen when the evaluation ran, its ``key``) for every evaluation of the run."""
    seen, total = {0: 0.0}, 0.0
    for record in metrics.steps:
        total += float(record.get("tokens", 0.0))
        seen[int(record["step"])] = total
    return [(seen.get(step, total), float(values[key])) for step, values in metrics.evals if key in values]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired_changes(base: Mapping[int, float], other: Mapping[int, float]) -> list[float]:
    """Per seed present in both, the relative change ``100 · (other / base − 1)`` in percent."""
    return [100.0 * (other[s] / base[s] - 1.0) for s in sorted(set(base) & set(other))]


@dataclass(frozen=True)
class Gain:
    """The paired differences of one mode against the baseline on one metric."""

    changes: list[float]  # percent, per seed; negative = lower (better) perplexity than the baseline

    @property
    def mean_sd(self) -> tuple[float, float]:
        return mean_sd(self.changes)

    @property
    def wins(self) -> int:
        return sum(c < 0 for c in self.changes)

    @property
    def beyond_two_sd(self) -> bool:
        """Two seeds or more, lower than the baseline in every one, by more than twice the sd of the changes."""
        mean, sd = self.mean_sd
        return self.wins == len(self.changes) > 1 and -mean > 2 * sd


def gains(scores: Scores, metric: str, baseline: str) -> dict[str, Gain]:
    """Every other mode's paired changes against ``baseline`` on ``metric``."""
    base = {s: row[metric] for s, row in scores[baseline].items()}
    return {mode: Gain(paired_changes(base, {s: row[metric] for s, row in runs.items()}))
            for mode, runs in scores.items() if mode != baseline}


def _cell(values: Sequence[float], digits: int = 1) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _head(metrics: Sequence[str]) -> str:
    return "| mode | " + " | ".join(metrics) + " |\n| --- |" + " ---: |" * len(metrics) + "\n"


def paired_table(scores: Scores, metrics: Sequence[str], baseline: str) -> str:
    """Markdown: each mode's paired change against ``baseline``, mean ± sd over seeds, wins, and a ✓ where
    the mode is lower in every seed by more than 2 sd of the paired changes."""
    n = max(len(runs) for runs in scores.values())
    per_metric = {m: gains(scores, m, baseline) for m in metrics}
    rows = ""
    for mode in scores:
        if mode != baseline:
            cells = [f"{_cell(g.changes, 2)}% ({g.wins}/{len(g.changes)}){' ✓' if g.beyond_two_sd else ''}"
                     for g in (per_metric[m][mode] for m in metrics)]
            rows += f"| {mode} | " + " | ".join(cells) + " |\n"
    note = "\n✓ = lower in every seed, and the mean change exceeds 2 sd of the paired changes.\n" if n > 1 else ""
    return (f"Paired change against {baseline} (per seed: 100 · (mode / {baseline} − 1); mean ± sd over {n} "
            f"seed(s); in brackets the seeds where the mode is lower):\n\n" + _head(metrics) + rows + note)


def comparison_tables(scores: Scores, metrics: Sequence[str], baseline: str) -> str:
    """Markdown: mean ± sd of every metric per mode, then :func:`paired_table`."""
    n = max(len(runs) for runs in scores.values())
    rows = "".join(f"| {mode} | " + " | ".join(_cell([r[m] for r in runs.values()]) for m in metrics) + " |\n"
                   for mode, runs in scores.items())
    return f"Mean ± sd over {n} seed(s):\n\n" + _head(metrics) + rows + "\n" + paired_table(scores, metrics, baseline)


def tokens_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """Training tokens at which a (tokens, perplexity) curve first reaches ``target``, linearly
    interpolated between evaluations; None if it never does."""
    prev: tuple[float, float] | None = None
    for tokens, value in points:
        if value <= target:
            if prev is None or prev[1] == value:
                return tokens
            frac = (prev[1] - target) / (prev[1] - value)
            return prev[0] + frac * (tokens - prev[0])
        prev = (tokens, value)
    return None


def mean_curve(curves: Mapping[int, Sequence[tuple[float, float]]]) -> tuple[np.ndarray, ...]:
    """Seeds' curves evaluated at the same steps → (tokens, mean, min, max) over seeds, as arrays."""
    length = min(len(c) for c in curves.values())
    arr = np.array([[p for p in c[:length]] for c in curves.values()], np.float64)  # (seeds, points, 2)
    values = arr[:, :, 1]
    return arr[:, :, 0].mean(0), values.mean(0), values.min(0), values.max(0)


def share_to_reach(fusion: Mapping[int, Sequence[tuple[float, float]]],
                   baseline: Mapping[int, Sequence[tuple[float, float]]]) -> float:
    """Fraction of the baseline's training tokens after which the fusion mode's mean curve reaches the
    baseline's mean final value (nan if it never does)."""
    tokens, mean, _, _ = mean_curve(fusion)
    b_tokens, b_mean, _, _ = mean_curve(baseline)
    reached = tokens_to_reach(list(zip(tokens.tolist(), mean.tolist(), strict=True)), float(b_mean[-1]))
    return math.nan if reached is None else reached / float(b_tokens[-1])
