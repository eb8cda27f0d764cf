"""Fusion: one source fuses to itself, MinCE selection, AvgCE weights and mixture, per-char CE."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from student_trainer.core.alignment import SparseTargets
from student_trainer.core.fusion import (
    FUSIONS,
    SEQUENCE_CE,
    ce_per_char,
    ce_per_token,
    fuse_avg_ce,
    fuse_min_ce,
    paper_weights,
    softmax_weights,
)


def random_targets(rng: np.random.Generator, rows: int, k: int, vocab: int = 30) -> SparseTargets:
    """Rows of k distinct ids with normalised probabilities, sorted descending."""
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)])
    lp = np.sort(np.log(rng.dirichlet(np.ones(k), rows)), axis=1)[:, ::-1].astype(np.float32)
    return SparseTargets(ids.astype(np.int64), lp, rng.random(rows) < 0.7)


def as_dicts(t: SparseTargets) -> list[dict[int, float]]:
    """Row → {id: probability} over kept entries."""
    out = []
    for ids, lp in zip(t.ids, t.logprobs, strict=True):
        keep = np.isfinite(lp)
        out.append(dict(zip(ids[keep].tolist(), np.exp(lp[keep]).tolist(), strict=True)))
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(FUSIONS)), st.sampled_from(["paper", "softmax"]),
       st.floats(0.0, 10.0))
def test_one_source_fuses_to_itself(seed, name, weighting, ce):
    src = random_targets(np.random.default_rng(seed), rows=6, k=5)
    fused = FUSIONS[name]([src], [ce], weighting=weighting)
    assert fused.winner == 0 and fused.weights.tolist() == [1.0]
    got, want = as_dicts(fused.targets), as_dicts(src)
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    assert all(np.allclose([g[i] for i in sorted(g)], [w[i] for i in sorted(w)], rtol=1e-5)
               for g, w in zip(got, want, strict=True))
    assert np.array_equal(fused.targets.aligned, src.aligned)


def test_min_ce_picks_lowest_and_skips_missing_sources():
    rng = np.random.default_rng(0)
    a, b, c = (random_targets(rng, 4, 3) for _ in range(3))
    assert fuse_min_ce([a, b, c], [2.0, 1.5, 1.7]).winner == 1
    fused = fuse_min_ce([a, None, c], [2.0, 0.1, 1.7])  # the best source is missing for this text
    assert fused.winner == 2 and fused.targets is c and fused.weights.tolist() == [0, 0, 1]
    assert fuse_min_ce([a, b, c], [2.0, float("nan"), 1.7]).winner == 2
    with pytest.raises(ValueError, match="no source"):
        fuse_avg_ce([None, None], [1.0, 1.0])


def test_avg_ce_paper_weights_are_near_uniform_softmax_weights_are_not():
    """Defect: softmax over exp(-CE) barely separates sources; softmax(-CE/τ) does."""
    ce = np.array([1.0, 3.0])
    paper = paper_weights(ce)
    assert np.allclose(paper, np.exp(np.exp(-ce)) / np.exp(np.exp(-ce)).sum())
    assert abs(paper[0] - paper[1]) < 0.2
    sharp = softmax_weights(ce, temperature=0.5)
    assert np.allclose(sharp, np.exp(-ce / 0.5) / np.exp(-ce / 0.5).sum()) and sharp[0] > 0.98
    assert np.allclose(softmax_weights(ce, 1e6), [0.5, 0.5], atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4), arrays(np.float64, 4, elements=st.floats(0.5, 5.0)),
       st.floats(0.1, 5.0))
def test_avg_ce_is_the_weighted_mixture(seed, n, ce, tau):
    rng = np.random.default_rng(seed)
    sources = [random_targets(rng, 5, k=int(rng.integers(2, 6)), vocab=8) for _ in range(n)]
    fused = fuse_avg_ce(sources, ce[:n], weighting="softmax", temperature=tau)
    w = softmax_weights(ce[:n], tau)
    assert np.allclose(fused.weights, w) and fused.winner == int(np.argmin(ce[:n]))
    assert fused.targets.ids.shape[1] == sum(s.ids.shape[1] for s in sources)
    for row, got in enumerate(as_dicts(fused.targets)):
        want: dict[int, float] = {}
        for wn, src in zip(w, sources, strict=True):
            for i, p in as_dicts(src)[row].items():
                want[i] = want.get(i, 0.0) + wn * p
        assert sorted(got) == sorted(want)
        assert np.allclose([got[i] for i in want], list(want.values()), rtol=1e-5, atol=1e-7)
        assert np.isclose(sum(got.values()), 1.0, rtol=1e-5)  # normalised sources → mixture sums to 1
    assert np.array_equal(fused.targets.aligned, np.any([s.aligned for s in sources], axis=0))


def test_ce_per_char_is_fair_across_tokenizer_granularity():
    """Defect: per-token CE favours the finer tokenizer for the same total surprise on the same text."""
    text_len = 40
    coarse_off = np.array([[i * 4, i * 4 + 4] for i in range(10)])  # 10 tokens of 4 chars
    fine_off = np.array([[i * 2, i * 2 + 2] for i in range(20)])  # 20 tokens of 2 chars
    coarse_lp = np.full(9, -4.0)  # 36 nats over chars 4..40
    fine_lp = np.full(19, -36.0 / 19 * (38 / 36))  # the same nats per char over chars 2..40
    assert ce_per_token(fine_lp, fine_off) < ce_per_token(coarse_lp, coarse_off) / 1.5
    assert np.isclose(ce_per_char(fine_lp, fine_off), ce_per_char(coarse_lp, coarse_off))
    assert np.isclose(ce_per_char(coarse_lp, coarse_off), 36.0 / (text_len - 4))
    assert set(SEQUENCE_CE) == {"token", "char"}


def test_unknown_names_fail_with_valid_ones():
    with pytest.raises(ValueError, match="softmax"):
        fuse_avg_ce([random_targets(np.random.default_rng(0), 2, 2)], [1.0], weighting="uniform")
