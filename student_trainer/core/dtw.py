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

from collections.abc import Sequence

import numba
import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

UNREACHABLE = 1 << 40  # DTW cost of a cell no path reaches, exact in int64 arithmetic
DTW_HALF_BAND = 64  # smallest initial band half-width in target tokens
DTW_BAND_SHARE = 64  # initial half-width at least n_t / 64 (the bound's slack grows with the text)


Coded = tuple[list[str], np.ndarray]  # distinct strings in order of first occurrence, each token's index


def coded(strings: Sequence[str]) -> Coded:
    """Token strings as :data:`Coded`: the distinct strings, first occurrence first, and each token's
    index among them ``(n,) int64``."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(s, len(index)) for s in strings), np.int64, len(strings))
    return list(index), codes


def pair_costs(src: Coded, tgt: Coded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edit distances between the distinct strings, ``dist (U_s, U_t) int32``, and each token's row or
    column in it, ``inv_s (n_s,)``, ``inv_t (n_t,)`` int64 (numbered by first occurrence, which makes
    :func:`side_floors` exact rather than only a lower bound; a string listed twice is harmless)."""
    dist = process.cdist(src[0], tgt[0], scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    return dist, src[1], tgt[1]


@numba.njit(cache=True, nogil=True)
def side_floors(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest cell of each row left of its band and right of it: ``left, right (n_s,) int64``,
    ``UNREACHABLE`` where the row has no cell there. What a path pays, at least, in a row it visits outside.

    ``inv_t`` numbers the distinct target strings in order of first occurrence, so the strings left of
    column p are the first ``seen[p]`` (any other numbering gives a superset: lower floors, still sound);
    one running minimum per source string, advanced as the band moves right (and stopped at 0), gives
    every row's floor in one sweep. Right: the same from the end, by last occurrence.
    """
    n, n_t = len(lo), len(inv_t)
    seen = np.zeros(n_t + 1, np.int64)  # distinct strings among tgt[:p], then among tgt[p:]
    for p in range(n_t):
        seen[p + 1] = max(seen[p], inv_t[p] + 1)
    left = _sweep(dist, inv_s, np.arange(dist.shape[1]), seen[lo], 0, n, 1)
    order, seen_after = _last_occurrence_order(inv_t, dist.shape[1])
    right = _sweep(dist, inv_s, order, seen_after[lo + width], n - 1, -1, -1)
    return left, right


@numba.njit(cache=True, nogil=True)
def _last_occurrence_order(inv_t: np.ndarray, n_u: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct target strings by last occurrence, latest first, and how many occur in ``tgt[p:]``."""
    n_t = len(inv_t)
    order, count, done = np.empty(n_u, np.int64), np.zeros(n_t + 1, np.int64), np.zeros(n_u, np.bool_)
    k = 0
    for p in range(n_t - 1, -1, -1):
        if not done[inv_t[p]]:
            done[inv_t[p]], order[k] = True, inv_t[p]
            k += 1
        count[p] = k
    return order, count


@numba.njit(cache=True, nogil=True)
def _sweep(dist: np.ndarray, inv_s: np.ndarray, order: np.ndarray, count: np.ndarray, first: int, stop: int,
           step: int) -> np.ndarray:
    """``out[r] = min(dist[inv_s[r], order[:count[r]]])`` (``UNREACHABLE`` for none), rows visited in
    ``range(first, stop, step)``, an order in which ``count`` never decreases."""
    best = np.full(dist.shape[0], UNREACHABLE, np.int64)
    done = np.zeros(dist.shape[0], np.int64)  # how far each source string's minimum has advanced
    out = np.empty(len(inv_s), np.int64)
    for r in range(first, stop, step):
        u, k, low = inv_s[r], done[inv_s[r]], best[inv_s[r]]
        while k < count[r] and low > 0:
            low = min(low, dist[u, order[k]])
            k += 1
        done[u], best[u] = k, low
        out[r] = low if count[r] > 0 else UNREACHABLE
    return out


def band_starts(target_starts: np.ndarray, source_starts: np.ndarray, half: int) -> np.ndarray:
    """First target column of each source row's band, centred on the char-aligned target token."""
    n_t = len(target_starts)
    width = min(n_t, 2 * half + 1)
    centre = np.searchsorted(target_starts, source_starts, side="right") - 1
    lo = np.clip(centre - half, 0, n_t - width)
    lo[0], lo[-1] = 0, n_t - width
    return np.maximum.accumulate(lo)


def band_is_connected(lo: np.ndarray, width: int, n_t: int) -> bool:
    """The band holds both corners and every row overlaps the next, so a monotone path runs inside it."""
    return bool(lo[0] == 0 and lo[-1] + width == n_t and np.all(np.diff(lo) < width))


@numba.njit(cache=True, nogil=True)
def _d_cells(tab: np.ndarray, cols: np.ndarray, shift: int, d_prev: np.ndarray, d_row: np.ndarray, start: int,
             stop: int, d: int) -> int:
    """D over band cells ``start .. stop-1`` of a row, ``d`` the cell left of ``start``; returns the last.

    Rows are padded: index 0 is the cell left of the band, 1..width the band, then the cells right of
    it (unreachable for D). ``tab``: this row's edit distances, ``cols``: the band's target strings,
    ``shift``: how far the band starts right of the previous row's."""
    for k in range(start, stop):
        d = min(min(d_prev[k + shift], d_prev[k + shift + 1]), d) + tab[cols[k]]
        d_row[k + 1] = d
    return d


@numba.njit(cache=True, nogil=True)
def _l_at(l_row: np.ndarray, i: int, live: tuple[int, int]) -> int:
    """L at padded index ``i`` of a row whose live cells lie in band cells ``[0, live[0])`` and
    ``[live[1], width)`` (and the pads); the cells in between hold stale values and count as none."""
    value = l_row[i]  # loaded either way, so that the choice compiles to a select, not a branch
    return value if (i <= live[0]) | (i > live[1]) else UNREACHABLE


@numba.njit(cache=True, nogil=True)
def _dl_cells(tab: np.ndarray, cols: np.ndarray, shift: int, d_prev: np.ndarray, d_row: np.ndarray,
              l_prev: np.ndarray, l_row: np.ndarray, live: tuple[int, int], k: int, stop: int, d: int,
              cost: int) -> tuple[int, int, int, int, int]:
    """D and L from band cell ``k`` to ``stop``, then on while L is live, in one loop (two independent
    chains); ``live``: the previous row's. L is pruned to ``UNREACHABLE`` where L > D: a band path reaches
    the cell cheaper, so nothing that leaves the band through it can beat or tie the band's best path
    without leaving again (which the band path's own L covers). Returns ``(k, d, cost, first, last)``:
    the next cell, D and L of the last one, the first and last live cell (``last < 0``: none).
    """
    first, last = len(cols), -1
    while k < len(cols) and (k < stop or cost < UNREACHABLE):
        c = tab[cols[k]]
        d = min(min(d_prev[k + shift], d_prev[k + shift + 1]), d) + c
        d_row[k + 1] = d
        cost = min(min(_l_at(l_prev, k + shift, live), _l_at(l_prev, k + shift + 1, live)), cost) + c
        cost = cost if cost <= d else UNREACHABLE
        l_row[k + 1] = cost
        alive = cost < UNREACHABLE
        first, last = min(first, k) if alive else first, k if alive else last
        k += 1
    return k, d, cost, first, last


@numba.njit(cache=True, nogil=True)
def _dl_row(tab: np.ndarray, cols: np.ndarray, shift: int, d_prev: np.ndarray, d_row: np.ndarray,
            l_prev: np.ndarray, l_row: np.ndarray, live: tuple[int, int], l_first: int) -> tuple[int, int]:
    """One band row of D and of L (the cheapest path to the cell that left the band before). L is live
    near the band's edges only: it is computed from the left edge (entered from the left, or below the
    previous row's live cells) and from the right (below live cells, or entered from the right of the
    previous band), D alone in between. Returns the row's ``live`` interval bounds (see :func:`_l_at`).
    """
    width = len(cols)
    l_row[0] = l_first
    left_seed = 1 if l_first < UNREACHABLE or l_prev[0] < UNREACHABLE else 0
    stop = max(left_seed, live[0] - shift + 1 if live[0] > 0 else 0)
    k, d, cost, _, last = _dl_cells(tab, cols, shift, d_prev, d_row, l_prev, l_row, live, 0, stop, UNREACHABLE,
                                    l_first)
    right_seed = width - shift if l_prev[width + 1] < UNREACHABLE else width
    start = max(k, min(live[1] - shift if live[1] < width else width, right_seed))
    d = _d_cells(tab, cols, shift, d_prev, d_row, k, start, d)
    cost = cost if start == k else UNREACHABLE
    _, _, _, first, right_last = _dl_cells(tab, cols, shift, d_prev, d_row, l_prev, l_row, live, start, width,
                                           d, cost)
    return last + 1, (first if right_last >= 0 else width)


@numba.njit(cache=True, nogil=True)
def _left_state(d_prev: np.ndarray, l_prev: np.ndarray, live: tuple[int, int], shift: int, floor: int,
                state: int) -> int:
    """Lower bound on the full DTW over the row's cells left of the band (``UNREACHABLE``: none), from
    the previous row's ``state``: the row's floor there plus the cheapest way in, from the row above (the
    leftmost cheapest such cell is not entered from its left neighbour)."""
    if floor == UNREACHABLE:
        return UNREACHABLE
    best = state
    for i in range(1, shift + 1):  # the previous band's cells that lie left of this one
        best = min(best, d_prev[i], _l_at(l_prev, i, live))
    return floor + best


@numba.njit(cache=True, nogil=True)
def _right_state(d_prev: np.ndarray, d_row: np.ndarray, l_prev: np.ndarray, l_row: np.ndarray,
                 live: tuple[int, int], row_live: tuple[int, int], shift: int, floor: int, state: int) -> int:
    """The same right of the band: entered from the band's last cell, from the cell above it, or from
    the previous row's cells right of the band (``state``)."""
    if floor == UNREACHABLE:
        return UNREACHABLE
    width = (len(d_row) - 1) // 2
    up = min(d_prev[width + shift], _l_at(l_prev, width + shift, live))
    return floor + min(min(d_row[width], _l_at(l_row, width, row_live)), up, state)


@numba.njit(cache=True, nogil=True)
def _band_pass(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int,
               left: np.ndarray, right: np.ndarray, certify: bool) -> tuple[np.ndarray, int]:
    """D in the band ``(n_s, width) int64`` and, with ``certify``, L at the last cell (else
    ``UNREACHABLE``)."""
    n = len(lo)
    acc = np.empty((n, width), np.int64)
    d_prev, d_row = np.full(2 * width + 1, UNREACHABLE, np.int64), np.full(2 * width + 1, UNREACHABLE, np.int64)
    l_prev, l_row = np.full(2 * width + 1, UNREACHABLE, np.int64), np.full(2 * width + 1, UNREACHABLE, np.int64)
    d_prev[1:width + 1] = np.cumsum(dist[inv_s[0]][inv_t[:width]])  # row 0: entered from the left only
    acc[0] = d_prev[1:width + 1]
    live = (0, width)  # row 0: no live L
    states = (UNREACHABLE, right[0] + acc[0, width - 1] if right[0] < UNREACHABLE else UNREACHABLE)
    for r in range(1, n):
        shift, tab, cols = lo[r] - lo[r - 1], dist[inv_s[r]], inv_t[lo[r]:lo[r] + width]
        if certify:
            l_prev[width + 1:width + shift + 1] = states[1]  # right of the previous band
            l_first = _left_state(d_prev, l_prev, live, shift, left[r], states[0])
            row_live = _dl_row(tab, cols, shift, d_prev, d_row, l_prev, l_row, live, l_first)
            states = (l_first, _right_state(d_prev, d_row, l_prev, l_row, live, row_live, shift, right[r],
                                            states[1]))
            live = row_live
        else:
            _d_cells(tab, cols, shift, d_prev, d_row, 0, width, UNREACHABLE)
        acc[r] = d_row[1:width + 1]
        d_prev, d_row, l_prev, l_row = d_row, d_prev, l_row, l_prev
    return acc, _l_at(l_prev, width, live) if certify else UNREACHABLE


def banded_dtw(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int,
               floors: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, int]:
    """Cumulative DTW cost in the band, ``acc (n_s, width) int64`` (``acc[i, k]`` is cell (i, lo[i] + k)),
    and the bound: above ``acc[-1, -1]`` exactly when every full-matrix path that leaves the band costs
    more than the band's best (``UNREACHABLE`` without ``floors``: unchecked).

    The bound is a second DP in the same pass, L: a lower bound on the cheapest path to a band cell that
    has left the band before, where a row's cells left (right) of the band are lumped into one state worth
    the row's floor there (:func:`side_floors`) plus its cheapest way in. L is kept only where it is not
    above D (see :func:`_dl_cells`), which near the band's edges is a few cells per row; the bound is L at
    the last cell (``UNREACHABLE`` once pruned).
    """
    if floors is None:
        none = np.zeros(len(lo), np.int64)
        return _band_pass(dist, inv_s, inv_t, lo, width, none, none, False)
    return _band_pass(dist, inv_s, inv_t, lo, width, floors[0], floors[1], True)


@numba.njit(cache=True, nogil=True)
def _at(acc: np.ndarray, lo: np.ndarray, i: int, j: int) -> int:
    """``D[i, j]``, ``UNREACHABLE`` outside the band or the matrix."""
    k = j - lo[i]
    return acc[i, k] if i >= 0 and j >= 0 and 0 <= k < acc.shape[1] else UNREACHABLE


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


def exact_banded_path(src: Coded, tgt: Coded, target_starts: np.ndarray, source_starts: np.ndarray,
                      half: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full DTW's path over the ``n_s`` source × ``n_t`` target token strings (:data:`Coded`), as
    ``(source_pos, target_pos)`` from the last cell back to (0, 0).

    The band is centred on the target token where each source token starts (``*_starts``: char offsets),
    with initial half-width ``half`` (default max(64, n_t / 64)); it doubles until its best path is strictly
    cheaper than the bound on paths that leave it — then no such path can be optimal, nor win a tie, and
    the banded backtrack makes the full matrix's choices — or until it covers the whole matrix.
    """
    n_t = len(tgt[1])
    half = max(DTW_HALF_BAND, n_t // DTW_BAND_SHARE) if half is None else half
    dist, inv_s, inv_t = pair_costs(src, tgt)
    while True:
        width = min(n_t, 2 * half + 1)
        lo = band_starts(target_starts, source_starts, half)
        if band_is_connected(lo, width, n_t):
            acc, bound = banded_dtw(dist, inv_s, inv_t, lo, width, side_floors(dist, inv_s, inv_t, lo, width))
            if acc[-1, -1] < bound:
                return dtw_backtrack(acc, lo, n_t)
        half *= 2
