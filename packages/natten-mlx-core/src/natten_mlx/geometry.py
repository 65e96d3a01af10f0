"""What the core knows about windows and tiles, for tier authors (public, stable names).

Every function takes a :class:`~natten_mlx.problem.Problem`, or its ``geometry`` tuple
``(spatial, kernel_size, stride, dilation, is_causal[, domain, query_offset, kv_spatial, kv_offset])``
(the last four default to a whole-domain problem). Results are cached per geometry; NumPy arrays
are read-only, MLX arrays must not be modified in place either.

- :func:`window_header`, :func:`include_dir`: ``natten_mlx/window.h``, the per-axis window
  arithmetic for C++, CUDA and Metal (prepend the text to ``mx.fast.*_kernel`` sources through
  their ``header=``, or add the directory to a C++ include path and ``#include <natten_mlx/window.h>``).
- :func:`axis_tables` / :func:`device_axis_tables`: per-axis slot tables (``[Lq, K]`` key index in
  the key slab, validity, rpb column; ``[Lq]`` window start).
- :func:`slot_tables` / :func:`device_slot_tables`: the flattened ``[N, Kt]`` tables of the whole problem.
- :func:`tile_plan` / :func:`device_tile_plan`: query tiles, their halo keys, and the compact per-axis
  key ranges from which a kernel derives its masks.
- :func:`key_extent`: the global key range ``[lo, hi)`` a range of queries needs along one axis
  (the halo of a shard); :func:`key_slab`: the same for a block of queries in nD, as the
  ``kv_offset`` and key shape that :func:`natten_mlx.functional.na_subdomain` takes.
- :func:`outer`: the one row-major outer product of per-axis tables.
- :func:`dense_mask`: the dense ``[N, N_kv]`` reference mask (tests check it against their float64
  oracle; benchmarks use it for their masked-SDPA baselines).
- :func:`grid_tiles`: tiles per dilation group a GPU grid provides along one axis (the Python twin
  of ``tiling.h``'s ``na_query_tiles``, which the kernels decode their tile boxes with).
- :func:`padded3d`: a Problem's sizes and window parameters with the axes padded in front to three
  (:class:`Padded3D`), what GPU kernels that always walk three axes read; :func:`pad3` pads one tuple.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .tiles import AxisTiles, TilePlan, default_tile, rpb_weights
from .tiles import tile_plan as _tile_plan
from .windows import (
    AxisWindows,
    NeighborhoodTables,
    axis_args,
    axis_windows,
    full_geometry,
    key_extent,
    neighborhood_mask,
    neighborhood_tables,
    outer,
    row_major_strides,
)

__all__ = [
    "window_header", "include_dir", "geometry_of", "axis_tables", "device_axis_tables", "slot_tables",
    "device_slot_tables", "tile_plan", "device_tile_plan", "key_extent", "key_slab", "outer", "row_major_strides",
    "rpb_weights", "default_tile", "dense_mask", "AxisWindows", "AxisTiles", "NeighborhoodTables", "TilePlan",
    "axis_windows", "Padded3D", "padded3d", "pad3", "grid_tiles",
]

_INCLUDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def include_dir() -> str:
    """The directory to add to a C++ include path; it holds ``natten_mlx/window.h``."""
    return _INCLUDE


@lru_cache(maxsize=1)
def window_header() -> str:
    """The text of ``natten_mlx/window.h`` (for the ``header=`` of ``mx.fast.metal_kernel`` /
    ``mx.fast.cuda_kernel``; define ``NA_FUNC`` before it where the dialect needs a qualifier)."""
    with open(os.path.join(_INCLUDE, "natten_mlx", "window.h"), encoding="utf-8") as fh:
        return fh.read()


def geometry_of(problem_or_geometry) -> tuple:
    """The nine-entry geometry tuple of a Problem or of a (five- or nine-entry) geometry tuple."""
    g = getattr(problem_or_geometry, "geometry", problem_or_geometry)
    if not isinstance(g, (tuple, list)) or len(g) not in (5, 9):
        raise TypeError(
            f"expected a Problem or a geometry tuple (spatial, kernel_size, stride, dilation, is_causal[, domain, "
            f"query_offset, kv_spatial, kv_offset]), got {problem_or_geometry!r}"
        )
    return full_geometry(*g)


def axis_tables(problem_or_geometry) -> tuple[AxisWindows, ...]:
    """Per-axis slot tables (NumPy, see :class:`~natten_mlx.windows.AxisWindows`): for each axis,
    ``key_index``/``valid``/``rel`` ``[Lq, K]`` and ``start`` ``[Lq]``; key positions local to the key slab."""
    return tuple(axis_windows(*args) for args in axis_args(geometry_of(problem_or_geometry)))


@lru_cache(maxsize=128)
def _device_axis_tables(geometry) -> tuple[dict, ...]:
    i32 = np.int32
    return tuple(
        dict(key_index=mx.array(w.key_index.astype(i32)), valid=mx.array(w.valid), rel=mx.array(w.rel.astype(i32)),
             start=mx.array(w.start.astype(i32)))
        for w in axis_tables(geometry)
    )


def device_axis_tables(problem_or_geometry) -> tuple[dict, ...]:
    """:func:`axis_tables` as MLX int32/bool arrays, one dict per axis (``key_index``, ``valid``,
    ``rel``, ``start``); cached per geometry."""
    return _device_axis_tables(geometry_of(problem_or_geometry))


def slot_tables(problem_or_geometry) -> NeighborhoodTables:
    """The flattened tables ``key_index``/``valid``/``rpb_index`` ``[N, Kt]`` (NumPy; ``valid`` None
    without a causal axis); see :class:`~natten_mlx.windows.NeighborhoodTables`."""
    return neighborhood_tables(*geometry_of(problem_or_geometry))


@lru_cache(maxsize=128)
def _device_slot_tables(geometry) -> dict:
    t = neighborhood_tables(*geometry)
    return dict(key_index=mx.array(t.key_index), valid=None if t.valid is None else mx.array(t.valid),
                rpb_index=mx.array(t.rpb_index))


def device_slot_tables(problem_or_geometry) -> dict:
    """:func:`slot_tables` as MLX arrays (dict ``key_index``, ``valid`` (or None), ``rpb_index``); cached."""
    return _device_slot_tables(geometry_of(problem_or_geometry))


def tile_plan(problem_or_geometry, tile=None) -> TilePlan:
    """The tiling of a problem (NumPy, see :class:`~natten_mlx.tiles.TilePlan`); ``tile``: queries
    per tile along each axis (default :func:`default_tile`)."""
    g = geometry_of(problem_or_geometry)
    return _tile_plan(*g[:5], None if tile is None else tuple(tile), *g[5:])


@lru_cache(maxsize=64)
def _device_tile_plan(geometry, tile) -> dict:
    t = _tile_plan(*geometry[:5], tile, *geometry[5:])
    i32 = np.int32
    axes = tuple(
        dict(tile=ax.tile, halo=ax.halo, query_index=mx.array(ax.query_index.astype(i32)),
             key_index=mx.array(ax.key_index.astype(i32)), query_lo=mx.array(ax.query_lo.astype(i32)),
             query_hi=mx.array(ax.query_hi.astype(i32)), halo_start=mx.array(ax.halo_start.astype(i32)))
        for ax in t.axes
    )
    return dict(query_index=mx.array(t.query_index), query_real=mx.array(t.query_real),
                key_index=mx.array(t.key_index), output_index=mx.array(t.output_index),
                tile_coords=mx.array(t.tile_coords), tile_shape=t.tile_shape, halo_shape=t.halo_shape,
                all_valid=t.all_valid, axes=axes)


def device_tile_plan(problem_or_geometry, tile=None) -> dict:
    """:func:`tile_plan` as MLX arrays: ``query_index``, ``query_real``, ``key_index``,
    ``output_index``, ``tile_coords`` and per-axis dicts (``query_index``, ``key_index``,
    ``query_lo``/``query_hi`` (group-order key range of each query), ``halo_start``); cached."""
    return _device_tile_plan(geometry_of(problem_or_geometry), None if tile is None else tuple(tile))


def key_slab(domain, kernel_size, stride, dilation, is_causal, query_offset, query_shape):
    """``(kv_offset, kv_spatial)``: the smallest key slab (global offset and shape, per axis) that
    holds every window of the queries ``query_offset + (0 .. query_shape - 1)`` of ``domain``.

    Window arguments are ints or per-axis tuples as the ops take them; a shard passes its block of
    queries and receives the halo-extended block of keys it needs."""
    from .problem import normalize_causal, normalize_tuple

    n = len(domain)
    ks = normalize_tuple("kernel_size", kernel_size, n, 2)
    st = normalize_tuple("stride", stride, n, 1)
    dl = normalize_tuple("dilation", dilation, n, 1)
    causal = normalize_causal(is_causal, n)
    qo = normalize_tuple("query_offset", query_offset, n, 0)
    qs = normalize_tuple("query_shape", query_shape, n, 1)
    offset, shape = [], []
    for a in range(n):
        lo, hi = key_extent(domain[a], ks[a], st[a], dl[a], causal[a], qo[a], qs[a])
        offset.append(lo)
        shape.append(hi - lo)
    return tuple(offset), tuple(shape)


def dense_mask(problem_or_geometry) -> np.ndarray:
    """``[N, N_kv]`` bool (NumPy): may query ``n`` attend to key ``m`` (row-major token order;
    keys of the key slab). The one dense reference mask of the package."""
    return neighborhood_mask(*geometry_of(problem_or_geometry))


def pad3(values, fill) -> tuple:
    """``values`` (one entry per spatial axis, 1 to 3 of them) padded in front with ``fill`` to three."""
    values = tuple(values)
    if not 1 <= len(values) <= 3:
        raise ValueError(f"pad3: {values!r} has {len(values)} entries; neighborhood attention has 1 to 3 axes")
    return (fill,) * (3 - len(values)) + values


@dataclass(frozen=True)
class Padded3D:
    """A problem's sizes and window parameters, its axes padded in front to three: extent 1,
    ``K = s = d = 1``, not causal, offset 0. A trivial leading axis changes no window and no
    row-major flat token index, so a kernel that always walks three axes serves 1D, 2D and 3D.

    rank: the problem's number of spatial axes (1 to 3).
    B, H, HKV, D, DV, E: batch, query heads, key/value heads, head dims (0 for the split op that
    has none), additional keys/values (``num_extra``).
    spatial, kv_spatial, domain, qoff, kvoff: local query extents, local key/value extents, the
    global extents the window rules apply to, global coordinates of local query 0 and key 0.
    K, s, d, causal: kernel size, stride, dilation, per-axis causal flags.
    has_rpb, scale, dtype: as in the Problem.
    """

    rank: int
    B: int
    H: int
    HKV: int
    D: int
    DV: int
    E: int
    spatial: tuple
    kv_spatial: tuple
    domain: tuple
    qoff: tuple
    kvoff: tuple
    K: tuple
    s: tuple
    d: tuple
    causal: tuple
    has_rpb: bool
    scale: float
    dtype: object

    @property
    def N(self) -> int:
        """Local queries."""
        return self.spatial[0] * self.spatial[1] * self.spatial[2]

    @property
    def NK(self) -> int:
        """Local keys/values."""
        return self.kv_spatial[0] * self.kv_spatial[1] * self.kv_spatial[2]

    @property
    def window_size(self) -> int:
        """Slots of a window: ``prod(K)``."""
        return self.K[0] * self.K[1] * self.K[2]

    @property
    def rpb_size(self) -> int:
        """rpb entries per head: ``prod(2K - 1)``."""
        return (2 * self.K[0] - 1) * (2 * self.K[1] - 1) * (2 * self.K[2] - 1)


def padded3d(problem) -> Padded3D:
    """The :class:`Padded3D` of a :class:`~natten_mlx.problem.Problem` (whole-domain or sub-domain).
    Objects with the Problem's field names serve too; absent sub-domain fields mean a whole domain,
    absent ``num_extra``/``has_rpb`` none, an absent ``dtype`` None (planning needs no dtype).
    Cached per problem where the problem is hashable (a frozen Problem; both are immutable): a compiled
    tier asks for it on every call, and building it is ~10 us of Python."""
    try:
        return _padded3d_cached(problem)
    except TypeError:  # an unhashable stand-in (e.g. a SimpleNamespace): built afresh
        return _padded3d(problem)


@lru_cache(maxsize=1024)
def _padded3d_cached(problem) -> Padded3D:
    return _padded3d(problem)


def _padded3d(problem) -> Padded3D:
    p = problem
    rank = len(p.spatial)
    spatial = tuple(p.spatial)
    domain = tuple(getattr(p, "domain", None) or spatial)
    kv_spatial = tuple(getattr(p, "kv_spatial", None) or spatial)
    qoff = tuple(getattr(p, "query_offset", None) or (0,) * rank)
    kvoff = tuple(getattr(p, "kv_offset", None) or (0,) * rank)
    return Padded3D(
        rank=rank, B=p.batch, H=p.heads, HKV=p.kv_heads, D=p.head_dim, DV=p.value_head_dim,
        E=int(getattr(p, "num_extra", 0) or 0), spatial=pad3(spatial, 1), kv_spatial=pad3(kv_spatial, 1),
        domain=pad3(domain, 1), qoff=pad3(qoff, 0), kvoff=pad3(kvoff, 0), K=pad3(p.kernel_size, 1),
        s=pad3(p.stride, 1), d=pad3(p.dilation, 1), causal=pad3(tuple(bool(c) for c in p.is_causal), False),
        has_rpb=bool(getattr(p, "has_rpb", False)), scale=float(p.scale), dtype=getattr(p, "dtype", None),
    )


def grid_tiles(offset: int, length: int, dilation: int, tile: int) -> int:
    """Tiles of ``tile`` in-group coordinates per dilation group that a grid must provide along one
    axis for the local tokens ``[offset, offset + length)``: enough for the group with the most of
    them. The Python twin of ``tiling.h``'s ``na_query_tiles`` (tested equal to it), for the
    ``tiles`` a tier writes into its kernels' parameters and sizes its grid with."""
    most = 0
    for g in range(dilation):
        first = 0 if offset <= g else (offset - g + dilation - 1) // dilation
        hi = offset + length - g
        end = 0 if hi <= 0 else (hi + dilation - 1) // dilation
        most = max(most, end - first)
    return -(-most // tile)
