"""The Metal backend's kernels, exactly as shipped, run through the CPU emulator against the
float64 oracle: forward (out, lse) and backward (every gradient, with and without d_lse) over
seeded random sweeps of 1D/2D/3D problems with every parameter of SEMANTICS.md (kernel sizes even
and odd, stride, dilation, per-axis causal, GQA, Dv != D, extra keys/values, rpb, scale), in
float32, float16 and bfloat16, and over every register-array size (head dims 8..256).

Every launch is checked by the emulator for out-of-bounds accesses, races on threadgroup memory
and outputs, reads of unwritten memory, outputs left unwritten, barrier divergence and the 32 KB
threadgroup-memory limit. Compiled kernels are cached (NATTEN_MLX_METAL_EMU_CACHE).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
for p in ("packages/natten-mlx-metal/emulator", "tests"):
    if str(ROOT / p) not in sys.path:
        sys.path.insert(0, str(ROOT / p))
try:  # an installed natten-mlx-metal is what is tested; else the source tree
    import natten_mlx_metal  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "packages/natten-mlx-metal/src"))

mx = pytest.importorskip("mlx.core")
if shutil.which("g++") is None:
    pytest.skip("the Metal emulator needs g++", allow_module_level=True)

import oracle  # noqa: E402
from configs import cfg_id, random_config  # noqa: E402
from metal_emulator import EmulatorError, emulate  # noqa: E402
from natten_mlx.problem import Problem  # noqa: E402
from natten_mlx_metal import kernels  # noqa: E402
from natten_mlx_metal.backend import MetalBackend  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# error bound relative to the largest magnitude of the reference (inputs are rounded to the dtype
# before the oracle sees them, so only the kernels' own rounding counts)
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def emulator_launcher(order=0, stats=None):
    def launch(L):
        return emulate(L.spec, list(L.inputs), grid=L.grid, threadgroup=L.threadgroup, output_shapes=L.output_shapes,
                       output_dtypes=L.output_dtypes, template=L.template, init_value=L.init_value, order=order,
                       stats=None if stats is None else stats.setdefault(L.spec.name, {}))
    return launch


BACKEND = MetalBackend(emulator_launcher())


def _problem(cfg, dtype):
    n = cfg["na_dim"]
    D = cfg["D"]
    scale = cfg["scale"] if cfg["scale"] is not None else D ** -0.5
    return Problem("fused", cfg["B"], tuple(cfg["shape"]), cfg["H"], cfg["Hkv"], D, cfg["Dv"], tuple(cfg["K"]),
                   tuple(cfg["s"]), tuple(cfg["d"]), tuple(bool(x) for x in cfg["c"]), float(scale), dtype,
                   cfg["E"], bool(cfg["rpb"]), True, device="gpu"), n


def _tensors(rng, cfg, dtype):
    B, shape, H, Hkv, D, Dv, E = (cfg[x] for x in ("B", "shape", "H", "Hkv", "D", "Dv", "E"))
    arrays = dict(
        query=rng.standard_normal((B, *shape, H, D)), key=rng.standard_normal((B, *shape, Hkv, D)),
        value=rng.standard_normal((B, *shape, Hkv, Dv)),
        additional_keys=rng.standard_normal((B, E, Hkv, D)) if E else None,
        additional_values=rng.standard_normal((B, E, Hkv, Dv)) if E else None,
        rpb=rng.standard_normal((H, *[2 * k - 1 for k in cfg["K"]])) if cfg["rpb"] else None,
    )
    mlx = {k: None if v is None else mx.array(v.astype(np.float32)).astype(dtype) for k, v in arrays.items()}
    # the oracle sees exactly the rounded inputs
    f64 = {k: None if v is None else np.array(v.astype(mx.float32)).astype(np.float64) for k, v in mlx.items()}
    return mlx, f64


def _close(got, ref, dtype_name, what):
    got = np.array(got.astype(mx.float32)).astype(np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= TOL[dtype_name] * scale, f"{what}: max error {err:.3g} > {TOL[dtype_name] * scale:.3g}"


def check(cfg, dtype_name, seed, backend=BACKEND, with_dlse=True):
    dtype = DTYPES[dtype_name]
    p, _ = _problem(cfg, dtype)
    assert backend.supports(p) is None
    rng = np.random.default_rng(seed)
    x, r = _tensors(rng, cfg, dtype)
    out, lse = backend.fused_forward(p, x["query"], x["key"], x["value"], x["additional_keys"],
                                     x["additional_values"], x["rpb"])
    args = (r["query"], r["key"], r["value"], cfg["K"], cfg["s"], cfg["d"], cfg["c"], p.scale, r["additional_keys"],
            r["additional_values"], r["rpb"])
    ref_out, ref_lse = oracle.na_forward(*args)
    _close(out, ref_out, dtype_name, "out")
    _close(lse, ref_lse, "float32" if dtype_name == "float32" else dtype_name, "lse")
    assert lse.dtype == mx.float32 and out.dtype == dtype

    dout = rng.standard_normal(ref_out.shape)
    dlse = rng.standard_normal(ref_lse.shape) if with_dlse else None
    d_out = mx.array(dout.astype(np.float32)).astype(dtype)
    dout_r = np.array(d_out.astype(mx.float32)).astype(np.float64)
    record = SimpleNamespace(problem=p, inputs=x, out=out, lse=lse, d_out=d_out,
                             d_lse=None if dlse is None else mx.array(dlse.astype(np.float32)))
    grads = backend.fused_backward(record)
    # the backward starts from the kernel's own (rounded) out, as it would in training
    ref = oracle.na_backward(*args, dout=dout_r, dlse=dlse)
    names = {"query": "q", "key": "k", "value": "v", "additional_keys": "additional_keys",
             "additional_values": "additional_values", "rpb": "rpb"}
    expected = {k for k, v in x.items() if v is not None}
    assert set(grads) == expected
    for k, g in grads.items():
        assert g.dtype == dtype and tuple(g.shape) == tuple(x[k].shape), k
        # delta = rowsum(dO * O) uses the rounded out: allow the dtype's rounding of out on top
        _close(g, ref[names[k]], dtype_name, f"d{k}")


def _sweep(na_dim, count, seed, max_len, **kw):
    rng = np.random.default_rng(seed)
    return [random_config(rng, na_dim, max_len, **kw) for _ in range(count)]


SWEEP = (
    [(c, "float32") for c in _sweep(1, 12, 101, 24)]
    + [(c, "float32") for c in _sweep(2, 10, 202, 9)]
    + [(c, "float32") for c in _sweep(3, 8, 303, 6)]
    + [(c, "float16") for c in _sweep(1, 3, 111, 20)]
    + [(c, "float16") for c in _sweep(2, 3, 212, 8)]
    + [(c, "float16") for c in _sweep(3, 2, 313, 5)]
    + [(c, "bfloat16") for c in _sweep(1, 3, 121, 20)]
    + [(c, "bfloat16") for c in _sweep(2, 3, 222, 8)]
    + [(c, "bfloat16") for c in _sweep(3, 2, 323, 5)]
)


@pytest.mark.parametrize("cfg,dtype", SWEEP, ids=[f"{d}-{cfg_id(c)}" for c, d in SWEEP])
def test_sweep_forward_backward(cfg, dtype):
    check(cfg, dtype, seed=hash(cfg_id(cfg)) % 1000, with_dlse=len(cfg_id(cfg)) % 2 == 0)


def _fixed(shape, K, s, d, c, D, Dv, H=2, Hkv=1, E=0, rpb=False, B=1, scale=None):
    n = len(shape)
    return dict(na_dim=n, shape=tuple(shape), B=B, H=H, Hkv=Hkv, D=D, Dv=Dv, E=E, kernel_size=K, stride=s,
                dilation=d, is_causal=c, K=tuple(K), s=tuple(s), d=tuple(d), c=tuple(c), rpb=rpb, scale=scale)


# every register-array size of the kernels (DP, DVP in 8..256), each dtype at least once
HEAD_DIMS = [
    ("float32", 16, 32), ("float32", 64, 8), ("float32", 128, 256), ("float32", 256, 64),
    ("float16", 24, 40), ("bfloat16", 12, 128),
]


@pytest.mark.parametrize("variant", ["mma", "simple"])
@pytest.mark.parametrize("dtype,D,Dv", HEAD_DIMS, ids=[f"{t}-D{a}-Dv{b}" for t, a, b in HEAD_DIMS])
def test_head_dims(dtype, D, Dv, variant):
    """Both variants at every register-array size ("auto" uses mma only up to head dim 128)."""
    check(_fixed((6, 5), (3, 2), (1, 2), (2, 1), (False, True), D, Dv, H=2, Hkv=2), dtype, seed=D + Dv,
          backend=BACKEND.configure(variant=variant))


def test_auto_variant():
    small = kernels.geometry(_problem(_fixed((6,), (3,), (1,), (1,), (False,), 128, 64), mx.float32)[0])
    large = kernels.geometry(_problem(_fixed((6,), (3,), (1,), (1,), (False,), 64, 136), mx.float32)[0])
    assert kernels.resolve_variant("auto", small) == "mma"
    assert kernels.resolve_variant("auto", large) == "simple"
    assert kernels.resolve_variant("mma", large) == "mma"


# geometries that stress the tile walk: long axes (several query and key tiles per group, skipped
# tiles, full tiles), stride == kernel (blocked), dilation groups of unequal length, all causal
WALK = [
    _fixed((150,), (9,), (1,), (1,), (False,), 8, 8),
    _fixed((150,), (8,), (8,), (1,), (False,), 8, 8),
    _fixed((130,), (7,), (3,), (4,), (True,), 8, 8, E=2),
    _fixed((23, 21), (5, 6), (2, 3), (2, 1), (False, False), 8, 8, rpb=True),
    _fixed((20, 19), (4, 4), (1, 4), (1, 2), (True, True), 8, 8, H=4, Hkv=2),
    _fixed((9, 10, 11), (3, 4, 5), (3, 1, 2), (1, 2, 1), (False, True, False), 8, 8, rpb=False, E=1),
    _fixed((12, 6, 10), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), 8, 8, rpb=True),
    _fixed((64, 2), (64, 2), (1, 1), (1, 1), (False, False), 8, 8),  # the window covers everything
]


@pytest.mark.parametrize("cfg", WALK, ids=[cfg_id(c) for c in WALK])
def test_tile_walk_geometries(cfg):
    check(cfg, "float32", seed=7)


SIMPLE = BACKEND.configure(variant="simple")
SIMPLE_CASES = WALK[:6] + [c for c, d in SWEEP[::4]]


@pytest.mark.parametrize("cfg", SIMPLE_CASES, ids=[cfg_id(c) for c in SIMPLE_CASES])
def test_simple_variant(cfg):
    """The scalar kernels (fwd.metal, bwd_dq.metal, bwd_dkv.metal: configure(variant="simple")),
    the cross-check for the simdgroup-matrix ones on a Mac."""
    check(cfg, "float32", seed=11, backend=SIMPLE)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_simple_variant_dtypes(dtype):
    check(WALK[3], dtype, seed=12, backend=SIMPLE)


def test_results_do_not_depend_on_the_schedule():
    cfg = _fixed((23, 21), (5, 6), (2, 3), (2, 1), (False, True), 8, 8, H=2, Hkv=1, E=2)
    dtype = mx.float32
    p, _ = _problem(cfg, dtype)
    x, _ = _tensors(np.random.default_rng(5), cfg, dtype)
    results = []
    for order in (0, 1, 9):
        be = MetalBackend(emulator_launcher(order))
        out, lse = be.fused_forward(p, x["query"], x["key"], x["value"], x["additional_keys"], x["additional_values"])
        results.append((np.array(out), np.array(lse)))
    for o, l in results[1:]:
        assert np.array_equal(o, results[0][0]) and np.array_equal(l, results[0][1])


def test_threadgroup_memory_stays_under_32k_at_the_largest_head_dims():
    stats = {}
    be = MetalBackend(emulator_launcher(stats=stats), variant="mma")
    cfg = _fixed((40,), (3,), (1,), (1,), (False,), 256, 256, H=1, Hkv=1)
    p, _ = _problem(cfg, mx.float32)
    x, _ = _tensors(np.random.default_rng(1), cfg, mx.float32)
    out, lse = be.fused_forward(p, x["query"], x["key"], x["value"])
    be.fused_backward(SimpleNamespace(problem=p, inputs=x, out=out, lse=lse, d_out=out, d_lse=None))
    for name in ("natten_mlx_fwd_mma", "natten_mlx_bwd_dq_mma", "natten_mlx_bwd_dkv_mma"):
        assert 8192 < stats[name]["tg_mem_peak"] <= 32768, (name, stats[name])


def test_user_tile_and_configure():
    cfg = _fixed((12, 12), (5, 3), (1, 1), (1, 1), (False, False), 8, 8)
    check(cfg, "float32", seed=3, backend=BACKEND.configure(tile=(4, 16)))
    check(cfg, "float32", seed=3, backend=BACKEND.configure(tile=(64, 1)))
    with pytest.raises(TypeError, match="unknown option"):
        BACKEND.configure(strategy="x")
    with pytest.raises(ValueError, match="exactly 64"):
        BACKEND.configure(tile=(8, 4))
    p, _ = _problem(_fixed((12,), (5,), (1,), (1,), (False,), 8, 8), mx.float32)
    assert "entries" in BACKEND.configure(tile=(8, 8)).supports(p)


def test_supports_reasons_and_availability():
    cfg = _fixed((12,), (5,), (1,), (1,), (False,), 8, 8)
    p, _ = _problem(cfg, mx.float32)
    assert BACKEND.supports(p) is None
    assert BACKEND.supports(p.with_(op="qk", value_head_dim=0)) is None
    assert "at most 256" in BACKEND.supports(p.with_(head_dim=320))
    if hasattr(p, "device"):
        assert "GPU streams only" in BACKEND.supports(p.with_(device="cpu"))
    if not mx.metal.is_available():
        assert "no Metal device" in BACKEND.available()
    assert BACKEND.name == "metal" and BACKEND.priority == 300 and BACKEND.differentiation == "backward"


PLANTED = {
    # name: (kernel, text, replacement); the variant of the kernel is used for the whole check
    # key tiles one coordinate short: keys at tile ends are never seen
    "walk": ("fwd_mma", "k1[a] = na_min(k0[a] + ax[a].tk, ke[a]) - 1;", "k1[a] = na_min(k0[a] + ax[a].tk, ke[a]) - 2;"),
    # K^T fragment filled in the transposed lane layout (row and column swapped)
    "layout": ("fwd_mma", "float(ks[(j * 8 + fc) * DP + kk * 8 + fr])", "float(ks[(j * 8 + fr) * DP + kk * 8 + fc])"),
    # the row reduction misses the lanes of the other column half
    "reduce": ("fwd_mma", "rmax = metal::max(rmax, simd_shuffle_xor(rmax, 8));", ""),
    # dQ: the K fragment of dQ += dS K read transposed
    "dq_layout": ("bwd_dq_mma", "float(ks[(j * 8 + fr) * DP + kk * 8 + fc])", "float(ks[(j * 8 + fc) * DP + kk * 8 + fr])"),
    # dK/dV: the mask of partial query tiles dropped
    "dkv_mask": ("bwd_dkv_mma", "if (!full) ok = ok && kc[a] >= qtab[r * 10 + 4 + a] && kc[a] < qtab[r * 10 + 7 + a];", ""),
    # the barrier between the key-row table and the staging that reads it dropped
    "table_barrier": ("fwd_mma", "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int e = tid; e < TK * DP; e += NT) {",
                      "  for (int e = tid; e < TK * DP; e += NT) {"),
    # the scalar forward's window test on partial tiles dropped
    "mask": ("fwd", "if (!full && !na_in_windows(ax, Lg, qc, kc)) continue;", ""),
    # dK/dV: the query range of a key tile one short at its end
    "query_range": ("bwd_dkv", "qe[a] = na_min(na_query_end(k1[a],", "qe[a] = -1 + na_min(na_query_end(k1[a],"),
    # the barrier after staging dropped (a race the emulator must report)
    "barrier": ("bwd_dq", "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  if (qvalid) {", "  if (qvalid) {"),
    # the staging barrier at the end of a key tile dropped in the MMA dK/dV (next tile overwrites)
    "barrier_mma": ("bwd_dkv_mma", "    threadgroup_barrier(mem_flags::mem_threadgroup);\n  }\n}", "  }\n}"),
    # split ops (checked by test_split_emulated's check_split):
    # qk: the causal validity of a slot dropped (invalid slots get scores instead of -inf)
    "split_mask": ("split_dot", "valid = valid && kc[a] < we[a];", ""),
    # av: the weights of invalid slots read (the +inf planted there leaks into the output)
    "split_weights": ("split_wsum", "  if (!valid) continue;\n", ""),
    # dK/dV of the split ops: the query range of a key one short at its end
    "split_range": ("split_scatter", "qn[a] = na_max(qe - qb[a], 0);", "qn[a] = na_max(qe - qb[a] - 1, 0);"),
    # qk's rpb gradient: the relative offset of a column shifted by one
    "split_rpb": ("split_rpb", "- (ax[a].K - 1);", "- ax[a].K;"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_kernel_bug_is_caught(name):
    """A bug planted in a shipped kernel must fail the same check the sweep runs."""
    from dataclasses import replace

    kind, old, new = PLANTED[name]
    good = kernels.spec(kind)
    assert old in good.source, name
    bad = replace(good, source=good.source.replace(old, new, 1))

    def launcher(L):
        return emulator_launcher()(replace(L, spec=bad) if L.spec == good else L)

    backend = MetalBackend(launcher, variant="mma" if kind.endswith("_mma") else "simple")
    if kind.startswith("split_"):
        from test_split_emulated import check_split

        # causal on one axis for the masks, rpb for the rpb gradient (rpb excludes causal)
        causal = (False, name != "split_rpb")
        cfg = _fixed((20, 6), (5, 3), (1, 2), (1, 1), causal, 8, 8, rpb=name == "split_rpb")
        with pytest.raises((AssertionError, EmulatorError)):
            check_split(cfg, "float32", seed=1, backend=backend)
        return
    cfg = _fixed((40, 3), (7, 2), (1, 1), (1, 1), (False, True), 8, 8)
    with pytest.raises((AssertionError, EmulatorError)):
        check(cfg, "float32", seed=1, backend=backend)


def test_hook_registers_the_backend():
    import natten_mlx_metal

    got = []
    natten_mlx_metal.natten_mlx_register_backends(got.append)
    assert [type(b).__name__ for b in got] == ["MetalBackend"]
    from natten_mlx.protocol import check_backend

    check_backend(got[0])


def test_generated_metal_text_is_what_mlx_compiles():
    """The signature of the shipped forward as MLX writes it (the emulator compiles the same list)."""
    from metal_emulator import generated_sources

    cfg = _fixed((12,), (5,), (1,), (1,), (False,), 8, 8)
    p, _ = _problem(cfg, mx.float16)
    geo = kernels.geometry(p)
    x, _ = _tensors(np.random.default_rng(0), cfg, mx.float16)
    L = kernels.forward_launch(geo, x["query"].reshape(1, 12, 2, 8), x["key"].reshape(1, 12, 1, 8),
                               x["value"].reshape(1, 12, 1, 8), None, None, None)
    metal, _, sig, _ = generated_sources(L.spec, list(L.inputs), L.output_dtypes, L.template)
    assert sig.kernel_name == "custom_kernel_natten_mlx_fwd_mma__float16_t_8_8_256"
    assert "template <typename T, int DP, int DVP, int NT>" in metal
    assert "  const device float16_t* q [[buffer(0)]]," in metal
    assert "  const device int32_t* prm [[buffer(6)]],\n  const constant float* scl [[buffer(7)]]," in metal
    assert "  device float* lse [[buffer(9)]],\n  uint simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]]," in metal


def _slab(L, K, s, d, c, qoff, n):
    """The key range [lo, hi) that holds every window of the queries [qoff, qoff + n)."""
    lo, hi = L, 0
    for i in range(qoff, qoff + n):
        g, a, b = oracle.axis_window(i, L, K, s, d, c)
        lo, hi = min(lo, a * d + g), max(hi, b * d + g + 1)
    return lo, hi


SUBDOMAINS = [
    # (full spatial, K, s, d, causal, local query offset, local query extent) per axis
    dict(spatial=(40,), K=(5,), s=(2,), d=(3,), c=(False,), qoff=(13,), n=(11,)),
    dict(spatial=(37,), K=(6,), s=(1,), d=(1,), c=(True,), qoff=(20,), n=(17,)),
    dict(spatial=(14, 15), K=(3, 4), s=(1, 2), d=(2, 1), c=(False, True), qoff=(5, 3), n=(6, 7)),
]


@pytest.mark.parametrize("sd", SUBDOMAINS, ids=[str(i) for i in range(len(SUBDOMAINS))])
def test_subdomain_matches_the_full_problem(sd):
    """A sharded problem (protocol v2 sub-domain fields): local queries, a local key slab, windows
    in global coordinates. Its out/lse/gradients are the full problem's, restricted to the slabs
    (gradients with dO zero outside the local queries)."""
    rng = np.random.default_rng(17)
    n_ax = len(sd["spatial"])
    H, Hkv, D, Dv = 2, 1, 8, 8
    full = sd["spatial"]
    kv = [_slab(full[a], sd["K"][a], sd["s"][a], sd["d"][a], sd["c"][a], sd["qoff"][a], sd["n"][a]) for a in range(n_ax)]
    q = rng.standard_normal((1, *full, H, D)).astype(np.float32)
    k = rng.standard_normal((1, *full, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((1, *full, Hkv, Dv)).astype(np.float32)
    qsl = (slice(None),) + tuple(slice(o, o + m) for o, m in zip(sd["qoff"], sd["n"]))
    ksl = (slice(None),) + tuple(slice(lo, hi) for lo, hi in kv)
    dout_full = np.zeros((1, *full, H, Dv))
    dout_full[qsl] = rng.standard_normal(dout_full[qsl].shape)
    ref_out, ref_lse = oracle.na_forward(q, k, v, sd["K"], sd["s"], sd["d"], sd["c"])
    ref = oracle.na_backward(q, k, v, sd["K"], sd["s"], sd["d"], sd["c"], dout=dout_full)
    p = SimpleNamespace(
        op="fused", batch=1, spatial=tuple(sd["n"]), heads=H, kv_heads=Hkv, head_dim=D, value_head_dim=Dv,
        kernel_size=sd["K"], stride=sd["s"], dilation=sd["d"], is_causal=sd["c"], scale=D ** -0.5,
        dtype=mx.float32, num_extra=0, has_rpb=False, return_lse=True, device="gpu", domain=tuple(full),
        query_offset=tuple(sd["qoff"]), kv_spatial=tuple(hi - lo for lo, hi in kv), kv_offset=tuple(lo for lo, _ in kv),
    )
    assert BACKEND.supports(p) is None
    x = {"query": mx.array(q[qsl]), "key": mx.array(k[ksl]), "value": mx.array(v[ksl]),
         "additional_keys": None, "additional_values": None, "rpb": None}
    out, lse = BACKEND.fused_forward(p, x["query"], x["key"], x["value"])
    _close(out, ref_out[qsl], "float32", "out")
    _close(lse, ref_lse[qsl], "float32", "lse")
    grads = BACKEND.fused_backward(SimpleNamespace(problem=p, inputs=x, out=out, lse=lse,
                                                   d_out=mx.array(dout_full[qsl].astype(np.float32)), d_lse=None))
    _close(grads["query"], ref["q"][qsl], "float32", "dq")
    _close(grads["key"], ref["k"][ksl], "float32", "dk")
    _close(grads["value"], ref["v"][ksl], "float32", "dv")


class _EmulatedGPU(MetalBackend):
    """The backend as the core sees it on a Mac: available, serving GPU problems (the calls here
    run on the CPU stream; the kernels run in the emulator)."""

    def available(self):
        return None

    def supports(self, problem):
        return super().supports(problem.with_(device="gpu"))


@pytest.mark.parametrize("return_lse", [True, False])
def test_through_the_core_dispatch(return_lse):
    """natten_mlx.na2d/na1d with backend=<the Metal backend object>: the core wraps the forward in
    mx.custom_function and hands fused_backward a real BackwardRecord; gradients match pure."""
    import natten_mlx

    be = _EmulatedGPU(emulator_launcher())
    rng = np.random.default_rng(0)
    f32 = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    calls = [
        (natten_mlx.na2d, dict(query=f32(2, 9, 10, 4, 8), key=f32(2, 9, 10, 2, 8), value=f32(2, 9, 10, 2, 16),
                               rpb=f32(4, 5, 7), kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1))),
        (natten_mlx.na1d, dict(query=f32(1, 30, 2, 8), key=f32(1, 30, 2, 8), value=f32(1, 30, 2, 8),
                               additional_keys=f32(1, 3, 2, 8), additional_values=f32(1, 3, 2, 8), kernel_size=6,
                               is_causal=True)),
    ]
    for op, kw in calls:
        names = [n for n in ("query", "key", "value", "additional_keys", "additional_values", "rpb") if n in kw]
        rest = {n: v for n, v in kw.items() if n not in names}

        def loss(*xs, backend, op=op, names=names, rest=rest):
            res = op(**dict(zip(names, xs)), **rest, return_lse=return_lse, backend=backend)
            if return_lse:
                out, lse = res
                return (out * out).sum() + (lse * lse).sum()
            return (res * res).sum()

        got = mx.grad(lambda *xs: loss(*xs, backend=be), argnums=list(range(len(names))))(*(kw[n] for n in names))
        want = mx.grad(lambda *xs: loss(*xs, backend="pure"), argnums=list(range(len(names))))(*(kw[n] for n in names))
        for n, g, w in zip(names, got, want):
            w = np.array(w)
            assert np.abs(np.array(g) - w).max() <= 2e-5 * max(1.0, np.abs(w).max()), n


def test_the_mlx_call_path_runs_what_the_emulator_ran(monkeypatch):
    """The backend's own launcher (kernels.metal_launch, what runs on a Mac) with
    mx.fast.metal_kernel replaced by a stand-in that hands its exact arguments to the emulator:
    the source, names, template, grid and threadgroup MLX would receive are the ones verified."""
    from metal_emulator import emulate as emu

    seen = []

    def fake_metal_kernel(*, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                          atomic_outputs=False, **rest):
        assert ensure_row_contiguous and not atomic_outputs and not rest
        spec = SimpleNamespace(name=name, input_names=tuple(input_names), output_names=tuple(output_names),
                               source=source, header=header)

        def call(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            seen.append(name)
            return emu(spec, inputs, template=template, grid=grid, threadgroup=threadgroup,
                       output_shapes=output_shapes, output_dtypes=output_dtypes, init_value=init_value)

        return call

    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    kernels._kernel.cache_clear()
    try:
        cfg = _fixed((11, 9), (3, 4), (2, 1), (1, 2), (True, False), 8, 16, H=2, Hkv=1, E=2)
        check(cfg, "float16", seed=4, backend=MetalBackend())
        cfg = _fixed((13,), (4,), (1,), (2,), (False,), 8, 8, rpb=True)
        check(cfg, "float32", seed=4, backend=MetalBackend())
    finally:
        kernels._kernel.cache_clear()
    assert {"natten_mlx_fwd_mma", "natten_mlx_bwd_dq_mma", "natten_mlx_bwd_dkv_mma", "natten_mlx_bwd_extra",
            "natten_mlx_bwd_rpb"} <= set(seen)
