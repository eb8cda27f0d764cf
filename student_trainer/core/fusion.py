"""Fusion of several sources' aligned distributions into one sparse target per sequence.

Pure maths on numpy arrays. Per sequence, each source's cross-entropy on the text (``SEQUENCE_CE``:
per token as in the paper, or per character, which is fair across tokenizers of different
granularity) decides: ``min_ce`` takes the source with the lowest CE, ``avg_ce`` mixes all sources'
probabilities with weights from CE (``AVG_WEIGHTS``: the paper's softmax over exp(-CE), which comes
out nearly uniform, or softmax(-CE/τ)). Any number of sources; a source missing for a sequence
(``None`` targets or NaN CE) is left out and the rest are fused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from student_trainer.core.alignment import SparseTargets, merge_duplicates, pad_width


@dataclass(frozen=True)
class Fused:
    """Fused targets of one sequence.

    ``weights (N,) float64`` — each source's share (one-hot of the winner for ``min_ce``, 0 for a
    missing source); ``winner`` — index of the lowest-CE source, for selection-rate logging.
    """

    targets: SparseTargets
    weights: np.ndarray
    winner: int


def ce_per_token(next_logprobs: np.ndarray, offsets: np.ndarray) -> float:
    """Mean negative log-prob of the predicted tokens (the paper's CE): ``next_logprobs (n-1,)``."""
    if len(next_logprobs) == 0:
        return float("nan")
    return float(-np.mean(next_logprobs, dtype=np.float64))


def predicted_chars(offsets: np.ndarray) -> int:
    """Characters covered by the predicted tokens 1..n-1 (token 1's start to the last token's end)."""
    return int(offsets[-1, 1]) - int(offsets[1, 0]) if len(offsets) > 1 else 0


def ce_per_char(next_logprobs: np.ndarray, offsets: np.ndarray) -> float:
    """Negative log-prob of the predicted tokens per character they cover: ``offsets (n, 2)``."""
    if len(next_logprobs) == 0:
        return float("nan")
    return float(-np.sum(next_logprobs, dtype=np.float64) / max(predicted_chars(offsets), 1))


SEQUENCE_CE: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "token": ce_per_token,
    "char": ce_per_char,
}


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def paper_weights(ce: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """FuseLLM's AvgCE weights, softmax(exp(-CE)): ``ce (N,)`` → ``(N,)``; ``temperature`` unused."""
    return _softmax(np.exp(-ce))


def softmax_weights(ce: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(-CE/τ): ``ce (N,)`` → ``(N,)``; τ → 0 approaches MinCE, τ → ∞ uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _softmax(-ce / temperature)


AVG_WEIGHTS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "paper": paper_weights,
    "softmax": softmax_weights,
}


def _present(targets: Sequence[SparseTargets | None], ce: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the sources present for this sequence and all CEs as ``(N,) float64``."""
    ce_arr = np.asarray(ce, dtype=np.float64)
    if len(ce_arr) != len(targets):
        raise ValueError(f"{len(targets)} sources but {len(ce_arr)} CE values")
    present = np.array([t is not None and np.isfinite(c) for t, c in zip(targets, ce_arr, strict=True)])
    if not present.any():
        raise ValueError("no source available for this sequence; fall back to alignment.one_hot_next")
    return np.flatnonzero(present), ce_arr


def fuse_min_ce(targets: Sequence[SparseTargets | None], ce: Sequence[float], *,
                weighting: str = "softmax", temperature: float = 1.0) -> Fused:
    """MinCE: the lowest-CE present source's targets (first on ties). ``weighting``/τ are unused."""
    idx, ce_arr = _present(targets, ce)
    winner = int(idx[np.argmin(ce_arr[idx])])
    weights = np.zeros(len(ce_arr))
    weights[winner] = 1.0
    chosen = targets[winner]
    assert chosen is not None
    return Fused(chosen, weights, winner)


def fuse_avg_ce(targets: Sequence[SparseTargets | None], ce: Sequence[float], *,
                weighting: str = "softmax", temperature: float = 1.0) -> Fused:
    """AvgCE: Σ_n w_n·p_n over the present sources, width Σ K_n; repeated ids have their mass summed.

    Probabilities are mixed at temperature 1 (the loss applies the teacher temperature afterwards).
    A row is ``aligned`` if any source's row is.
    """
    if weighting not in AVG_WEIGHTS:
        raise ValueError(f"unknown AvgCE weighting {weighting!r}; valid: {sorted(AVG_WEIGHTS)}")
    idx, ce_arr = _present(targets, ce)
    weights = np.zeros(len(ce_arr))
    weights[idx] = AVG_WEIGHTS[weighting](ce_arr[idx], temperature)
    present = [targets[i] for i in idx]
    with np.errstate(divide="ignore"):
        log_w = np.log(weights[idx])
    ids = np.concatenate([t.ids for t in present], axis=1)
    lp = np.concatenate([t.logprobs + np.float32(w) for t, w in zip(present, log_w, strict=True)], axis=1)
    ids, lp = merge_duplicates(np.where(np.isfinite(lp), ids, -1), lp)
    aligned = np.any([t.aligned for t in present], axis=0)
    fused = pad_width(SparseTargets(ids, lp, aligned), sum(t.ids.shape[1] for t in present))
    return Fused(fused, weights, int(idx[np.argmin(ce_arr[idx])]))


Fusion = Callable[..., Fused]
FUSIONS: dict[str, Fusion] = {"min_ce": fuse_min_ce, "avg_ce": fuse_avg_ce}
