"""The cuda backend behind natten_mlx's public API (protocol v2), on the CPU through the emulator:
na2d/na3d with backend=<object> (the core's custom_function calls fused_backward with a real
BackwardRecord), return_lse with its cotangent, and na_subdomain (sharded attention's local problem).
Checked against the float64 oracle. Skipped without g++."""

from __future__ import annotations

import numpy as np
import pytest

__import__("cuda_cases").require_emulator()
import emu  # noqa: E402
import mlx.core as mx  # noqa: E402
import natten_mlx  # noqa: E402
import oracle  # noqa: E402
from cuda_cases import TOL, rel_err, to_mx, to_np  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402

BACKEND = CudaBackend(runner=emu.mlx_runner, require_device=False)


def _grads(fn, arrays, w_out, w_lse):
    def loss(*xs):
        out, lse = fn(*xs)
        return (out.astype(mx.float32) * w_out).sum() + (lse * w_lse).sum()

    return mx.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_na2d_forward_backward_through_the_core(dtype):
    rng = np.random.default_rng(21)
    shape, K, s, d, c = (10, 9), (3, 4), (2, 1), (2, 1), (False, True)
    q, k, v = (rng.standard_normal((1, *shape, h, 16)) for h in (4, 2, 2))
    mq, mk, mv = (to_mx(x, dtype) for x in (q, k, v))
    q, k, v = (to_np(x) for x in (mq, mk, mv))

    def fn(a, b, cc):
        return natten_mlx.na2d(a, b, cc, K, stride=s, dilation=d, is_causal=c, return_lse=True, backend=BACKEND)

    out, lse = fn(mq, mk, mv)
    ref_o, ref_l = oracle.na_forward(q, k, v, K, s, d, c)
    assert rel_err(to_np(out), ref_o) < TOL[dtype] and rel_err(to_np(lse), ref_l) < TOL[dtype]
    w_out, w_lse = rng.standard_normal(ref_o.shape), rng.standard_normal(ref_l.shape)
    g = _grads(fn, (mq, mk, mv), mx.array(w_out.astype(np.float32)), mx.array(w_lse.astype(np.float32)))
    ref = oracle.na_backward(q, k, v, K, s, d, c, dout=w_out, dlse=w_lse)
    for got, name in zip(g, ("q", "k", "v")):
        assert rel_err(to_np(got), ref[name]) < TOL[dtype], name


def test_na3d_rpb_and_extra_keys_through_the_core():
    rng = np.random.default_rng(22)
    shape, K = (4, 5, 6), (3, 3, 2)
    q, k, v = (rng.standard_normal((2, *shape, 2, 8)) for _ in range(3))
    ak, av = (rng.standard_normal((2, 3, 2, 8)) for _ in range(2))
    rpb = rng.standard_normal((2, 5, 5, 3))
    arrays = [to_mx(x, "float16") for x in (q, k, v, ak, av, rpb)]
    q, k, v, ak, av, rpb = (to_np(x) for x in arrays)

    def fn(a, b, cc, e1, e2, r):
        return natten_mlx.na3d(a, b, cc, K, additional_keys=e1, additional_values=e2, rpb=r, return_lse=True, backend=BACKEND)

    out, lse = fn(*arrays)
    ref_o, ref_l = oracle.na_forward(q, k, v, K, additional_keys=ak, additional_values=av, rpb=rpb)
    assert rel_err(to_np(out), ref_o) < TOL["float16"] and rel_err(to_np(lse), ref_l) < TOL["float16"]
    w_out = rng.standard_normal(ref_o.shape)
    g = _grads(fn, arrays, mx.array(w_out.astype(np.float32)), mx.zeros(ref_l.shape))
    ref = oracle.na_backward(q, k, v, K, additional_keys=ak, additional_values=av, rpb=rpb, dout=w_out,
                             dlse=np.zeros(ref_l.shape))
    for got, name in zip(g, ("q", "k", "v", "additional_keys", "additional_values", "rpb")):
        assert rel_err(to_np(got), ref[name]) < TOL["float16"], name


def test_na_subdomain_through_the_core():
    rng = np.random.default_rng(23)
    domain, K, s, d, c = (16, 12), (5, 4), (1, 2), (2, 1), (False, False)
    q, k, v = (rng.standard_normal((1, *domain, 2, 16)) for _ in range(3))
    mq, mk, mv = (to_mx(x, "float16") for x in (q, k, v))
    q, k, v = (to_np(x) for x in (mq, mk, mv))
    qlo, qhi = (4, 3), (11, 9)
    ext = [natten_mlx.geometry.key_extent(domain[a], K[a], s[a], d[a], c[a], qlo[a], qhi[a] - qlo[a]) for a in range(2)]
    klo = tuple(int(e[0]) for e in ext)
    khi = tuple(int(e[1]) for e in ext)
    qs = (slice(None),) + tuple(slice(a, b) for a, b in zip(qlo, qhi))
    ks = (slice(None),) + tuple(slice(a, b) for a, b in zip(klo, khi))
    out = natten_mlx.na_subdomain(mq[qs], mk[ks], mv[ks], K, domain=domain, query_offset=qlo, kv_offset=klo,
                                  stride=s, dilation=d, is_causal=c, backend=BACKEND)
    ref_o, _ = oracle.na_forward(q, k, v, K, s, d, c)
    assert rel_err(to_np(out), ref_o[qs]) < TOL["float16"]


def test_selection_reasons():
    """available()/supports() refuse with exact reasons; configure() validates and caches."""
    from cuda_cases import make_problem

    real = CudaBackend()
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        assert "mx.cuda.is_available() is False" in real.available()
    cfg = dict(na_dim=2, shape=(8, 8), B=1, H=2, Hkv=1, D=16, Dv=16, E=0, K=(3, 3), s=(1, 1), d=(1, 1),
               c=(False, False), rpb=False, scale=None)
    assert "GPU streams only" in real.supports(make_problem(cfg, "float16", device="cpu"))
    assert real.supports(make_problem(cfg, "float16")) is None
    assert "exceed 512" in real.supports(make_problem(dict(cfg, D=640, Dv=640), "float16"))
    split = make_problem(cfg, "float16")
    split.op = "qk"
    assert "no split qk op" in real.supports(split)
    fmha = real.configure(kernel="fmha")
    assert "multiples of 8" in fmha.supports(make_problem(dict(cfg, D=12, Dv=12), "float16"))
    assert "float32" in fmha.supports(make_problem(cfg, "float32"))
    assert "tile=(64,) has 1 entries" in real.configure(tile=(64,)).supports(make_problem(cfg, "float16"))
    # the forward's grid y is heads x splits
    assert real.configure(splits=8).supports(make_problem(dict(cfg, H=8191, Hkv=1), "float16")) is None
    assert "heads 8192 x splits=8 exceed the grid limit 65535" in real.configure(splits=8).supports(
        make_problem(dict(cfg, H=8192, Hkv=1), "float16"))
    assert real.configure(tile=(8, 8)) is real.configure(tile=(8, 8))
    with pytest.raises(TypeError, match="unknown option.*strategy"):
        real.configure(strategy="gather")
    with pytest.raises(ValueError, match="exactly 64"):
        real.configure(tile=(8, 4))


def test_backward_shared_memory_leaves_room_for_static_tables():
    """The backward bodies keep tile tables in static shared memory (< plan.BWD_STATIC_SMEM bytes). A
    launch may use 48 KB in all unless MLX opts in to more, which it does only for dynamic requests
    above 48000 bytes: every backward request is either above that or small enough to fit beside
    the tables (D 64 / Dv 32 asked 43008 bytes and failed to launch on the H200 before this)."""
    from natten_mlx_cuda import plan

    for d, dv in [(8, 8), (16, 32), (32, 64), (64, 32), (64, 64), (72, 56), (128, 128), (128, 64)]:
        for body in ("fmha_bwd_dq", "fmha_bwd_dkdv"):
            v = plan._fmha_bwd_variant(body, "float16", d, dv, (1, 8, 8), (1, 8, 8), False)
            smem = v.shared_memory
            assert smem > plan.MLX_OPT_IN_SMEM or smem + plan.BWD_STATIC_SMEM <= 48 * 1024, (body, d, dv, smem)
            assert smem + plan.BWD_STATIC_SMEM <= 227 * 1024, (body, d, dv, smem)
