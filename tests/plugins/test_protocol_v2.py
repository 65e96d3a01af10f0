"""Protocol v2 (natten_mlx.protocol): the three differentiation modes under mx.grad, mx.vjp and
mx.compile; the backward record (lse always kept, d_lse None when not asked for); streams and
devices; backend options through configure; ordered backend lists."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import natten_mlx
import numpy as np
import pytest
from natten_mlx import protocol
from natten_mlx.backends.pure import PureBackend
from natten_mlx.dispatch import BACKEND_ENV, select
from plugin_toys import ConfigurableToy, DenseToy, OwnBackwardToy, fused, qkv

CALL = dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2), is_causal=(True, False))


class PrimitiveToy(DenseToy):
    """A forward made of differentiable MLX ops standing in for a primitive with its own vjp: the
    core must call it directly (no custom_function), so MLX's autodiff differentiates the forward
    itself. A bias ``shift`` added to the output has gradient 1 only along that path: a core that
    wrapped this backend in the pure backward would not see the shift at all in the gradients of
    ``shift``-dependent losses, and a core that wrapped it at all would never trace ``traced``."""

    differentiation = "primitive"

    def __init__(self, name="toy-prim", **kw):
        super().__init__(name, **kw)
        self.traced = []

    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        out, lse = super().fused_forward(problem, query, key, value, additional_keys, additional_values, rpb)
        # a deliberate, differentiable deviation from attention: out + 0.5 * query (H == H_kv, D == D_v)
        self.traced.append(query)
        return out + 0.5 * query, lse


class PureModeToy(OwnBackwardToy):
    """Has a fused_backward, yet declares "pure": the core must use the pure backend's backward."""

    differentiation = "pure"


def _loss(op_kwargs, with_lse):
    def loss(q, k, v):
        if with_lse:
            out, lse = natten_mlx.na2d(q, k, v, **CALL, return_lse=True, **op_kwargs)
            return (out * out).sum() + (lse * 0.3).sum()
        return (natten_mlx.na2d(q, k, v, **CALL, **op_kwargs) ** 2).sum()

    return loss


def _grads(fn, q, k, v, how):
    if how == "grad":
        return mx.grad(fn, argnums=(0, 1, 2))(q, k, v)
    if how == "vjp":
        _, g = mx.vjp(lambda q, k, v: fn(q, k, v), [q, k, v], [mx.array(1.0)])
        return tuple(g)
    return mx.compile(mx.grad(fn, argnums=(0, 1, 2)))(q, k, v)


def _close(a, b, tol=1e-4):
    return float(mx.abs(a - b).max()) <= tol


TRANSFORMS = ["grad", "vjp", "compile"]


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("how", TRANSFORMS)
def test_backward_mode_gets_a_record_with_the_lse(register, how, with_lse):
    toy = OwnBackwardToy("toy-bwd")
    register(toy)
    assert protocol.differentiation_of(toy) == "backward"
    q, k, v = qkv(heads=2, kv_heads=1, batch=2)
    got = _grads(_loss(dict(backend="toy-bwd"), with_lse), q, k, v, how)
    want = _grads(_loss(dict(backend="pure"), with_lse), q, k, v, how)
    for g, w in zip(got, want, strict=True):
        assert _close(g, w)
    assert toy.backward_calls >= 1
    record = toy.records[-1]
    assert isinstance(record, protocol.BackwardRecord)
    # the lse reaches the backward also when the caller did not ask for it
    assert record.lse is not None and record.lse.shape == (2, 7, 6, 2) and record.lse.dtype == mx.float32
    assert (record.d_lse is not None) == with_lse
    assert set(record.inputs) == {"query", "key", "value", "additional_keys", "additional_values", "rpb"}
    assert record.inputs["rpb"] is None and record.out.shape == (2, 7, 6, 2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.lse = None


@pytest.mark.parametrize("how", TRANSFORMS)
def test_primitive_mode_is_called_directly(register, how):
    toy = PrimitiveToy()
    register(toy)
    q, k, v = qkv(heads=2, kv_heads=2)
    got = _grads(_loss(dict(backend="toy-prim"), False), q, k, v, how)

    # the true gradient of what the toy computes, by autodiff of its forward outside the core
    problem = fused(q, k, v, **CALL)

    def direct(q, k, v):
        return (PrimitiveToy().fused_forward(problem, q, k, v)[0] ** 2).sum()

    want = _grads(direct, q, k, v, "grad")
    for g, w in zip(got, want, strict=True):
        assert _close(g, w)
    # the pure backward (what a wrapped call would use) differs: the shift's gradient is missing
    pure = _grads(_loss(dict(backend="pure"), False), q, k, v, "grad")
    assert not _close(got[0], pure[0], 1e-2)


@pytest.mark.parametrize("how", TRANSFORMS)
def test_pure_mode_uses_the_pure_backward_even_with_its_own(register, how):
    toy = PureModeToy("toy-puremode")
    register(toy)
    q, k, v = qkv(heads=4, kv_heads=2)
    got = _grads(_loss(dict(backend="toy-puremode"), True), q, k, v, how)
    want = _grads(_loss(dict(backend="pure"), True), q, k, v, how)
    for g, w in zip(got, want, strict=True):
        assert _close(g, w)
    assert toy.backward_calls == 0 and toy.forward_calls >= 1


def test_a_backward_that_returns_no_dict_or_misses_a_gradient_is_named(register):
    class Tuple(OwnBackwardToy):
        def fused_backward(self, record):
            return tuple(super().fused_backward(record).values())

    class Missing(OwnBackwardToy):
        def fused_backward(self, record):
            grads = super().fused_backward(record)
            del grads["key"]
            return grads

    register(Tuple("toy-tuple"))
    register(Missing("toy-missing"))
    q, k, v = qkv()
    with pytest.raises(TypeError, match="toy-tuple.*dict of gradients"):
        mx.eval(mx.grad(lambda q: natten_mlx.na2d(q, k, v, 3, backend="toy-tuple").sum())(q))
    with pytest.raises(TypeError, match=r"toy-missing.*no gradient for \['key'\]"):
        mx.eval(mx.grad(lambda k: natten_mlx.na2d(q, k, v, 3, backend="toy-missing").sum())(k))


def test_check_backend_refuses_bad_differentiation():
    toy = DenseToy("bad")
    toy.differentiation = "magic"
    with pytest.raises(TypeError, match="differentiation='magic'"):
        protocol.check_backend(toy)
    toy.differentiation = "backward"  # without fused_backward
    with pytest.raises(TypeError, match="no fused_backward"):
        protocol.check_backend(toy)
    comma = DenseToy("a,b")
    with pytest.raises(TypeError, match="contains ','"):
        protocol.check_backend(comma)


# ---- streams and devices ------------------------------------------------------------------------------
class StreamToy(DenseToy):
    """Records the default CPU stream seen inside its forward and backward, and the problem's device;
    refuses the devices in ``refuse_devices``."""

    def __init__(self, name="toy-stream", refuse_devices=(), **kw):
        super().__init__(name, **kw)
        self.refuse_devices = refuse_devices
        self.seen = []

    def supports(self, problem):
        if problem.device in self.refuse_devices:
            return f"{self.name}: serves no {problem.device} streams"
        return super().supports(problem)

    def fused_forward(self, problem, *arrays, **kw):
        self.seen.append(("forward", problem.device, mx.default_stream(mx.cpu)))
        return super().fused_forward(problem, *arrays, **kw)

    def fused_backward(self, record):
        self.seen.append(("backward", record.problem.device, mx.default_stream(mx.cpu)))
        return PureBackend().fused_backward(record)


def test_stream_reaches_the_problem_and_wraps_forward_and_backward(register):
    toy = StreamToy()
    register(toy)
    q, k, v = qkv()
    stream = mx.new_stream(mx.cpu)
    assert stream != mx.default_stream(mx.cpu)
    g = mx.grad(lambda q: natten_mlx.na2d(q, k, v, 3, backend="toy-stream", stream=stream).sum())(q)
    mx.eval(g)
    assert [s[0] for s in toy.seen] == ["forward", "backward"]
    assert all(device == "cpu" and s == stream for _, device, s in toy.seen)
    # without a stream the default one is used
    natten_mlx.na2d(q, k, v, 3, backend="toy-stream")
    assert toy.seen[-1][2] == mx.default_stream(mx.cpu)
    assert natten_mlx.explain(q, k, v, 3, stream=mx.cpu).problem.device == "cpu"


@pytest.mark.parametrize("stream", [mx.cpu, mx.Device(mx.cpu), "new"])
def test_a_gpu_only_backend_refuses_a_cpu_stream(register, stream):
    stream = mx.new_stream(mx.cpu) if stream == "new" else stream
    toy = StreamToy("toy-gpu", refuse_devices=("cpu",), priority=50)
    register(toy)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="toy-gpu: serves no cpu streams"):
        natten_mlx.na2d(q, k, v, 3, backend="toy-gpu", stream=stream)
    out = natten_mlx.na2d(q, k, v, 3, stream=stream)  # automatic: pure serves it
    assert _close(out, natten_mlx.na2d(q, k, v, 3, backend="pure"))
    assert natten_mlx.explain(q, k, v, 3, stream=stream).chosen == "pure"


def test_every_op_takes_a_stream():
    q, k, v = qkv()
    s = mx.new_stream(mx.cpu)
    ref = natten_mlx.na2d(q, k, v, 3)
    assert _close(natten_mlx.na2d(q, k, v, 3, stream=s, backend="pure"), ref)
    scores = natten_mlx.na2d_qk(q, k, 3, stream=s)
    out = natten_mlx.na2d_av(mx.softmax(scores, axis=-1), v, 3, stream=s)
    assert _close(out, ref)
    o, lse = natten_mlx.na2d(q, k, v, 3, return_lse=True, stream=s)
    merged, _ = natten_mlx.merge_attentions([o, o], [lse, lse], stream=s)
    assert _close(merged, o)
    with pytest.raises(TypeError, match="stream="):
        natten_mlx.na2d(q, k, v, 3, stream="cpu")


def test_pure_chooses_its_strategy_from_the_problem_device():
    pure = PureBackend()
    p = fused(*qkv(), 3)
    assert pure.strategy_for(p.with_(device="cpu")) == "slices"
    assert pure.strategy_for(p.with_(device="gpu")) == "tiled"
    assert pure.configure(strategy="gather").strategy_for(p.with_(device="gpu")) == "gather"


# ---- configure and use_backend options --------------------------------------------------------------
def test_use_backend_with_options_configures_a_copy(register):
    toy = ConfigurableToy()
    register(toy)
    q, k, v = qkv()
    ref = natten_mlx.na2d(q, k, v, 3, backend="toy-conf")
    with natten_mlx.use_backend("toy-conf", factor=2.0):
        doubled = natten_mlx.na2d(q, k, v, 3)
    assert _close(doubled, 2 * ref)
    assert len(toy.configured) == 1
    assert _close(natten_mlx.na2d(q, k, v, 3, backend=natten_mlx.configure("toy-conf", factor=3.0)), 3 * ref)
    with pytest.raises(TypeError, match="has no option.*factor"):
        with natten_mlx.use_backend("toy-conf", tile=4):
            pass
    register(DenseToy("plain"))
    with pytest.raises(TypeError, match="'plain' takes no options"):
        with natten_mlx.use_backend("plain", factor=2.0):
            pass
    with pytest.raises(TypeError, match="apply to one backend"):
        with natten_mlx.use_backend("toy-conf,pure", factor=2.0):
            pass


def test_pure_options():
    pure = natten_mlx.get_backend("pure")
    assert pure.configure(strategy="gather") is pure.configure(strategy="gather")
    with pytest.raises(TypeError, match="no option 'tiles'.*strategy, tile"):
        pure.configure(tiles=(4, 4))
    with pytest.raises(ValueError, match="strategy='fast'"):
        pure.configure(strategy="fast")
    q, k, v = qkv(spatial=(9, 8))
    ref = natten_mlx.na2d(q, k, v, 3, dilation=2, backend="pure")
    for strategy in ("slices", "gather", "tiled"):
        with natten_mlx.use_backend("pure", strategy=strategy, tile=(2, 3)):
            assert _close(natten_mlx.na2d(q, k, v, 3, dilation=2), ref)


# ---- ordered lists -----------------------------------------------------------------------------------
@pytest.fixture
def two(register):
    a = DenseToy("toy-a", priority=20, refuse={"causal": "toy-a: no causal"})
    b = DenseToy("toy-b", priority=10)
    register(a)
    register(b)
    return a, b


@pytest.mark.parametrize("how", ["argument", "sequence", "context", "env"])
def test_a_list_serves_with_the_first_that_can(two, monkeypatch, how):
    a, b = two
    q, k, v = qkv()

    def call(**kw):
        if how == "argument":
            return natten_mlx.na2d(q, k, v, 3, backend="toy-a, toy-b", **kw)
        if how == "sequence":
            return natten_mlx.na2d(q, k, v, 3, backend=["toy-a", b], **kw)
        if how == "context":
            with natten_mlx.use_backend("toy-a,toy-b"):
                return natten_mlx.na2d(q, k, v, 3, **kw)
        monkeypatch.setenv(BACKEND_ENV, "toy-a,toy-b")
        return natten_mlx.na2d(q, k, v, 3, **kw)

    call()
    assert (a.forward_calls, b.forward_calls) == (1, 0)
    call(is_causal=True)
    assert (a.forward_calls, b.forward_calls) == (1, 1)


def test_a_list_explains_and_fails_with_every_reason(two, caplog):
    import logging

    a, b = two
    q, k, v = qkv()
    e = natten_mlx.explain(q, k, v, 3, is_causal=True, backend="toy-a,toy-b")
    assert e.chosen == "toy-b" and e.requested == ("toy-a", "toy-b")
    assert e.reasons["toy-a"] == "toy-a: no causal"
    assert "chosen: toy-b (backend= argument: toy-a, toy-b)" in str(e)
    with caplog.at_level(logging.DEBUG, logger="natten_mlx"):
        natten_mlx.na2d(q, k, v, 3, is_causal=True, backend="toy-a,toy-b")
    assert any("uses 'toy-b'" in r.getMessage() and "toy-a: no causal" in r.getMessage() for r in caplog.records)
    b.refuse["causal"] = "toy-b: no causal either"
    with pytest.raises(ValueError, match=r"none of the backends \['toy-a', 'toy-b'\].*toy-a: no causal.*toy-b: no causal either"):
        natten_mlx.na2d(q, k, v, 3, is_causal=True, backend="toy-a,toy-b")
    with pytest.raises(ValueError, match="unknown backend 'toy-c'"):
        natten_mlx.na2d(q, k, v, 3, backend="toy-a,toy-c")
    with pytest.raises(ValueError, match="empty name"):
        natten_mlx.na2d(q, k, v, 3, backend="toy-a,,toy-b")


def test_select_accepts_a_backend_object_not_registered():
    solo = DenseToy("unregistered")
    p = fused(*qkv(), 3)
    assert select(p, solo) is solo
    q, k, v = qkv()
    assert _close(natten_mlx.na2d(q, k, v, 3, backend=solo), natten_mlx.na2d(q, k, v, 3, backend="pure"))


def test_explain_and_support_show_differentiation_and_devices(register):
    register(PrimitiveToy())
    register(StreamToy("toy-gpu-only", refuse_devices=("cpu",)))
    rows = {r["name"]: r for r in natten_mlx.get_support_matrix()}
    assert rows["toy-prim"]["differentiation"] == "primitive"
    assert rows["toy-prim"]["backward"] == "its primitives' vjp"
    assert rows["pure"]["differentiation"] == "backward" and rows["pure"]["devices"] == ("cpu", "gpu")
    assert rows["toy-gpu-only"]["devices"] == ("gpu",)
    q, k, v = qkv()
    e = natten_mlx.explain(q, k, v, 3, backend="toy-prim", stream=mx.cpu)
    assert e.differentiation == "primitive"
    assert "device cpu; gradients: its MLX primitives' vjp" in str(e)


def test_priorities_table_matches_the_registered_backends():
    assert protocol.PRIORITIES["pure"][0] == natten_mlx.get_backend("pure").priority
    try:
        example = natten_mlx.get_backend("example-dense")
    except ValueError:
        return
    assert protocol.PRIORITIES["example-dense"][0] == example.priority


def test_batch_zero_returns_empty_outputs_and_gradients():
    q, k, v = qkv(batch=1)
    q0, k0, v0 = (x[:0] for x in (q, k, v))
    out, lse = natten_mlx.na2d(q0, k0, v0, 3, return_lse=True)
    assert out.shape == (0, 7, 6, 2, 4) and lse.shape == (0, 7, 6, 2) and lse.dtype == mx.float32
    assert natten_mlx.na2d_qk(q0, k0, 3).shape == (0, 7, 6, 2, 9)
    g = mx.grad(lambda q: natten_mlx.na2d(q, k0, v0, 3).sum())(q0)
    assert g.shape == q0.shape
    assert np.asarray(out).size == 0
