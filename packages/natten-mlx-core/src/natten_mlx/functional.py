"""The public functional API: fused ``na1d/na2d/na3d``, split ``na*d_qk`` / ``na*d_av``,
``merge_attentions``. Heads-last layout: ``[B, *spatial, H, D]``.

Each call is validated into a :class:`~natten_mlx.problem.Problem`, dispatched to a backend and
wrapped in ``mx.custom_function`` so that gradients always exist: the backend's own backward
where it has one, else MLX's autodiff of the pure backend's forward.
"""

from __future__ import annotations

import mlx.core as mx

from . import problem as _p
from .backends.pure import PureBackend
from .dispatch import select

FUSED_INPUTS = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
QK_INPUTS = ("query", "key", "additional_keys", "rpb")
AV_INPUTS = ("attn", "value", "additional_values")

_OPS = {
    "fused": (FUSED_INPUTS, "fused_forward", "fused_backward"),
    "qk": (QK_INPUTS, "qk_forward", "qk_backward"),
    "av": (AV_INPUTS, "av_forward", "av_backward"),
}

_PURE = PureBackend()


_CACHE: dict = {}
_CACHE_SIZE = 256


def _differentiable(problem: _p.Problem, backend, present: tuple[str, ...]):
    """The cached custom_function of (problem, backend, present inputs); backends need not be hashable."""
    key = (problem, id(backend), present)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is backend:
        return hit[1]
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    f = _make_differentiable(problem, backend, present)
    _CACHE[key] = (backend, f)
    return f


def _make_differentiable(problem: _p.Problem, backend, present: tuple[str, ...]):
    """A custom_function of the present inputs (positional, in ``present`` order) -> outputs tuple."""
    names, forward_name, backward_name = _OPS[problem.op]
    fused = problem.op == "fused"

    def run(impl, arrays):
        kwargs = dict(zip(present, arrays))
        args = [kwargs.pop(n) for n in names[: 3 if fused else 2]]
        result = getattr(impl, forward_name)(problem, *args, **kwargs)
        if not fused:
            return (result,)
        out, lse = result
        return (out, lse) if problem.return_lse else (out,)

    @mx.custom_function
    def f(*arrays):
        return run(backend, arrays)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        # a backend without its own backward gets the pure backend's (it recomputes from the inputs)
        backward = getattr(backend, backward_name, None) or getattr(_PURE, backward_name, None)
        if backward is not None:
            full = dict.fromkeys(names)
            full.update(zip(present, primals))
            if fused:
                out = outputs[0]
                lse = outputs[1] if problem.return_lse else None
                d_lse = cotangents[1] if problem.return_lse else None
                grads = backward(problem, *full.values(), out, lse, cotangents[0], d_lse)
            else:
                grads = backward(problem, *full.values(), outputs[0], cotangents[0])
            by_name = dict(zip(names, grads))
            return tuple(by_name[n] for n in present)
        _, grads = mx.vjp(lambda *xs: run(_PURE, xs), list(primals), list(cotangents))
        return tuple(grads)

    return f


def _call(problem: _p.Problem, backend: str | None, arrays: dict):
    impl = select(problem, backend)
    present = tuple(n for n, x in arrays.items() if x is not None)
    outputs = _differentiable(problem, impl, present)(*(arrays[n] for n in present))
    return outputs


def _fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
           additional_values, rpb, return_lse, backend):
    problem = _p.fused_problem(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                               additional_keys, additional_values, rpb, return_lse)
    arrays = dict(query=query, key=key, value=value, additional_keys=additional_keys,
                  additional_values=additional_values, rpb=rpb)
    outputs = _call(problem, backend, arrays)
    return tuple(outputs) if return_lse else outputs[0]


_FUSED_DOC = """Neighborhood attention over {n} spatial axis/axes (fused).

    query ``[B, {axes}, H, D]``, key ``[B, {axes}, H_kv, D]``, value ``[B, {axes}, H_kv, D_v]``
    (``H % H_kv == 0``). ``kernel_size``, ``stride``, ``dilation``: an int or one per axis;
    ``is_causal``: a bool or one per axis. ``stride`` groups queries onto a shared window (the
    output keeps the input's size). ``scale`` defaults to ``D ** -0.5``.
    ``additional_keys`` ``[B, N_extra, H_kv, D]`` / ``additional_values`` ``[B, N_extra, H_kv, D_v]``
    are attended by every query in the same softmax. ``rpb`` ``[H, {rpb}]`` is a relative
    positional bias (not with causal masking). Returns ``out [B, {axes}, H, D_v]``, and with
    ``return_lse=True`` also the float32 logsumexp ``[B, {axes}, H]``. ``backend`` names a backend.
    """


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None):
    return _fused(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None):
    return _fused(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None):
    return _fused(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend)


na1d.__doc__ = _FUSED_DOC.format(n=1, axes="L", rpb="2K-1")
na2d.__doc__ = _FUSED_DOC.format(n=2, axes="X, Y", rpb="2K1-1, 2K2-1")
na3d.__doc__ = _FUSED_DOC.format(n=3, axes="X, Y, Z", rpb="2K1-1, 2K2-1, 2K3-1")


def _qk(na_dim, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend):
    problem = _p.qk_problem(na_dim, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys)
    return _call(problem, backend, dict(query=query, key=key, additional_keys=additional_keys, rpb=rpb))[0]


def _av(na_dim, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend):
    problem = _p.av_problem(na_dim, attn, value, kernel_size, stride, dilation, is_causal, additional_values)
    return _call(problem, backend, dict(attn=attn, value=value, additional_values=additional_values))[0]


_QK_DOC = """Attention scores of {n}D neighborhood attention (split op).

    query ``[B, {axes}, H, D]``, key ``[B, {axes}, H_kv, D]`` -> ``[B, {axes}, H, K_total (+N_extra)]``
    with ``K_total = prod(kernel_size)``: scores times ``scale`` (default ``D ** -0.5``) plus ``rpb``,
    slots row-major over the per-axis window offsets, causal slots past the query ``-inf``, then the
    scores of ``additional_keys``. ``na{n}d_av(softmax(scores), value) == na{n}d(query, key, value)``.
    """

_AV_DOC = """Weighted sum of values of {n}D neighborhood attention (split op).

    attn ``[B, {axes}, H, K_total (+N_extra)]`` (as ``na{n}d_qk`` lays it out), value
    ``[B, {axes}, H_kv, D_v]``, ``additional_values [B, N_extra, H_kv, D_v]`` -> ``[B, {axes}, H, D_v]``.
    """


def na1d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None):
    return _qk(1, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend)


def na2d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None):
    return _qk(2, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend)


def na3d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None):
    return _qk(3, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend)


def na1d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None):
    return _av(1, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend)


def na2d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None):
    return _av(2, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend)


def na3d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None):
    return _av(3, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend)


for _n, (_qkf, _avf) in enumerate(((na1d_qk, na1d_av), (na2d_qk, na2d_av), (na3d_qk, na3d_av)), start=1):
    _axes = ("L", "X, Y", "X, Y, Z")[_n - 1]
    _qkf.__doc__ = _QK_DOC.format(n=_n, axes=_axes)
    _avf.__doc__ = _AV_DOC.format(n=_n, axes=_axes)


def merge_attentions(outputs, lses):
    """Merge attentions over disjoint key sets by their logsumexps.

    outputs: a sequence of ``[B, *spatial, H, D_v]`` arrays; lses: matching ``[B, *spatial, H]``.
    Returns ``(out, lse)``: ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``,
    computed in float32; out in the outputs' dtype, lse float32.
    """
    if not isinstance(outputs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(
            f"merge_attentions takes sequences of arrays, got outputs={type(outputs).__name__}, lses={type(lses).__name__}"
        )
    if len(outputs) != len(lses) or len(outputs) < 2:
        raise ValueError(
            f"merge_attentions needs at least 2 outputs and as many lses; got {len(outputs)} outputs and {len(lses)} lses"
        )
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if not isinstance(o, mx.array) or not isinstance(l, mx.array):
            raise TypeError(f"outputs[{i}] and lses[{i}] must be mlx.core.array")
        if tuple(o.shape) != tuple(outputs[0].shape) or o.dtype != outputs[0].dtype:
            raise ValueError(
                f"outputs[{i}] has shape {tuple(o.shape)} and dtype {o.dtype}; all outputs need "
                f"{tuple(outputs[0].shape)} and {outputs[0].dtype}"
            )
        if tuple(l.shape) != tuple(o.shape[:-1]):
            raise ValueError(f"lses[{i}] has shape {tuple(l.shape)}; expected the output's shape without D_v: {tuple(o.shape[:-1])}")
    stacked = mx.stack([l.astype(mx.float32) for l in lses])
    lse = mx.logsumexp(stacked, axis=0)
    weights = mx.exp(stacked - lse)
    out = sum(w[..., None] * o.astype(mx.float32) for w, o in zip(weights, outputs))
    return out.astype(outputs[0].dtype), lse
