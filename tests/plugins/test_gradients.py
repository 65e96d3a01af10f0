"""Gradients always exist: the core wraps every backend's forward in ``mx.custom_function`` and uses
the backend's own backward where it has one, the pure backend's otherwise."""

from __future__ import annotations

import mlx.core as mx
import natten_mlx
import numpy as np
import pytest
from plugin_toys import DenseToy, OwnBackwardToy, OwnSplitBackwardToy, SplitToy, fused, qkv

OPS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}

# (id, spatial, heads/kv_heads, call arguments, extras): every feature a backward must carry
CASES = [
    ("1d", (11,), (2, 2), dict(kernel_size=3), ()),
    ("1d-causal-stride", (11,), (2, 2), dict(kernel_size=4, stride=2, is_causal=True), ()),
    ("2d-dilation-gqa", (7, 6), (4, 2), dict(kernel_size=(3, 2), dilation=(2, 3)), ()),
    ("2d-causal-extra", (6, 5), (2, 1), dict(kernel_size=3, is_causal=(True, False)), ("extra",)),
    ("2d-rpb", (6, 5), (2, 2), dict(kernel_size=(3, 5)), ("rpb",)),
    ("2d-window-covers-all", (4, 3), (2, 2), dict(kernel_size=(4, 3)), ()),
    ("3d-stride-dilation", (5, 4, 4), (2, 2), dict(kernel_size=2, stride=(1, 2, 1), dilation=(2, 1, 2)), ("extra",)),
]


def _inputs(spatial, heads, extras, seed=1):
    h, hk = heads
    q, k, v = qkv(spatial=spatial, heads=h, kv_heads=hk, head_dim=4, value_dim=3, batch=2, seed=seed)
    arrays = dict(query=q, key=k, value=v)
    rng = np.random.default_rng(seed + 1)
    if "extra" in extras:
        arrays["additional_keys"] = mx.array(rng.standard_normal((2, 3, hk, 4)).astype(np.float32))
        arrays["additional_values"] = mx.array(rng.standard_normal((2, 3, hk, 3)).astype(np.float32))
    return arrays


def _with_rpb(arrays, call, heads):
    ks = call["kernel_size"]
    ks = (ks,) * (arrays["query"].ndim - 3) if isinstance(ks, int) else ks
    rng = np.random.default_rng(7)
    arrays["rpb"] = mx.array(rng.standard_normal((heads[0], *[2 * x - 1 for x in ks])).astype(np.float32))
    return arrays


def _value_and_grads(op, arrays, call, backend, return_lse):
    names = list(arrays)
    weights = mx.array(np.random.default_rng(3).standard_normal(arrays["value"].shape[-1]).astype(np.float32))

    def loss(*xs):
        kw = dict(zip(names, xs, strict=True))
        result = op(**kw, **call, return_lse=return_lse, backend=backend)
        out, lse = result if return_lse else (result, None)
        total = (out * out * weights).sum()
        return total + (lse * lse).sum() if return_lse else total

    value, grads = mx.value_and_grad(loss, argnums=list(range(len(names))))(*arrays.values())
    return value, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backend_without_backward_gets_the_pure_backward(register, case, return_lse):
    _, spatial, heads, call, extras = case
    toy = DenseToy("toy")
    register(toy)
    assert not hasattr(toy, "fused_backward")
    arrays = _inputs(spatial, heads, extras)
    if "rpb" in extras:
        arrays = _with_rpb(arrays, call, heads)
    op = OPS[len(spatial)]
    value, grads = _value_and_grads(op, arrays, call, "toy", return_lse)
    assert toy.forward_calls >= 1
    want_value, want = _value_and_grads(op, arrays, call, "pure", return_lse)
    assert abs(float(value) - float(want_value)) <= 1e-4 * max(1.0, abs(float(want_value)))
    assert set(grads) == set(want)
    for name in want:
        assert grads[name].shape == arrays[name].shape, name
        assert float(mx.abs(grads[name] - want[name]).max()) <= 1e-4, name


def test_pure_backward_agrees_with_autodiff_of_the_toy_forward(register):
    """The gradient the core supplies is the true gradient of what the toy computes (MLX autodiff
    through the toy's dense forward, which shares no code with the pure backend)."""
    toy = DenseToy("toy")
    register(toy)
    arrays = _inputs((7, 6), (4, 2), ("extra",))
    call = dict(kernel_size=(3, 2), stride=(2, 1), dilation=(2, 1), is_causal=(False, True))
    problem = fused(*(arrays[n] for n in ("query", "key", "value")), additional_keys=arrays["additional_keys"],
                    additional_values=arrays["additional_values"], return_lse=True, **call)
    cot_out = mx.array(np.random.default_rng(5).standard_normal((2, 7, 6, 4, 3)).astype(np.float32))
    cot_lse = mx.array(np.random.default_rng(6).standard_normal((2, 7, 6, 4)).astype(np.float32))
    names = list(arrays)

    def through_core(*xs):
        return natten_mlx.na2d(**dict(zip(names, xs, strict=True)), **call, return_lse=True, backend="toy")

    def through_toy(*xs):
        return DenseToy().fused_forward(problem, *xs)

    _, got = mx.vjp(lambda *xs: list(through_core(*xs)), list(arrays.values()), [cot_out, cot_lse])
    _, want = mx.vjp(lambda *xs: list(through_toy(*xs)), list(arrays.values()), [cot_out, cot_lse])
    for name, g, w in zip(names, got, want, strict=True):
        assert float(mx.abs(g - w).max()) <= 1e-4, name


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_backend_with_its_own_backward_has_it_called(register, return_lse):
    toy = OwnBackwardToy("toy-bwd")
    register(toy)
    arrays = _inputs((7, 6), (4, 2), ("extra",))
    call = dict(kernel_size=3, dilation=(2, 1))
    _, grads = _value_and_grads(natten_mlx.na2d, arrays, call, "toy-bwd", return_lse)
    mx.eval(grads)
    assert toy.backward_calls == 1 and toy.forward_calls >= 1
    _, want = _value_and_grads(natten_mlx.na2d, arrays, call, "pure", return_lse)
    for name in want:
        assert float(mx.abs(grads[name] - want[name]).max()) <= 1e-4, name
    # a forward without a gradient asked for never calls the backward
    natten_mlx.na2d(**arrays, **call, backend="toy-bwd")
    assert toy.backward_calls == 1


def test_the_own_backward_result_is_what_the_caller_gets(register):
    toy = OwnBackwardToy("toy-zero", zero_grads=True)
    register(toy)
    q, k, v = qkv()
    grads = mx.grad(lambda q, k, v: natten_mlx.na2d(q, k, v, 3, backend="toy-zero").sum(), argnums=(0, 1, 2))(q, k, v)
    assert toy.backward_calls == 1
    assert all(float(mx.abs(g).max()) == 0.0 for g in grads)
    # the same call through pure has a non-zero gradient: the zeros came from the toy
    grads = mx.grad(lambda q, k, v: natten_mlx.na2d(q, k, v, 3, backend="pure").sum(), argnums=(0, 1, 2))(q, k, v)
    assert float(mx.abs(grads[2]).max()) > 0.0


def test_automatic_selection_of_a_toy_keeps_gradients(register):
    toy = DenseToy("toy", priority=50)
    register(toy)
    q, k, v = qkv(heads=4, kv_heads=1)
    got = mx.grad(lambda q, k, v: (natten_mlx.na2d(q, k, v, (3, 5), is_causal=True) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    assert toy.forward_calls >= 1
    want = mx.grad(lambda q, k, v: (natten_mlx.na2d(q, k, v, (3, 5), is_causal=True, backend="pure") ** 2).sum(),
                   argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert float(mx.abs(g - w).max()) <= 1e-4


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_split_ops_without_split_backward_get_the_pure_backward(register, na_dim):
    toy = SplitToy("toy-split", priority=20)
    register(toy)
    spatial = (9, 7, 5)[:na_dim]
    q, k, v = qkv(spatial=spatial, heads=2, kv_heads=1, batch=2)
    qk, av = getattr(natten_mlx, f"na{na_dim}d_qk"), getattr(natten_mlx, f"na{na_dim}d_av")
    call = dict(kernel_size=3, dilation=(2, 1, 1)[:na_dim], is_causal=(True, False, False)[:na_dim])

    def loss(backend):
        def f(q, k, v):
            attn = mx.softmax(qk(q, k, backend=backend, **call), axis=-1)
            return (av(attn, v, backend=backend, **call) ** 2).sum()

        return mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

    value, got = loss("toy-split")
    assert toy.split_calls["qk"] >= 1 and toy.split_calls["av"] >= 1
    assert not hasattr(toy, "qk_backward") and not hasattr(toy, "av_backward")
    want_value, want = loss("pure")
    assert abs(float(value) - float(want_value)) <= 1e-4 * abs(float(want_value))
    for g, w in zip(got, want, strict=True):
        assert float(mx.abs(g - w).max()) <= 1e-4


def test_split_backend_with_its_own_split_backward_has_it_called(register):
    toy = OwnSplitBackwardToy("toy-split-bwd", priority=20)
    register(toy)
    q, k, v = qkv(heads=2, kv_heads=1, batch=2)
    ek = mx.random.normal((2, 3, 1, 4), key=mx.random.key(1))
    ev = mx.random.normal((2, 3, 1, 4), key=mx.random.key(2))

    def f(backend):
        def loss(q, k, v, ek, ev):
            scores = natten_mlx.na2d_qk(q, k, 3, dilation=2, additional_keys=ek, backend=backend)
            attn = mx.softmax(scores, axis=-1)
            return (natten_mlx.na2d_av(attn, v, 3, dilation=2, additional_values=ev, backend=backend) ** 2).sum()

        return mx.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, ek, ev)

    got = f("toy-split-bwd")
    mx.eval(got)
    assert toy.backward_calls == {"qk": 1, "av": 1}
    for g, w in zip(got, f("pure"), strict=True):
        assert float(mx.abs(g - w).max()) <= 1e-4


def test_backend_without_split_ops_is_skipped_for_split_calls(register):
    toy = DenseToy("toy-fused-only", priority=50)
    register(toy)
    q, k, v = qkv()
    e = natten_mlx.explain("na2d_qk", q, k, 3)
    assert e.chosen == "pure" and e.reasons["toy-fused-only"] == "has no split qk op (qk_forward)"
    grads = mx.grad(lambda q, k: natten_mlx.na2d_qk(q, k, 3).sum(), argnums=(0, 1))(q, k)
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k), strict=True))
    assert toy.forward_calls == 0
