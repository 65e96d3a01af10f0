"""Query tiles and their key halos, derived from the slot tables of :mod:`natten_mlx.windows`.

Along one axis the tokens are first reordered so that every dilation group is contiguous
(``order``); in that order each query's neighborhood is one contiguous range ``[lo, hi]``.
Queries are cut into tiles of ``tile`` consecutive positions; a tile's *halo* is a run of ``halo``
consecutive positions covering every tile query's range. Tiles, halos and the per-pair mask of
an nD problem are row-major outer products of the per-axis ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .windows import axis_windows


@dataclass(frozen=True)
class AxisTiles:
    """One axis. ``T`` tiles of ``tile`` queries, each with a halo of ``halo`` keys.

    query_index: ``[T, tile]`` input positions of each tile's queries (the last tile repeats the
                 final query when ``tile`` does not divide the axis).
    query_real:  ``[T, tile]`` False for those repeats, which only pad the tile.
    owner:       ``[L]`` flat ``tile_id * tile + position`` of each input position's query slot.
    key_index:   ``[T, halo]`` input positions of each tile's halo keys.
    mask:        ``[T, tile, halo]`` whether the halo key is in the query's neighborhood.
    rel:         ``[T, tile, halo]`` rpb column ``key_c - query_c + K - 1`` (clipped where masked).
    """

    tile: int
    halo: int
    query_index: np.ndarray
    query_real: np.ndarray
    owner: np.ndarray
    key_index: np.ndarray
    mask: np.ndarray
    rel: np.ndarray


@lru_cache(maxsize=256)
def axis_tiles(length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, tile: int) -> AxisTiles:
    w = axis_windows(length, kernel_size, stride, dilation, is_causal)
    i = np.arange(length)
    order = np.lexsort((i // dilation, i % dilation))  # group-major: position -> input index
    pos = np.empty(length, dtype=np.int64)
    pos[order] = np.arange(length)  # input index -> position
    lo = pos[w.start]
    hi = lo + w.valid.sum(axis=1) - 1  # valid slots are a prefix of the window
    tile = min(tile, length)
    ntiles = -(-length // tile)
    slots = np.arange(ntiles * tile).reshape(ntiles, tile)
    qpos = np.minimum(slots, length - 1)
    qlo, qhi = lo[order[qpos]], hi[order[qpos]]
    halo = int((qhi.max(axis=1) - qlo.min(axis=1)).max()) + 1
    hstart = np.minimum(qlo.min(axis=1), length - halo)
    hpos = hstart[:, None] + np.arange(halo)[None, :]
    mask = (hpos[:, None, :] >= qlo[:, :, None]) & (hpos[:, None, :] <= qhi[:, :, None])
    rel = np.where(mask, hpos[:, None, :] - qpos[:, :, None] + kernel_size - 1, 0)
    owner = pos.copy()  # tile t, slot i sits at flat t * tile + i == its position
    return AxisTiles(tile, halo, order[qpos], slots < length, owner, order[hpos], mask, rel)


def _outer_index(tables: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Row-major flat index of per-axis ``[T_a, X_a]`` index tables -> ``[T_1..T_n, X_1..X_n]``."""
    n = len(tables)
    out = 0
    for a, tab in enumerate(tables):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = tab.shape
        weight = int(np.prod(sizes[a + 1 :], dtype=np.int64))
        out = out + tab.reshape(shape) * weight
    return out


@dataclass(frozen=True)
class TilePlan:
    """A whole problem's tiling; ``Tn`` tiles of ``Tq`` queries and ``Hk`` halo keys each.

    query_index: ``[Tn, Tq]`` flat token index of each tile query.
    query_real:  ``[Tn, Tq]`` bool, False for queries that only pad a tile (repeats of a real one).
    key_index:   ``[Tn, Hk]`` flat token index of each halo key.
    output_index:``[N]`` flat ``tile * Tq + query`` holding each token's output.
    tile_coords: ``[Tn, n]`` each tile's per-axis tile number.
    axes:        the per-axis tables; pair tables (mask, rpb index) of a chunk of tiles are
                 built from them on demand, since ``[Tn, Tq, Hk]`` can reach billions of entries.
    all_valid:   every (query, halo key) pair is in the neighborhood: no mask is needed.
    """

    query_index: np.ndarray
    query_real: np.ndarray
    key_index: np.ndarray
    output_index: np.ndarray
    tile_coords: np.ndarray
    axes: tuple
    all_valid: bool

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return tuple(ax.tile for ax in self.axes)

    @property
    def halo_shape(self) -> tuple[int, ...]:
        return tuple(ax.halo for ax in self.axes)


def default_tile(spatial: tuple[int, ...], kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """Queries per tile along each axis, never beyond an axis' length.

    Chosen on an H100 (benchmarks/RESULTS.md, tile study): about 256 queries a tile, 1024 for 2D
    windows of 1024+ keys, and thin axes (K <= 4) cut to 4 in 3D; bigger tiles amortise the halo,
    smaller ones waste less of it at small windows.
    """
    n = len(spatial)
    window = int(np.prod(kernel_size))
    if n == 1:
        tile = (256,)
    elif n == 2:
        tile = (32, 32) if window >= 1024 else (16, 16)
    else:
        tile = tuple(4 if k <= 4 else 8 for k in kernel_size)
    return tuple(min(t, length) for t, length in zip(tile, spatial))


@lru_cache(maxsize=64)
def tile_plan(spatial, kernel_size, stride, dilation, is_causal, tile=None) -> TilePlan:
    tile = tile or default_tile(spatial, kernel_size)
    axes = tuple(axis_tiles(*p) for p in zip(spatial, kernel_size, stride, dilation, is_causal, tile))
    n = len(axes)
    counts = [ax.query_index.shape[0] for ax in axes]
    tq = [ax.tile for ax in axes]
    tn, q_tot = int(np.prod(counts)), int(np.prod(tq))
    query_index = _outer_index([ax.query_index for ax in axes], list(spatial)).reshape(tn, q_tot)
    query_real = np.ones((tn, q_tot), dtype=bool)
    for a, ax in enumerate(axes):
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = ax.query_real.shape
        full = np.broadcast_to(ax.query_real.reshape(shape), tuple(counts) + tuple(tq))
        query_real &= full.reshape(tn, q_tot)
    key_index = _outer_index([ax.key_index for ax in axes], list(spatial)).reshape(tn, -1)
    # token -> (tile, query) flat slot: row-major over per-axis (tile id, in-tile position)
    owners = [np.stack([ax.owner // ax.tile, ax.owner % ax.tile]) for ax in axes]
    tile_id = _outer_index([o[0][None, :] for o in owners], counts).reshape(-1)
    in_tile = _outer_index([o[1][None, :] for o in owners], tq).reshape(-1)
    output_index = (tile_id * q_tot + in_tile).astype(np.int32)
    tile_coords = np.stack(np.unravel_index(np.arange(tn), counts), axis=1).astype(np.int32)
    all_valid = all(ax.mask.all() for ax in axes)
    return TilePlan(
        query_index.astype(np.int32), query_real, key_index.astype(np.int32), output_index, tile_coords, axes,
        all_valid,
    )


def rpb_weights(kernel_size: tuple[int, ...]) -> list[int]:
    """Row-major strides of ``rpb.reshape(H, -1)`` over the per-axis ``2K - 1`` columns."""
    sizes = [2 * k - 1 for k in kernel_size]
    return [int(np.prod(sizes[a + 1 :], dtype=np.int64)) for a in range(len(sizes))]
