"""Sub-domain problems (natten_mlx.functional.na_subdomain): a block of queries against a slab of
keys inside a larger domain equals the matching slice of the whole-domain op, forward (against the
float64 oracle) and backward (against the whole-domain op's gradients), for every pure strategy,
over random geometries: stride, dilation, per-axis causal, even kernels, rpb, extra keys/values, GQA."""

from __future__ import annotations

import mlx.core as mx
import natten_mlx
import numpy as np
import oracle
import pytest
from configs import cfg_id, random_config, random_tensors
from natten_mlx.geometry import key_extent

FNS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
STRATEGIES = ("slices", "gather", "tiled")
MAX_LEN = {1: 24, 2: 11, 3: 7}


def _case(seed: int, na_dim: int):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng, na_dim, MAX_LEN[na_dim])
    # a random query block per axis, the smallest key slab it needs, plus random margins
    q_off, q_len, kv_off, kv_len = [], [], [], []
    for a, L in enumerate(cfg["shape"]):
        lo = int(rng.integers(0, L))
        hi = int(rng.integers(lo + 1, L + 1))
        klo, khi = key_extent(L, cfg["K"][a], cfg["s"][a], cfg["d"][a], cfg["c"][a], lo, hi - lo)
        klo = max(0, klo - int(rng.integers(0, 3)))
        khi = min(L, khi + int(rng.integers(0, 3)))
        q_off.append(lo), q_len.append(hi - lo), kv_off.append(klo), kv_len.append(khi - klo)
    return cfg, rng, tuple(q_off), tuple(q_len), tuple(kv_off), tuple(kv_len)


def _region(offset, length):
    return (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, length))


CASES = [(seed, n) for n in (1, 2, 3) for seed in range(10)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed,na_dim", CASES, ids=[f"{n}d-{s}" for s, n in CASES])
def test_subdomain_equals_the_slice_of_the_whole_domain(seed, na_dim, strategy):
    cfg, rng, q_off, q_len, kv_off, kv_len = _case(1000 * na_dim + seed, na_dim)
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    call = dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
                is_causal=cfg["is_causal"], scale=cfg["scale"])
    qr, kr = _region(q_off, q_len), _region(kv_off, kv_len)

    # forward against the float64 oracle of the whole domain, sliced
    exp_out, exp_lse = oracle.na_forward(q, k, v, cfg["K"], cfg["s"], cfg["d"], cfg["c"], scale=cfg["scale"],
                                         additional_keys=ak, additional_values=av, rpb=rpb)
    f32 = {n: None if x is None else mx.array(x.astype(np.float32))
           for n, x in dict(q=q, k=k, v=v, ak=ak, av=av, rpb=rpb).items()}
    backend = natten_mlx.configure("pure", strategy=strategy, tile=(3,) * na_dim if strategy == "tiled" else None)
    sub = dict(domain=cfg["shape"], query_offset=q_off, kv_offset=kv_off, backend=backend, **call)
    out, lse = natten_mlx.na_subdomain(f32["q"][qr], f32["k"][kr], f32["v"][kr], additional_keys=f32["ak"],
                                       additional_values=f32["av"], rpb=f32["rpb"], return_lse=True, **sub)
    np.testing.assert_allclose(np.array(out), exp_out[qr], rtol=1e-4, atol=1e-4, err_msg=cfg_id(cfg))
    np.testing.assert_allclose(np.array(lse), exp_lse[qr], rtol=1e-4, atol=1e-4)

    # backward: the gradients of a loss on the query block equal the whole-domain op's
    w_out = mx.array(rng.standard_normal(out.shape).astype(np.float32))
    w_lse = mx.array(rng.standard_normal(lse.shape).astype(np.float32))
    names = [n for n in ("q", "k", "v", "ak", "av", "rpb") if f32[n] is not None]

    def sub_loss(*xs):
        x = dict(zip(names, xs))
        o, l = natten_mlx.na_subdomain(x["q"], x["k"], x["v"], additional_keys=x.get("ak"),
                                       additional_values=x.get("av"), rpb=x.get("rpb"), return_lse=True, **sub)
        return (o * w_out).sum() + (l * w_lse).sum()

    def full_loss(*xs):
        x = dict(zip(names, xs))
        o, l = FNS[na_dim](x["q"], x["k"], x["v"], additional_keys=x.get("ak"), additional_values=x.get("av"),
                           rpb=x.get("rpb"), return_lse=True, backend="pure", **call)
        return (o[qr] * w_out).sum() + (l[qr] * w_lse).sum()

    local = {n: f32[n][qr] if n == "q" else f32[n][kr] if n in ("k", "v") else f32[n] for n in names}
    got = mx.grad(sub_loss, argnums=list(range(len(names))))(*(local[n] for n in names))
    want = mx.grad(full_loss, argnums=list(range(len(names))))(*(f32[n] for n in names))
    for n, g, w in zip(names, got, want):
        w = np.array(w)
        if n == "q":
            w = w[qr]
        elif n in ("k", "v"):
            outside = w.copy()
            outside[kr] = 0
            assert np.abs(outside).max() == 0, f"{n}: the whole-domain gradient reaches keys outside the slab"
            w = w[kr]
        np.testing.assert_allclose(np.array(g), w, rtol=1e-3, atol=1e-4, err_msg=f"{n} {cfg_id(cfg)}")


def test_subdomain_of_the_whole_domain_is_the_plain_op():
    rng = np.random.default_rng(3)
    q = mx.array(rng.standard_normal((1, 9, 7, 2, 4)).astype(np.float32))
    out = natten_mlx.na_subdomain(q, q, q, 3, domain=(9, 7), query_offset=(0, 0), kv_offset=(0, 0), dilation=2)
    ref = natten_mlx.na2d(q, q, q, 3, dilation=2)
    assert float(mx.abs(out - ref).max()) == 0.0


def test_explain_and_backends_see_a_subdomain_problem():
    q = mx.zeros((1, 4, 2, 4))
    k = mx.zeros((1, 8, 2, 4))
    out = natten_mlx.na_subdomain(q, k, k, 3, domain=(20,), query_offset=(6,), kv_offset=(4,))
    assert out.shape == (1, 4, 2, 4)
    from natten_mlx.problem import fused_problem

    p = fused_problem(1, q, k, k, 3, 1, 1, False, None, None, None, None, False,
                      subdomain=dict(domain=(20,), query_offset=(6,), kv_offset=(4,)))
    assert p.is_subdomain and p.kv_spatial == (8,) and p.kv_tokens == 8 and p.num_tokens == 4
    assert not p.covers_everything


BAD = [
    ("slab too short on the left", dict(domain=(20,), query_offset=(6,), kv_offset=(6,)), (1, 8), "need keys \\[5, 11\\)"),
    ("slab too short on the right", dict(domain=(20,), query_offset=(6,), kv_offset=(5,)), (1, 5), "need keys \\[5, 11\\)"),
    ("queries leave the domain", dict(domain=(8,), query_offset=(6,), kv_offset=(0,)), (1, 8), "leave domain"),
    ("keys leave the domain", dict(domain=(20,), query_offset=(6,), kv_offset=(15,)), (1, 8), "leave domain"),
    ("negative offset", dict(domain=(20,), query_offset=(-1,), kv_offset=(0,)), (1, 8), "query_offset"),
    ("window beyond the domain", dict(domain=(2,), query_offset=(0,), kv_offset=(0,)), (1, 2), "kernel_size=3"),
    ("domain rank", dict(domain=(20, 3), query_offset=(6,), kv_offset=(4,)), (1, 8), "domain=\\(20, 3\\)"),
]


@pytest.mark.parametrize("name,sub,kv,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_subdomains_are_named(name, sub, kv, pattern):
    q = mx.zeros((1, 4 if name != "window beyond the domain" else 2, 2, 4))
    k = mx.zeros((kv[0], kv[1], 2, 4))
    with pytest.raises((ValueError, TypeError), match=pattern):
        natten_mlx.na_subdomain(q, k, k, 3, **sub)


def test_plain_ops_refuse_different_query_and_key_shapes():
    q = mx.zeros((1, 4, 2, 4))
    k = mx.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="must share batch and spatial shape"):
        natten_mlx.na1d(q, k, k, 3)


def test_example_backend_refuses_subdomains():
    try:
        backend = natten_mlx.get_backend("example-dense")
    except ValueError:
        pytest.skip("the example backend is not installed")
    q = mx.zeros((1, 4, 2, 4))
    k = mx.zeros((1, 8, 2, 4))
    e = natten_mlx.explain(q, q, q, 3)
    assert e.reasons[backend.name] is None
    out = natten_mlx.na_subdomain(q, k, k, 3, domain=(20,), query_offset=(6,), kv_offset=(4,))
    assert out.shape == q.shape


def test_key_slab_is_what_na_subdomain_accepts():
    from natten_mlx.geometry import key_slab

    rng = np.random.default_rng(9)
    x = mx.array(rng.standard_normal((1, 20, 17, 2, 4)).astype(np.float32))
    kw = dict(kernel_size=(5, 4), stride=(2, 3), dilation=(2, 1), is_causal=(False, True))
    full = natten_mlx.na2d(x, x, x, **kw)
    kv_offset, kv_shape = key_slab((20, 17), query_offset=(8, 4), query_shape=(6, 7), **kw)
    kr = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(kv_offset, kv_shape))
    out = natten_mlx.na_subdomain(x[:, 8:14, 4:11], x[kr], x[kr], domain=(20, 17), query_offset=(8, 4),
                                  kv_offset=kv_offset, **kw)
    assert float(mx.abs(out - full[:, 8:14, 4:11]).max()) < 1e-5
    # one key fewer on either side of any axis is refused
    for a in range(2):
        for side in (0, 1):
            off, shape = list(kv_offset), list(kv_shape)
            shape[a] -= 1
            if side == 0:
                off[a] += 1
            if shape[a] < 1:
                continue
            kr = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(off, shape))
            with pytest.raises(ValueError, match="does not hold the windows"):
                natten_mlx.na_subdomain(x[:, 8:14, 4:11], x[kr], x[kr], domain=(20, 17), query_offset=(8, 4),
                                        kv_offset=tuple(off), **kw)
