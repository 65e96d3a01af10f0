"""Metal kernel sources and launch plans: from a Problem to ``mx.fast.metal_kernel`` calls.

Pure Python (MLX only to name dtypes), so the emulator of tests/metal runs exactly what the
backend launches: a :class:`Launch` holds the :class:`KernelSpec` (the arguments of
``mx.fast.metal_kernel``) and the arguments of the call (inputs, template, grid, threadgroup,
output shapes and dtypes). The window and tile arithmetic lives in window.h and tiling.h (shared
with the CUDA tier); the Python side only sizes grids and tiles.

Problems of rank < 3 are padded in front with trivial axes (extent 1, K = s = d = 1): every
kernel walks three axes, and row-major flat token indices are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import mlx.core as mx
from natten_mlx.geometry import Padded3D, grid_tiles, pad3, padded3d

HEAD_DIMS = (8, 16, 32, 64, 128, 256)  # register-array sizes (DP, DVP template values)
MAX_HEAD_DIM = HEAD_DIMS[-1]
THREADS = 64  # tokens per tile box, and threads of the scalar kernels: one per query (dQ) or key (dK/dV)
MMA_THREADS = 4 * THREADS  # the simdgroup-matrix forward: one simdgroup (32 threads) per 8 queries
# kernel variants: "mma" (simdgroup matrices) or "simple" (one thread per query or key); "auto"
# picks mma up to head dims of MMA_MAX_DIM and simple above, where 256 threads of 2 * (D + Dv) / 8
# fragment registers each may exceed what a pipeline allows per threadgroup (unmeasured: no Mac).
# The additional-key and rpb gradients have one (scalar) kernel each.
VARIANTS = ("auto", "mma", "simple")
MMA_MAX_DIM = 128


def resolve_variant(variant: str, geo: "Geometry") -> str:
    if variant != "auto":
        return variant
    return "mma" if max(padded_dim(geo.D), padded_dim(geo.DV)) <= MMA_MAX_DIM else "simple"


def _variant(kind: str, variant: str) -> tuple[str, int]:
    """(kernel name, threads per threadgroup) of the forward, dQ or dK/dV kernel of a variant."""
    return (kind + "_mma", MMA_THREADS) if variant == "mma" else (kind, THREADS)
DEFAULT_BOX = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
TG_MEMORY = 32768  # bytes of threadgroup memory on Apple GPUs
N_SCALARS = 8
AXIS_INTS = 12
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
ESIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KernelSpec:
    """The arguments of ``mx.fast.metal_kernel`` (one compiled kernel family)."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str


@dataclass(frozen=True)
class Launch:
    """One call of a kernel object: what ``kernel(inputs=..., ...)`` receives."""

    spec: KernelSpec
    inputs: tuple
    template: tuple
    grid: tuple
    threadgroup: tuple
    output_shapes: tuple
    output_dtypes: tuple
    init_value: float | None = None


# ---- sources ----
def _core_header(name: str) -> str:
    from natten_mlx import geometry

    return (Path(geometry.include_dir()) / "natten_mlx" / name).read_text()


def _metal(name: str) -> str:
    return resources.files("natten_mlx_metal").joinpath("metal").joinpath(name).read_text()


@lru_cache(maxsize=None)
def header() -> str:
    """window.h, tiling.h (the core's shared tile walk) and common.h, as ``header=``."""
    return "\n".join([_core_header("window.h"), _core_header("tiling.h"), _metal("common.h")])


KERNELS = {
    # name: (body file, inputs, outputs)
    "fwd": ("fwd.metal", ("q", "k", "v", "ak", "av", "rpb", "prm", "scl"), ("out", "lse")),
    "fwd_mma": ("fwd_mma.metal", ("q", "k", "v", "ak", "av", "rpb", "prm", "scl"), ("out", "lse")),
    "bwd_dq_mma": ("bwd_dq_mma.metal", ("q", "k", "v", "ak", "av", "rpb", "dout", "lse", "delta", "prm", "scl"),
                   ("dq",)),
    "bwd_dkv_mma": ("bwd_dkv_mma.metal", ("q", "k", "v", "rpb", "dout", "lse", "delta", "prm", "scl"), ("dk", "dv")),
    "bwd_dq": ("bwd_dq.metal", ("q", "k", "v", "ak", "av", "rpb", "dout", "lse", "delta", "prm", "scl"), ("dq",)),
    "bwd_dkv": ("bwd_dkv.metal", ("q", "k", "v", "rpb", "dout", "lse", "delta", "prm", "scl"), ("dk", "dv")),
    "bwd_extra": ("bwd_extra.metal", ("q", "ak", "av", "dout", "lse", "delta", "prm", "scl"), ("dak", "dav")),
    "bwd_rpb": ("bwd_rpb.metal", ("q", "k", "v", "rpb", "dout", "lse", "delta", "prm", "scl"), ("drpb",)),
    # the split ops (one thread per query or key, no threadgroup memory)
    "split_dot": ("split_dot.metal", ("x", "y", "ye", "rpb", "prm", "scl"), ("out",)),
    "split_wsum": ("split_wsum.metal", ("w", "y", "ye", "prm", "scl"), ("out",)),
    "split_scatter": ("split_scatter.metal", ("w", "x", "prm", "scl"), ("out",)),
    "split_rpb": ("split_rpb.metal", ("w", "prm"), ("drpb",)),
}


@lru_cache(maxsize=None)
def spec(kind: str) -> KernelSpec:
    body, ins, outs = KERNELS[kind]
    return KernelSpec(name=f"natten_mlx_{kind}", input_names=ins, output_names=outs, source=_metal(body), header=header())


# ---- geometry ----
# The core's 3-axis-padded geometry (natten_mlx.geometry.padded3d), the one the CUDA tier reads too.
Geometry = Padded3D


def geometry(p) -> Geometry:
    return padded3d(p)


def padded_dim(x: int) -> int:
    """The register-array size (DP, DVP template value) of a head dim."""
    return next(h for h in HEAD_DIMS if h >= x)


def stage_rows(geo: Geometry) -> int:
    """common.h's na_stage_rows: rows of key+value (or query+dO) staged per tile."""
    b = (padded_dim(geo.D) + padded_dim(geo.DV)) * ESIZE[DTYPE_NAMES[geo.dtype]]
    return 32 if b * 32 <= TG_MEMORY - 2048 else 16 if b * 16 <= TG_MEMORY - 2048 else 8


def _box(geo: Geometry, size: int, extents) -> tuple:
    """A tile box of ``size`` tokens over the rank's axes (padded to 3): the rank's default shape
    scaled to ``size``, halved along axes whose dilation groups are shorter, the freed factor given
    to the axis with the most tokens per tile slot."""
    rank = geo.rank
    t = [1, 1, 1]
    base = pad3(DEFAULT_BOX[rank], 1)
    # scale the default box (64 tokens) to `size` by halving its largest entries
    t = list(base)
    while t[0] * t[1] * t[2] > size:
        a = max(range(3), key=lambda i: (t[i], i))
        t[a] //= 2
    ext = [max(1, e) for e in extents]
    for a in range(3 - rank, 3):
        while t[a] > 1 and t[a] // 2 >= ext[a]:
            t[a] //= 2
    while t[0] * t[1] * t[2] < size:
        a = max(range(3 - rank, 3), key=lambda i: (ext[i] / t[i], i))
        t[a] *= 2
    return tuple(t)


def _group_extents(spatial, d) -> list:
    return [-(-n // dd) for n, dd in zip(spatial, d)]


def params(geo: Geometry, T: tuple, U: tuple, key_major: bool) -> tuple:
    """The prm block of common.h. ``tiles`` counts query tiles (T), or key tiles (U) when key_major."""
    out = [geo.B, geo.H, geo.HKV, geo.N, geo.NK, geo.D, geo.DV, geo.E]
    for a in range(3):
        tiles = grid_tiles(geo.kvoff[a], geo.kv_spatial[a], geo.d[a], U[a]) if key_major else grid_tiles(
            geo.qoff[a], geo.spatial[a], geo.d[a], T[a])
        out += [geo.domain[a], geo.spatial[a], geo.kv_spatial[a], geo.qoff[a], geo.kvoff[a], geo.K[a], geo.s[a],
                 geo.d[a], int(geo.causal[a]), tiles, T[a], U[a]]
    out += [geo.rpb_size, int(geo.has_rpb)]
    return tuple(out)


def _ntiles(prm: tuple) -> int:
    n = 1
    for a in range(3):
        o = N_SCALARS + AXIS_INTS * a
        n *= prm[o + 7] * prm[o + 9]  # d * tiles
    return n


def _template(geo: Geometry, dtype, threads: int = THREADS) -> tuple:
    return (("T", dtype), ("DP", padded_dim(geo.D)), ("DVP", padded_dim(geo.DV)), ("NT", threads))


# Per-call constants are cached MLX arrays built from Python values (immutable and holding their data,
# so safe to share across calls, streams and mx.compile traces): a launch builds no host tables.
@lru_cache(maxsize=None)
def _dummy(dtype):
    # a buffer of >= 8 elements binds as `const device T*` like the real one would
    return mx.array([0.0] * 8, dtype=dtype)


def query_major_tiles(geo: Geometry, tile=None) -> tuple[tuple, tuple]:
    """(query box T of THREADS tokens, key staging box U) for the forward and dQ kernels."""
    ext = _group_extents(geo.spatial, geo.d)
    T = tile if tile is not None else _box(geo, THREADS, ext)
    U = _box(geo, stage_rows(geo), _group_extents(geo.kv_spatial, geo.d))
    return T, U


def key_major_tiles(geo: Geometry, tile=None) -> tuple[tuple, tuple]:
    """(query staging box T, key box U of THREADS tokens) for the dK/dV kernel."""
    U = tile if tile is not None else _box(geo, THREADS, _group_extents(geo.kv_spatial, geo.d))
    T = _box(geo, stage_rows(geo), _group_extents(geo.spatial, geo.d))
    return T, U


def _scale(geo: Geometry):
    return _scale_array(geo.scale)


@lru_cache(maxsize=256)
def _scale_array(scale: float):
    return mx.array([scale], dtype=mx.float32)


@lru_cache(maxsize=256)
def _int_block(values: tuple):
    return mx.array(values, dtype=mx.int32)


def forward_launch(geo: Geometry, q, k, v, ak, av, rpb, tile=None, variant: str = "auto") -> Launch:
    """Fused forward: out [B, N, H, DV], lse [B, N, H] float32. q/k/v flattened to tokens."""
    dtype = q.dtype
    kind, threads = _variant("fwd", resolve_variant(variant, geo))
    T, U = query_major_tiles(geo, tile)
    prm = params(geo, T, U, key_major=False)
    inputs = (q, k, v, ak if ak is not None else _dummy(dtype), av if av is not None else _dummy(dtype),
              rpb if rpb is not None else _dummy(dtype), _int_block(prm), _scale(geo))
    return Launch(spec(kind), inputs, _template(geo, dtype, threads), (_ntiles(prm) * threads, geo.H, geo.B),
                  (threads, 1, 1),
                  ((geo.B, geo.N, geo.H, geo.DV), (geo.B, geo.N, geo.H)), (dtype, mx.float32))


def backward_launches(geo: Geometry, q, k, v, ak, av, rpb, dout, lse, delta, tile=None, variant: str = "auto") -> dict:
    """The backward's launches by gradient name (each a Launch); delta = rowsum(dO * O) - dlse."""
    dtype = q.dtype
    rpb_in = rpb if rpb is not None else _dummy(dtype)
    ak_in = ak if ak is not None else _dummy(dtype)
    av_in = av if av is not None else _dummy(dtype)
    tpl = _template(geo, dtype)
    T, U = query_major_tiles(geo, tile)
    prm_q = _int_block(params(geo, T, U, key_major=False))
    out = {}
    variant = resolve_variant(variant, geo)
    kind, threads = _variant("bwd_dq", variant)
    out["dq"] = Launch(spec(kind), (q, k, v, ak_in, av_in, rpb_in, dout, lse, delta, prm_q, _scale(geo)),
                       _template(geo, dtype, threads), (_ntiles(params(geo, T, U, False)) * threads, geo.H, geo.B),
                       (threads, 1, 1), ((geo.B, geo.N, geo.H, geo.D),), (dtype,))
    Tk, Uk = key_major_tiles(geo)
    prm_k = params(geo, Tk, Uk, key_major=True)
    kind, threads = _variant("bwd_dkv", variant)
    out["dkv"] = Launch(spec(kind), (q, k, v, rpb_in, dout, lse, delta, _int_block(prm_k), _scale(geo)),
                        _template(geo, dtype, threads), (_ntiles(prm_k) * threads, geo.HKV, geo.B), (threads, 1, 1),
                        ((geo.B, geo.NK, geo.HKV, geo.D), (geo.B, geo.NK, geo.HKV, geo.DV)), (dtype, dtype))
    if geo.E:
        chunks = -(-geo.E // THREADS)
        out["extra"] = Launch(spec("bwd_extra"), (q, ak, av, dout, lse, delta, prm_q, _scale(geo)), tpl,
                              (chunks * THREADS, geo.HKV, geo.B), (THREADS, 1, 1),
                              ((geo.B, geo.E, geo.HKV, geo.D), (geo.B, geo.E, geo.HKV, geo.DV)), (dtype, dtype))
    if geo.has_rpb:
        cols = -(-geo.rpb_size // 32) * 32
        out["rpb"] = Launch(spec("bwd_rpb"), (q, k, v, rpb, dout, lse, delta, prm_q, _scale(geo)), tpl,
                            (cols, geo.H, 1), (32, 1, 1), ((geo.H, geo.rpb_size),), (mx.float32,))
    return out


# ---- the split ops ----
# Four kernels serve qk, av and both backwards (the same contraction appears twice, with its
# operands renamed): split_dot (scores from x . y[slot key]: qk's scores, av's dAttn), split_wsum
# (sum of slot weights times y[slot key]: av's out, qk's dQ), split_scatter (its transpose, key
# major: qk's dK, av's dV) and split_rpb (qk's rpb gradient). ``dim`` is the row length of the
# contraction; it travels as both D and DV of prm.
SPLIT_THREADS = 64


def _split_common(geo: Geometry, dim: int, has_rpb: bool = False):
    g = replace(geo, D=dim, DV=dim, has_rpb=has_rpb)
    return g, _int_block(params(g, (1, 1, 1), (1, 1, 1), key_major=False))


@lru_cache(maxsize=64)
def _constants(c: float, fill: float):
    return mx.array([c, fill], dtype=mx.float32)


def _rows(n: int, per: int = SPLIT_THREADS) -> int:
    return -(-n // per) * per


def split_dot_launch(geo: Geometry, dim: int, x, y, ye, rpb, c: float, fill: float) -> Launch:
    """Scores ``[B, N, H, KT + E]`` (x's dtype): ``c * x . y[slot key]`` (+ rpb), ``fill`` in
    invalid slots, then the additional tokens ``c * x . ye``. x ``[B, N, H, dim]``, y ``[B, NK,
    HKV, dim]``, ye ``[B, E, HKV, dim]`` or None, rpb ``[H, R]`` or None."""
    dtype = x.dtype
    g, prm = _split_common(geo, dim, rpb is not None)
    inputs = (x, y, ye if ye is not None else _dummy(dtype), rpb if rpb is not None else _dummy(dtype), prm,
              _constants(float(c), float(fill)))
    return Launch(spec("split_dot"), inputs, _template(g, dtype, SPLIT_THREADS), (_rows(g.N), g.H, g.B),
                  (SPLIT_THREADS, 1, 1), ((g.B, g.N, g.H, g.window_size + g.E),), (dtype,))


def split_wsum_launch(geo: Geometry, dim: int, w, y, ye, c: float) -> Launch:
    """``[B, N, H, dim]`` (w's dtype): ``c * (sum_slot w * y[slot key] + sum_e w[KT + e] * ye[e])``;
    weights of invalid slots are not read."""
    dtype = w.dtype
    g, prm = _split_common(geo, dim)
    inputs = (w, y, ye if ye is not None else _dummy(dtype), prm, _constants(float(c), 0.0))
    return Launch(spec("split_wsum"), inputs, _template(g, dtype, SPLIT_THREADS), (_rows(g.N), g.H, g.B),
                  (SPLIT_THREADS, 1, 1), ((g.B, g.N, g.H, dim),), (dtype,))


def split_scatter_launch(geo: Geometry, dim: int, w, x, c: float, out_dtype) -> Launch:
    """``[B, NK, HKV, dim]``: ``c * sum over (query, head of the group, slot) reading each key of w * x``."""
    g, prm = _split_common(geo, dim)
    return Launch(spec("split_scatter"), (w, x, prm, _constants(float(c), 0.0)), _template(g, w.dtype, SPLIT_THREADS),
                  (_rows(g.NK), g.HKV, g.B), (SPLIT_THREADS, 1, 1), ((g.B, g.NK, g.HKV, dim),), (out_dtype,))


def split_rpb_launch(geo: Geometry, w) -> Launch:
    """``[H, R]`` float32: dScores summed into the rpb columns."""
    g, prm = _split_common(geo, 8, True)
    return Launch(spec("split_rpb"), (w, prm), _template(g, w.dtype, 32), (_rows(g.rpb_size, 32), g.H, 1),
                  (32, 1, 1), ((g.H, g.rpb_size),), (mx.float32,))


def metal_launch(launch: Launch) -> list:
    """Run a Launch on the GPU through mx.fast.metal_kernel."""
    return _kernel(launch.spec)(
        inputs=list(launch.inputs), template=list(launch.template), grid=launch.grid, threadgroup=launch.threadgroup,
        output_shapes=list(launch.output_shapes), output_dtypes=list(launch.output_dtypes),
        init_value=launch.init_value,
    )


@lru_cache(maxsize=None)
def _kernel(s: KernelSpec):
    return mx.fast.metal_kernel(name=s.name, input_names=list(s.input_names), output_names=list(s.output_names),
                                source=s.source, header=s.header)
