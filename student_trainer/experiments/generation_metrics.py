"""What a student *generates*, scored apart from any I/O: the teachers' negative log-likelihood of its
continuations per character (so tokenizers compare), fused the way MinCE fuses, and two degeneration guards
(distinct-n, the repeated n-gram rate) so that a student that repeats itself cannot win the first.

A continuation is the text after a prompt; a teacher scores prompt + continuation in its own tokens, and
:func:`continuation_sums` keeps the tokens that end inside the continuation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from student_trainer.core.fusion import predicted_chars


def continuation_sums(next_logprobs: np.ndarray, offsets: np.ndarray, start: int) -> tuple[float, float]:
    """(summed NLL, characters) of a teacher's tokens that end after character ``start`` (the prompt's end).

    ``next_logprobs (n-1,)``: log-prob of token j+1 after tokens 0..j; ``offsets (n, 2)``: [start, end) of each
    token in the scored text. A token that straddles the boundary counts whole, and so do the characters it
    covers (NLL per character covered: ``core.fusion.predicted_chars``); token 0 is never predicted.
    """
    ends = np.asarray(offsets, np.int64)[1:, 1]  # the predicted tokens 1..n-1
    keep = ends > start
    if not keep.any():
        return 0.0, 0.0
    first = int(np.argmax(keep)) + 1  # the first counted token: the tokens from the one before it predict
    return -float(np.sum(np.asarray(next_logprobs, np.float64)[keep])), float(predicted_chars(offsets[first - 1:]))


def min_ce_sums(per_source: Mapping[str, Sequence[tuple[float, float]]]) -> tuple[float, float, dict[str, int]]:
    """The sources fused by MinCE's rule: per continuation, the source with the lowest NLL per character.

    ``per_source[name][i]``: (NLL, characters) of continuation i by that source. Returns the chosen NLLs and
    characters summed over the continuations, and how often each source was chosen. A continuation no source
    covers (0 characters) is left out.
    """
    names = list(per_source)
    n = {len(v) for v in per_source.values()}
    if len(n) != 1:
        raise ValueError(f"every source must score the same continuations; got counts {sorted(n)}")
    nll, chars, chosen = 0.0, 0.0, dict.fromkeys(names, 0)
    for i in range(n.pop() if n else 0):
        rates = {name: per_source[name][i][0] / per_source[name][i][1] for name in names if per_source[name][i][1] > 0}
        if rates:
            best = min(rates, key=rates.__getitem__)
            nll, chars, chosen[best] = nll + per_source[best][i][0], chars + per_source[best][i][1], chosen[best] + 1
    return nll, chars, chosen


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of all continuations (Li et al., 2016; 1: no n-gram repeats; NaN
    when there is none). Pooled: a student that says the same thing after every prompt scores low too."""
    grams = [g for s in seqs for g in _ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(seqs: Sequence[Sequence[int]], n: int = 4) -> float:
    """Share of the n-grams that repeat an earlier n-gram of the same continuation (Welleck et al.'s seq-rep-n,
    pooled over continuations: 0 = none repeats; a looping continuation tends to 1; NaN when there is none)."""
    total = repeated = 0
    for s in seqs:
        grams = _ngrams(list(s), n)
        total, repeated = total + len(grams), repeated + len(grams) - len(set(grams))
    return repeated / total if total else float("nan")
