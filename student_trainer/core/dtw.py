"""The MinED DTW: exact, but computed in a band around the character diagonal.

Pure numpy over token strings (the aligner's canonical strings without spaces) and the tokens' start
characters. D[i, j] = c[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]) with c the Levenshtein distance;
the path is backtracked from the last cell with ties broken diagonal > up > left (the paper's). The band
is a certificate, not a heuristic: :func:`exact_banded_path` widens it until :func:`band_lower_bound`
proves that no path leaving it can be optimal or win a tie, so the result is the full O(n·m) DTW's path.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

_INF = np.int64(1 << 40)  # "unreachable" DTW cost, exact in int64 arithmetic
DTW_HALF_BAND = 64  # smallest initial band half-width in target tokens
DTW_BAND_SHARE = 16  # initial half-width at least n_t / 16: the certificate needs wider bands on longer texts


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


def _band_costs(src: np.ndarray, tgt: np.ndarray, lo: np.ndarray,
                width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edit distance of every band cell ``(n_s, width) int64`` via one cdist over distinct strings, and
    the cheapest cell of every row ``(n_s,)`` and column ``(n_t,)`` of the whole matrix."""
    us, inv_s = np.unique(src, return_inverse=True)
    ut, inv_t = np.unique(tgt, return_inverse=True)
    dist = process.cdist(list(us), list(ut), scorer=Levenshtein.distance, dtype=np.int32, workers=1)
    cols = inv_t[lo[:, None] + np.arange(width)]
    row_min, col_min = dist.min(axis=1)[inv_s], dist.min(axis=0)[inv_t]
    return dist[inv_s[:, None], cols].astype(np.int64), row_min.astype(np.int64), col_min.astype(np.int64)


def banded_dtw(cost: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Cumulative DTW cost inside the band: ``cost (n_s, W)``, ``lo (n_s,)`` → ``(n_s, W) int64``.

    D[i, j] = c[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]). Each row is vectorised: with
    a = c + min(up, diag) and S the row's prefix sum of c, D = S + cummin(a - S), exact in integers.
    """
    n, width = cost.shape
    prefix = np.cumsum(cost, axis=1)
    rest = cost - prefix  # c - S, added to min(up, diag) in every row
    out = np.empty((n, width), np.int64)
    out[0] = prefix[0]
    prev = np.full(2 * width + 1, _INF, np.int64)  # the previous row in columns 1 .. width, _INF around
    tmp = np.empty(width, np.int64)
    for i, k in enumerate(np.diff(lo).tolist(), start=1):
        prev[1:width + 1] = out[i - 1]
        np.minimum(prev[1 + k:1 + k + width], prev[k:k + width], out=tmp)
        tmp += rest[i]
        row = out[i]
        np.minimum.accumulate(tmp, out=row)
        row += prefix[i]
    return out


def _band_edges(lo: np.ndarray, width: int, n_t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Band cells (row, column) with a successor outside the band (*exits*) and with a predecessor outside
    it (*entries*): ``(exit_rows, exit_cols, entry_rows, entry_cols)``."""
    n = len(lo)
    rows = np.arange(n)
    right = lo + width < n_t  # right edge: the cell to the right lies outside
    jump = np.diff(lo)  # row i's first jump[i] cells have the cell below outside (left of row i+1's band)
    down_r = np.repeat(rows[:-1], jump)
    down_c = lo[down_r] + np.arange(len(down_r)) - np.repeat(np.cumsum(jump) - jump, jump)
    left = lo > 0  # left edge: the cell to the left lies outside
    # row i+1's last jump[i] cells have the cell above outside (right of row i's band)
    up_r = np.repeat(rows[1:], jump)
    up_c = lo[up_r] + width - 1 - (np.arange(len(up_r)) - np.repeat(np.cumsum(jump) - jump, jump))
    return (np.concatenate([rows[right], down_r]), np.concatenate([(lo + width - 1)[right], down_c]),
            np.concatenate([rows[left], up_r]), np.concatenate([lo[left], up_c]))


def _pair_bound(d_val: np.ndarray, d_key: np.ndarray, e_val: np.ndarray, e_key: np.ndarray,
                floor: np.ndarray) -> int:
    """min of D(a) + (floors strictly between a and b) + E(b) over exits a and entries b with key(a) <= key(b)."""
    acc = np.concatenate([[0], np.cumsum(floor)])  # acc[k] = sum of floor[:k]
    best = np.full(len(floor), _INF, np.int64)
    np.minimum.at(best, d_key, d_val - acc[np.minimum(d_key + 1, len(floor))])
    best = np.minimum.accumulate(best)
    return int((best[e_key] + e_val + acc[e_key]).min(initial=_INF))


def band_lower_bound(cost: np.ndarray, acc: np.ndarray, lo: np.ndarray, n_t: int, row_min: np.ndarray,
                     col_min: np.ndarray) -> int:
    """A lower bound on the cost of every full-matrix DTW path that leaves the band.

    Such a path leaves the band for the first time after a band cell ``a`` (an *exit*) and comes back for
    the last time at a band cell ``b`` (an *entry*), with ``a`` before ``b``. Up to ``a`` it runs inside
    the band, so it costs at least the banded D(a); from ``b`` on at least E(b), the banded DTW run
    backwards from the last cell; in between it crosses every row (column) strictly between them, each at
    least that row's (column's) cheapest cell. "Before" is relaxed to rows, and to columns, separately.
    """
    n, width = cost.shape
    if width == n_t:
        return int(_INF)  # nothing lies outside the band
    back = banded_dtw(cost[::-1, ::-1], (n_t - width - lo)[::-1])[::-1, ::-1]
    x_r, x_c, e_r, e_c = _band_edges(lo, width, n_t)
    d_val, e_val = acc[x_r, x_c - lo[x_r]], back[e_r, e_c - lo[e_r]]
    return max(_pair_bound(d_val, x_r, e_val, e_r, row_min), _pair_bound(d_val, x_c, e_val, e_c, col_min))


def dtw_backtrack(acc: np.ndarray, lo: np.ndarray, n_t: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's backtrack from the last cell; ties: diagonal > up (source-1) > left (target-1).

    Returns the path as ``(source_pos, target_pos)`` int64 arrays, end to start.
    """
    width, inf = acc.shape[1], int(_INF)
    lo_l = lo.tolist()

    def at(i: int, j: int) -> int:
        k = j - lo_l[i]
        return acc.item(i, k) if 0 <= k < width else inf

    i, j = len(lo_l) - 1, n_t - 1
    path_i, path_j = [i], [j]
    while i > 0 or j > 0:
        diag = at(i - 1, j - 1) if i > 0 and j > 0 else inf
        up = at(i - 1, j) if i > 0 else inf
        left = at(i, j - 1) if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path_i.append(i)
        path_j.append(j)
    return np.array(path_i, np.int64), np.array(path_j, np.int64)


def exact_banded_path(src: np.ndarray, tgt: np.ndarray, target_starts: np.ndarray, source_starts: np.ndarray,
                      half: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full DTW's path over ``src (n_s,)`` × ``tgt (n_t,)`` (object arrays of str), as
    ``(source_pos, target_pos)`` from the last cell back to (0, 0).

    The band is centred on the target token where each source token starts (``*_starts``: char offsets),
    with initial half-width ``half`` (default max(64, n_t / 16)); it doubles until its best path is strictly
    cheaper than :func:`band_lower_bound` — then no path that leaves the band can be optimal, nor win a tie,
    and the banded backtrack makes the full matrix's choices — or until it covers the whole matrix.
    """
    n_t = len(tgt)
    half = max(DTW_HALF_BAND, n_t // DTW_BAND_SHARE) if half is None else half
    while True:
        width = min(n_t, 2 * half + 1)
        lo = _band_starts(target_starts, source_starts, half)
        if _band_is_connected(lo, width, n_t):
            cost, row_min, col_min = _band_costs(src, tgt, lo, width)
            acc = banded_dtw(cost, lo)
            if acc[-1, -1] < band_lower_bound(cost, acc, lo, n_t, row_min, col_min):
                return dtw_backtrack(acc, lo, n_t)
        half *= 2
