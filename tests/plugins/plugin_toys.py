"""Toy backends for the plugin tests. Each follows natten_mlx.protocol and is small on purpose.

- :class:`DenseToy`: exact neighborhood attention as dense attention under
  ``natten_mlx.windows.neighborhood_mask``, computed independently of the pure backend; no
  backward and no split ops. ``refuse`` maps feature names to the reason it gives for them.
- :class:`OwnBackwardToy`: DenseToy plus a ``fused_backward`` that counts its calls.
- :class:`SplitToy`: the pure backend's split forwards without split backwards, counting calls.
- :class:`OwnSplitBackwardToy`: SplitToy plus split backwards that count their calls.
- :class:`ConfigurableToy`: DenseToy with an option set through ``configure``.
- :class:`WrongToy`: a backend whose output is wrong, for ``natten-mlx check``.
- :class:`RaisingToy`: a backend whose forward raises.

And the fakes of discovery: :class:`FakeEntryPoint` and :func:`plugin_module`.
"""

from __future__ import annotations

import types

import mlx.core as mx
import numpy as np
from natten_mlx.backends.pure import PureBackend
from natten_mlx.windows import neighborhood_mask, neighborhood_tables

_PURE = PureBackend()


def refusal(problem, refuse: dict) -> str | None:
    """The reason for the first refused feature ``problem`` uses (feature names as in the support matrix)."""
    uses = {
        "na1d": problem.na_dim == 1,
        "na2d": problem.na_dim == 2,
        "na3d": problem.na_dim == 3,
        "float16": problem.dtype == mx.float16,
        "bfloat16": problem.dtype == mx.bfloat16,
        "stride": any(s > 1 for s in problem.stride),
        "dilation": any(d > 1 for d in problem.dilation),
        "causal": any(problem.is_causal),
        "gqa": problem.kv_heads != problem.heads,
        "rpb": problem.has_rpb,
        "extra_kv": problem.num_extra > 0,
        "return_lse": problem.return_lse,
    }
    for feature, why in refuse.items():
        if uses[feature]:
            return why
    return None


class DenseToy:
    """Dense attention under the neighborhood mask; fused op only, no backward."""

    priority = 5
    description = "toy: dense attention under the neighborhood mask"

    def __init__(self, name: str = "toy", priority: int | None = None, refuse: dict | None = None,
                 unavailable: str | None = None):
        self.name = name
        if priority is not None:
            self.priority = priority
        self.refuse = dict(refuse or {})
        self.unavailable = unavailable
        self.forward_calls = 0

    def available(self):
        return self.unavailable

    def supports(self, problem):
        return refusal(problem, self.refuse)

    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        self.forward_calls += 1
        p = problem
        b, n, h, hk = p.batch, p.num_tokens, p.heads, p.kv_heads
        g = h // hk
        q = query.astype(mx.float32).reshape(b, n, hk, g, -1).transpose(0, 2, 3, 1, 4) * p.scale
        k = key.astype(mx.float32).reshape(b, n, hk, -1).transpose(0, 2, 1, 3)[:, :, None]
        v = value.astype(mx.float32).reshape(b, n, hk, -1).transpose(0, 2, 1, 3)[:, :, None]
        s = q @ k.swapaxes(-1, -2)  # [B, H_kv, G, N, N]
        if rpb is not None:
            s = s + _dense_rpb(p, rpb).reshape(hk, g, n, n)
        mask = mx.array(neighborhood_mask(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal))
        s = mx.where(mask, s, -mx.inf)
        if additional_keys is not None:
            ek = additional_keys.astype(mx.float32).transpose(0, 2, 1, 3)[:, :, None]
            ev = additional_values.astype(mx.float32).transpose(0, 2, 1, 3)[:, :, None]
            s = mx.concatenate([s, q @ ek.swapaxes(-1, -2)], axis=-1)
            v = mx.concatenate([v, ev], axis=-2)
        lse = mx.logsumexp(s, axis=-1)
        out = mx.exp(s - lse[..., None]) @ v
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, *p.spatial, h, -1).astype(p.dtype)
        return out, lse.transpose(0, 3, 1, 2).reshape(b, *p.spatial, h)


def _dense_rpb(p, rpb) -> mx.array:
    """``[H, N, N]`` bias: ``rpb[h, rel(query, key)]`` for keys in the window, 0 elsewhere (masked anyway).

    Relative offsets follow SEMANTICS.md through the window tables' ``rpb_index``."""
    t = neighborhood_tables(p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal)
    n = p.num_tokens
    flat = rpb.astype(mx.float32).reshape(p.heads, -1)
    cols = mx.array(t.key_index.reshape(-1))
    rows = mx.array(np.repeat(np.arange(n, dtype=np.int32), t.key_index.shape[1]))
    vals = mx.take(flat, mx.array(t.rpb_index.reshape(-1)), axis=1)  # [H, N * Kt]
    return mx.zeros((p.heads, n, n), mx.float32).at[:, rows, cols].add(vals)


class OwnBackwardToy(DenseToy):
    """DenseToy with its own fused backward (the pure backend's, counted; or zeros when asked)."""

    description = "toy: own backward"

    def __init__(self, name: str = "toy-bwd", priority: int | None = None, zero_grads: bool = False, **kw):
        super().__init__(name, priority, **kw)
        self.zero_grads = zero_grads
        self.backward_calls = 0
        self.records = []

    def fused_backward(self, record):
        self.backward_calls += 1
        self.records.append(record)
        grads = _PURE.fused_backward(record)
        if self.zero_grads:
            return {n: None if g is None else mx.zeros_like(g) for n, g in grads.items()}
        return grads


class SplitToy(DenseToy):
    """Split forwards borrowed from the pure backend, no split backwards: the core must supply them."""

    def __init__(self, name: str = "toy-split", priority: int | None = None, **kw):
        super().__init__(name, priority, **kw)
        self.split_calls = {"qk": 0, "av": 0}

    def qk_forward(self, problem, query, key, additional_keys=None, rpb=None):
        self.split_calls["qk"] += 1
        return _PURE.qk_forward(problem, query, key, additional_keys, rpb)

    def av_forward(self, problem, attn, value, additional_values=None):
        self.split_calls["av"] += 1
        return _PURE.av_forward(problem, attn, value, additional_values)


class OwnSplitBackwardToy(SplitToy):
    """SplitToy plus its own split backwards (the pure backend's, counted)."""

    def __init__(self, name: str = "toy-split-bwd", priority: int | None = None, **kw):
        super().__init__(name, priority, **kw)
        self.backward_calls = {"qk": 0, "av": 0}

    def qk_backward(self, record):
        self.backward_calls["qk"] += 1
        return _PURE.qk_backward(record)

    def av_backward(self, record):
        self.backward_calls["av"] += 1
        return _PURE.av_backward(record)


class ConfigurableToy(DenseToy):
    """DenseToy with one option, ``factor`` (multiplies the output), through ``configure``."""

    def __init__(self, name: str = "toy-conf", priority: int | None = None, factor: float = 1.0, **kw):
        super().__init__(name, priority, **kw)
        self.factor = factor
        self.configured = []

    def configure(self, **options):
        unknown = sorted(set(options) - {"factor"})
        if unknown:
            raise TypeError(f"backend {self.name!r} has no option {unknown}; its options: factor")
        copy = ConfigurableToy(self.name, self.priority, **options)
        self.configured.append(copy)
        return copy

    def fused_forward(self, problem, *arrays, **kw):
        out, lse = super().fused_forward(problem, *arrays, **kw)
        return out * self.factor, lse


class WrongToy(DenseToy):
    """Claims every problem and returns a wrong output (a deliberate bug for ``natten-mlx check``)."""

    description = "toy: deliberately wrong"

    def __init__(self, name: str = "toy-wrong", priority: int | None = None, **kw):
        super().__init__(name, priority, **kw)

    def fused_forward(self, problem, *arrays, **kw):
        out, lse = super().fused_forward(problem, *arrays, **kw)
        return out * 1.5, lse


class RaisingToy(DenseToy):
    """Claims every problem and raises in its forward (a crashing plugin)."""

    def fused_forward(self, problem, *arrays, **kw):
        raise RuntimeError("toy kernel crashed")


# ---- fakes of discovery ----------------------------------------------------------------------------
class FakeDistribution:
    """What the registry reads of ``importlib.metadata.Distribution``: ``metadata["Name"]`` and ``version``."""

    def __init__(self, name: str, version: str):
        self.metadata = {"Name": name}
        self.version = version


class FakeEntryPoint:
    """Stands in for ``importlib.metadata.EntryPoint``: ``.name``, ``.load()``, ``.dist``.

    ``target`` is what ``load()`` returns, or an exception instance that ``load()`` raises (an
    import that fails).
    """

    group = "natten_mlx.backends"

    def __init__(self, name: str, target, distribution: str = "fake-plugin", version: str = "1.2.3"):
        self.name = name
        self.value = f"fake_{name.replace('-', '_')}"
        self._target = target
        self.dist = FakeDistribution(distribution, version)
        self.loads = 0

    def load(self):
        self.loads += 1
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def plugin_module(name: str, *backends, hook=None) -> types.ModuleType:
    """A module object holding a ``natten_mlx_register_backends`` hook that registers ``backends``
    (or the given ``hook`` function)."""
    from natten_mlx import hookimpl

    module = types.ModuleType(name)
    if hook is None:

        @hookimpl
        def natten_mlx_register_backends(register):
            for backend in backends:
                register(backend)

        hook = natten_mlx_register_backends
    module.natten_mlx_register_backends = hook
    return module


# ---- inputs -----------------------------------------------------------------------------------------
def qkv(spatial=(7, 6), heads=2, kv_heads=2, head_dim=4, value_dim=None, batch=1, seed=0, dtype=None):
    """Random ``(query, key, value)`` in the heads-last layout ``[B, *spatial, H, D]``."""
    rng = np.random.default_rng(seed)
    dv = value_dim or head_dim
    arrays = (
        rng.standard_normal((batch, *spatial, heads, head_dim)),
        rng.standard_normal((batch, *spatial, kv_heads, head_dim)),
        rng.standard_normal((batch, *spatial, kv_heads, dv)),
    )
    return tuple(mx.array(a.astype(np.float32)).astype(dtype or mx.float32) for a in arrays)


def fused(q, k, v, kernel_size=3, **kw):
    """The validated Problem of the fused call ``na*d(q, k, v, kernel_size, **kw)``."""
    from natten_mlx.problem import fused_problem

    args = dict(stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None, additional_values=None,
                rpb=None, return_lse=False)
    args.update(kw)
    return fused_problem(q.ndim - 3, q, k, v, kernel_size, *args.values())
