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

_u = np.uint64  # array indices cast to unsigned in the kernels: no negative-index wraparound code
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
    low = np.empty(dist.shape[0], np.int32)  # each source string's cheapest cell anywhere: a sweep's stop
    for u in range(dist.shape[0]):
        low[u] = _row_min(dist[u], 0, dist.shape[1], _I32_MAX)
    left = _sweep(dist, inv_s, np.empty(0, np.int32), low, seen[lo], 0, n, 1)  # columns in order already
    order, seen_after = _last_occurrence_order(inv_t, dist.shape[1])
    right = _sweep(dist, inv_s, order, low, seen_after[lo + width], n - 1, -1, -1)
    return left, right


_I32_MAX = np.int32(2**31 - 1)


@numba.njit(cache=True, nogil=True)
def _last_occurrence_order(inv_t: np.ndarray, n_u: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct target strings by last occurrence, latest first, and how many occur in ``tgt[p:]``."""
    n_t = len(inv_t)
    order, count, done = np.empty(n_u, np.int32), np.zeros(n_t + 1, np.int64), np.zeros(n_u, np.bool_)
    k = 0
    for p in range(n_t - 1, -1, -1):
        if not done[inv_t[p]]:
            done[inv_t[p]], order[k] = True, inv_t[p]
            k += 1
        count[p] = k
    return order, count


@numba.njit(cache=True, nogil=True)
def _row_min(row: np.ndarray, start: int, stop: int, low: np.int32) -> np.int32:
    """``min(low, row[start:stop])``, a loop the compiler vectorises."""
    for q in range(start, stop):
        low = min(low, row[_u(q)])
    return low


@numba.njit(cache=True, nogil=True)
def _row_min_at(row: np.ndarray, order: np.ndarray, start: int, stop: int, low: np.int32) -> np.int32:
    """``min(low, row[order[start:stop]])``."""
    for q in range(start, stop):
        low = min(low, row[_u(order[_u(q)])])
    return low


@numba.njit(cache=True, nogil=True)
def _sweep(dist: np.ndarray, inv_s: np.ndarray, order: np.ndarray, low: np.ndarray, count: np.ndarray,
           first: int, stop: int, step: int) -> np.ndarray:
    """``out[r] = min(dist[inv_s[r], order[:count[r]]])`` (``UNREACHABLE`` for none; an empty ``order``:
    the columns in their order), rows visited in ``range(first, stop, step)``, an order in which ``count``
    never decreases. One running minimum per source string, advanced only as far as each row needs, in
    chunks (vectorised), and no further once it reaches ``low``, the string's minimum over the whole row."""
    best = np.full(dist.shape[0], _I32_MAX, np.int32)
    done = np.zeros(dist.shape[0], np.int64)  # how far each source string's minimum has advanced
    out = np.empty(len(inv_s), np.int64)
    identity = len(order) == 0
    chunk = 64 if identity else 16
    for r in range(first, stop, step):
        u, c = inv_s[_u(r)], count[_u(r)]
        k, m, floor = done[_u(u)], best[_u(u)], low[_u(u)]
        if k < c and m > floor:
            row = dist[u]
            while k < c and m > floor:
                e = min(c, k + chunk)
                m = _row_min(row, k, e, m) if identity else _row_min_at(row, order, k, e, m)
                k = e
            done[_u(u)], best[_u(u)] = k, m
        out[_u(r)] = m if c > 0 else UNREACHABLE
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
def _d_cells(dist: np.ndarray, t0: int, inv_t: np.ndarray, c0: int, d_buf: np.ndarray, prev: int, cur: int,
             start: int, stop: int, d: int) -> int:
    """D over band cells ``start .. stop-1`` of a row, ``d`` the cell left of ``start``; returns the last.

    Flat arrays and offsets, so that a row costs no array views: the row's edit distances are
    ``dist[t0:]`` (``dist`` raveled), its band's target strings ``inv_t[c0:]``, and D rows live in
    ``d_buf``, padded: ``d_buf[cur]`` is the cell left of the band, ``d_buf[cur + 1 + k]`` band cell k,
    then the cells right of it (unreachable for D); ``prev`` is the previous row's offset plus how far the
    band moved right. Indices are cast to unsigned: they are never negative, and numba then drops its
    negative-index wraparound from every load."""
    diag = d_buf[_u(prev + start)]
    for k in range(start, stop):
        up = d_buf[_u(prev + k + 1)]
        d = min(min(diag, up), d) + dist[_u(t0 + inv_t[_u(c0 + k)])]
        d_buf[_u(cur + k + 1)] = d
        diag = up
    return d


@numba.njit(cache=True, nogil=True)
def _first_row(dist: np.ndarray, t0: int, inv_t: np.ndarray, width: int, d_buf: np.ndarray,
               acc: np.ndarray) -> None:
    """Row 0 of D: entered from the left only."""
    d = 0
    for k in range(width):
        d += dist[_u(t0 + inv_t[_u(k)])]
        d_buf[_u(k + 1)] = d
        acc[0, _u(k)] = d


@numba.njit(cache=True, nogil=True)
def _band_pass(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int) -> np.ndarray:
    """D in the band, ``(n_s, width) int64``: the unchecked pass."""
    n, n_u, stride = len(lo), dist.shape[1], 2 * width + 1
    flat = dist.reshape(-1)
    acc = np.empty((n, width), np.int64)
    d_buf = np.full(2 * stride, UNREACHABLE, np.int64)  # two padded rows, alternating
    _first_row(flat, inv_s[0] * n_u, inv_t, width, d_buf, acc)
    for r in range(1, n):
        cur = (r & 1) * stride
        prev = stride - cur + lo[r] - lo[r - 1]
        _d_cells(flat, inv_s[r] * n_u, inv_t, lo[r], d_buf, prev, cur, 0, width, UNREACHABLE)
        for k in range(width):
            acc[r, _u(k)] = d_buf[_u(cur + k + 1)]
    return acc


_PAD = 4  # cells written past a row's left stretch (dead) and past the band (the right state) every row


@numba.njit(cache=True, nogil=True)
def _certified_pass(dist: np.ndarray, inv_s: np.ndarray, inv_t: np.ndarray, lo: np.ndarray, width: int,
                    left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, int]:
    """D in the band, as :func:`_band_pass`, and L at the last cell, in one pass (see :func:`banded_dtw`).

    L rows are padded like D's (``l_buf``, the same offsets): index 0 holds the row's left state (cells
    left of the band, lumped), the pad right of the band the previous row's right state. A row's L is
    computed on two stretches, D alone in between:

    - from the left edge: over the cells with a possibly live cell above (``a``: one past the previous
      row's last live cell there) and at least the first ``win`` cells, then on along the row while L
      stays live;
    - to the right edge: from below the previous row's first live cell there (``b``), or where the right
      state enters, and at least the last ``win`` cells.

    The fixed ``win`` gives most rows the same three loop lengths (branches the processor predicts; the
    cells it adds hold dead L). Cells in between hold stale values, which no read reaches: the left
    stretch writes ``_PAD`` dead cells past its end and reads at most that far past the previous row's
    when the band moved right by at most ``_PAD`` (other rows go by ``a`` alone), and the right stretch
    writes a dead cell before its start, where the next row's right stretch reads from at the earliest.
    """
    n, n_u, stride = len(lo), dist.shape[1], 2 * width + 1 + _PAD
    flat = dist.reshape(-1)
    acc = np.empty((n, width), np.int64)
    d_buf = np.full(2 * stride, UNREACHABLE, np.int64)
    l_buf = np.full(2 * stride, UNREACHABLE, np.int64)
    _first_row(flat, inv_s[0] * n_u, inv_t, width, d_buf, acc)
    win = min(max(8, width // 8), width)
    a, b = 0, width  # row 0: no live L
    sl = UNREACHABLE  # row 0 has no cells left of the band
    sr = right[0] + d_buf[width] if right[0] < UNREACHABLE else UNREACHABLE
    for r in range(1, n):
        s = lo[r] - lo[r - 1]
        cur = (r & 1) * stride
        base = stride - cur  # the previous row's offset
        prev = base + s
        t0, c0 = inv_s[r] * n_u, lo[r]
        for i in range(_PAD):  # the previous row's cells right of its band (those past s are never read)
            l_buf[_u(base + width + 1 + i)] = sr
        for i in range(_PAD, s):
            l_buf[_u(base + width + 1 + i)] = sr
        # The left state: the row's floor there plus the cheapest way in from the row above (the cells
        # of the previous band left of this one, D or live L, or the previous row's left state).
        sl_prev, best = sl, sl
        for i in range(min(_PAD, width)):  # band cells of the previous row left of this band: i < s
            inside = i < s
            dv, lv = d_buf[_u(base + i + 1)], l_buf[_u(base + i + 1)]
            live = inside & ((i < a) | (i >= b))
            best = min(best, min(dv if inside else UNREACHABLE, lv if live else UNREACHABLE))
        for i in range(_PAD, min(s, width)):
            lv = l_buf[_u(base + i + 1)]
            best = min(best, min(d_buf[_u(base + i + 1)], lv if (i < a) | (i >= b) else UNREACHABLE))
        sl = left[r] + best if left[r] < UNREACHABLE else UNREACHABLE
        l_buf[_u(cur)] = sl
        # Where the right stretch starts: below the previous row's live right stretch, or where the right
        # state enters (the previous row's cells right of its band lie above this row's last s cells).
        rstart = b - s if b < width else width
        rstart = min(rstart, width - s if (s > 0) & (sr < UNREACHABLE) else width)
        rstart = max(rstart, 0)
        # Left stretch: cells with a possibly live cell above (diagonal or up), and the window.
        e1 = max(a - s + 1, 0) if a > 0 else 0
        e1 = min(max(e1, win) if s <= _PAD else e1, rstart)
        d, cost, last = UNREACHABLE, sl, -1
        d_diag, l_diag = d_buf[_u(prev)], l_buf[_u(prev)]
        for k in range(e1):
            c = flat[_u(t0 + inv_t[_u(c0 + k)])]
            d_up, l_up = d_buf[_u(prev + k + 1)], l_buf[_u(prev + k + 1)]
            d = min(min(d_diag, d_up), d) + c
            d_buf[_u(cur + k + 1)] = d
            cost = min(min(l_diag, l_up), cost) + c
            l_buf[_u(cur + k + 1)] = cost | ((d - cost) >> 63 & UNREACHABLE)  # pruned where L > D
            last = k if cost <= d else last
            d_diag, l_diag = d_up, l_up
        # Then on along the row while L is live (nothing live above; the first cell's diagonal is the
        # previous row's left state when the band did not move).
        k = e1
        if k == 0 and s == 0:
            cost = min(cost, sl_prev)
        while k < rstart and cost <= d and cost < UNREACHABLE:
            c = flat[_u(t0 + inv_t[_u(c0 + k)])]
            d = min(min(d_buf[_u(prev + k)], d_buf[_u(prev + k + 1)]), d) + c
            d_buf[_u(cur + k + 1)] = d
            cost = cost + c
            l_buf[_u(cur + k + 1)] = cost | ((d - cost) >> 63 & UNREACHABLE)
            last = k if cost <= d else last
            k += 1
        k_l = k
        for i in range(_PAD):
            l_buf[_u(cur + k_l + 1 + i)] = UNREACHABLE
        # D alone up to the right stretch, then D and L to the right edge (L carried on if contiguous).
        k_r = max(min(rstart, width - win), k_l)
        if k_r > k_l:
            d = _d_cells(flat, t0, inv_t, c0, d_buf, prev, cur, k_l, k_r, d)
            cost = UNREACHABLE  # the cells in between are dead
            l_buf[_u(cur + k_r)] = UNREACHABLE  # band cell k_r - 1: the next row's right stretch reads it
        first = width
        d_diag, l_diag = d_buf[_u(prev + k_r)], l_buf[_u(prev + k_r)]
        for k in range(k_r, width):
            c = flat[_u(t0 + inv_t[_u(c0 + k)])]
            d_up, l_up = d_buf[_u(prev + k + 1)], l_buf[_u(prev + k + 1)]
            d = min(min(d_diag, d_up), d) + c
            d_buf[_u(cur + k + 1)] = d
            cost = min(min(l_diag, l_up), cost) + c
            l_buf[_u(cur + k + 1)] = cost | ((d - cost) >> 63 & UNREACHABLE)
            first = min(first, k if cost <= d else width)
            d_diag, l_diag = d_up, l_up
        # The right state: entered from this row's last cell, from the cell above it, or from the
        # previous row's cells right of the band.
        if right[r] < UNREACHABLE:
            up = min(d_buf[_u(prev + width)], l_buf[_u(prev + width)])
            sr = right[r] + min(min(d_buf[_u(cur + width)], l_buf[_u(cur + width)]), min(up, sr))
        else:
            sr = UNREACHABLE
        for k in range(width):
            acc[r, _u(k)] = d_buf[_u(cur + k + 1)]
        a, b = last + 1, first
    return acc, min(l_buf[_u((n - 1 & 1) * stride + width)], UNREACHABLE)


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
        return _band_pass(dist, inv_s, inv_t, lo, width), UNREACHABLE
    return _certified_pass(dist, inv_s, inv_t, lo, width, floors[0], floors[1])


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
