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

from .windows import axis_starts, full_geometry, outer, row_major_strides


@dataclass(frozen=True)
class AxisTiles:
    """One axis. ``T`` tiles of ``tile`` queries, each with a halo of ``halo`` keys.

    Queries and keys are each put in *group order* (every dilation group contiguous, groups by
    their global residue); there each query's keys are one contiguous range ``[lo, hi]``.

    query_index: ``[T, tile]`` local positions of each tile's queries (the last tile repeats the
                 final query when ``tile`` does not divide the axis).
    query_real:  ``[T, tile]`` False for those repeats, which only pad the tile.
    owner:       ``[Lq]`` flat ``tile_id * tile + position`` of each local query.
    key_index:   ``[T, halo]`` local positions (in the key slab) of each tile's halo keys.
    query_lo, query_hi: ``[T, tile]`` group-order key positions of each query's first and last key.
    halo_start:  ``[T]`` group-order key position of each tile's first halo key.
    query_group_coord: ``[T, tile]`` in-group coordinate of each query (global ``i // dilation``).
    key_group_coord:   ``[Lk]`` in-group coordinate of the key at each group-order position.

    ``mask`` and ``rel`` (``[T, tile, halo]``) are derived on demand: in 1D they reach billions of
    entries, so kernels build the rows they need from the compact tables above.
    """

    tile: int
    halo: int
    kernel_size: int
    query_index: np.ndarray
    query_real: np.ndarray
    owner: np.ndarray
    key_index: np.ndarray
    query_lo: np.ndarray
    query_hi: np.ndarray
    halo_start: np.ndarray
    query_group_coord: np.ndarray
    key_group_coord: np.ndarray

    def halo_positions(self, tiles=slice(None)) -> np.ndarray:
        """``[t, halo]`` group-order key positions of the halos of ``tiles``."""
        return self.halo_start[tiles][:, None] + np.arange(self.halo)[None, :]

    def pair_mask(self, tiles=slice(None)) -> np.ndarray:
        """``[t, tile, halo]``: whether each halo key is in each query's neighborhood."""
        h = self.halo_positions(tiles)[:, None, :]
        return (h >= self.query_lo[tiles][:, :, None]) & (h <= self.query_hi[tiles][:, :, None])

    def pair_rel(self, tiles=slice(None)) -> np.ndarray:
        """``[t, tile, halo]`` rpb column ``key_c - query_c + K - 1`` (0 where masked)."""
        h = self.halo_positions(tiles)
        rel = self.key_group_coord[h][:, None, :] - self.query_group_coord[tiles][:, :, None] + self.kernel_size - 1
        return np.where(self.pair_mask(tiles), rel, 0)

    @property
    def mask(self) -> np.ndarray:
        return self.pair_mask()

    @property
    def rel(self) -> np.ndarray:
        return self.pair_rel()


def _group_order(count: int, offset: int, dilation: int) -> np.ndarray:
    """Local positions sorted by global dilation group, then position (group order -> local)."""
    i = np.arange(count)
    return np.lexsort((i, (i + offset) % dilation))


@lru_cache(maxsize=256)
def axis_tiles(
    length: int, kernel_size: int, stride: int, dilation: int, is_causal: bool, tile: int,
    query_offset: int = 0, query_length: int | None = None, kv_offset: int = 0, kv_length: int | None = None,
) -> AxisTiles:
    """Tiles of one axis (global length ``length``; queries and key slab as in
    :func:`natten_mlx.windows.axis_windows`)."""
    qlen = length - query_offset if query_length is None else query_length
    klen = length - kv_offset if kv_length is None else kv_length
    start, count = axis_starts(length, kernel_size, stride, dilation, is_causal, query_offset, qlen, kv_offset)
    qorder = _group_order(qlen, query_offset, dilation)
    korder = _group_order(klen, kv_offset, dilation)
    kpos = np.empty(klen, dtype=np.int64)
    kpos[korder] = np.arange(klen)  # local key -> group-order position
    lo = kpos[start]
    hi = lo + count - 1  # valid slots are a prefix of the window
    tile = min(tile, qlen)
    ntiles = -(-qlen // tile)
    slots = np.arange(ntiles * tile).reshape(ntiles, tile)
    qpos = np.minimum(slots, qlen - 1)
    qlo, qhi = lo[qorder[qpos]], hi[qorder[qpos]]
    halo = int((qhi.max(axis=1) - qlo.min(axis=1)).max()) + 1
    hstart = np.minimum(qlo.min(axis=1), klen - halo)
    hpos = hstart[:, None] + np.arange(halo)[None, :]
    owner = np.empty(qlen, dtype=np.int64)
    owner[qorder] = np.arange(qlen)  # tile t, slot i sits at flat t * tile + i == its group-order position
    qgc = (qorder[qpos] + query_offset) // dilation
    kgc = (korder + kv_offset) // dilation
    return AxisTiles(tile, halo, kernel_size, qorder[qpos], slots < qlen, owner, korder[hpos], qlo, qhi, hstart, qgc, kgc)


def _outer_index(tables: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Row-major flat index of per-axis ``[T_a, X_a]`` index tables -> ``[T, X]`` (both row-major)."""
    return outer(tables, np.add, row_major_strides(sizes))


@dataclass(frozen=True)
class TilePlan:
    """A whole problem's tiling; ``Tn`` tiles of ``Tq`` queries and ``Hk`` halo keys each.

    query_index: ``[Tn, Tq]`` flat (local) token index of each tile query.
    query_real:  ``[Tn, Tq]`` bool, False for queries that only pad a tile (repeats of a real one).
    key_index:   ``[Tn, Hk]`` flat token index (in the key slab) of each halo key.
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

    def pair_mask(self, tiles=slice(None)) -> np.ndarray:
        """``[t, Tq, Hk]`` bool: which (query, halo key) pairs of ``tiles`` are in the neighborhood."""
        coords = self.tile_coords[tiles]
        return outer([ax.pair_mask(coords[:, a]) for a, ax in enumerate(self.axes)], np.logical_and)

    def pair_rpb_index(self, tiles=slice(None)) -> np.ndarray:
        """``[t, Tq, Hk]``: flat index into ``rpb.reshape(H, -1)`` of each pair of ``tiles`` (0 where masked)."""
        coords = self.tile_coords[tiles]
        rels = [ax.pair_rel(coords[:, a]) for a, ax in enumerate(self.axes)]
        return outer(rels, np.add, rpb_weights(tuple(ax.kernel_size for ax in self.axes)))


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
def tile_plan(spatial, kernel_size, stride, dilation, is_causal, tile=None, domain=None, query_offset=None,
              kv_spatial=None, kv_offset=None) -> TilePlan:
    """The tiling of a problem's geometry (cached); ``tile`` defaults to :func:`default_tile`, the
    sub-domain fields to a whole domain (see :attr:`natten_mlx.problem.Problem.geometry`)."""
    spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial, kv_offset = full_geometry(
        spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial, kv_offset
    )
    tile = tuple(tile) if tile else default_tile(spatial, kernel_size)
    axes = tuple(
        axis_tiles(domain[a], kernel_size[a], stride[a], dilation[a], is_causal[a], tile[a], query_offset[a],
                   spatial[a], kv_offset[a], kv_spatial[a])
        for a in range(len(spatial))
    )
    counts = [ax.query_index.shape[0] for ax in axes]
    tq = [ax.tile for ax in axes]
    query_index = _outer_index([ax.query_index for ax in axes], list(spatial))
    query_real = outer([ax.query_real for ax in axes], np.logical_and)
    key_index = _outer_index([ax.key_index for ax in axes], list(kv_spatial))
    # token -> (tile, query) flat slot: row-major over per-axis (tile id, in-tile position)
    tile_id = _outer_index([(ax.owner // ax.tile)[None, :] for ax in axes], counts).reshape(-1)
    in_tile = _outer_index([(ax.owner % ax.tile)[None, :] for ax in axes], tq).reshape(-1)
    output_index = (tile_id * int(np.prod(tq)) + in_tile).astype(np.int32)
    tile_coords = np.stack(np.unravel_index(np.arange(int(np.prod(counts))), counts), axis=1).astype(np.int32)
    all_valid = all(bool(((ax.query_lo == ax.halo_start[:, None]) & (ax.query_hi == ax.halo_start[:, None] + ax.halo - 1)).all())
                    for ax in axes)
    return TilePlan(
        query_index.astype(np.int32), query_real, key_index.astype(np.int32), output_index, tile_coords, axes,
        all_valid,
    )


def rpb_weights(kernel_size: tuple[int, ...]) -> list[int]:
    """Row-major strides of ``rpb.reshape(H, -1)`` over the per-axis ``2K - 1`` columns."""
    sizes = [2 * k - 1 for k in kernel_size]
    return [int(np.prod(sizes[a + 1 :], dtype=np.int64)) for a in range(len(sizes))]
