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
    """Slot tables of one spatial axis; every array is ``[L, K]`` unless noted.

    key_index: the key's position along the axis (input coordinates, always in ``[0, L)``).
    valid:     whether the slot belongs to the neighborhood.
    rel:       ``key_c - query_c + K - 1`` in group coordinates: the rpb column of the slot.
    start:     ``[L]``, the window start of each query in input coordinates.
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


@lru_cache(maxsize=512)
def axis_windows(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool) -> AxisWindows:
    """Slot tables for one axis. Requires ``kernel_size * dilation <= length`` (validated earlier)."""
    i = np.arange(length, dtype=np.int64)
    g = i % dilation
    c = i // dilation
    group_len = -((g - length) // dilation)  # ceil((L - g) / d)
    start_c = _window_start_in_group(c, group_len, kernel_size, stride, is_causal)
    slot = np.arange(kernel_size, dtype=np.int64)
    key_c = start_c[:, None] + slot[None, :]
    valid = key_c <= c[:, None] if is_causal else np.ones_like(key_c, dtype=bool)
    key_index = key_c * dilation + g[:, None]
    rel = key_c - c[:, None] + kernel_size - 1
    for a in (key_index, valid, rel):
        a.setflags(write=False)
    start = start_c * dilation + g
    start.setflags(write=False)
    return AxisWindows(length, kernel_size, stride, dilation, is_causal, key_index, valid, rel, start)


@dataclass(frozen=True)
class NeighborhoodTables:
    """Flattened slot tables of a whole nD problem: queries and keys in row-major token order.

    key_index: ``[N, Kt]`` int32, the flat token index of each slot's key (``N = prod(spatial)``,
               ``Kt = prod(kernel_size)``; slots row-major over the per-axis slots).
    valid:     ``[N, Kt]`` bool, or None when every slot is valid (no causal axis).
    rpb_index: ``[N, Kt]`` int32, the flat index into ``rpb.reshape(H, -1)`` of each slot.
    """

    key_index: np.ndarray
    valid: np.ndarray | None
    rpb_index: np.ndarray


def _row_major_strides(sizes) -> list[int]:
    return [int(np.prod(sizes[a + 1 :], dtype=np.int64)) for a in range(len(sizes))]


def _outer(arrays: list[np.ndarray], op, weights: list[int] | None = None) -> np.ndarray:
    """Combine per-axis ``[L_a, K_a]`` tables into ``[N, Kt]``, both row-major over the axes."""
    n = len(arrays)
    out = None
    for a, arr in enumerate(arrays):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = arr.shape
        term = arr.reshape(shape) if weights is None else arr.reshape(shape) * weights[a]
        out = term if out is None else op(out, term)
    full = tuple(arr.shape[0] for arr in arrays) + tuple(arr.shape[1] for arr in arrays)
    return np.broadcast_to(out, full).reshape(int(np.prod(full[:n])), int(np.prod(full[n:])))


@lru_cache(maxsize=128)
def neighborhood_tables(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
) -> NeighborhoodTables:
    axes = [axis_windows(*p) for p in zip(spatial, kernel_size, stride, dilation, is_causal)]
    key_index = _outer([ax.key_index for ax in axes], np.add, _row_major_strides(spatial))
    valid = _outer([ax.valid for ax in axes], np.logical_and) if any(is_causal) else None
    rel_sizes = [2 * k - 1 for k in kernel_size]
    rpb_index = _outer([ax.rel for ax in axes], np.add, _row_major_strides(rel_sizes))
    key_index, rpb_index = key_index.astype(np.int32), rpb_index.astype(np.int32)
    return NeighborhoodTables(key_index, valid, rpb_index)


def neighborhood_mask(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
) -> np.ndarray:
    """Dense ``[N, N]`` boolean mask (query, key) of the neighborhood; for baselines and checks."""
    t = neighborhood_tables(spatial, kernel_size, stride, dilation, is_causal)
    n = t.key_index.shape[0]
    mask = np.zeros((n, n), dtype=bool)
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
def axis_runs(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool) -> tuple[Run, ...]:
    """Cover one axis' queries with runs, read off :func:`axis_windows`' window starts.

    Queries of one dilation group and one stride residue form an arithmetic progression; along it
    the window start is constant or moves with the query except near the borders, so each such
    progression splits into a few runs (about three: left border, interior, right border).
    """
    starts = axis_windows(length, kernel_size, stride, dilation, is_causal).start
    step = stride * dilation
    runs = []
    for first in range(min(step, length)):
        pos = np.arange(first, length, step)
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
