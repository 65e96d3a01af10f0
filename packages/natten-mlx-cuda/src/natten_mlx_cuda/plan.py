"""From a problem to kernel launches: geometry, tile shapes, the int parameter block, grids.

No arrays, so the CPU emulator of tests/cuda plans exactly what the backend launches. The geometry
is the core's natten_mlx.geometry.padded3d, shared with the Metal tier: problems of rank < 3 are
padded in front with trivial axes (extent 1, K = s = d = 1), so every kernel walks three axes and
row-major flat indices are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from natten_mlx.geometry import Padded3D, pad3, padded3d
from natten_mlx.geometry import grid_tiles as query_tiles
from natten_mlx.windows import axis_starts

from .source import Variant

FAST_DTYPES = ("float16", "bfloat16")
FAST_MAX_DIM = 128  # register budget of the tensor-core kernels (Q fragments and O accumulators)
SIMPLE_DIMS = (16, 32, 64, 128, 256, 512)  # register-array sizes of the simple kernels
MAX_DIM = SIMPLE_DIMS[-1]
TILE = 64  # queries per query tile and keys per key tile of the tensor-core kernels
THREADS = 128
# the forward's query tile: 16 rows per warp, 4 or 8 warps. The default is 64 (H200, fp16, D 128, after
# the forward's per-tile instructions were halved: G1-G4 0.220 / 25.1 / 93.0 / 0.482 ms against 0.249 /
# 30.9 / 115 / 0.48 with 128-query tiles of 8 warps: two blocks of 4 warps per SM wait on their own
# barriers, and the 128-row tiles' union of windows is wider)
FWD_TILES = (64, 128)
FWD_STAGES = 2  # key-tile slots in the forward's cp.async ring (2 or 3)
FWD_MT = 1  # m-tiles of 16 query rows per warp with a caller's query tile (1 or 2)
# The default forward layouts (plan.forward_tiles): 64-query tiles of 4 warps x 16 rows, three blocks per SM,
# or 128-query tiles of 4 warps x 32 rows (m_tiles 2: each K/V fragment read from shared memory serves
# two mma, as in FlashAttention-2), two blocks per SM. The second costs about this much per computed
# (query, key) pair against the first (H200, fp16, session 6: G2 21.4 against 24.2 ms at 1.065x the pairs,
# G3 81.2 against 86.2 at 1.107x, G4 0.67 against 0.48 at 1.69x: 0.83-0.85), so it serves when its
# tiles' larger union of windows costs less than that
FWD_MT2_COST = 0.85
FWD_MT2_MIN_BLOCKS = 2  # 254 registers at D 128 (no spill), 113 KB of shared memory with the short tile list
MT2_FILL = 0.9  # below FIT_TILE_ROWS query rows, 128-query tiles need this share of the slots (G1: 256 / 264)
# the forward's shared tables: common.cuh's NA_FWD_GEO ints, and MAXT key tiles per chunk of the
# walk (a template argument; 6x7x7 = 294 tiles of G3 fit in one chunk)
FWD_GEO = 36
FWD_MAXT = 384
SM_SMEM = 228 * 1024  # shared memory per SM (H100/H200), and what the driver reserves per resident block
BLOCK_SMEM_RESERVED = 1024
FWD_MAXT_SMALL = 128  # with three blocks per SM: 76.2 KB of shared memory per block at D 128 (3 x (76.2 + 1) <= 228)
# resident forward blocks per SM the kernel is compiled for (__launch_bounds__) when the caller does not
# say: three for 64-query tiles (H200, fp16, D 128, with the loads of e7eb96e: G1-G4 0.207 / 24.3 / 86.2 /
# 0.459 ms against 0.237 / 27.0 / 97.0 / 0.473 unbound, 173 registers, two blocks per SM; with rpb, since
# its index is three added parts (session 6: 172 registers unbound, a 16-byte spill bound): G2 31.7 against
# 34.0 ms unbound, G3 113 against 120); 128-query tiles of 16-row warps cannot have three blocks
FWD_MIN_BLOCKS = 3
DEFAULT_TILES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
# SMs of the H100/H200 (SXM), which MLX does not report: the forward's layout and splits count the grid's
# waves of resident blocks with it (a GPU with fewer SMs only sees its waves rounded differently)
SMS = 132
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z extents (the forward's y: heads x splits)
# Splitting each query tile's walk over several blocks (fmha_fwd's SPLIT; float32 parts merged by their
# lse in merge_parts.cu). Measured on the H200 (fp16, D 128, session 7): the kernel alone gains (G1, one
# head of 32768 tokens, window 2048, ncu at base clocks: 64-query tiles 308 us unsplit for 512 blocks on
# 132 x 3 slots, 266 / 266 / 289 us in 2 / 3 / 4 parts; 128-query tiles of 32-row warps, which G1 now
# takes, 197 us unsplit), but whole calls lose: G1 0.379 ms in 3 parts against 0.216 unsplit, and even a
# grid that fills a quarter of the slots (S1: 8192 tokens, window 2048, 128 blocks) 0.186 ms in 4 parts
# against 0.094. The loss is outside the kernels and grows with the parts' bytes (not profiled yet). So
# the default never splits (SPLIT_FILL 0); the backend's ``splits`` option does. With SPLIT_FILL > 0,
# grids of fewer blocks than that share of the slots split into the fewest parts that fill them, each of
# SPLIT_MIN_TILES key tiles or more.
MAX_SPLITS = 8
SPLIT_MIN_TILES = 8
SPLIT_FILL = 0.0
# The forward's products by warpgroup MMA (fmha_fwd's WG; sm_90a, so Hopper only): 128-query tiles of two
# warpgroups (8 warps of 16 rows), Q, K and V in 128-byte-swizzled shared tiles, two blocks per SM (128
# registers, ~110 KB of shared memory at D 128). Standalone (benchmarks/gpu/wgmma_attn.py, H200, session
# 10) this structure ran dense attention at 438 TFLOP/s and a 6400-key 1D window at 429, against 318 and
# 301 for the mma.sync kernels in the same run. Served where head dims are 64 or 128 (whole 128-byte
# panels) and the device compiles sm_90a code; WGMMA False turns the default off (the backend option
# ``wgmma`` overrides it per call).
WGMMA = True
WG_DIMS = (64, 128)
WG_MIN_BLOCKS = 2
WG_ALIGN = 1024  # the swizzled tiles' alignment: the kernel aligns its shared base, this is the slack


# the 3-axis-padded geometry of a call is the core's, shared with the Metal tier
Geometry = Padded3D
geometry = padded3d
_pad = pad3


def params(geo: Geometry, tile=(1, 1, 1), over_keys: bool = False) -> tuple:
    """The prm block of common.cuh: 8 scalars, then 10 ints per axis. The last per-axis entry is the
    number of tiles per dilation group of the launch's own walk: over the local queries, or over
    the local keys for the key-major backward (``over_keys``)."""
    out = [geo.B, geo.H, geo.HKV, geo.N, geo.NK, geo.D, geo.DV, geo.rpb_size]
    for a in range(3):
        walk = (geo.kvoff[a], geo.kv_spatial[a]) if over_keys else (geo.qoff[a], geo.spatial[a])
        out += [geo.domain[a], geo.spatial[a], geo.kv_spatial[a], geo.qoff[a], geo.kvoff[a], geo.K[a], geo.s[a],
                geo.d[a], int(geo.causal[a]), query_tiles(walk[0], walk[1], geo.d[a], tile[a])]
    return tuple(out)


def check_tile(tile, rank: int, what: str, sizes=(TILE,)) -> tuple:
    """A user's tile: ``rank`` positive ints whose product is one of ``sizes``; returns it padded to 3 axes."""
    if not isinstance(tile, (tuple, list)) or len(tile) != rank or not all(isinstance(x, int) and x >= 1 for x in tile):
        raise ValueError(f"{what}={tile!r} must be a tuple of {rank} positive ints (one per spatial axis)")
    prod = 1
    for x in tile:
        prod *= x
    if prod not in sizes:
        need = " or ".join(str(x) for x in sizes)
        raise ValueError(f"{what}={tile!r} holds {prod} tokens; the tensor-core kernels need exactly {need}")
    return _pad(tile, 1)


# below this many query rows (B x N x H) the default tile is the rank's box whatever the extents: small
# problems gain nothing from a fitted tile, and each tile shape is one more NVRTC compilation
FIT_TILE_ROWS = 1 << 16


def default_tile(geo: Geometry, size: int = TILE) -> tuple:
    """The default query tile of ``size`` tokens (padded to 3 axes): the rank's box (doubled along
    its leading axes for 128); for large problems shrunk along axes whose dilation groups are
    shorter than the tile, the freed factor given to the longest axis."""
    rank = geo.rank
    t = list(_pad(DEFAULT_TILES[rank], 1))
    a = 3 - rank
    while t[0] * t[1] * t[2] < size:
        t[a] *= 2
        a = a + 1 if a < 2 else 3 - rank
    if geo.B * geo.N * geo.H < FIT_TILE_ROWS:
        return tuple(t)
    ext = [-(-geo.spatial[a] // geo.d[a]) for a in range(3)]
    for a in range(3 - rank, 3):
        while t[a] > 1 and t[a] // 2 >= ext[a]:
            t[a] //= 2
    while t[0] * t[1] * t[2] < size:
        a = max(range(3 - rank, 3), key=lambda i: (ext[i] / t[i], i))
        t[a] *= 2
    return tuple(t)


def axis_walk(geo: Geometry, a: int, qt: int, kt: int) -> tuple[int, int]:
    """Along axis ``a``: ``(walked, useful)``. ``walked`` sums, over the query tiles of ``qt``
    coordinates of every dilation group, ``qt`` times the keys of the key tiles of ``kt`` that cover
    the union of the tile's windows (a block computes every row against every key of its walk, absent
    rows included); ``useful`` sums the window sizes of the local queries. A launch's computed and
    useful (query, key) pairs are the products of these over the three axes."""
    import numpy as np

    d, off, n = geo.d[a], geo.qoff[a], geo.spatial[a]
    # each local query's window (global start, valid keys), grouped by dilation group in coordinate order
    start, count = axis_starts(geo.domain[a], geo.K[a], geo.s[a], d, geo.causal[a], off, n)
    group = np.arange(off, off + n) % d
    walked = useful = 0
    for g in range(d):
        sel = group == g
        m = int(sel.sum())
        if m == 0:
            continue
        ws = (start[sel] - g) // d  # in-group coordinates
        we = ws + count[sel]
        useful += int((we - ws).sum())
        kb = ws[::qt]
        ke = we[np.minimum(np.arange(qt - 1, m + qt - 1, qt), m - 1)]
        walked += int((-(-(ke - kb) // kt)).sum()) * kt * qt
    return walked, useful


def _boxes(rank: int, size: int = TILE) -> list:
    """Every tile box of ``size`` tokens (powers of two per axis), padded to 3 axes."""
    import itertools
    import math

    p2 = [1 << i for i in range(size.bit_length()) if 1 << i <= size]
    return [_pad(t, 1) for t in itertools.product(p2, repeat=rank) if math.prod(t) == size]


def fitted_tiles(geo: Geometry, size: int = TILE) -> tuple:
    """``(query tile, key tile)``: query tiles of ``size`` tokens (64 or 128), key tiles of 64 (padded to 3
    axes), that compute the fewest (query, key) pairs for this geometry (:func:`axis_walk`; the kernels'
    time follows the pairs each block computes, measured on the H200: G3 89.7 ms with the fitted 8x8x1 /
    2x4x8 against 93.0 with 4x4x4 boxes). Small problems (fewer than FIT_TILE_ROWS query rows) keep the
    rank's box: each tile shape is one more NVRTC compilation. Ties keep the box."""
    return _fitted(geo, size)[:2]


def _fitted(geo: Geometry, size: int) -> tuple:
    """``(query tile, key tile, computed pairs per batch x head)`` of :func:`fitted_tiles`."""
    box = default_tile(geo, size)
    key = _walk_key(geo)
    if geo.B * geo.N * geo.H < FIT_TILE_ROWS:
        return box, default_tile(geo), _fit(key, box, size, False)[2]
    return _fit(key, box, size, True)


@lru_cache(maxsize=256)
def _fit(geo: Geometry, box: tuple, size: int, search: bool) -> tuple:
    rank = geo.rank
    walks = [{} for _ in range(3)]

    def cost(qt, kt):
        total = 1
        for a in range(3):
            if (qt[a], kt[a]) not in walks[a]:
                walks[a][qt[a], kt[a]] = axis_walk(geo, a, qt[a], kt[a])[0]
            total *= walks[a][qt[a], kt[a]]
        return total

    kbox = default_tile(geo)
    best, best_cost = (box, kbox), cost(box, kbox)
    if search:
        for qt in _boxes(rank, size):
            for kt in _boxes(rank):
                c = cost(qt, kt)
                if c < best_cost * 0.995:
                    best, best_cost = (qt, kt), c
    return (*best, best_cost)


def forward_tiles(geo: Geometry, m_tiles: int | None = None, has_rpb: bool = False) -> tuple:
    """The forward's ``(query tile, key tile, m-tiles per warp)`` when the caller gives no tile: the fitted
    64-query tiles of 4 warps x 16 rows, or, without rpb, the fitted 128-query tiles of 4 warps x 32 rows
    (``m_tiles`` 2) when those compute fewer pairs once weighted by FWD_MT2_COST (the rank's boxes for
    small problems). With rpb the 32-row warps were slower (H200, session 6, after rpb's index became three
    added parts: G2 32.3 against 31.7 ms with three blocks of 16-row warps, G3 117 against 113, G4 0.87
    against 0.60). ``m_tiles`` given: that layout's fitted tiles."""
    q64, k64, c64 = _fitted(geo, TILE)
    if m_tiles == 1 or (m_tiles is None and has_rpb):
        return q64, k64, 1
    q128, k128, c128 = _fitted(geo, 2 * TILE)
    if m_tiles == 2:
        return q128, k128, 2
    if FWD_MT2_COST * c128 >= c64:
        return q64, k64, 1
    # few query rows: the 128-query tiles only where their grid still fills the GPU's slots
    # (G1: 256 blocks for 132 x 2, 197 us against 308 for 64-query tiles, kernels alone)
    if geo.B * geo.N * geo.H < FIT_TILE_ROWS:
        if _blocks(params(geo, q128)) * geo.B * geo.H < MT2_FILL * SMS * FWD_MT2_MIN_BLOCKS:
            return q64, k64, 1
    return q128, k128, 2


def simple_dim(geo: Geometry) -> int:
    need = max(geo.D, geo.DV)
    return next(x for x in SIMPLE_DIMS if x >= need)


def fast_reason(geo: Geometry, dtype: str) -> str | None:
    """Why the tensor-core forward cannot serve (None when it can)."""
    if dtype not in FAST_DTYPES:
        return f"dtype {dtype} runs on the simple kernel (the tensor-core kernels take float16/bfloat16)"
    if geo.D % 8 or geo.DV % 8:
        return f"head dims D={geo.D}, Dv={geo.DV} are not multiples of 8 (16-byte loads)"
    if max(geo.D, geo.DV) > FAST_MAX_DIM:
        return f"head dims D={geo.D}, Dv={geo.DV} exceed {FAST_MAX_DIM}"
    return None


def wgmma_reason(geo: Geometry, dtype: str) -> str | None:
    """Why the warpgroup-MMA forward cannot serve this problem (None when it can; the device is the
    backend's question)."""
    why = fast_reason(geo, dtype)
    if why is not None:
        return why
    if geo.D not in WG_DIMS or geo.DV not in WG_DIMS:
        return f"head dims D={geo.D}, Dv={geo.DV} are not both in {WG_DIMS} (whole 128-byte panels)"
    return None


@dataclass(frozen=True)
class Launch:
    variant: Variant
    grid: tuple  # threads, as mx.fast.cuda_kernel takes it
    threadgroup: tuple
    output_shapes: tuple
    init_value: float | None
    prm: tuple
    splits: int = 1  # blocks per query tile; out and lse then have a leading axis of this size (float32)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _r16(x: int) -> int:
    return _ceil(x, 16) * 16


def _planned(fn):
    """Caches a launch plan per call arguments and the module's tuning constants (tests and studies
    change those): planning a call costs ~50 us of Python (walks, fits, parameter blocks), a small
    kernel's launch as much."""
    import functools

    cached = functools.lru_cache(maxsize=1024)(lambda consts, args, kw: fn(*args, **dict(kw)))

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        key = (tuning_key(), args, tuple(sorted(kw.items())) if kw else ())
        try:
            hash(key)
        except TypeError:  # an unhashable argument: planned afresh (and refused there if it matters)
            return fn(*args, **kw)
        return cached(*key)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_planned
def forward(geo: Geometry, dtype: str, out_dtype: str, has_rpb: bool, fast: bool, tile=None, key_tile=None,
            ldsm: bool = True, m_tiles: int | None = None, stages: int | None = None,
            min_blocks: int | None = None, splits: int | None = None, wgmma: bool = False) -> Launch:
    """Forward launch: outputs out [B, N, H, DV] (out_dtype), lse [B, N, H] float32; with ``splits`` > 1
    (given, or forward_splits' choice) out [splits, B, N, H, DV] float32 and lse [splits, B, N, H], the
    parts of each query tile's walk, for the caller to merge by their lse. ``wgmma``: the products by
    warpgroup MMA where wgmma_reason allows and the layout is 16-row warps in whole warpgroups (the caller
    has checked the device)."""
    outs = ((geo.B, geo.N, geo.H, geo.DV), (geo.B, geo.N, geo.H))
    if not fast:
        v = Variant("simple_fwd", (("T", dtype), ("OT", out_dtype), ("DMAX", simple_dim(geo)), ("HAS_RPB", has_rpb)))
        total = geo.B * geo.N * geo.H
        return Launch(v, (_ceil(total, THREADS) * THREADS, 1, 1), (THREADS, 1, 1), outs, None, params(geo))
    wg = wgmma and wgmma_reason(geo, dtype) is None and m_tiles in (None, 1)
    if tile is None:
        if wg:
            qt, kt, _ = _fitted(geo, 2 * TILE)
            mt = 1
        else:
            qt, kt, mt = forward_tiles(geo, m_tiles, has_rpb)
        kt = key_tile or kt
    else:
        qt, kt, mt = tile, key_tile or default_tile(geo), m_tiles or FWD_MT
    wg = wg and mt == 1
    if wg and min_blocks is None:
        min_blocks = WG_MIN_BLOCKS if (stages or FWD_STAGES) == 2 else 0
    if min_blocks is None:
        bq = qt[0] * qt[1] * qt[2]
        two = (stages or FWD_STAGES) == 2
        if bq == TILE and mt == 1 and two:
            min_blocks = FWD_MIN_BLOCKS
        elif bq == 2 * TILE and mt == 2 and two:
            min_blocks = FWD_MT2_MIN_BLOCKS
        else:
            min_blocks = 0
    prm = params(geo, qt)
    if splits is None:
        splits = forward_splits(geo, qt, kt, _blocks(prm), min_blocks or 1)
    if splits > 1:
        out_dtype = "float32"
        outs = ((splits,) + outs[0], (splits,) + outs[1])
    v = _fmha_variant(dtype, out_dtype, geo.D, geo.DV, qt, kt, has_rpb, ldsm, mt, stages, min_blocks, splits, wg)
    threads = qt[0] * qt[1] * qt[2] * 2 // mt  # 16 rows per m-tile, MT m-tiles per warp
    return Launch(v, (_blocks(prm) * threads, geo.H * splits, geo.B), (threads, 1, 1), outs, None, prm, splits)


@_planned
def merge(splits: int, rows: int, dv: int, out_dtype: str) -> Launch:
    """The merge of a split forward's parts (merge_parts.cu): parts [splits, rows, dv] and their lse
    [splits, rows] float32 -> out [rows, dv] (out_dtype), lse [rows] float32; one thread per 4 columns."""
    v = Variant("merge_parts", (("OT", out_dtype), ("S", splits), ("DV", dv)))
    total = rows * (dv // 4)
    return Launch(v, (_ceil(total, THREADS) * THREADS, 1, 1), (THREADS, 1, 1), ((rows, dv), (rows,)), None, (rows,))


def forward_splits(geo: Geometry, qt: tuple, kt: tuple, tiles: int, per_sm: int) -> int:
    """Parts per query tile's walk (1: no split) for a grid of ``tiles`` query tiles per (batch, head) at
    ``per_sm`` resident blocks per SM: for grids of fewer blocks than SPLIT_FILL of the GPU's slots, the
    fewest parts that fill them, each of SPLIT_MIN_TILES key tiles or more (see SPLIT_FILL)."""
    blocks, slots = tiles * geo.H * geo.B, SMS * per_sm
    if blocks >= SPLIT_FILL * slots:
        return 1
    walk = _walk_pairs(_walk_key(geo), qt, kt) / (tiles * qt[0] * qt[1] * qt[2] * TILE)  # key tiles per tile
    s = 1
    while s < MAX_SPLITS and blocks * s < slots and walk >= (s + 1) * SPLIT_MIN_TILES and geo.H * (s + 1) <= MAX_GRID_YZ:
        s += 1
    return s


def _walk_key(geo: Geometry) -> Geometry:
    """The geometry with only what a walk depends on (the windows), as a cache key."""
    return replace(geo, B=1, H=1, HKV=1, D=0, DV=0, E=0, has_rpb=False, scale=1.0, dtype=None)


@lru_cache(maxsize=256)
def _walk_pairs(key: Geometry, qt: tuple, kt: tuple) -> int:
    total = 1
    for a in range(3):
        total *= axis_walk(key, a, qt[a], kt[a])[0]
    return total


def _blocks(prm) -> int:
    blocks = 1
    for a in range(3):
        blocks *= prm[8 + 10 * a + 7] * prm[8 + 10 * a + 9]
    return blocks


def _bwd_tiles(geo: Geometry, tile, key_tile) -> tuple:
    """The backward's (query tile, key tile): the fitted pair by default; a given query tile alone
    serves as the key tile too."""
    if tile is None and key_tile is None:
        return fitted_tiles(geo)
    qt = tile or default_tile(geo)
    return qt, key_tile or qt


@_planned
def backward_dq(geo: Geometry, dtype: str, has_rpb: bool, fast: bool = False, tile=None, key_tile=None,
                ldsm: bool = True) -> Launch:
    """dq [B, N, H, D] float32 and d_rpb [H, R] float32 (zero-initialised, atomics)."""
    outs = ((geo.B, geo.N, geo.H, geo.D), (geo.H, geo.rpb_size) if has_rpb else (1,))
    if fast:
        qt, kt = _bwd_tiles(geo, tile, key_tile)
        v = _fmha_bwd_variant("fmha_bwd_dq", dtype, geo.D, geo.DV, qt, kt, has_rpb, ldsm, geo.rpb_size)
        prm = params(geo, qt)
        return Launch(v, (_blocks(prm) * THREADS, geo.H, geo.B), (THREADS, 1, 1), outs, 0.0, prm)
    v = Variant("simple_dq", (("T", dtype), ("DMAX", simple_dim(geo)), ("HAS_RPB", has_rpb)))
    total = geo.B * geo.N * geo.H
    return Launch(v, (_ceil(total, THREADS) * THREADS, 1, 1), (THREADS, 1, 1), outs, 0.0, params(geo))


@_planned
def backward_dkdv(geo: Geometry, dtype: str, has_rpb: bool, fast: bool = False, tile=None, key_tile=None,
                  ldsm: bool = True) -> Launch:
    """dk [B, NK, HKV, D], dv [B, NK, HKV, DV], float32."""
    outs = ((geo.B, geo.NK, geo.HKV, geo.D), (geo.B, geo.NK, geo.HKV, geo.DV))
    if fast:
        qt, kt = _bwd_tiles(geo, tile, key_tile)
        v = _fmha_bwd_variant("fmha_bwd_dkdv", dtype, geo.D, geo.DV, qt, kt, has_rpb, ldsm)
        prm = params(geo, kt, over_keys=True)
        return Launch(v, (_blocks(prm) * THREADS, geo.HKV, geo.B), (THREADS, 1, 1), outs, None, prm)
    v = Variant("simple_dkdv", (("T", dtype), ("DMAX", simple_dim(geo)), ("HAS_RPB", has_rpb)))
    total = geo.B * geo.NK * geo.HKV
    return Launch(v, (_ceil(total, THREADS) * THREADS, 1, 1), (THREADS, 1, 1), outs, None, params(geo))


def compile_variants() -> list:
    """The kernel variants the CI compile check builds: every body x dtype x flag combination the
    backend can dispatch (out dtype, rpb), with head dims and tile shapes cycled through the
    supported kinds (ranks 1-3, D != Dv, padded dims, the largest register arrays)."""
    import itertools

    out = []
    dims = [(128, 128), (64, 64), (8, 16), (32, 24), (128, 64), (16, 128)]
    tiles = [((1, 1, 64), (1, 1, 64)), ((1, 8, 8), (1, 8, 8)), ((4, 4, 4), (4, 4, 4)), ((1, 2, 32), (1, 16, 4))]
    for i, (dt, ot, rpb) in enumerate(itertools.product(FAST_DTYPES, ("same", "float32"), (False, True))):
        d, dv = dims[i % len(dims)]
        qt, kt = tiles[i % len(tiles)]
        out.append(_fmha_variant(dt, dt if ot == "same" else "float32", d, dv, qt, kt, rpb))
        if ot == "same":
            out.append(_fmha_bwd_variant("fmha_bwd_dq", dt, d, dv, qt, kt, rpb))
            out.append(_fmha_bwd_variant("fmha_bwd_dkdv", dt, dv, d, kt, qt, rpb))
    for j, (d, dv) in enumerate(dims[:4]):  # the rest of the head dims, every rank
        qt, kt = tiles[(j + 1) % len(tiles)]
        out.append(_fmha_variant("float16", "float16", d, dv, qt, kt, False))
    for j, qt in enumerate(((1, 1, 128), (1, 16, 8), (8, 4, 4))):  # 128-query tiles, every rank
        d, dv = dims[j]
        out.append(_fmha_variant(FAST_DTYPES[j % 2], FAST_DTYPES[j % 2], d, dv, qt, tiles[j][1], j == 1))  # 8 warps
        out.append(_fmha_variant(FAST_DTYPES[j % 2], "float32", dv, d, qt, tiles[j][1], j != 1, mt=2))  # 4 warps x 32 rows
    out.append(_fmha_variant("float16", "float16", 128, 128, (1, 8, 8), (1, 8, 8), True, mt=2))  # 2 warps x 32 rows
    out.append(_fmha_variant("bfloat16", "bfloat16", 128, 64, (1, 16, 8), (1, 8, 8), False, stages=3))  # 3 slots
    out.append(_fmha_variant("float16", "float32", 32, 32, (2, 4, 8), (4, 4, 4), True, mt=2, stages=3))
    # three blocks per SM: Q in a K slot, every rank; a bound without the alias (128-query tiles)
    out.append(_fmha_variant("float16", "float16", 128, 128, (1, 8, 8), (1, 8, 8), False, min_blocks=3))
    out.append(_fmha_variant("bfloat16", "float32", 128, 96, (2, 8, 4), (2, 8, 4), True, min_blocks=3))
    out.append(_fmha_variant("float16", "float16", 64, 64, (1, 1, 64), (1, 1, 64), True, min_blocks=3))
    out.append(_fmha_variant("float16", "float16", 128, 128, (1, 16, 8), (1, 8, 8), False, min_blocks=2))
    # the default of large problems: 128-query tiles of 4 warps x 32 rows, two blocks per SM (short tile list at D 128)
    out.append(_fmha_variant("float16", "float16", 128, 128, (1, 16, 8), (1, 8, 8), False, mt=2, min_blocks=2))
    out.append(_fmha_variant("bfloat16", "float32", 128, 128, (2, 8, 8), (2, 4, 8), True, mt=2, min_blocks=2))
    out.append(_fmha_variant("float16", "float16", 64, 64, (1, 1, 128), (1, 1, 64), False, mt=2, min_blocks=2))
    # a query tile's walk split over blocks (float32 parts): 1D three blocks per SM, 2D 32-row warps with rpb
    out.append(_fmha_variant("float16", "float32", 128, 128, (1, 1, 64), (1, 1, 64), False, min_blocks=3, splits=3))
    out.append(_fmha_variant("bfloat16", "float32", 64, 64, (1, 16, 8), (1, 8, 8), True, mt=2, min_blocks=2, splits=2))
    for i, ot in enumerate(("float32", "float16", "bfloat16")):  # the parts' merge
        out.append(Variant("merge_parts", (("OT", ot), ("S", 2 + 3 * i), ("DV", (128, 64, 96)[i]))))
    qt, kt = tiles[1]  # B fragments through plain shared loads (ldmatrix=False)
    out.append(_fmha_variant("bfloat16", "bfloat16", 64, 64, qt, kt, True, False))
    out.append(_fmha_bwd_variant("fmha_bwd_dq", "float16", 64, 64, qt, kt, True, False))
    out.append(_fmha_bwd_variant("fmha_bwd_dq", "bfloat16", 32, 32, qt, kt, True, True, 169))  # d_rpb in shared memory
    out.append(_fmha_bwd_variant("fmha_bwd_dkdv", "bfloat16", 64, 64, qt, kt, False, False))
    simple_dims = list(SIMPLE_DIMS)
    for i, (dt, rpb) in enumerate(itertools.product(("float32", "float16", "bfloat16"), (False, True))):
        dmax = simple_dims[i % len(simple_dims)]
        out.append(Variant("simple_fwd", (("T", dt), ("OT", dt if i % 2 else "float32"), ("DMAX", dmax), ("HAS_RPB", rpb))))
        out.append(Variant("simple_dq", (("T", dt), ("DMAX", dmax), ("HAS_RPB", rpb))))
        out.append(Variant("simple_dkdv", (("T", dt), ("DMAX", simple_dims[-1 - i % 3]), ("HAS_RPB", rpb))))
    return out


def wgmma_variants() -> list:
    """The warpgroup-MMA forward variants the CI compile check builds for sm_90a (their wgmma bodies
    only exist there): both dtypes, head dims 64/128 and D != Dv, ranks 1-3, rpb, float32 out, a split
    walk, one warpgroup (64-query tiles) and the default two (128)."""
    return [
        _fmha_variant("float16", "float16", 128, 128, (1, 16, 8), (1, 8, 8), False, min_blocks=WG_MIN_BLOCKS, wg=True),
        _fmha_variant("bfloat16", "bfloat16", 128, 128, (1, 1, 128), (1, 1, 64), False, min_blocks=WG_MIN_BLOCKS, wg=True),
        _fmha_variant("float16", "float32", 64, 128, (2, 8, 8), (4, 4, 4), True, min_blocks=WG_MIN_BLOCKS, wg=True),
        _fmha_variant("bfloat16", "float32", 128, 64, (1, 16, 8), (1, 8, 8), True, min_blocks=WG_MIN_BLOCKS, wg=True,
                      splits=2),
        _fmha_variant("float16", "float16", 64, 64, (1, 8, 8), (1, 8, 8), False, wg=True),
        _fmha_variant("float16", "float16", 128, 128, (1, 1, 128), (1, 1, 64), False, stages=3, wg=True),
    ]


# The backward bodies' static __shared__ tile tables (ptxas: 6.8-7.6 KB) count against the 48 KB a
# block may use without opting in to more, and MLX opts in (cuFuncSetAttribute of the dynamic size)
# only for dynamic requests above 48000 bytes: a request that fits alone but not beside the tables
# would fail at launch (cuGraphAddKernelNode: invalid argument; seen on the H200 with D 64, Dv 32), so
# such a request is raised just past MLX's threshold.
BWD_STATIC_SMEM = 8192
MLX_OPT_IN_SMEM = 48000


def _with_static_tables(dynamic: int) -> int:
    if dynamic <= MLX_OPT_IN_SMEM and dynamic + BWD_STATIC_SMEM > 48 * 1024:
        return MLX_OPT_IN_SMEM + 16
    return dynamic


# d_rpb of the dq pass summed per block in shared memory (fmha_bwd_dq.cu's SRPB) for tables of at most
# this many entries per head (2D windows up to 16 x 16, 3D up to 5 x 5 x 5), where the space does not
# cost a resident block
BWD_SRPB = 1024


def _smem_blocks(dynamic: int) -> int:
    """Resident backward blocks per SM that shared memory allows (its static tables and the driver's
    reserve included), at most the two that the kernels' registers allow."""
    return min(2, SM_SMEM // (dynamic + BWD_STATIC_SMEM + BLOCK_SMEM_RESERVED))


def _fmha_bwd_variant(body, dt, d, dv, qt, kt, rpb, ldsm=True, rpb_size=0) -> Variant:
    dp, dvp = _r16(d), _r16(dv)
    smem = (TILE * (dp + 8) * 3 + TILE * (dvp + 8) * 3) * 2 + (4 * TILE * 4 if body == "fmha_bwd_dkdv" else 0)
    extra = ()
    if body == "fmha_bwd_dq":
        srpb = rpb and 0 < rpb_size <= BWD_SRPB and _smem_blocks(smem + 4 * BWD_SRPB) == _smem_blocks(smem)
        smem += 4 * BWD_SRPB if srpb else 0
        extra = (("SRPB", srpb),)
    smem = _with_static_tables(smem)
    return Variant(
        body,
        (("T", dt), ("D", d), ("DV", dv), ("DP", dp), ("DVP", dvp), ("QT0", qt[0]), ("QT1", qt[1]), ("QT2", qt[2]),
         ("KT0", kt[0]), ("KT1", kt[1]), ("KT2", kt[2]), ("HAS_RPB", rpb), ("LDSM", ldsm)) + extra,
        smem,
    )


def _fmha_variant(dt, ot, d, dv, qt, kt, rpb, ldsm=True, mt=1, stages=None, min_blocks=0, splits=1, wg=False) -> Variant:
    stages = stages or FWD_STAGES
    dp, dvp = _r16(d), _r16(dv)
    bq = qt[0] * qt[1] * qt[2]
    # with a bound of 3+ blocks, Q shares the ring (it is read once, into registers) and the tile
    # list is shorter, so that the blocks' shared memory fits too
    small = min_blocks >= 3
    qalias = small and bq == TILE and stages == 2 and (mt == 1 or dp <= 64) and not wg

    # the column masks (3 x 65 64-bit words), the block geometry, the row windows, the key-tile list and
    # the key rows' token offsets (fmha_fwd.cu's shared layout)
    def tables(maxt):  # with rpb, one more int per key-tile column (its part of the rpb index)
        return 3 * (TILE + 1) * 8 + (FWD_GEO + 8 * bq + 5 * maxt + TILE + (TILE if rpb else 0)) * 4

    pad = 0 if wg else 8  # WG: swizzled tiles without padding, aligned in the kernel
    tiles = ((0 if qalias else bq * (dp + pad)) + stages * TILE * (dp + pad) + stages * TILE * (dvp + pad)) * 2
    tiles += WG_ALIGN if wg else 0
    # the shorter tile list also when it lets the bound's blocks fit (128-query tiles of 4 warps x 32
    # rows at D 128: 118.2 KB, two need 113 KB or less)
    if min_blocks >= 2 and tiles + tables(FWD_MAXT) > SM_SMEM // min_blocks - BLOCK_SMEM_RESERVED:
        small = True
    maxt = FWD_MAXT_SMALL if small else FWD_MAXT
    return Variant(
        "fmha_fwd",
        (("T", dt), ("OT", ot), ("D", d), ("DV", dv), ("DP", dp), ("DVP", dvp), ("QT0", qt[0]), ("QT1", qt[1]),
         ("QT2", qt[2]), ("KT0", kt[0]), ("KT1", kt[1]), ("KT2", kt[2]), ("HAS_RPB", rpb), ("LDSM", ldsm),
         ("NW", bq // (16 * mt)), ("MT", mt), ("MAXT", maxt), ("STAGES", stages), ("QALIAS", qalias),
         ("SPLIT", splits), ("WG", wg)),
        tiles + tables(maxt),
        min_blocks,
    )


# the module's constants that plans depend on (every hashable upper-case global), for _planned's cache
_TUNING = tuple(n for n, v in list(globals().items()) if n.isupper() and not n.startswith("_") and isinstance(v, (int, float, str, tuple)))


def tuning_key() -> tuple:
    """The module's tuning constants now (a cache key part: tests and studies change them)."""
    return tuple(map(_GLOBALS.__getitem__, _TUNING))


_GLOBALS = globals()
