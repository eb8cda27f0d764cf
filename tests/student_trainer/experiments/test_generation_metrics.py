"""The generation scores: a continuation's teacher NLL per character (only the tokens after the prompt), MinCE's
rule over sources, and the degeneration guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from student_trainer.core.fusion import predicted_chars
from student_trainer.experiments.generation_metrics import (
    continuation_sums,
    distinct_n,
    min_ce_sums,
    repeated_ngram_rate,
)

# "ab cd": tokens "ab" [0, 2), " " [2, 3), "cd" [3, 5); log-probs of tokens 1 and 2
OFFSETS = np.array([[0, 2], [2, 3], [3, 5]])
LOGPROBS = np.array([-1.0, -2.0])


def test_only_tokens_ending_after_the_prompt_count():
    assert continuation_sums(LOGPROBS, OFFSETS, start=3) == (2.0, 2.0)  # prompt "ab ": "cd" only
    assert continuation_sums(LOGPROBS, OFFSETS, start=2) == (3.0, 3.0)  # prompt "ab": " " and "cd"


def test_a_token_across_the_boundary_counts_whole_with_its_characters():
    assert continuation_sums(LOGPROBS, OFFSETS, start=4) == (2.0, 2.0)  # prompt "ab c": "cd" starts at 3


def test_nothing_after_the_prompt_is_zero():
    assert continuation_sums(LOGPROBS, OFFSETS, start=5) == (0.0, 0.0)


@given(st.lists(st.integers(1, 6), min_size=2, max_size=30), st.data())
def test_whole_text_is_the_evaluators_sum_and_a_cut_at_a_token_boundary_splits_it(lengths, data):
    """Start 0 = every predicted token over ``predicted_chars`` (the held-out evaluator's rule); a prompt ending
    at a token boundary leaves exactly the later tokens and characters."""
    ends = np.cumsum(lengths)
    offsets = np.stack([ends - lengths, ends], 1)
    logprobs = -np.random.default_rng(len(lengths)).random(len(lengths) - 1)
    nll, chars = continuation_sums(logprobs, offsets, start=0)
    assert nll == pytest.approx(-logprobs.sum()) and chars == predicted_chars(offsets)
    cut = data.draw(st.integers(1, len(lengths) - 1))  # the prompt is tokens 0..cut-1
    nll, chars = continuation_sums(logprobs, offsets, start=int(ends[cut - 1]))
    assert nll == pytest.approx(-logprobs[cut - 1:].sum()) and chars == ends[-1] - ends[cut - 1]


def test_min_ce_picks_per_continuation_the_lowest_nll_per_character():
    per_source = {"a": [(10.0, 10.0), (2.0, 10.0)], "b": [(4.0, 8.0), (3.0, 8.0)]}
    assert min_ce_sums(per_source) == (6.0, 18.0, {"a": 1, "b": 1})  # b's 0.5 < 1.0, then a's 0.2 < 0.375


def test_one_source_fuses_to_itself_and_uncovered_continuations_are_left_out():
    assert min_ce_sums({"a": [(3.0, 6.0), (0.0, 0.0), (1.0, 2.0)]}) == (4.0, 8.0, {"a": 2})


def test_sources_must_score_the_same_continuations():
    with pytest.raises(ValueError, match="same continuations"):
        min_ce_sums({"a": [(1.0, 1.0)], "b": []})


@given(st.lists(st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3), min_size=1, max_size=20))
def test_with_equal_characters_min_ce_is_below_every_source(nlls):
    per_source = {name: [(row[i], 4.0) for row in nlls] for i, name in enumerate("abc")}
    nll, chars, chosen = min_ce_sums(per_source)
    assert chars == 4.0 * len(nlls) and sum(chosen.values()) == len(nlls)
    assert all(nll <= sum(n for n, _ in rows) + 1e-9 for rows in per_source.values())
    assert nll == pytest.approx(sum(min(row) for row in nlls))


def test_distinct_2_pools_the_continuations_and_never_joins_them():
    assert distinct_n([[1, 2, 3, 4]]) == 1.0
    assert distinct_n([[1, 1, 1, 1]]) == pytest.approx(1 / 3)
    assert distinct_n([[1, 2, 3], [1, 2, 3]]) == 0.5  # the same text after two prompts: half the bigrams repeat
    assert distinct_n([[1, 2], [2, 1]]) == 1.0  # (2, 2) across the join is no bigram
    assert distinct_n([[5, 6, 5, 6]], n=1) == 0.5
    assert math.isnan(distinct_n([[1], []]))


def test_repeated_4grams_count_within_a_continuation_only():
    assert repeated_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    assert repeated_ngram_rate([[7] * 20]) == pytest.approx(16 / 17)  # a loop: all but the first repeat
    assert repeated_ngram_rate([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.0  # across prompts is distinct-2's business
    assert repeated_ngram_rate([[1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9]]) == pytest.approx(2 / 5)  # pooled: 2 of 5
    assert math.isnan(repeated_ngram_rate([[1, 2, 3]]))
