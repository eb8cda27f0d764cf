"""The paper's MinED DTW written the plain, obviously-correct way: the reference the fast aligner is
checked against (tests) and timed against (bench/alignment.py)."""

from __future__ import annotations

import numpy as np
from rapidfuzz.distance import Levenshtein


def plain_dtw(src: list[str], tgt: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The paper's DTW, cell by cell: O(n·m) edit-distance calls, then backtrack (diag > up > left)."""
    n, m = len(src), len(tgt)
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            acc[i + 1, j + 1] = Levenshtein.distance(src[i], tgt[j]) + min(acc[i, j + 1], acc[i + 1, j], acc[i, j])
    acc = acc[1:, 1:]
    i, j = n - 1, m - 1
    path_i, path_j = [i], [j]
    while i > 0 or j > 0:
        diag = acc[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = acc[i - 1, j] if i > 0 else np.inf
        left = acc[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path_i.append(i)
        path_j.append(j)
    return np.array(path_i), np.array(path_j)


def plain_band_costs(src: list[str], tgt: list[str], lo: np.ndarray, width: int) -> tuple[float, float]:
    """The cheapest path inside the band (row i holds columns ``lo[i] .. lo[i] + width - 1``) and the
    cheapest full-matrix path that visits a cell outside it, cell by cell (inf where there is none)."""
    n, m = len(src), len(tgt)
    stay = np.full((n + 1, m + 1), np.inf)  # paths that never left the band
    left = np.full((n + 1, m + 1), np.inf)  # paths that visited a cell outside it
    stay[0, 0] = 0.0
    for i in range(n):
        for j in range(m):
            cost = Levenshtein.distance(src[i], tgt[j])
            best_stay = min(stay[i, j + 1], stay[i + 1, j], stay[i, j])
            best_left = min(left[i, j + 1], left[i + 1, j], left[i, j])
            if lo[i] <= j < lo[i] + width:
                stay[i + 1, j + 1], left[i + 1, j + 1] = cost + best_stay, cost + best_left
            else:
                left[i + 1, j + 1] = cost + min(best_stay, best_left)
    return stay[n, m], left[n, m]
