"""Token alignment: a source's top-k next-token distributions, moved onto the target's tokens.

Pure maths on numpy arrays. Two aligners share one signature and one output (``ALIGNERS``):

- ``mined``: the paper's MinED — DTW whose cost is the Levenshtein distance between the tokens'
  *canonical byte strings with every space removed* (:func:`vocab.canonical_strings`: the bytes a token
  stands for, so ``"▁the"``, ``"Ġthe"`` and ``"the"`` all compare as ``"the"``, and a whitespace-only token
  compares as ``""``); ties on backtrack: diagonal > up > left. A target token aligned to exactly one
  source token that equals it (same canonical string, spaces kept; or through the vocab map; at position
  0 also when one has exactly one more leading space, SentencePiece's dummy prefix) takes that source
  position's top-k.
  Fast: the costs come from one compiled ``cdist`` over the distinct strings, and the DTW runs in a band
  around the character diagonal in compiled kernels that release the GIL (:mod:`dtw`). Exact: the band
  widens until a lower bound on every path that leaves it, computed in the same pass
  (:func:`dtw.banded_dtw`), is strictly above the band's best path, so the result is the full O(n·m)
  DTW's path, tie-breaking included.
- ``offsets``: target position i takes the top-k of the source position that ends at the same
  character boundary, i.e. has read exactly the same text.

Output convention (:class:`SparseTargets`): target position i predicts target token i+1. An aligned
position holds the source's top-k mapped into target ids, duplicates (many-to-one map) merged by
summing their probability (logsumexp), sorted by descending log-prob at temperature 1, padded with
``-inf``. Source ids the map sends nowhere (padded output rows, role-less specials) are dropped; the
loss renormalises over what is kept. A position with no aligned source, or whose whole top-k was
dropped, holds the one-hot of the gold *next* target token. The last position has no next token
inside the sequence: its row is empty (all ``-inf``), which the loss treats as masked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from student_trainer.core.dtw import Coded, coded, exact_banded_path
from student_trainer.core.vocab import build_vocab_map, canonical_strings


@dataclass(frozen=True)
class Tokens:
    """One tokenisation of a text: ``ids (n,) int64``, ``offsets (n, 2) int64`` char ``[start, end)``."""

    ids: np.ndarray
    offsets: np.ndarray


@dataclass(frozen=True)
class TeacherOutput:
    """What a source returns for one text; position j predicts source token j+1.

    ``topk_ids (n, k) int64``, ``topk_logprobs (n, k) float32`` (log-softmax at T=1, descending),
    ``next_logprobs (n-1,) float32`` (log-prob of the actual token j+1 at position j).
    """

    tokens: Tokens
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    next_logprobs: np.ndarray
    gathered_logprobs: np.ndarray | None = None  # (m, c) float32 at the ids a request asked for (on-policy)


@dataclass(frozen=True)
class SparseTargets:
    """Sparse next-token targets on the target's positions.

    ``ids (T, K) int64``, ``logprobs (T, K) float32`` (-inf = no entry), ``aligned (T,) bool``
    (True where a source distribution, not the one-hot fallback, fills the row).
    """

    ids: np.ndarray
    logprobs: np.ndarray
    aligned: np.ndarray


@dataclass(frozen=True)
class VocabPair:
    """Per (source, target) tokenizer pair, built once: canonical strings and the MinED vocab map.

    ``source_canon (|V_src|,)`` / ``target_canon (|V_tgt|,)`` object arrays of canonical strings,
    ``source_stripped`` / ``target_stripped`` the same without spaces (the DTW's strings),
    ``vocab_map (|V_src|,) int64`` with -1 = no target token.
    """

    source_canon: np.ndarray
    target_canon: np.ndarray
    source_stripped: np.ndarray
    target_stripped: np.ndarray
    vocab_map: np.ndarray


def _objects(strings: Sequence[str]) -> np.ndarray:
    out = np.empty(len(strings), dtype=object)
    out[:] = list(strings)
    return out


def make_vocab_pair(source: Sequence[str], target: Sequence[str],
                    vocab_map: np.ndarray | None = None) -> VocabPair:
    """Builds a :class:`VocabPair` from raw vocabularies (index = id); the map is built if not given."""
    src, tgt = canonical_strings(source), canonical_strings(target)
    vmap = build_vocab_map(source, target) if vocab_map is None else np.asarray(vocab_map, np.int64)
    return VocabPair(_objects(src), _objects(tgt), _objects([s.replace(" ", "") for s in src]),
                     _objects([s.replace(" ", "") for s in tgt]), vmap)


def lookup(table: np.ndarray, ids: np.ndarray, fill: object) -> np.ndarray:
    """``table[ids]`` with ``fill`` where an id is negative or past the table (padded vocab rows)."""
    ok = (ids >= 0) & (ids < len(table))
    out = np.full(ids.shape, fill, dtype=table.dtype)
    out[ok] = table[ids[ok]]
    return out


def merge_duplicates(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums the probability of repeated ids per row; ids < 0 are dropped.

    ``ids (R, K) int64``, ``logprobs (R, K)`` → same shapes, each row sorted by descending log-prob,
    merged entries as logsumexp, emptied slots ``-inf`` with id 0.
    """
    rows, width = ids.shape
    lp = np.where(ids < 0, -np.inf, logprobs.astype(np.float64))
    order = np.argsort(ids, axis=1, kind="stable")
    ids_s, lp_s = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
    first = np.ones_like(ids_s, dtype=bool)
    first[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    top = lp_s.max(axis=1, initial=-np.inf, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    starts = np.flatnonzero(first)
    sums = np.add.reduceat(np.exp(lp_s - top).ravel(), starts) if starts.size else np.zeros(0)
    merged = np.full(rows * width, -np.inf)
    with np.errstate(divide="ignore"):
        merged[starts] = np.log(sums) + np.broadcast_to(top, lp_s.shape).ravel()[starts]
    merged = merged.reshape(rows, width)
    order = np.argsort(-merged, axis=1, kind="stable")
    out_lp = np.take_along_axis(merged, order, 1)
    out_ids = np.where(np.isfinite(out_lp), np.take_along_axis(ids_s, order, 1), 0)
    return out_ids.astype(np.int64), out_lp.astype(np.float32)


def one_hot_next(target_ids: np.ndarray, width: int) -> SparseTargets:
    """Fallback targets: row i is the one-hot of gold token i+1; the last row is empty."""
    n = len(target_ids)
    ids = np.zeros((n, width), np.int64)
    lp = np.full((n, width), -np.inf, np.float32)
    ids[:-1, 0] = target_ids[1:]
    lp[:-1, 0] = 0.0
    return SparseTargets(ids, lp, np.zeros(n, bool))


def project(target_ids: np.ndarray, source: TeacherOutput, source_pos: np.ndarray,
            vocab_map: np.ndarray) -> SparseTargets:
    """Fills target position i with the source top-k at ``source_pos[i]`` (-1 = one-hot fallback).

    ``target_ids (T,)``, ``source_pos (T,) int64`` → :class:`SparseTargets` of width k.
    """
    out = one_hot_next(target_ids, source.topk_ids.shape[1])
    rows = np.flatnonzero(source_pos[:-1] >= 0)
    if rows.size == 0:
        return out
    mapped = lookup(vocab_map, source.topk_ids[source_pos[rows]].astype(np.int64), -1)
    ids, lp = merge_duplicates(mapped, source.topk_logprobs[source_pos[rows]])
    keep = np.isfinite(lp[:, 0])
    out.ids[rows[keep]], out.logprobs[rows[keep]] = ids[keep], lp[keep]
    out.aligned[rows[keep]] = True
    return out


def dtw_path(src: np.ndarray, tgt: np.ndarray, target: Tokens, source: Tokens,
             half: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MinED DTW path over token strings ``src (n_s,)``, ``tgt (n_t,)`` (object arrays of str), its band
    placed by the tokens' char offsets: exactly the full DTW's path (:func:`dtw.exact_banded_path`)."""
    return exact_banded_path(coded(src), coded(tgt), target.offsets[:, 0], source.offsets[:, 0], half)


def coded_ids(table: np.ndarray, ids: np.ndarray) -> Coded:
    """The DTW strings of token ids as :data:`dtw.Coded`, numbered by distinct id (numpy, not a Python loop
    over tokens; two ids with one string give two equal entries, which changes no cost)."""
    distinct, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return lookup(table, distinct[order], "").tolist(), rank[inverse]


def _one_to_one(path_i: np.ndarray, path_j: np.ndarray, n_t: int) -> np.ndarray:
    """Source position of each target position aligned to exactly one source position, else -1."""
    count = np.bincount(path_j, minlength=n_t)
    pos = np.full(n_t, -1, np.int64)
    pos[path_j] = path_i
    return np.where(count == 1, pos, -1)


def same_but_dummy_prefix(a: str, b: str) -> bool:
    """True if two first-token strings differ only by SentencePiece's dummy prefix: one leading space more.

    Only one space: ``" " * 24`` and ``" "`` are different whitespace runs, not one run and a prefix.
    """
    a_text, b_text = a.lstrip(" "), b.lstrip(" ")
    return a_text == b_text and abs((len(a) - len(a_text)) - (len(b) - len(b_text))) == 1


def mined_positions(target: Tokens, source: Tokens, pair: VocabPair) -> np.ndarray:
    """Source position feeding each target position under MinED: ``(T,) int64``, -1 = none."""
    s_ids, t_ids = source.ids.astype(np.int64), target.ids.astype(np.int64)
    if len(s_ids) == 0 or len(t_ids) == 0:
        return np.full(len(t_ids), -1, np.int64)
    src, tgt = coded_ids(pair.source_stripped, s_ids), coded_ids(pair.target_stripped, t_ids)
    path_i, path_j = exact_banded_path(src, tgt, target.offsets[:, 0], source.offsets[:, 0])
    pos = _one_to_one(path_i, path_j, len(t_ids))
    rows = np.flatnonzero(pos >= 0)
    s_canon = lookup(pair.source_canon, s_ids[pos[rows]], "")
    t_canon = lookup(pair.target_canon, t_ids[rows], "")
    same = (s_canon == t_canon) | (lookup(pair.vocab_map, s_ids[pos[rows]], -1) == t_ids[rows])
    if rows.size and rows[0] == 0 and pos[0] == 0:
        same[0] |= same_but_dummy_prefix(s_canon[0], t_canon[0])
    pos[rows[~same]] = -1
    return pos


def _boundaries(offsets: np.ndarray) -> np.ndarray:
    """Positions after which the text is cut cleanly (the next token starts at or after the end)."""
    cut = np.ones(len(offsets), bool)
    cut[:-1] = offsets[1:, 0] >= offsets[:-1, 1]
    return cut


def offset_positions(target: Tokens, source: Tokens, pair: VocabPair | None = None) -> np.ndarray:
    """Source position ending at the same char boundary as each target position: ``(T,)``, -1 = none.

    Tokens that end inside a character split across several byte tokens are not boundaries; of several
    source tokens ending at one boundary (zero-width tokens), the last is taken.
    """
    s_cut, t_cut = np.flatnonzero(_boundaries(source.offsets)), _boundaries(target.offsets)
    if s_cut.size == 0:  # an empty source: nothing to align to
        return np.full(len(target.ids), -1, np.int64)
    s_end = source.offsets[s_cut, 1]
    order = np.argsort(s_end, kind="stable")
    s_end, s_cut = s_end[order], s_cut[order]
    t_end = target.offsets[:, 1]
    k = np.searchsorted(s_end, t_end, side="right") - 1
    hit = t_cut & (k >= 0) & (s_end[np.maximum(k, 0)] == t_end)
    return np.where(hit, s_cut[np.maximum(k, 0)], -1)


def align_mined(target: Tokens, source: TeacherOutput, pair: VocabPair) -> SparseTargets:
    """MinED alignment (the paper's): see the module docstring."""
    return project(target.ids, source, mined_positions(target, source.tokens, pair), pair.vocab_map)


def align_offsets(target: Tokens, source: TeacherOutput, pair: VocabPair) -> SparseTargets:
    """Character-boundary alignment: see the module docstring."""
    return project(target.ids, source, offset_positions(target, source.tokens), pair.vocab_map)


Aligner = Callable[[Tokens, TeacherOutput, VocabPair], SparseTargets]
ALIGNERS: dict[str, Aligner] = {"mined": align_mined, "offsets": align_offsets}


def pad_width(targets: SparseTargets, width: int) -> SparseTargets:
    """Pads (with -inf entries) or keeps the top ``width`` entries of each row."""
    k = targets.ids.shape[1]
    if k >= width:
        return SparseTargets(targets.ids[:, :width], targets.logprobs[:, :width], targets.aligned)
    pad = width - k
    ids = np.pad(targets.ids, ((0, 0), (0, pad)))
    lp = np.pad(targets.logprobs, ((0, 0), (0, pad)), constant_values=-np.inf)
    return SparseTargets(ids, lp, targets.aligned)


def stack_targets(batch: Sequence[SparseTargets]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacks same-length sequences: ``ids (B, T, K)``, ``logprobs (B, T, K)``, ``aligned (B, T)``."""
    width = max(t.ids.shape[1] for t in batch)
    padded = [pad_width(t, width) for t in batch]
    return (np.stack([t.ids for t in padded]), np.stack([t.logprobs for t in padded]),
            np.stack([t.aligned for t in padded]))


def with_gathered(targets: SparseTargets, positions: np.ndarray, ids: np.ndarray,
                  logprobs: np.ndarray) -> SparseTargets:
    """``targets`` with more entries: at target position ``positions[r]`` the ids ``ids[r]`` (target ids; < 0 =
    none) with the source's log-probs ``logprobs[r]`` (-inf = none), gathered at the student's candidates.

    ``positions (m,)``, ``ids``/``logprobs (m, c)`` → rows ``c`` wider. Only rows where a source distribution
    is aligned take them (a one-hot fallback row is no distribution to add to), and only ids the row does not
    hold yet (its top-k value is the source's log-prob of that id already, or the sum of the source ids the
    vocabulary map sends to it): a union, never a sum.
    """
    n, c = len(targets.ids), ids.shape[1]
    new_ids, new_lp = np.zeros((n, c), np.int64), np.full((n, c), -np.inf, np.float32)
    keep = targets.aligned[positions][:, None] & (ids >= 0) & np.isfinite(logprobs)
    held = targets.ids[positions][:, :, None] == ids[:, None, :]
    keep &= ~(held & np.isfinite(targets.logprobs[positions])[:, :, None]).any(axis=1)
    new_ids[positions] = np.where(keep, ids, 0)
    new_lp[positions] = np.where(keep, logprobs, -np.inf)
    return SparseTargets(np.concatenate([targets.ids, new_ids], 1), np.concatenate([targets.logprobs, new_lp], 1),
                         targets.aligned)
