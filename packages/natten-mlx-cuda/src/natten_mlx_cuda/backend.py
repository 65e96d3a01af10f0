"""The ``cuda`` backend: neighborhood attention kernels compiled at run time by mx.fast.cuda_kernel.

Forward: the tensor-core kernel (fmha_fwd: float16/bfloat16, head dims multiples of 8 up to 128)
or the simple kernel (every dtype, head dims up to 512). Backward (from the saved lse): the simple
dq and dk/dv kernels. Extra keys/values are attended by MLX matmuls and merged by their lse.
Kernels run through a *runner* (``launch, inputs -> outputs``): mx.fast.cuda_kernel on the GPU, the
CPU emulator in tests/cuda.
"""

from __future__ import annotations

from functools import lru_cache, partial

import mlx.core as mx

from . import plan
from .source import BODIES, Variant, body, header_for

_MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "int32": mx.int32}
_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
OPTIONS = ("tile", "key_tile", "kernel", "ldmatrix", "m_tiles", "stages", "min_blocks", "splits", "wgmma")
KERNELS = ("auto", "fmha", "simple")
MAX_GRID_YZ = plan.MAX_GRID_YZ
MAX_THREADS = 2**31 - 1
_MISS = object()


@lru_cache(maxsize=None)
def _kernel(v_body: str, shared_memory: int, threads: int = 0, min_blocks: int = 0):
    ins, outs = BODIES[v_body]
    return mx.fast.cuda_kernel(
        name="natten_" + v_body + (f"_lb{min_blocks}" if min_blocks else ""), input_names=list(ins),
        output_names=list(outs), source=body(v_body), header=header_for(threads, min_blocks),
        ensure_row_contiguous=True, shared_memory=shared_memory,
    )


def mlx_runner(launch: plan.Launch, inputs: list) -> list:
    """Run a launch through mx.fast.cuda_kernel (compiled by NVRTC at first use, cached by MLX)."""
    return mlx_bound(launch)(inputs)


def mlx_bound(launch: plan.Launch):
    """``inputs -> outputs`` of a launch, with the kernel object and the call's keywords resolved now."""
    v: Variant = launch.variant
    _, outs = v.arg_dtypes()
    template = [(n, _MX_DTYPES[x] if isinstance(x, str) else x) for n, x in v.template]
    kernel = _kernel(v.body, v.shared_memory, v.threads if v.min_blocks else 0, v.min_blocks)
    return partial(
        _call_kernel, kernel, dict(
            template=template, grid=launch.grid, threadgroup=launch.threadgroup,
            output_shapes=[tuple(s) for s in launch.output_shapes], output_dtypes=[_MX_DTYPES[d] for _, d in outs],
            init_value=launch.init_value,
        ),
    )


def _call_kernel(kernel, kw: dict, inputs: list) -> list:
    return kernel(inputs=inputs, **kw)


def _shaped(x, shape: tuple):
    """x viewed as shape (no reshape node when it already has it)."""
    return x if x.shape == shape else x.reshape(shape)


@lru_cache(maxsize=256)
def _int_block(prm: tuple) -> mx.array:
    return mx.array(prm, dtype=mx.int32)


# MLX's CUDA allocator serves allocations of at most 8 bytes from one pool of managed memory that the host's
# own scalars share, so a kernel's first read of such an array can wait for a page migration (ncu on the H200:
# 13 us of G1's 121 us forward, a third of a 7-tile walk's stall samples on the FMUL of scl[0]). The host-data
# arrays the kernels read are therefore padded to 16 bytes or more.
HOST_PAD = 4


@lru_cache(maxsize=256)
def _scale(scale: float) -> mx.array:
    return mx.array([scale] + [0.0] * (HOST_PAD - 1), dtype=mx.float32)


_ARCH_PROBE = """
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  flag[0] = 1;
#else
  flag[0] = 0;
#endif
"""


@lru_cache(maxsize=None)
def device_wgmma_reason() -> str | None:
    """Why this process's GPU cannot run the warpgroup-MMA forward (None when it can): MLX's NVRTC
    builds for the arch-specific sm_90a target on compute capability 9.0 only, which wgmma needs. Asked
    once, by a one-thread kernel that reports whether that target's feature macro is defined."""
    try:
        k = mx.fast.cuda_kernel(name="natten_arch_probe", input_names=["x"], output_names=["flag"], source=_ARCH_PROBE)
        (flag,) = k(inputs=[mx.zeros((1,), dtype=mx.int32)], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                    output_shapes=[(1,)], output_dtypes=[mx.int32])
        ok = int(flag.item()) == 1
    except Exception as exc:  # no CUDA device, or NVRTC refused the probe
        return f"the architecture probe failed ({type(exc).__name__}: {exc})"
    return None if ok else "the GPU is not compiled for sm_90a (wgmma is Hopper's; MLX targets sm_90a on compute capability 9.0)"


def _device_type() -> str:
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


class CudaBackend:
    """Neighborhood attention on NVIDIA GPUs through MLX's CUDA backend.

    Options (``configure``): ``tile`` (query tile of the tensor-core kernels, one int per spatial axis,
    product 64, or 128 for the forward alone: 8 warps of 16 rows; the backward then takes its default),
    ``key_tile`` (same for key tiles, product 64; default: with neither given, the pair of
    plan.fitted_tiles, which computes the fewest (query, key) pairs; with a tile alone, the rank's box
    in the forward and the query tile in the backward), ``kernel`` ("auto",
    "fmha" or "simple": which kernels; "fmha" refuses problems it cannot serve), ``ldmatrix``
    (True: the tensor-core kernels read B fragments through ldmatrix; False: through plain shared loads),
    ``m_tiles`` (1 or 2: m-tiles of 16 query rows per warp in the forward; 2 halves its shared-memory reads per mma;
    default: plan.forward_tiles, 2 with 128-query tiles for large problems without rpb whose windows are wide
    enough that the tiles' larger union of windows pays),
    ``stages`` (2 or 3: key-tile slots of the forward's cp.async ring), ``min_blocks`` (0, 2, 3 or 4:
    resident forward blocks per SM the kernel is compiled for, through __launch_bounds__; 3 also puts Q
    in a K slot of the ring and lists fewer key tiles per chunk so that three blocks' shared memory fits;
    0: no bound; default: plan.forward's choice, 3 for 64-query tiles without rpb, 2 for 128-query tiles
    of 32-row warps), ``splits`` (1 to plan.MAX_SPLITS: blocks that share each query tile's walk of key
    tiles in the tensor-core forward, merged by their lse; default 1: measured slower on whole calls, see
    plan.SPLIT_FILL), ``wgmma`` (None: the forward's products by warpgroup MMA where plan.WGMMA, the
    device (sm_90a) and the problem (plan.wgmma_reason) allow; True: the same, and a problem or device it
    cannot serve is refused in ``supports``; False: mma.sync only).
    """

    name = "cuda"
    priority = 300
    differentiation = "backward"
    distribution = "natten-mlx-cuda"
    description = "fused kernels through mx.fast.cuda_kernel (tensor cores for float16/bfloat16; warpgroup MMA on Hopper)"

    def __init__(self, tile=None, key_tile=None, kernel: str = "auto", runner=None, require_device: bool = True,
                 ldmatrix: bool = True, m_tiles=None, stages=None, min_blocks=None, splits=None, wgmma=None):
        self.wgmma = wgmma
        self.min_blocks = min_blocks
        self.splits = splits
        self.m_tiles = m_tiles
        self.stages = stages
        self.tile = tile
        self.key_tile = key_tile
        self.kernel = kernel
        self.ldmatrix = ldmatrix
        self._configured: dict = {}
        self._fwd_cache: dict = {}
        self._supports_cache: dict = {}
        self._runner = runner or mlx_runner
        # tests run the CPU emulator through the whole backend; then no CUDA device is needed
        self._require_device = require_device

    def configure(self, **options) -> "CudaBackend":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"cuda backend: unknown option(s) {', '.join(unknown)}; known options: {', '.join(OPTIONS)}")
        kernel = options.get("kernel", self.kernel)
        if kernel not in KERNELS:
            raise ValueError(f"cuda backend: kernel={kernel!r} must be one of {', '.join(KERNELS)}")
        ldmatrix = options.get("ldmatrix", self.ldmatrix)
        if not isinstance(ldmatrix, bool):
            raise TypeError(f"cuda backend: ldmatrix={ldmatrix!r} must be a bool")
        m_tiles = options.get("m_tiles", self.m_tiles)
        if m_tiles is not None and (isinstance(m_tiles, bool) or m_tiles not in (1, 2)):
            raise ValueError(f"cuda backend: m_tiles={m_tiles!r} must be 1 or 2 (16-row m-tiles per warp in the forward)")
        stages = options.get("stages", self.stages)
        if stages is not None and (isinstance(stages, bool) or stages not in (2, 3)):
            raise ValueError(f"cuda backend: stages={stages!r} must be 2 or 3 (key-tile slots of the forward's load ring)")
        min_blocks = options.get("min_blocks", self.min_blocks)
        if min_blocks is not None and (isinstance(min_blocks, bool) or min_blocks not in (0, 2, 3, 4)):
            raise ValueError(f"cuda backend: min_blocks={min_blocks!r} must be 0, 2, 3 or 4 (resident forward blocks per SM)")
        splits = options.get("splits", self.splits)
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= plan.MAX_SPLITS):
            raise ValueError(f"cuda backend: splits={splits!r} must be an int from 1 to {plan.MAX_SPLITS} (blocks per query tile's walk)")
        wgmma = options.get("wgmma", self.wgmma)
        if wgmma is not None and not isinstance(wgmma, bool):
            raise TypeError(f"cuda backend: wgmma={wgmma!r} must be None, True or False (the forward's warpgroup MMA)")
        for what in ("tile", "key_tile"):
            t = options.get(what)
            if t is not None:
                if not isinstance(t, (tuple, list)) or not t:
                    raise ValueError(f"cuda backend: {what}={t!r} must be a tuple of ints (one per spatial axis)")
                plan.check_tile(tuple(t), len(t), what, plan.FWD_TILES if what == "tile" else (plan.TILE,))
        new = (
            tuple(options["tile"]) if options.get("tile") is not None else self.tile,
            tuple(options["key_tile"]) if options.get("key_tile") is not None else self.key_tile,
            kernel, ldmatrix, m_tiles, stages, min_blocks, splits, wgmma,
        )
        if new == (self.tile, self.key_tile, self.kernel, self.ldmatrix, self.m_tiles, self.stages, self.min_blocks,
                   self.splits, self.wgmma):
            return self
        # the same options give the same object, so calls share the core's cached functions
        if new not in self._configured:
            self._configured[new] = CudaBackend(
                tile=new[0], key_tile=new[1], kernel=kernel, runner=self._runner,
                require_device=self._require_device, ldmatrix=ldmatrix, m_tiles=m_tiles, stages=stages,
                min_blocks=min_blocks, splits=splits, wgmma=wgmma,
            )
        return self._configured[new]

    # -- selection --------------------------------------------------------------------------------
    def available(self) -> str | None:
        if not self._require_device:
            return None
        try:
            ok = mx.cuda.is_available()
        except AttributeError:
            ok = False
        if not ok:
            return "MLX's CUDA backend is not available here (mx.cuda.is_available() is False; install mlx[cuda13] on an NVIDIA GPU)"
        return None

    def _tiles(self, geo: plan.Geometry, forward: bool = False):
        # a 128-token tile is the forward's (8 warps); the backward kernels then take their default
        qt = None
        if self.tile is not None:
            qt = plan.check_tile(self.tile, geo.rank, "tile", plan.FWD_TILES)
            if not forward and qt[0] * qt[1] * qt[2] != plan.TILE:
                qt = None
        kt = plan.check_tile(self.key_tile, geo.rank, "key_tile") if self.key_tile is not None else None
        return qt, kt

    def _fast(self, geo: plan.Geometry, dtype: str) -> bool:
        if self.kernel == "simple":
            return False
        return plan.fast_reason(geo, dtype) is None

    def _wgmma(self, geo: plan.Geometry, dtype: str) -> bool:
        """Whether the forward's products go through warpgroup MMA for this problem."""
        if self.wgmma is False or (self.wgmma is None and not plan.WGMMA) or self.kernel == "simple":
            return False
        if plan.wgmma_reason(geo, dtype) is not None:
            return False
        # the CPU emulator (tests) runs the WG bodies too
        return not self._require_device or device_wgmma_reason() is None

    def supports(self, problem) -> str | None:
        # cached per problem (with its device) and plan's tuning constants: the dispatcher asks on every call
        if not getattr(problem, "device", None):
            return self._supports(problem)
        try:
            ck = (problem, plan.tuning_key())
            hit = self._supports_cache.get(ck, _MISS)
        except TypeError:  # an unhashable stand-in
            return self._supports(problem)
        if hit is _MISS:
            hit = self._supports(problem)
            if len(self._supports_cache) >= 1024:
                self._supports_cache.clear()
            self._supports_cache[ck] = hit
        return hit

    def _supports(self, problem) -> str | None:
        device = getattr(problem, "device", None) or _device_type()
        if self._require_device and device != "gpu":
            return f"serves GPU streams only (this call runs on the {device})"
        if problem.op != "fused":
            return f"has no split {problem.op} op (the fused op only; the pure backend serves split ops)"
        dtype = _NAMES.get(problem.dtype)
        if dtype is None:
            return f"dtype {problem.dtype} is not float32, float16 or bfloat16"
        geo = plan.geometry(problem)
        if max(geo.D, geo.DV) > plan.MAX_DIM:
            return f"head dims D={geo.D}, Dv={geo.DV} exceed {plan.MAX_DIM}"
        if geo.B > MAX_GRID_YZ or geo.H > MAX_GRID_YZ:
            return f"batch {geo.B} or heads {geo.H} exceed the grid limit {MAX_GRID_YZ}"
        if self.splits and geo.H * self.splits > MAX_GRID_YZ:
            return f"heads {geo.H} x splits={self.splits} exceed the grid limit {MAX_GRID_YZ} (the forward's grid y)"
        if max(geo.B * geo.N * geo.H, geo.B * geo.NK * geo.HKV) + plan.THREADS > MAX_THREADS:
            return f"{geo.B * geo.N * geo.H} (batch x tokens x heads) exceeds the grid limit of 2^31 threads"
        if self.tile is not None and len(self.tile) != geo.rank:
            return f"tile={self.tile} has {len(self.tile)} entries for a {geo.rank}D problem"
        if self.key_tile is not None and len(self.key_tile) != geo.rank:
            return f"key_tile={self.key_tile} has {len(self.key_tile)} entries for a {geo.rank}D problem"
        if self.kernel == "fmha":
            why = plan.fast_reason(geo, dtype)
            if why is not None:
                return f"kernel='fmha' was asked for, but {why}"
        if self.wgmma:
            why = plan.wgmma_reason(geo, dtype) or (device_wgmma_reason() if self._require_device else None)
            if why is not None:
                return f"wgmma=True was asked for, but {why}"
            if self.m_tiles == 2:
                return "wgmma=True was asked for with m_tiles=2 (warpgroup MMA takes 16-row warps)"
        return None

    # -- forward ----------------------------------------------------------------------------------
    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """``(out [B, *spatial, H, Dv] problem.dtype, lse [B, *spatial, H] float32)``."""
        extra = additional_keys is not None
        geo, launch, run, tail = self._prepared_forward(problem, rpb is not None, extra)
        out, lse = run([
            _shaped(query, (geo.B, geo.N, geo.H, geo.D)), _shaped(key, (geo.B, geo.NK, geo.HKV, geo.D)),
            _shaped(value, (geo.B, geo.NK, geo.HKV, geo.DV)),
            tail[0] if rpb is None else rpb.reshape(geo.H, geo.rpb_size), tail[1], tail[2],
        ])
        spatial = tuple(problem.spatial)
        if launch.splits > 1:
            rows = geo.B * geo.N * geo.H
            l_m = plan.merge(launch.splits, rows, geo.DV, "float32" if extra else _NAMES[problem.dtype])
            out, lse = self._runner(l_m, [out.reshape(launch.splits, rows, geo.DV), lse.reshape(launch.splits, rows),
                                          _int_block(l_m.prm)])
            out, lse = out.reshape(geo.B, geo.N, geo.H, geo.DV), lse.reshape(geo.B, geo.N, geo.H)
        if extra:
            out, lse = _merge_extra(geo, query, out, lse, additional_keys, additional_values)
            out = out.astype(problem.dtype)
        return _shaped(out, (geo.B, *spatial, geo.H, geo.DV)), _shaped(lse, (geo.B, *spatial, geo.H))

    def _prepared_forward(self, problem, has_rpb: bool, extra: bool):
        """(geometry, launch, the launch's bound runner, [rpb placeholder, parameter block, scale]) of a
        forward, cached per problem, rpb/extra flags and plan's tuning constants: planning and binding a
        call cost ~40 us of Python, which G1's 0.12 ms kernel would wait for (a call is built before
        MLX evaluates it)."""
        ck = (problem, has_rpb, extra, plan.tuning_key())
        try:
            hit = self._fwd_cache.get(ck)
        except TypeError:  # an unhashable stand-in for a Problem: planned afresh
            hit, ck = None, None
        if hit is not None:
            return hit
        geo = plan.geometry(problem)
        dtype = _NAMES[problem.dtype]
        out_dtype = "float32" if extra else dtype
        launch = self._forward_launch(geo, dtype, out_dtype, has_rpb)
        # host-data arrays (as _int_block and _scale): safe to keep when the first call is traced by mx.compile
        tail = [mx.array([0.0] * 2 * HOST_PAD, dtype=problem.dtype), _int_block(launch.prm), _scale(geo.scale)]
        hit = (geo, launch, self._bound(launch), tail)
        if ck is not None:
            if len(self._fwd_cache) >= 256:
                self._fwd_cache.clear()
            self._fwd_cache[ck] = hit
        return hit

    def _bound(self, launch: plan.Launch):
        """The launch's runner with everything but the inputs bound (mx.fast.cuda_kernel's object, its
        template, grid and outputs resolved once)."""
        if self._runner is not mlx_runner:
            return partial(self._runner, launch)
        return mlx_bound(launch)

    def _forward_launch(self, geo: plan.Geometry, dtype: str, out_dtype: str, has_rpb: bool) -> plan.Launch:
        """The forward's launch plan under this backend's options (fused_forward runs it)."""
        qt, kt = self._tiles(geo, forward=True)
        return plan.forward(geo, dtype, out_dtype, has_rpb, self._fast(geo, dtype), qt, kt, self.ldmatrix,
                            self.m_tiles, self.stages, self.min_blocks, self.splits, self._wgmma(geo, dtype))

    @staticmethod
    def _rpb(rpb, geo, dtype):
        if rpb is None:
            return mx.zeros((2 * HOST_PAD,), dtype=dtype)
        return rpb.reshape(geo.H, geo.rpb_size)

    # -- backward ---------------------------------------------------------------------------------
    def fused_backward(self, record) -> dict:
        """Gradients by input name from the saved lse (protocol v2 BackwardRecord)."""
        problem = record.problem
        inp = record.inputs
        query, key, value = inp["query"], inp["key"], inp["value"]
        ak, av, rpb = inp.get("additional_keys"), inp.get("additional_values"), inp.get("rpb")
        geo = plan.geometry(problem)
        dtype = _NAMES[problem.dtype]
        f32 = mx.float32
        d_out = record.d_out
        lse = record.lse.astype(f32).reshape(geo.B, geo.N, geo.H)
        delta = (d_out.astype(f32) * record.out.astype(f32)).sum(axis=-1).reshape(geo.B, geo.N, geo.H)
        if record.d_lse is not None:
            delta = delta - record.d_lse.astype(f32).reshape(geo.B, geo.N, geo.H)
        q = query.reshape(geo.B, geo.N, geo.H, geo.D)
        k = key.reshape(geo.B, geo.NK, geo.HKV, geo.D)
        v = value.reshape(geo.B, geo.NK, geo.HKV, geo.DV)
        do = d_out.reshape(geo.B, geo.N, geo.H, geo.DV).astype(problem.dtype)
        has_rpb = rpb is not None
        common = [q, k, v, do, lse, delta, self._rpb(rpb, geo, problem.dtype)]
        fast = self._fast(geo, dtype)
        qt, kt = self._tiles(geo)
        l_dq = plan.backward_dq(geo, dtype, has_rpb, fast, qt, kt, self.ldmatrix)
        dq, drpb = self._runner(l_dq, common + [_int_block(l_dq.prm), _scale(geo.scale)])
        l_kv = plan.backward_dkdv(geo, dtype, has_rpb, fast, qt, kt, self.ldmatrix)
        dk, dv = self._runner(l_kv, common + [_int_block(l_kv.prm), _scale(geo.scale)])
        grads = {}
        if ak is not None:
            dq_e, dak, dav = _extra_backward(geo, q, do, lse, delta, ak, av)
            dq = dq + dq_e
            grads["additional_keys"] = dak.astype(ak.dtype)
            grads["additional_values"] = dav.astype(av.dtype)
        grads["query"] = dq.reshape(query.shape).astype(query.dtype)
        grads["key"] = dk.reshape(key.shape).astype(key.dtype)
        grads["value"] = dv.reshape(value.shape).astype(value.dtype)
        if has_rpb:
            grads["rpb"] = drpb.reshape(rpb.shape).astype(rpb.dtype)
        return grads


def _group(geo, x):
    """[B, N, H, X] -> [B, HKV, G*N, X] (query heads grouped by their kv head)."""
    g = geo.H // geo.HKV
    return x.reshape(geo.B, x.shape[1], geo.HKV, g, -1).transpose(0, 2, 3, 1, 4).reshape(geo.B, geo.HKV, g * x.shape[1], -1)


def _ungroup(geo, x, n):
    g = geo.H // geo.HKV
    return x.reshape(geo.B, geo.HKV, g, n, -1).transpose(0, 3, 1, 2, 4).reshape(geo.B, n, geo.H, -1)


def _extra_scores(geo, query, ak):
    """float32 scaled scores of every query against the extra keys: [B, HKV, G*N, E]."""
    q = _group(geo, query.reshape(geo.B, geo.N, geo.H, geo.D).astype(mx.float32))
    k = ak.astype(mx.float32).transpose(0, 2, 3, 1)  # [B, HKV, D, E]
    return (q @ k) * geo.scale


def _merge_extra(geo, query, out_n, lse_n, ak, av):
    """Merge the neighborhood result (float32 out, lse) with attention over the extra tokens."""
    s = _extra_scores(geo, query, ak)
    lse_e = mx.logsumexp(s, axis=-1)
    o_e = mx.exp(s - lse_e[..., None]) @ av.astype(mx.float32).transpose(0, 2, 1, 3)  # [B, HKV, G*N, DV]
    o_e = _ungroup(geo, o_e, geo.N)
    lse_e = _ungroup(geo, lse_e[..., None], geo.N)[..., 0]
    lse = mx.logaddexp(lse_n, lse_e)
    out = mx.exp(lse_n - lse)[..., None] * out_n + mx.exp(lse_e - lse)[..., None] * o_e
    return out, lse


def _extra_backward(geo, q, do, lse, delta, ak, av):
    """dq contribution, d_additional_keys, d_additional_values (float32)."""
    s = _extra_scores(geo, q, ak)  # [B, HKV, G*N, E]
    p = mx.exp(s - _group(geo, lse[..., None]))
    dog = _group(geo, do.astype(mx.float32))  # [B, HKV, G*N, DV]
    dp = dog @ av.astype(mx.float32).transpose(0, 2, 3, 1)  # [B, HKV, G*N, E]
    ds = p * (dp - _group(geo, delta[..., None]))
    dq = _ungroup(geo, (ds @ ak.astype(mx.float32).transpose(0, 2, 1, 3)) * geo.scale, geo.N)
    qg = _group(geo, q.astype(mx.float32))
    dak = (ds.transpose(0, 1, 3, 2) @ qg * geo.scale).transpose(0, 2, 1, 3)  # [B, E, HKV, D]
    dav = (p.transpose(0, 1, 3, 2) @ dog).transpose(0, 2, 1, 3)
    return dq, dak, dav
