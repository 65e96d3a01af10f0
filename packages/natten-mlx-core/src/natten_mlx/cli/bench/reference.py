"""The checks' references: a float64 NumPy oracle of sampled queries, and the dense mask.

The oracle builds its windows from the stride-1 clamp rule of SEMANTICS.md on its own, so a bug
in the package's window code cannot hide from it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cases import Case


def _axis_neighbors(length: int, kernel: int, dilation: int, positions: np.ndarray) -> np.ndarray:
    """``[S, K]`` key positions of queries ``positions`` along one axis (stride 1, not causal):
    the classic clamp ``start = clamp(c - K // 2, 0, Lg - K)`` in dilation-group coordinates."""
    g, c = positions % dilation, positions // dilation
    group_len = (length - g + dilation - 1) // dilation
    start = np.clip(c - kernel // 2, 0, group_len - kernel)
    return (start[:, None] + np.arange(kernel)[None, :]) * dilation + g[:, None]


def reference_rows(case: Case, q, k, v, rows: np.ndarray) -> np.ndarray:
    """Float64 outputs ``[B, S, H, D]`` of the flat query indices ``rows`` (``S = len(rows)``)."""
    ks, ds = case.per_axis(case.kernel_size), case.per_axis(case.dilation)
    coords = np.unravel_index(rows, case.spatial)
    per_axis = [_axis_neighbors(n, kk, d, c) for n, kk, d, c in zip(case.spatial, ks, ds, coords, strict=True)]
    # row-major product of the per-axis neighbours -> flat key indices [S, Kt]
    flat = np.zeros((len(rows), 1), dtype=np.int64)
    for n, nb in zip(case.spatial, per_axis, strict=True):
        flat = (flat[:, :, None] * n + nb[:, None, :]).reshape(len(rows), -1)
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    qf = np.asarray(q.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, rows]  # [B, S, H, D]
    kf = np.asarray(k.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, flat]  # [B, S, Kt, H, D]
    vf = np.asarray(v.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, flat]
    s = np.einsum("bshd,bskhd->bshk", qf, kf) * d**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bshk,bskhd->bshd", p, vf)


def sample_rows(case: Case, count: int = 256) -> np.ndarray:
    """Flat query indices to check: the first and last few tokens (borders) and a seeded sample."""
    n = case.tokens
    rng = np.random.default_rng(1234)
    picks = np.concatenate([np.arange(min(16, n)), np.arange(max(0, n - 16), n), rng.integers(0, n, count)])
    return np.unique(picks)


def max_err(a, b) -> float:
    """Largest absolute difference of two arrays, in float64."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def neighborhood_mask(case: Case) -> np.ndarray:
    """Dense ``[N, N]`` boolean (query, key) mask of the case (``N`` tokens): the core's one dense
    reference mask, :func:`natten_mlx.geometry.dense_mask`."""
    import natten_mlx
    from natten_mlx.geometry import dense_mask

    q = mx.zeros((case.batch, *case.spatial, case.heads, case.head_dim), dtype=mx.float32)
    problem = natten_mlx.explain(case.op, q, q, q, kernel_size=case.kernel_size, dilation=case.dilation).problem
    return np.asarray(dense_mask(problem), dtype=bool)
