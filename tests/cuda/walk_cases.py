"""How long the backward kernels' tile walks are, from the float64 oracle's windows (shared by
test_emulated_walk.py and test_gpu_walk.py, which need walks longer than one tile table)."""

from __future__ import annotations

import oracle


def _axis_walks(L, K, s, d, c, tq, tk):
    """Along one axis: the most key tiles (tk keys) that one query tile (tq queries) walks, and the
    most query tiles (tq) whose windows meet one key tile (tk)."""
    most_k = most_q = 0
    for g in range(d):
        n = len(range(g, L, d))
        win = [oracle.axis_window(i, L, K, s, d, c)[1:] for i in range(g, L, d)]  # in-group [first, last]
        for c0 in range(0, n, tq):
            most_k = max(most_k, -(-(win[min(c0 + tq, n) - 1][1] + 1 - win[c0][0]) // tk))
        for k0 in range(0, n, tk):
            qs = [i for i in range(n) if win[i][0] < k0 + tk and win[i][1] >= k0]
            most_q = max(most_q, -(-(max(qs) + 1 - min(qs)) // tq) if qs else 0)
    return most_k, most_q


def longest_walks(cfg, tile, key_tile):
    """(most key tiles of one dq block, most query tiles per head of one dk/dv block) over the
    problem's blocks: per-axis maxima multiply, since blocks take every combination of axis tiles."""
    most_k = most_q = 1
    for a in range(cfg["na_dim"]):
        k, q = _axis_walks(cfg["shape"][a], cfg["K"][a], cfg["s"][a], cfg["d"][a], cfg["c"][a], tile[a], key_tile[a])
        most_k, most_q = most_k * k, most_q * q
    return most_k, most_q
