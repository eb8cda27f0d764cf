"""The MinED DTW: exact, but computed in a band around the character diagonal, in one compiled pass.

Over token strings (the aligner's canonical strings without spaces) and the tokens' start characters.
D[i, j] = c[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]) with c the Levenshtein distance; the path is
backtracked from the last cell with ties broken diagonal > up > left (the paper's). The band is a
certificate, not a heuristic: the same pass that fills the band also computes a lower bound on every path
that leaves it (:func:`banded_dtw`), and :func:`exact_banded_path` widens the band until that bound is
strictly above the band's best path, so the result is the full O(n·m) DTW's path.

The loops are numba kernels (``nogil``: the trainer's prefetch threads run them in parallel; ``cache``:
compiled once per machine, then loaded from ``__pycache__``).
"""

from __future__ import annotations

import numba
import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

_INF = 1 << 40  # "unreachable" DTW cost, exact in int64 arithmetic
DTW_HALF_BAND = 64  # smallest initial band half-width in target tokens
DTW_BAND_SHARE = 32  # initial half-width at least n_t / 32 (the bound's slack grows with the text)


def pair_costs(src: np.ndarray, tgt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edit distances between the distinct strings, ``dist (U_s, U_t) int32``, and each token's row or
    column in it, ``inv_s (n_s,)``, ``inv_t (n_t,)`` int64. Distinct strings are numbered in order of first
    occurrence, which :func:`floor_tables` relies on."""
    (us, inv_s), (ut, inv_t) = _codes(src), _codes(tgt)
    dist = process.cdist(us, ut, scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    return dist, inv_s, inv_t


def _codes(strings: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The distinct strings in order of first occurrence and each string's index among them."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(s, len(index)) for s in strings), np.int64, len(strings))
    return list(index), codes


def floor_tables(dist: np.ndarray, inv_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per source string, the cheapest cell over every prefix and every suffix of the target:
    ``(prefix_min, prefix_count, suffix_min, suffix_count)``. The cheapest cell of source string u among
    target tokens ``[0, p)`` is ``prefix_min[u, prefix_count[p] - 1]``, among ``[p, n_t)`` it is
    ``suffix_min[u, suffix_count[p] - 1]`` (a count of 0: no token there)."""
    n_t = len(inv_t)
    prefix_count = np.concatenate([[0], np.maximum.accumulate(inv_t) + 1])  # distinct strings in tgt[:p]
    _, first_rev = np.unique(inv_t[::-1], return_index=True)
    last = n_t - 1 - first_rev  # last position of each distinct string
    order = np.argsort(-last, kind="stable")
    suffix_count = np.searchsorted(-last[order], -np.arange(n_t + 1), side="right")
    return (np.minimum.accumulate(dist, axis=1), prefix_count,
            np.minimum.accumulate(dist[:, order], axis=1), suffix_count)


def side_floors(tables: tuple[np.ndarray, ...], inv_s: np.ndarray, lo: np.ndarray,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest cell of each row left of its band and right of it: ``left, right (n_s,) int64``,
    ``_INF`` where the row has no cell there. What a path pays, at least, in a row it visits outside."""
    prefix_min, prefix_count, suffix_min, suffix_count = tables
    n_k = prefix_min.shape[1]
    k_left, k_right = prefix_count[lo], suffix_count[lo + width]
    left = prefix_min[inv_s, np.clip(k_left - 1, 0, n_k - 1)].astype(np.int64)
    right = suffix_min[inv_s, np.clip(k_right - 1, 0, n_k - 1)].astype(np.int64)
    return np.where(k_left > 0, left, _INF), np.where(k_right > 0, right, _INF)


def _band_starts(target_starts: np.ndarray, source_starts: np.ndarray, half: int) -> np.ndarray:
    """First target column of each source row's band, centred on the char-aligned target token."""
    n_t = len(target_starts)
    width = min(n_t, 2 * half + 1)
    centre = np.searchsorted(target_starts, source_starts, side="right") - 1
    lo = np.clip(centre - half, 0, n_t - width)
    lo[0], lo[-1] = 0, n_t - width
    return np.maximum.accumulate(lo)


def _band_is_connected(lo: np.ndarray, width: int, n_t: int) -> bool:
    """The band holds both corners and every row overlaps the next, so a monotone path runs inside it."""
    return bool(lo[0] == 0 and lo[-1] + width == n_t and np.all(np.diff(lo) < width))


@numba.njit(cache=True, nogil=True)
def _first_row(tab: np.ndarray, inv_t: np.ndarray, width: int, acc: np.ndarray, d_row: np.ndarray) -> None:
    """Row 0 of the band: a prefix sum (the only way in is from the left)."""
    total = 0
    for j in range(width):
        total += tab[inv_t[j]]
        acc[0, j] = total
        d_row[j + 1] = total


@numba.njit(cache=True, nogil=True)
def _band_row(tab: np.ndarray, inv_t: np.ndarray, r: int, lo: int, width: int, acc: np.ndarray,
              d_prev: np.ndarray, l_prev: np.ndarray, d_row: np.ndarray, l_row: np.ndarray,
              l_left: int, certify: bool) -> None:
    """Row ``r`` of D (band paths) and, with ``certify``, of L (paths that left the band before).

    Rows are indexed by target column + 1 (index 0: column -1, never reachable); ``l_left`` is L of the
    cell left of the band."""
    d_last, l_last = _INF, l_left
    for j in range(lo, lo + width):
        c = tab[inv_t[j]]
        d = min(min(d_prev[j], d_prev[j + 1]), d_last) + c
        acc[r, j - lo] = d
        d_row[j + 1] = d
        d_last = d
        if certify:
            l_last = min(min(l_prev[j], l_prev[j + 1]), l_last) + c
            l_row[j + 1] = l_last


@numba.njit(cache=True, nogil=True)
def _left_state(d_prev: np.ndarray, l_prev: np.ndarray, prev_lo: int, lo: int, floor: int,
                prev_state: int) -> int:
    """Lower bound on the full DTW over the row's cells left of the band (every path there has left it):
    the row's floor plus the cheapest predecessor, one row up (the cheapest such cell is entered from
    above, or it would not be the leftmost cheapest)."""
    if lo == 0:
        return _INF
    best = prev_state
    for j in range(prev_lo, lo):
        best = min(best, d_prev[j + 1], l_prev[j + 1])
    return floor + best


@numba.njit(cache=True, nogil=True)
def _pad_previous(d_prev: np.ndarray, l_prev: np.ndarray, prev_lo: int, prev_hi: int, hi: int,
                  left_state: int, right_state: int) -> None:
    """The previous row's cells outside its band that this row reads: unreachable for D, the outside
    state's bound for L."""
    if prev_lo > 0:
        d_prev[prev_lo], l_prev[prev_lo] = _INF, left_state
    for j in range(prev_hi, hi):
        d_prev[j + 1], l_prev[j + 1] = _INF, right_state


@numba.njit(cache=True, nogil=True)
def _band_pass(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int,
               left: np.ndarray, right: np.ndarray, certify: bool) -> tuple[np.ndarray, int]:
    """D in the band ``(n_s, width) int64`` and a lower bound on every full path that leaves it."""
    n, n_t = len(lo), len(inv_t)
    acc = np.empty((n, width), np.int64)
    d_prev, d_row = np.full(n_t + 1, _INF, np.int64), np.full(n_t + 1, _INF, np.int64)
    l_prev, l_row = np.full(n_t + 1, _INF, np.int64), np.full(n_t + 1, _INF, np.int64)
    _first_row(dist[inv_s[0]], inv_t, width, acc, d_prev)
    left_state, right_state = _INF, (right[0] + acc[0, width - 1] if width < n_t else _INF)
    for r in range(1, n):
        a, b = lo[r - 1], lo[r]
        prev_left = left_state
        if certify:
            left_state = _left_state(d_prev, l_prev, a, b, left[r], prev_left)
        _pad_previous(d_prev, l_prev, a, a + width, b + width, prev_left, right_state)
        _band_row(dist[inv_s[r]], inv_t, r, b, width, acc, d_prev, l_prev, d_row, l_row, left_state, certify)
        if certify and b + width < n_t:  # right of the band: entered from its last cell or from above
            h = b + width
            right_state = right[r] + min(min(d_row[h], l_row[h]), min(d_prev[h], l_prev[h]), right_state)
        d_prev, d_row, l_prev, l_row = d_row, d_prev, l_row, l_prev
    return acc, l_prev[n_t] if certify else _INF


def banded_dtw(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int,
               floors: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, int]:
    """Cumulative DTW cost in the band, ``acc (n_s, width) int64`` (``acc[i, k]`` is cell (i, lo[i] + k)),
    and a lower bound on the cost of every full-matrix path that leaves the band (``_INF`` without
    ``floors``: unchecked).

    The bound is a second DP in the same pass, L: the cheapest path to a band cell that has left the band
    before, where a row's cells left (right) of the band are lumped into one state worth the row's floor
    there (:func:`side_floors`) plus its cheapest way in. Every path that leaves the band pays at least L
    at the last cell.
    """
    if floors is None:
        none = np.zeros(len(lo), np.int64)
        return _band_pass(dist, inv_s, inv_t, lo, width, none, none, False)
    return _band_pass(dist, inv_s, inv_t, lo, width, floors[0], floors[1], True)


@numba.njit(cache=True, nogil=True)
def _at(acc: np.ndarray, lo: np.ndarray, i: int, j: int) -> int:
    """``D[i, j]``, ``_INF`` outside the band or the matrix."""
    k = j - lo[i]
    return acc[i, k] if i >= 0 and j >= 0 and 0 <= k < acc.shape[1] else _INF


@numba.njit(cache=True, nogil=True)
def dtw_backtrack(acc: np.ndarray, lo: np.ndarray, n_t: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's backtrack from the last cell; ties: diagonal > up (source-1) > left (target-1).

    Returns the path as ``(source_pos, target_pos)`` int64 arrays, end to start.
    """
    i, j, k = len(lo) - 1, n_t - 1, 0
    path_i, path_j = np.empty(i + j + 1, np.int64), np.empty(i + j + 1, np.int64)
    path_i[0], path_j[0] = i, j
    while i > 0 or j > 0:
        diag, up, left = _at(acc, lo, i - 1, j - 1), _at(acc, lo, i - 1, j), _at(acc, lo, i, j - 1)
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        k += 1
        path_i[k], path_j[k] = i, j
    return path_i[:k + 1].copy(), path_j[:k + 1].copy()


def exact_banded_path(src: np.ndarray, tgt: np.ndarray, target_starts: np.ndarray, source_starts: np.ndarray,
                      half: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full DTW's path over ``src (n_s,)`` × ``tgt (n_t,)`` (object arrays of str), as
    ``(source_pos, target_pos)`` from the last cell back to (0, 0).

    The band is centred on the target token where each source token starts (``*_starts``: char offsets),
    with initial half-width ``half`` (default max(64, n_t / 32)); it doubles until its best path is strictly
    cheaper than the bound on paths that leave it — then no such path can be optimal, nor win a tie, and
    the banded backtrack makes the full matrix's choices — or until it covers the whole matrix.
    """
    n_t = len(tgt)
    half = max(DTW_HALF_BAND, n_t // DTW_BAND_SHARE) if half is None else half
    dist, inv_s, inv_t = pair_costs(src, tgt)
    tables = floor_tables(dist, inv_t)
    while True:
        width = min(n_t, 2 * half + 1)
        lo = _band_starts(target_starts, source_starts, half)
        if _band_is_connected(lo, width, n_t):
            acc, bound = banded_dtw(dist, inv_s, inv_t, lo, width, side_floors(tables, inv_s, lo, width))
            if acc[-1, -1] < bound:
                return dtw_backtrack(acc, lo, n_t)
        half *= 2
