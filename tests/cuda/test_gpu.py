"""The cuda backend on a real NVIDIA GPU (skipped without MLX's CUDA backend): forward and backward
against the float64 oracle, float32/float16/bfloat16, both forward kernels, random sweeps over
1D/2D/3D with every parameter, sub-domains, tile overrides, and one problem with more than 2^31
elements in one array (64-bit indexing). Every kernel output starts as NaN (the runner passes
init_value=NaN to launches that overwrite their outputs), so an unwritten element fails."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
    pytest.skip("needs MLX's CUDA backend on an NVIDIA GPU", allow_module_level=True)

import oracle  # noqa: E402
from configs import cfg_id, random_config  # noqa: E402
from cuda_cases import TOL, run_and_compare  # noqa: E402
from natten_mlx_cuda import plan  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend, mlx_runner  # noqa: E402

LAUNCHES = []


def poisoned_runner(launch, inputs):
    if launch.init_value is None:
        launch = dataclasses.replace(launch, init_value=float("nan"))
    LAUNCHES.append(launch.variant.body)
    if launch.variant.body == "fmha_fwd" and dict(launch.variant.template)["WG"]:
        LAUNCHES.append("fmha_fwd[WG]")
    return mlx_runner(launch, inputs)


BACKEND = CudaBackend(runner=poisoned_runner)
MAX_LEN = {1: 300, 2: 24, 3: 10}


def _configs(count, seed, head_dims, dtypes):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        na_dim = 1 + i % 3
        cfg = random_config(rng, na_dim, MAX_LEN[na_dim], head_dims=head_dims, allow_dv=False)
        dtype = dtypes[(i // 3) % len(dtypes)]
        out.append(pytest.param(cfg, dtype, seed * 1000 + i, id=f"{dtype}-{cfg_id(cfg)}"))
    return out


# NVRTC compiles each specialisation at first use (seconds each): the sweeps keep head dims few
@pytest.mark.parametrize("cfg,dtype,seed", _configs(12, 1, (32,), ("float16", "bfloat16")))
def test_fmha_sweep(cfg, dtype, seed):
    LAUNCHES.clear()
    errs = run_and_compare(BACKEND, cfg, dtype, np.random.default_rng(seed))
    assert "fmha_fwd" in LAUNCHES
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (errs, TOL[dtype])


def _wg_configs(count, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        na_dim = 1 + i % 3
        cfg = random_config(rng, na_dim, MAX_LEN[na_dim], head_dims=(64, 128))
        dtype = ("float16", "bfloat16")[(i // 3) % 2]
        out.append(pytest.param(cfg, dtype, seed * 1000 + i, id=f"{dtype}-{cfg_id(cfg)}"))
    return out


@pytest.mark.parametrize("cfg,dtype,seed", _wg_configs(12, 5))
def test_wgmma_sweep(cfg, dtype, seed):
    """The forward by warpgroup MMA (the default on sm_90a for head dims 64/128), forward and backward,
    with every parameter (Dv != D, extra keys, rpb, GQA, causal, stride, dilation)."""
    from natten_mlx_cuda.backend import device_wgmma_reason

    if device_wgmma_reason() is not None:  # not a Hopper GPU: the mma.sync forward serves (test_fmha_sweep)
        pytest.skip(device_wgmma_reason())
    LAUNCHES.clear()
    errs = run_and_compare(BACKEND, cfg, dtype, np.random.default_rng(seed))
    assert "fmha_fwd[WG]" in LAUNCHES, LAUNCHES
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (errs, TOL[dtype])


def test_wgmma_matches_mma_sync():
    """G2's shape on 2 heads: the warpgroup forward and the mma.sync forward agree (same inputs)."""
    from cuda_cases import make_problem
    from natten_mlx_cuda.backend import device_wgmma_reason

    if device_wgmma_reason() is not None:
        pytest.skip(device_wgmma_reason())

    cfg = dict(na_dim=2, shape=(256, 256), B=1, H=2, Hkv=2, D=128, Dv=128, E=0, K=(80, 80), s=(1, 1), d=(1, 1),
               c=(False, False), rpb=False, scale=None)
    p = make_problem(cfg, "float16")
    q, k, v = (mx.random.normal((1, 256, 256, 2, 128), key=mx.random.key(i)).astype(mx.float16) for i in range(3))
    LAUNCHES.clear()
    o1, l1 = BACKEND.configure(wgmma=True).fused_forward(p, q, k, v)
    o2, l2 = BACKEND.configure(wgmma=False).fused_forward(p, q, k, v)
    mx.eval(o1, l1, o2, l2)
    assert LAUNCHES.count("fmha_fwd[WG]") == 1
    assert mx.abs(o1.astype(mx.float32) - o2.astype(mx.float32)).max().item() < 2e-3
    assert mx.abs(l1 - l2).max().item() < 1e-3


@pytest.mark.parametrize("cfg,dtype,seed", _configs(9, 2, (3, 8), ("float32", "float16", "bfloat16")))
def test_simple_sweep(cfg, dtype, seed):
    errs = run_and_compare(BACKEND.configure(kernel="simple"), cfg, dtype, np.random.default_rng(seed))
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (errs, TOL[dtype])


@pytest.mark.parametrize("tile,m_tiles", [((8, 8), 1), ((2, 32), 1), ((16, 4), 1), ((1, 64), 1), ((16, 8), 1), ((4, 32), 2),
                                          ((8, 8), 2), ((16, 8), 2)])
def test_tiles(tile, m_tiles):
    cfg = dict(na_dim=2, shape=(37, 29), B=2, H=4, Hkv=2, D=64, Dv=64, E=0, K=(9, 6), s=(2, 1), d=(2, 3),
               c=(False, True), rpb=False, scale=None)
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=(4, 16), m_tiles=m_tiles), cfg, "float16",
                           np.random.default_rng(3))
    assert max(errs.values()) < TOL["float16"], errs


def test_more_than_2_31_elements():
    """q/k/v/out of 2^31 + 2^17 elements each (float16, 1D, D=128): both forward kernels and the
    backward index past 2^31; checked on sampled rows at both ends against float64."""
    from cuda_cases import make_problem, record

    n, H, D, K = (1 << 21) + 128, 8, 128, 33
    assert n * H * D > 2**31
    kq, kk, kv, kd = mx.random.split(mx.random.key(0), 4)
    q, k, v = (mx.random.normal((1, n, H, D), key=x).astype(mx.float16) for x in (kq, kk, kv))
    cfg = dict(na_dim=1, shape=(n,), B=1, H=H, Hkv=H, D=D, Dv=D, E=0, K=(K,), s=(1,), d=(1,), c=(False,), rpb=False, scale=None)
    p = make_problem(cfg, "float16")
    rows = [0, 1, 2, 3, n // 2, (1 << 21) + 5] + list(range(n - 70, n))

    def host(x, lo, hi):
        return np.array(x[0, lo:hi].astype(mx.float32)).astype(np.float64)

    for kernel in ("fmha", "simple"):
        out, lse = BACKEND.configure(kernel=kernel).fused_forward(p, q, k, v)
        mx.eval(out, lse)
        assert not mx.any(mx.isnan(out)).item() and not mx.any(mx.isnan(lse)).item(), kernel
        got, ref = [], []
        for i in rows:
            _, st, en = oracle.axis_window(i, n, K, 1, 1, False)
            s = np.einsum("hd,khd->hk", host(q, i, i + 1)[0], host(k, st, en + 1)) * D**-0.5
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            ref.append(np.einsum("hk,khd->hd", pr, host(v, st, en + 1)))
            got.append(host(out, i, i + 1)[0])
        err = np.linalg.norm(np.stack(got) - np.stack(ref)) / np.linalg.norm(np.stack(ref))
        assert err < TOL["float16"], (kernel, err)
    do = mx.random.normal(out.shape, key=kd).astype(mx.float16)
    grads = BACKEND.fused_backward(record(p, {"query": q, "key": k, "value": v}, out, lse, do, None))
    for name in ("query", "key", "value"):
        assert not mx.any(mx.isnan(grads[name])).item(), name
    # the last 3K tokens: queries there see the same windows as in the whole problem once they are
    # K/2 from the slice's start, so the last K keys' gradients come from inside the slice alone
    lo = n - 3 * K
    sl = [x[:, lo:, :1].astype(mx.float32) for x in (q, k, v, do)]
    qt, kt, vt, dt = (np.array(x).astype(np.float64) for x in sl)
    ref_g = oracle.na_backward(qt, kt, vt, (K,), dout=dt)
    for name, rk in (("key", "k"), ("value", "v")):
        g = np.array(grads[name][:, n - K :, :1].astype(mx.float32))
        assert np.linalg.norm(g - ref_g[rk][:, -K:]) / np.linalg.norm(ref_g[rk][:, -K:]) < TOL["float16"], name


def test_plan_covers_g_cases():
    """The benchmark shapes plan onto the tensor-core kernel with the expected grids."""
    import types

    p = types.SimpleNamespace(spatial=(256, 256), batch=1, heads=24, kv_heads=24, head_dim=128, value_head_dim=128,
                              kernel_size=(80, 80), stride=(1, 1), dilation=(1, 1), is_causal=(False, False), scale=0.1)
    launch = plan.forward(plan.geometry(p), "float16", "float16", False, True)
    size = 128  # 16x8 query tiles (plan.forward_tiles), 4 warps of 32 rows
    assert launch.variant.body == "fmha_fwd" and launch.grid == (65536 // size * launch.threadgroup[0], 24, 1)
    assert launch.threadgroup[0] == 128 and dict(launch.variant.template)["MT"] == 2


@pytest.mark.parametrize("dtype,kw,causal,extra", [("float16", dict(splits=2), False, 0), ("bfloat16", dict(splits=3), True, 2),
                                                   ("float16", dict(splits=4, m_tiles=2), False, 0)])
def test_split_walk(dtype, kw, causal, extra):
    """Query tiles' walks split over blocks (the backend's splits option; float32 parts merged by their lse
    in merge_parts.cu): one kv head of 2048 tokens, window 1024, with causal windows (some parts miss a
    row's window), extra keys, 32-row warps."""
    cfg = dict(na_dim=1, shape=(2048,), B=1, H=2, Hkv=1, D=64, Dv=64, E=extra, K=(1024,), s=(1,), d=(1,), c=(causal,),
               rpb=False, scale=None)
    from cuda_cases import make_problem

    launch = plan.forward(plan.geometry(make_problem(cfg, dtype)), dtype, dtype, False, True, **kw)
    assert launch.splits == kw["splits"]
    errs = run_and_compare(BACKEND.configure(**kw), cfg, dtype, np.random.default_rng(7))
    assert max(errs.values()) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_compiled_first_then_eager(dtype):
    """The backend caches a call's plan, bound kernel and constant inputs per Problem: a first call traced
    by mx.compile, then an eager call and a compiled replay of the same Problem (sharing that cache entry),
    and their gradients, all match the float64 oracle (the cached constants are host data, valid outside
    the trace that made them)."""
    import natten_mlx

    be = CudaBackend()
    rng = np.random.default_rng(17)
    dt = getattr(mx, dtype)
    q, k, v = (mx.array(rng.standard_normal((2, 45, 2, 64)).astype(np.float32)).astype(dt) for _ in range(3))
    kw = dict(kernel_size=9, dilation=2, is_causal=False)

    def f(a, b, c):
        return natten_mlx.na1d(a, b, c, backend=be, **kw)

    g = mx.compile(f)
    first = g(q, k, v)
    eager = f(q, k, v)
    again = g(q, k, v)
    grad = mx.grad(lambda a: (f(a, k, v).astype(mx.float32) ** 2).sum())(q)
    grad_c = mx.compile(mx.grad(lambda a: (f(a, k, v).astype(mx.float32) ** 2).sum()))(q)
    mx.eval(first, eager, again, grad, grad_c)
    qn, kn, vn = (np.array(x.astype(mx.float32), np.float64) for x in (q, k, v))
    ref = oracle.na_forward(qn, kn, vn, **kw)[0]
    tol = TOL[dtype]
    for x in (first, again):
        np.testing.assert_allclose(np.array(x.astype(mx.float32)), np.array(eager.astype(mx.float32)), atol=tol)
    np.testing.assert_allclose(np.array(grad_c.astype(mx.float32)), np.array(grad.astype(mx.float32)), atol=10 * tol)
    np.testing.assert_allclose(np.array(eager.astype(mx.float32)), ref, atol=10 * tol)
