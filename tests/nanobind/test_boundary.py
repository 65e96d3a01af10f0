"""The C++ boundary of the nanobind tier: bad input raises a Python exception (never a crash),
unusual but valid input (views, broadcasts, NaN/inf) gives the right numbers; threads, mx.compile,
mx.grad, vmap, and the backend object's supports()."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import oracle
import pytest
from nb_checks import run_in_two_threads

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)
ext = nb.extension()

W2 = dict(kernel_size=[3, 5], stride=[1, 2], dilation=[2, 1], is_causal=[False, True])
G2 = dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))


def _qkv(rng, shape=(2, 9, 11), heads=4, kv_heads=2, dim=8):
    b, *sp = shape
    q = rng.standard_normal((b, *sp, heads, dim))
    k = rng.standard_normal((b, *sp, kv_heads, dim))
    v = rng.standard_normal((b, *sp, kv_heads, dim))
    return q, k, v


def _f32(x):
    return mx.array(np.asarray(x, np.float32))


def test_every_dtype_mlx_has():
    rng = np.random.default_rng(0)
    q, k, v = (_f32(x) for x in _qkv(rng))
    others = [mx.bool_, mx.uint8, mx.uint16, mx.uint32, mx.uint64, mx.int8, mx.int16, mx.int32, mx.int64,
              mx.float64, mx.complex64]
    for dt in others:
        for pos in range(3):
            args = [q, k, v]
            args[pos] = args[pos].astype(dt)
            with pytest.raises(ValueError, match="dtype"):
                ext.fused_forward(*args, **W2)
        with pytest.raises(ValueError, match="dtype"):
            ext.qk_forward(q.astype(dt), k.astype(dt), **W2)
    with pytest.raises(ValueError, match="dtypes"):
        ext.fused_forward(q, k.astype(mx.float16), v, **W2)


def test_bad_geometry_and_shapes():
    rng = np.random.default_rng(1)
    q, k, v = (_f32(x) for x in _qkv(rng))
    bad = [
        dict(W2, kernel_size=[1, 5]),
        dict(W2, kernel_size=[3, 12]),  # 12 > 11
        dict(W2, dilation=[4, 1]),  # 3 * 4 > 9
        dict(W2, stride=[4, 1]),  # stride > kernel
        dict(W2, stride=[0, 1]),
        dict(W2, kernel_size=[3]),
        dict(W2, is_causal=[True]),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            ext.fused_forward(q, k, v, **kw)
    with pytest.raises(ValueError):
        ext.fused_forward(q, k[..., :4], v, **W2)  # D mismatch
    with pytest.raises(ValueError):
        ext.fused_forward(q[..., :3, :], k, v, **W2)  # H % H_kv
    with pytest.raises(ValueError):
        ext.fused_forward(q[None, None], k[None, None], v[None, None], **W2)  # rank 7: no 4D op
    with pytest.raises(ValueError, match="rank"):
        ext.fused_forward(q, k[None], v, **W2)
    rpb = mx.zeros((4, 5, 9))
    with pytest.raises(ValueError, match="causal"):
        ext.fused_forward(q, k, v, None, None, rpb, **W2)
    with pytest.raises(ValueError, match="rpb"):
        ext.fused_forward(q, k, v, None, None, mx.zeros((4, 5, 8)), **dict(W2, is_causal=[False, False]))
    ek = mx.zeros((2, 3, 2, 8))
    with pytest.raises(ValueError, match="pairs"):
        ext.fused_forward(q, k, v, ek, None, **W2)
    with pytest.raises(ValueError, match="additional_values"):
        ext.fused_forward(q, k, v, ek, mx.zeros((2, 3, 1, 8)), **W2)
    with pytest.raises(ValueError, match="scale"):
        ext.fused_forward(q, k, v, scale=float("nan"), **W2)
    with pytest.raises(ValueError, match="weights per query"):
        ext.av_forward(mx.zeros((2, 9, 11, 4, 14)), v, **W2)
    with pytest.raises(TypeError):
        ext.fused_forward(np.zeros((2, 9, 11, 4, 8), np.float32), k, v, **W2)


def test_empty_arrays_raise():
    for shape in [(0, 9, 11, 4, 8), (2, 9, 11, 4, 0), (2, 9, 11, 0, 8)]:
        x = mx.zeros(shape)
        with pytest.raises(ValueError):
            ext.fused_forward(x, x, x, **W2)


def test_gpu_stream_refused():
    rng = np.random.default_rng(2)
    q, k, v = (_f32(x) for x in _qkv(rng))
    with pytest.raises((ValueError, RuntimeError)):
        ext.fused_forward(q, k, v, stream=mx.gpu, **W2)


def test_views_and_broadcasts_give_the_right_numbers():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, shape=(2, 9, 22))
    # transposed storage, a strided slice, a broadcast (stride-0) key, a float16 view of a slice
    qt = mx.array(np.ascontiguousarray(np.moveaxis(q, -2, 1)).astype(np.float32)).transpose(0, 2, 3, 1, 4)
    kb_np = np.broadcast_to(k[:1, :1, :1], (2, 9, 11, 2, 8))
    kb = mx.broadcast_to(_f32(k[:1, :1, :1]), (2, 9, 11, 2, 8))
    vs = _f32(v)[:, :, ::2]
    out, lse = ext.fused_forward(qt[:, :, ::2], kb, vs, **W2)
    ro, rl = oracle.na_forward(q[:, :, ::2], kb_np, v[:, :, ::2], **G2)
    assert np.abs(np.array(out) - ro).max() < 1e-4 and np.abs(np.array(lse) - rl).max() < 1e-4
    # gradients through the views land in the right places
    g = mx.grad(lambda x: ext.fused_forward(x[:, :, ::2], kb, vs, **W2)[0].sum())(qt)
    want = oracle.na_backward(q[:, :, ::2], kb_np, v[:, :, ::2], **G2, dout=np.ones(ro.shape))["q"]
    full = np.zeros(q.shape)
    full[:, :, ::2] = want
    assert np.abs(np.array(g) - full).max() < 1e-4


def _address(a):
    return np.asarray(memoryview(a)).__array_interface__["data"][0]


def test_outputs_start_on_a_cache_line_and_behave_as_arrays(tmp_path):
    # the outputs sit 64-byte aligned inside a slightly larger buffer (an offset into it, as a slice's):
    # MLX's operations, conversions, donation and saving must see only the array
    rng = np.random.default_rng(5)
    q, k, v = (_f32(x) for x in _qkv(rng, shape=(2, 9, 11)))
    ro, rl = oracle.na_forward(np.array(q), np.array(k), np.array(v), **G2)
    out, lse = ext.fused_forward(q, k, v, **W2)
    attn = ext.qk_forward(q, k, **W2)
    mx.eval(out, lse, attn)
    grads = mx.grad(lambda a, b, c: ext.fused_forward(a, b, c, **W2)[0].sum(), argnums=(0, 1, 2))(q, k, v)
    mx.eval(grads)
    for a in (out, lse, attn, *grads):
        assert _address(a) % 64 == 0, "an output does not start on a 64-byte line"
    assert np.abs(np.array(out) - ro).max() < 1e-4 and np.abs(np.array(lse) - rl).max() < 1e-4
    # an intermediate output MLX may donate to the next operation, then slices, a transpose, a reduction
    chained = mx.compile(lambda a, b, c: (ext.fused_forward(a, b, c, **W2)[0] * 2.0 + 1.0)[:, 1:])(q, k, v)
    assert np.abs(np.array(chained) - (2 * ro + 1)[:, 1:]).max() < 1e-4
    assert np.abs(np.array(out.transpose(0, 3, 1, 2, 4).sum(axis=-1)) - ro.transpose(0, 3, 1, 2, 4).sum(-1)).max() < 1e-3
    mx.save(str(tmp_path / "out.npy"), out)
    assert np.array_equal(np.array(mx.load(str(tmp_path / "out.npy"))), np.array(out))


def test_nan_and_inf_stay_in_their_windows():
    rng = np.random.default_rng(4)
    L = 40
    q, k, v = _qkv(rng, shape=(1, L), heads=2, kv_heads=1, dim=8)
    geo = dict(kernel_size=(7,), stride=(1,), dilation=(1,), is_causal=(False,))
    mask = oracle.na_mask((L,), 7)  # [query, key]
    for bad in (np.nan, np.inf):
        for where in ("value", "key"):
            vv, kk = v.copy(), k.copy()
            (vv if where == "value" else kk)[0, 20, 0, 3] = bad
            out, _ = ext.fused_forward(_f32(q), _f32(kk), _f32(vv), **{n: list(x) for n, x in geo.items()})
            out = np.array(out)
            hit = mask[:, 20]
            clean_v, clean_k = v.copy(), k.copy()
            ro, _ = oracle.na_forward(q, clean_k, clean_v, **geo)
            assert np.allclose(out[0, ~hit], ro[0, ~hit], atol=1e-5), f"{bad} in {where} leaked outside its windows"
            assert not np.all(np.isfinite(out[0, hit])), f"{bad} in {where} vanished"
    # backward: a NaN key only reaches the queries that see it and that key's own gradient
    kk = k.copy()
    kk[0, 20, 0, 3] = np.nan
    win = {n: list(x) for n, x in geo.items()}
    dq, dk, dv = mx.grad(lambda a, b, c: ext.fused_forward(a, b, c, **win)[0].sum(), argnums=(0, 1, 2))(
        _f32(q), _f32(kk), _f32(v))
    want = oracle.na_backward(q, k, v, **geo, dout=np.ones((1, L, 2, 8)))
    far = ~mask[mask[:, 20]].any(0)  # keys outside the window of every query that sees key 20
    assert np.allclose(np.array(dq)[0, ~mask[:, 20]], want["q"][0, ~mask[:, 20]], atol=1e-5)
    assert far.sum() > 10 and np.allclose(np.array(dv)[0, far], want["v"][0, far], atol=1e-5)
    assert np.allclose(np.array(dk)[0, far], want["k"][0, far], atol=1e-5)


def test_shapes_past_int32_build_lazily():
    # a graph whose arrays hold more than 2^31 elements: shapes are right and nothing is evaluated
    big = mx.zeros((1, 65536, 65537, 1, 1))
    out, lse = ext.fused_forward(big, big, big, kernel_size=[2, 2], stride=[1, 1], dilation=[1, 1], is_causal=[False, False])
    assert out.shape == (1, 65536, 65537, 1, 1) and lse.shape == (1, 65536, 65537, 1)
    assert out.size > 2**31


def _fused_ref(seed):
    rng = np.random.default_rng(seed)
    q, k, v = (_f32(x) for x in _qkv(rng, shape=(2, 16, 18)))
    return q, k, v


@pytest.mark.parametrize("spin_us", ["0", "200", "5000"])
def test_two_python_threads(spin_us, monkeypatch):
    # the pool's threads wait for work and for each other asleep (0) or spinning a while first
    monkeypatch.setenv("NATTEN_MLX_SPIN_US", spin_us)
    cases = [_fused_ref(s) for s in (10, 11)]

    def run(q, k, v):
        out = ext.fused_forward(q, k, v, **W2)[0]
        g = mx.grad(lambda x: ext.fused_forward(x, k, v, **W2)[0].sum())(q)
        return np.array(out), np.array(g)

    want = [run(*c) for c in cases]

    def same(i):
        got = run(*cases[i])
        return np.array_equal(got[0], want[i][0]) and np.array_equal(got[1], want[i][1])

    errors = run_in_two_threads(same, reps=8)
    assert not errors, errors


def test_compile_grad_and_vmap():
    q, k, v = _fused_ref(12)

    def loss(q, k, v):
        out, lse = ext.fused_forward(q, k, v, **W2)
        return (out * out).sum() + lse.sum()

    eager = loss(q, k, v)
    assert abs(mx.compile(loss)(q, k, v).item() - eager.item()) < 1e-3
    g = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    gc = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, gc):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5)
    gs = mx.compile(mx.grad(loss), shapeless=True)(q, k, v)  # needs output_shapes
    assert np.allclose(np.array(gs), np.array(g[0]), atol=1e-5)
    with pytest.raises(ValueError, match="vmap"):
        mx.vmap(lambda x: ext.fused_forward(x, k, v, **W2)[0])(mx.stack([q, q]))
    with pytest.raises(ValueError, match="second-order"):
        mx.grad(lambda x: mx.grad(loss)(x, k, v).sum())(q)


def test_backend_object_refusals():
    from natten_mlx_nanobind.plugin import NanobindBackend

    b = NanobindBackend()
    assert b.name == "nanobind" and b.priority == 200 and b.differentiation == "primitive"
    assert b.available() is None
    base = dict(op="fused", batch=1, spatial=(8, 8), heads=2, kv_heads=2, head_dim=4, value_head_dim=4,
                dtype=mx.float32, device="cpu", is_subdomain=False)
    assert b.supports(SimpleNamespace(**base)) is None
    assert "CPU" in b.supports(SimpleNamespace(**dict(base, device="gpu")))
    assert b.supports(SimpleNamespace(**dict(base, is_subdomain=True))) is None
    assert "sub-domain" in b.supports(SimpleNamespace(**dict(base, op="qk", is_subdomain=True)))
    assert "empty" in b.supports(SimpleNamespace(**dict(base, batch=0)))


def test_backward_is_repeatable_with_rpb_and_extras():
    # the backward sums per-task accumulators (keys, values, rpb) in a fixed order: bitwise repeatable
    rng = np.random.default_rng(13)
    q, k, v = (_f32(x) for x in _qkv(rng, shape=(2, 46), heads=4, kv_heads=2))
    ek, ev = _f32(rng.standard_normal((2, 3, 2, 8))), _f32(rng.standard_normal((2, 3, 2, 8)))
    rpb = _f32(rng.standard_normal((4, 5)))
    win = dict(kernel_size=[3], stride=[2], dilation=[1], is_causal=[False])

    def grads():
        def loss(*xs):
            o, lse = ext.fused_forward(*xs, **win)
            return (o * o).sum() + lse.sum()

        return [np.array(g) for g in mx.grad(loss, argnums=tuple(range(6)))(q, k, v, ek, ev, rpb)]

    first = grads()
    for _ in range(6):
        for a, b in zip(first, grads()):
            assert np.array_equal(a, b)


SUBDOMAINS = [
    # domain, local query range per axis (start, length), kernel, stride, dilation, causal
    ((40,), [(11, 9)], (5,), (1,), (1,), (False,)),
    ((40,), [(0, 7)], (4,), (2,), (3,), (True,)),
    ((13, 17), [(4, 5), (9, 8)], (3, 5), (1, 2), (2, 1), (False, True)),
    ((6, 9, 10), [(1, 3), (0, 9), (5, 5)], (3, 3, 4), (1, 1, 2), (1, 2, 1), (False, False, False)),
]


@pytest.mark.parametrize("case", SUBDOMAINS, ids=[str(c[0]) for c in SUBDOMAINS])
def test_subdomain_matches_the_full_problem(case):
    domain, ranges, K, S, Dl, C = case
    rng = np.random.default_rng(len(domain) * 7 + ranges[0][0])
    q, k, v = _qkv(rng, shape=(2, *domain), heads=4, kv_heads=2, dim=4)
    rpb = None if any(C) else rng.standard_normal((4, *[2 * x - 1 for x in K]))
    geo = dict(kernel_size=K, stride=S, dilation=Dl, is_causal=C)
    ro, rl = oracle.na_forward(q, k, v, **geo, rpb=rpb)
    qsl, ksl, koff = [], [], []
    for a, (start, length) in enumerate(ranges):
        lo, hi = domain[a], -1
        for i in range(start, start + length):
            g, s0, e0 = oracle.axis_window(i, domain[a], K[a], S[a], Dl[a], C[a])
            lo, hi = min(lo, g + Dl[a] * s0), max(hi, g + Dl[a] * e0)
        qsl.append(slice(start, start + length))
        ksl.append(slice(lo, hi + 1))
        koff.append(lo)
    qi = (slice(None), *qsl)
    ki = (slice(None), *ksl)
    args = [_f32(q[qi]), _f32(k[ki]), _f32(v[ki]), None, None, None if rpb is None else _f32(rpb)]
    sub = dict(domain=list(domain), query_offset=[r[0] for r in ranges], kv_offset=koff)
    win = {n: list(x) for n, x in geo.items()}
    out, lse = ext.fused_forward(*args, **win, **sub)
    assert np.abs(np.array(out) - ro[qi]).max() < 1e-5 and np.abs(np.array(lse) - rl[qi]).max() < 1e-5
    dout = rng.standard_normal(ro[qi].shape)
    present = [0, 1, 2] + ([5] if rpb is not None else [])

    def loss(*xs):
        a = list(args)
        for i, x in zip(present, xs):
            a[i] = x
        return (ext.fused_forward(*a, **win, **sub)[0] * _f32(dout)).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(present))))(*[args[i] for i in present])
    full_dout = np.zeros(ro.shape)
    full_dout[qi] = dout
    want = oracle.na_backward(q, k, v, **geo, rpb=rpb, dout=full_dout)
    assert np.abs(np.array(grads[0]) - want["q"][qi]).max() < 1e-4
    assert np.abs(np.array(grads[1]) - want["k"][ki]).max() < 1e-4
    assert np.abs(np.array(grads[2]) - want["v"][ki]).max() < 1e-4
    if rpb is not None:
        assert np.abs(np.array(grads[3]) - want["rpb"]).max() < 1e-4
    # a slab one key too short on either side is refused with the reason
    bad = dict(sub, kv_offset=[o + 1 for o in koff])
    with pytest.raises(ValueError, match="key slab|domain"):
        ext.fused_forward(*args, **win, **bad)


def test_a_build_for_another_mlx_is_unavailable_with_the_reason(tmp_path):
    # a copy of the installed package whose build record names another MLX: importing it must not
    # load the extension, and the backend must say which versions and how to rebuild
    import os
    import shutil
    import subprocess
    import sys

    src = os.path.dirname(nb.__file__)
    dst = tmp_path / "natten_mlx_nanobind"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "_build_info.py").write_text('MLX_VERSION = "0.0.1"\nSANITIZE = "OFF"\n')
    code = (
        "import natten_mlx_nanobind as m, natten_mlx_nanobind.plugin as p, types; "
        "b = p.NanobindBackend(); "
        "print(m.UNAVAILABLE); print(b.available() == m.UNAVAILABLE); "
        "print(b.supports(types.SimpleNamespace(device='cpu')) == m.UNAVAILABLE); "
        "import sys; print('natten_mlx_nanobind._ext' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, same, same2, loaded = out.stdout.strip().splitlines()
    assert "0.0.1" in reason and mx.__version__ in reason and "rebuild" in reason
    assert same == "True" and same2 == "True" and loaded == "False"
