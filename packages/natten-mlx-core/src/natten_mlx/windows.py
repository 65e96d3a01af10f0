"""Window arithmetic of neighborhood attention: the one place where SEMANTICS.md is coded.

Everything here is NumPy on small integer tables, computed once per (shape, parameters) and
cached. Kernels and backends receive these tables (or the per-axis numbers in them); they never
re-derive the rules.

Per axis of length ``L`` with kernel size ``K``, stride ``s``, dilation ``d`` and a causal flag,
every query ``i`` owns ``K`` *slots*. Slot ``j`` holds the key whose in-group coordinate is
``window_start(i) + j``; a slot is *valid* when that key is in the query's neighborhood (always,
unless causal, where slots past the query itself are invalid). Slot order is the order of the
attention weights of the split ops (``na*d_qk``), as upstream NATTEN lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class AxisWindows:
    """Slot tables of one spatial axis for ``query_length`` queries; every array is ``[Lq, K]`` unless noted.

    key_index: the key's position along the axis, local to the key slab (global position minus
               ``kv_offset``; for a whole-domain problem, input coordinates in ``[0, L)``).
    valid:     whether the slot belongs to the neighborhood.
    rel:       ``key_c - query_c + K - 1`` in group coordinates: the rpb column of the slot.
    start:     ``[Lq]``, the window start of each query, local to the key slab.
    """

    length: int
    kernel_size: int
    stride: int
    dilation: int
    is_causal: bool
    key_index: np.ndarray
    valid: np.ndarray
    rel: np.ndarray
    start: np.ndarray
    query_offset: int = 0
    kv_offset: int = 0


def _window_start_in_group(c: np.ndarray, group_len: np.ndarray, k: int, s: int, causal: bool):
    """Window start (group coordinates) of each query with in-group coordinate ``c``."""
    if causal:
        leader = np.minimum((c // s) * s + s - 1, group_len - 1)
        return np.maximum(leader - k + 1, 0)
    wl = k // 2
    wr = k // 2 + (k % 2) - 1
    leader = np.minimum((c // s) * s + s // 2, group_len - 1)
    centre = np.clip(leader, wl, group_len - 1 - wr)
    return centre - wl


def _global_starts(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, i: np.ndarray):
    """Window start (global input coordinates) and in-group coordinate of the global queries ``i``."""
    g = i % dilation
    c = i // dilation
    group_len = -((g - length) // dilation)  # ceil((L - g) / d)
    start_c = _window_start_in_group(c, group_len, kernel_size, stride, is_causal)
    return start_c * dilation + g, start_c, c


@lru_cache(maxsize=512)
def axis_windows(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
    query_offset: int = 0, query_length: int | None = None, kv_offset: int = 0,
) -> AxisWindows:
    """Slot tables for one axis of global length ``length``.

    The queries are the global positions ``query_offset .. query_offset + query_length - 1``
    (default: the whole axis); key positions are given relative to ``kv_offset`` (the first key of
    the local key slab). Requires ``kernel_size * dilation <= length`` (validated earlier).
    """
    count = length - query_offset if query_length is None else query_length
    i = np.arange(query_offset, query_offset + count, dtype=np.int64)
    start, start_c, c = _global_starts(length, kernel_size, stride, dilation, is_causal, i)
    slot = np.arange(kernel_size, dtype=np.int64)
    key_c = start_c[:, None] + slot[None, :]
    valid = key_c <= c[:, None] if is_causal else np.ones_like(key_c, dtype=bool)
    key_index = start[:, None] + slot[None, :] * dilation - kv_offset
    rel = key_c - c[:, None] + kernel_size - 1
    start = start - kv_offset
    for x in (key_index, valid, rel, start):
        x.setflags(write=False)
    return AxisWindows(length, kernel_size, stride, dilation, is_causal, key_index, valid, rel, start, query_offset,
                       kv_offset)


@lru_cache(maxsize=512)
def axis_starts(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
    query_offset: int = 0, query_length: int | None = None, kv_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(start, count)``, both ``[Lq]``: each query's window start local to the key slab, and its
    number of valid slots (``K``, fewer for causal queries near their group's start). The same
    numbers as :func:`axis_windows` without its ``[Lq, K]`` tables (cheap for millions of queries)."""
    count = length - query_offset if query_length is None else query_length
    i = np.arange(query_offset, query_offset + count, dtype=np.int64)
    start, start_c, c = _global_starts(length, kernel_size, stride, dilation, is_causal, i)
    valid = np.minimum(c - start_c + 1, kernel_size) if is_causal else np.full(count, kernel_size, dtype=np.int64)
    start = start - kv_offset
    start.setflags(write=False)
    valid.setflags(write=False)
    return start, valid


def key_extent(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, query_offset: int = 0,
    query_length: int | None = None,
) -> tuple[int, int]:
    """``(lo, hi)``: the global key positions ``[lo, hi)`` that the windows of the queries
    ``query_offset .. query_offset + query_length - 1`` cover along one axis, every slot counted
    (also the invalid causal slots past a query, which kernels may still read).

    The smallest key slab a sub-domain problem accepts (the halo of a shard)."""
    count = length - query_offset if query_length is None else query_length
    if count <= 0:
        return query_offset, query_offset
    i = np.arange(query_offset, query_offset + count, dtype=np.int64)
    start = _global_starts(length, kernel_size, stride, dilation, is_causal, i)[0]
    return int(start.min()), int(start.max()) + (kernel_size - 1) * dilation + 1


def axis_args(geometry) -> list[tuple]:
    """Per-axis ``axis_windows`` arguments of a geometry tuple (see :attr:`Problem.geometry`)."""
    spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial, kv_offset = geometry
    return [
        (domain[a], kernel_size[a], stride[a], dilation[a], is_causal[a], query_offset[a], spatial[a], kv_offset[a])
        for a in range(len(spatial))
    ]


def full_geometry(spatial, kernel_size, stride, dilation, is_causal, domain=None, query_offset=None, kv_spatial=None,
                  kv_offset=None) -> tuple:
    """The nine-entry geometry tuple (:attr:`natten_mlx.problem.Problem.geometry`), defaults filled."""
    spatial = tuple(spatial)
    zeros = (0,) * len(spatial)
    return (
        spatial, tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal),
        tuple(domain) if domain else spatial, tuple(query_offset) if query_offset else zeros,
        tuple(kv_spatial) if kv_spatial else spatial, tuple(kv_offset) if kv_offset else zeros,
    )


@dataclass(frozen=True)
class NeighborhoodTables:
    """Flattened slot tables of a whole nD problem: queries and keys in row-major token order.

    key_index: ``[N, Kt]`` int32, the flat token index of each slot's key in the key slab
               (``N = prod(spatial)`` queries, ``Kt = prod(kernel_size)``; slots row-major over the
               per-axis slots; keys row-major over ``kv_spatial``).
    valid:     ``[N, Kt]`` bool, or None when every slot is valid (no causal axis).
    rpb_index: ``[N, Kt]`` int32, the flat index into ``rpb.reshape(H, -1)`` of each slot.
    """

    key_index: np.ndarray
    valid: np.ndarray | None
    rpb_index: np.ndarray


def row_major_strides(sizes) -> list[int]:
    """Row-major strides of an array of shape ``sizes`` (in elements)."""
    return [int(np.prod(sizes[a + 1 :], dtype=np.int64)) for a in range(len(sizes))]


def outer(tables, op=np.add, weights=None, xp=np):
    """Row-major outer combination of per-axis tables: ``[L_a, K_a]`` per axis -> ``[N, Kt]``.

    ``N = prod(L_a)`` and ``Kt = prod(K_a)``, both row-major over the axes; entry
    ``[(i_1..i_n), (j_1..j_n)]`` is ``op``-folded ``tables[a][i_a, j_a] * weights[a]``. With
    ``op=np.add`` and ``weights`` the row-major strides of a shape, index tables combine into flat
    indices; with ``op=np.logical_and`` masks into a mask. Tables may carry a leading batch axis
    shared by all (``[T, L_a, K_a]`` -> ``[T, N, Kt]``, as tile tables do). ``xp`` is ``numpy`` or
    ``mlx.core`` (``op`` then ``mx.add``/``mx.logical_and``).
    """
    n = len(tables)
    lead = tuple(tables[0].shape[:-2])
    out = None
    for a, tab in enumerate(tables):
        shape = list(lead) + [1] * (2 * n)
        shape[len(lead) + a], shape[len(lead) + n + a] = tab.shape[-2], tab.shape[-1]
        term = tab.reshape(shape)
        if weights is not None:
            term = term * weights[a]
        out = term if out is None else op(out, term)
    rows = [int(t.shape[-2]) for t in tables]
    cols = [int(t.shape[-1]) for t in tables]
    full = lead + tuple(rows) + tuple(cols)
    return xp.broadcast_to(out, full).reshape(*lead, int(np.prod(rows)), int(np.prod(cols)))


@lru_cache(maxsize=128)
def _neighborhood_tables(geometry) -> NeighborhoodTables:
    spatial, kernel_size, _, _, is_causal, _, _, kv_spatial, _ = geometry
    axes = [axis_windows(*args) for args in axis_args(geometry)]
    key_index = outer([ax.key_index for ax in axes], np.add, row_major_strides(kv_spatial))
    valid = outer([ax.valid for ax in axes], np.logical_and) if any(is_causal) else None
    rpb_index = outer([ax.rel for ax in axes], np.add, row_major_strides([2 * k - 1 for k in kernel_size]))
    key_index, rpb_index = key_index.astype(np.int32), rpb_index.astype(np.int32)
    for x in (key_index, valid, rpb_index):
        if x is not None:
            x.setflags(write=False)
    return NeighborhoodTables(key_index, valid, rpb_index)


def neighborhood_tables(spatial, kernel_size, stride, dilation, is_causal, domain=None, query_offset=None,
                        kv_spatial=None, kv_offset=None) -> NeighborhoodTables:
    """Slot tables of a problem's geometry (cached); the sub-domain fields default to a whole domain."""
    return _neighborhood_tables(full_geometry(spatial, kernel_size, stride, dilation, is_causal, domain, query_offset,
                                              kv_spatial, kv_offset))


def neighborhood_mask(spatial, kernel_size, stride, dilation, is_causal, domain=None, query_offset=None,
                      kv_spatial=None, kv_offset=None) -> np.ndarray:
    """Dense ``[N, N_kv]`` boolean mask (query, key) of the neighborhood; for baselines and checks.

    ``N`` queries and ``N_kv`` keys (of the key slab) in row-major token order."""
    geometry = full_geometry(spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial,
                             kv_offset)
    t = _neighborhood_tables(geometry)
    n = t.key_index.shape[0]
    mask = np.zeros((n, int(np.prod(geometry[7]))), dtype=bool)
    rows = np.broadcast_to(np.arange(n)[:, None], t.key_index.shape)
    sel = np.ones_like(t.key_index, dtype=bool) if t.valid is None else t.valid
    mask[rows[sel], t.key_index[sel]] = True
    return mask


@dataclass(frozen=True)
class Run:
    """Queries along one axis whose windows move in lock-step: ``count`` positions
    ``first, first + step, ...``; the slot-0 key of the m-th is ``key_start + m * key_step``
    (``key_step`` is 0 when they share one window, ``step`` when the window moves with them)."""

    first: int
    step: int
    count: int
    key_start: int
    key_step: int

    def keys(self, slot: int, dilation: int) -> slice:
        """Key positions of ``slot`` for every query of the run (a single position when shared)."""
        start = self.key_start + slot * dilation
        if self.key_step == 0:
            return slice(start, start + 1)
        return slice(start, start + self.key_step * (self.count - 1) + 1, self.key_step)


@lru_cache(maxsize=512)
def axis_runs(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool,
    query_offset: int = 0, query_length: int | None = None, kv_offset: int = 0,
) -> tuple[Run, ...]:
    """Cover one axis' queries with runs, read off :func:`axis_windows`' window starts (local
    query positions; key positions local to the key slab).

    Queries of one dilation group and one stride residue form an arithmetic progression; along it
    the window start is constant or moves with the query except near the borders, so each such
    progression splits into a few runs (about three: left border, interior, right border).
    """
    starts = axis_windows(length, kernel_size, stride, dilation, is_causal, query_offset, query_length, kv_offset).start
    count = len(starts)
    step = stride * dilation
    runs = []
    for first in range(min(step, count)):
        pos = np.arange(first, count, step)
        st = starts[pos]
        m = 0
        while m < len(pos):
            e, diff = m, 0
            if m + 1 < len(pos) and st[m + 1] - st[m] in (0, step):
                diff = int(st[m + 1] - st[m])
                e = m + 1
                while e + 1 < len(pos) and st[e + 1] - st[e] == diff:
                    e += 1
            runs.append(Run(int(pos[m]), step, e - m + 1, int(st[m]), diff))
            m = e + 1
    return tuple(runs)
