"""vLLM's log-prob structures -> the HF backend's ``ScoreOutput``, in numpy (no vLLM, no I/O): the conversion
the vLLM backend (vllm.py) applies to every finished engine request. See docs/VLLM.md, "From vLLM's log-probs
to the response".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from teacher_server.backends.base import ScoreOutput

Position = Mapping[int, Any]  # vLLM's {token_id: Logprob(logprob, rank, decoded_token)} for one position


def top_k_of(position: Position, k: int) -> tuple[list[int], list[float]]:
    """The k entries of one position by decreasing log-prob (ties: smaller id first).

    vLLM's dict holds the top-k plus, when it is not among them, the actual (prompt or sampled) token;
    sorting drops that extra entry. ``Logprob.rank`` is not used: vLLM counts ties against the token
    (rank = number of entries >= its log-prob), and earlier V1 versions gave the extra entry rank k+1.
    """
    ranked = sorted(position.items(), key=lambda item: (-item[1].logprob, item[0]))[:k]
    if len(ranked) < k:
        raise ValueError(f"vLLM returned {len(ranked)} log-probs for a position, expected at least {k}")
    return [tid for tid, _ in ranked], [lp.logprob for _, lp in ranked]


def prompt_logprobs_to_output(prompt_logprobs: Sequence[Position | None], last: Position,
                              text_ids: np.ndarray, top_k: int, bos: bool) -> ScoreOutput:
    """vLLM's per-prompt-token dicts -> the HF backend's ScoreOutput for the n text tokens.

    prompt_logprobs: (n + bos) entries, ``None`` first; entry p is the distribution that predicted
    prompt token p. last: the distribution at the last prompt position (the first sampled token's
    logprobs). text_ids: (n,) the text tokens without BOS. Row j of the output predicts text token j+1,
    so it comes from entry j + bos + 1; with BOS, entry 1 (BOS predicting text token 0) is dropped.
    """
    n, offset = len(text_ids), int(bos) + 1
    if len(prompt_logprobs) != n + int(bos):
        raise ValueError(f"got {len(prompt_logprobs)} prompt log-prob entries for {n + int(bos)} prompt tokens")
    positions = [prompt_logprobs[j + offset] for j in range(n - 1)] + [last]
    topk_ids = np.empty((n, top_k), dtype=np.int32)
    topk_logprobs = np.empty((n, top_k), dtype=np.float32)
    for j, position in enumerate(positions):
        if position is None:
            raise ValueError(f"no log-probs for text position {j}")
        topk_ids[j], topk_logprobs[j] = top_k_of(position, top_k)
    next_logprobs = np.array([positions[j][int(text_ids[j + 1])].logprob for j in range(n - 1)],
                             dtype=np.float32)
    return ScoreOutput(topk_ids, topk_logprobs, next_logprobs)


def _flat_rows(flat: Any, first: int, count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, k + 1) ids and log-probs of positions first .. first+count-1 of a ``FlatLogprobs``.

    vLLM appends each position as [actual token, top-1 .. top-k] (``append_fast``, no dedup), so every
    position has exactly k + 1 entries and the columns come out as one reshape.
    """
    if count == 0:
        return np.empty((0, k + 1), np.int64), np.empty((0, k + 1), np.float32)
    starts = np.asarray(flat.start_indices[first:first + count])
    ends = np.asarray(flat.end_indices[first:first + count])
    if len(starts) != count or np.any(ends - starts != k + 1):
        raise ValueError(f"expected {count} positions of {k + 1} flat log-prob entries from {first}")
    lo, hi = int(starts[0]), int(ends[-1])
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(count, k + 1)
    return ids, np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(count, k + 1)


def flat_logprobs_to_output(prompt: Any, sample: Any, n: int, top_k: int, bos: bool) -> ScoreOutput:
    """Same as ``prompt_logprobs_to_output`` for vLLM's ``FlatLogprobs`` (``flat_logprobs=True``), in numpy.

    prompt: n + bos positions (the first empty); sample: the first sampled token's position. Row j comes
    from prompt position j + bos + 1 (its column 0, the actual token, is next_logprobs[j]); the last row
    from the sample. Top-k columns are re-sorted by (-log-prob, id), as the dict path sorts them.
    """
    if len(prompt) != n + int(bos):
        raise ValueError(f"got {len(prompt)} prompt log-prob entries for {n + int(bos)} prompt tokens")
    prompt_ids, prompt_lps = _flat_rows(prompt, int(bos) + 1, n - 1, top_k)
    sample_ids, sample_lps = _flat_rows(sample, 0, 1, top_k)
    ids = np.concatenate([prompt_ids, sample_ids])[:, 1:]
    lps = np.concatenate([prompt_lps, sample_lps])[:, 1:]
    order = np.lexsort((ids, -lps), axis=-1)
    return ScoreOutput(np.take_along_axis(ids, order, -1).astype(np.int32), np.take_along_axis(lps, order, -1),
                       prompt_lps[:, 0].copy())
