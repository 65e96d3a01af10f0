"""The public functional API: fused ``na1d/na2d/na3d``, split ``na*d_qk`` / ``na*d_av``,
``merge_attentions``, and ``na_subdomain`` (a query range against a key slab, for sharded
attention). Heads-last layout: ``[B, *spatial, H, D]``.

Each call is validated into a :class:`~natten_mlx.problem.Problem` and dispatched to a backend
(:mod:`natten_mlx.dispatch`). Gradients always exist, in the way the backend declares
(:data:`natten_mlx.protocol.DIFFERENTIATION`): its own backward inside ``mx.custom_function``,
its MLX primitives' own vjp (called directly), or the pure backend's backward. The fused forward's
lse is kept for the backward whether or not the caller asked for it.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx

from . import problem as _p
from .dispatch import get_backend, select
from .protocol import BackwardRecord, differentiation_of

FUSED_INPUTS = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
QK_INPUTS = ("query", "key", "additional_keys", "rpb")
AV_INPUTS = ("attn", "value", "additional_values")

_OPS = {
    "fused": (FUSED_INPUTS, "fused_forward", "fused_backward"),
    "qk": (QK_INPUTS, "qk_forward", "qk_backward"),
    "av": (AV_INPUTS, "av_forward", "av_backward"),
}

_CACHE: dict = {}
_CACHE_SIZE = 256


def _on(stream):
    """``with mx.stream(stream)`` when a stream (or device) was given."""
    return nullcontext() if stream is None else mx.stream(stream)


def _forward(problem: _p.Problem, impl, present: tuple[str, ...], arrays, stream) -> tuple:
    """``impl``'s forward on the present inputs -> ``(out, lse)`` (fused) or ``(result,)`` (split)."""
    names, forward_name, _ = _OPS[problem.op]
    kwargs = dict(zip(present, arrays))
    args = [kwargs.pop(n) for n in names[: 3 if problem.op == "fused" else 2]]
    with _on(stream):
        result = getattr(impl, forward_name)(problem, *args, **kwargs)
    if problem.op != "fused":
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(f"backend {impl.name!r}: fused_forward must return (out, lse), got {type(result).__name__}")
    out, lse = result
    if lse is None and problem.return_lse:
        raise TypeError(f"backend {impl.name!r}: fused_forward returned lse=None for a call that asked for the lse")
    return out, lse


def _backward_of(problem: _p.Problem, impl):
    """The backward method that serves ``impl``'s op: its own (a backend that declares "pure"
    opts out of it), else the pure backend's."""
    backward_name = _OPS[problem.op][2]
    own = getattr(impl, backward_name, None)
    if getattr(impl, "differentiation", None) != "pure" and callable(own):
        return own
    return getattr(get_backend("pure"), backward_name)


def _differentiable(problem: _p.Problem, backend, present: tuple[str, ...], stream):
    """The cached custom_function of (problem, backend, present inputs, stream); backends need not be hashable."""
    key = (problem, id(backend), present, None if stream is None else str(stream))
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is backend:
        return hit[1]
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    f = _make_differentiable(problem, backend, present, stream)
    _CACHE[key] = (backend, f)
    return f


def _make_differentiable(problem: _p.Problem, backend, present: tuple[str, ...], stream):
    """A custom_function of the present inputs (positional, in ``present`` order) -> outputs tuple."""
    names = _OPS[problem.op][0]
    fused = problem.op == "fused"
    # pure's fused forward may skip the lse when the caller did not ask for it (its backward
    # recomputes); custom_function outputs must be arrays, so it is carried as an empty array
    none = mx.zeros((0,), mx.float32)

    @mx.custom_function
    def f(*arrays):
        outputs = _forward(problem, backend, present, arrays, stream)
        return tuple(none if x is None else x for x in outputs)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        inputs = dict.fromkeys(names)
        inputs.update(zip(present, primals))
        lse = outputs[1] if fused and outputs[1].size else None
        record = BackwardRecord(
            problem=problem,
            inputs=inputs,
            out=outputs[0],
            lse=lse,
            d_out=cotangents[0],
            d_lse=cotangents[1] if fused and problem.return_lse else None,
        )
        with _on(stream):
            grads = _backward_of(problem, backend)(record)
        if not isinstance(grads, dict):
            raise TypeError(
                f"backend {backend.name!r}: {_OPS[problem.op][2]} must return a dict of gradients by input name, "
                f"got {type(grads).__name__}"
            )
        missing = [n for n in present if grads.get(n) is None]
        if missing:
            raise TypeError(f"backend {backend.name!r}: {_OPS[problem.op][2]} returned no gradient for {missing}")
        return tuple(grads[n] for n in present)

    return f


def _empty(problem: _p.Problem) -> tuple:
    """Outputs of a batch-0 call: empty arrays of the right shapes (as MLX's own ops return)."""
    p = problem
    if p.op == "fused":
        return (mx.zeros((0, *p.spatial, p.heads, p.value_head_dim), p.dtype), mx.zeros((0, *p.spatial, p.heads), mx.float32))
    last = p.window_size + p.num_extra if p.op == "qk" else p.value_head_dim
    return (mx.zeros((0, *p.spatial, p.heads, last), p.dtype),)


def _call(problem: _p.Problem, backend, arrays: dict, stream=None) -> tuple:
    """Dispatch a validated call and run it differentiably; returns the outputs tuple."""
    if problem.batch == 0:
        return _empty(problem)
    impl = select(problem, backend)
    present = tuple(n for n, x in arrays.items() if x is not None)
    if differentiation_of(impl) == "primitive":
        # the outputs come from MLX primitives with their own vjp: autodiff reaches them directly
        return _forward(problem, impl, present, [arrays[n] for n in present], stream)
    outputs = _differentiable(problem, impl, present, stream)(*(arrays[n] for n in present))
    if problem.op == "fused" and not outputs[1].size:
        return outputs[0], None
    return outputs


def _fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
           additional_values, rpb, return_lse, backend, stream, subdomain=None):
    problem = _p.fused_problem(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                               additional_keys, additional_values, rpb, return_lse, stream, subdomain)
    arrays = dict(query=query, key=key, value=value, additional_keys=additional_keys,
                  additional_values=additional_values, rpb=rpb)
    outputs = _call(problem, backend, arrays, stream)
    return (outputs[0], outputs[1]) if return_lse else outputs[0]


_FUSED_DOC = """Neighborhood attention over {n} spatial axis/axes (fused).

    query ``[B, {axes}, H, D]``, key ``[B, {axes}, H_kv, D]``, value ``[B, {axes}, H_kv, D_v]``
    (``H % H_kv == 0``). ``kernel_size``, ``stride``, ``dilation``: an int or one per axis;
    ``is_causal``: a bool or one per axis. ``stride`` groups queries onto a shared window (the
    output keeps the input's size). ``scale`` defaults to ``D ** -0.5``.
    ``additional_keys`` ``[B, N_extra, H_kv, D]`` / ``additional_values`` ``[B, N_extra, H_kv, D_v]``
    are attended by every query in the same softmax. ``rpb`` ``[H, {rpb}]`` is a relative
    positional bias (not with causal masking). Returns ``out [B, {axes}, H, D_v]``, and with
    ``return_lse=True`` also the float32 logsumexp ``[B, {axes}, H]``.

    ``backend``: a backend name, a comma-separated ordered list (``"cuda,pure"``: the first that
    serves the call), a sequence of names or backend objects, or a backend object (e.g.
    ``get_backend("pure").configure(strategy="gather")``); None: :func:`natten_mlx.use_backend`,
    ``NATTEN_BACKEND``, else the highest-priority backend that serves the call.
    ``stream``: an ``mx.Stream`` or ``mx.Device`` the call (forward and backward) runs on; None: MLX's
    default. A batch of 0 (``B == 0``) returns empty arrays of the right shapes; ``H``, ``H_kv``,
    ``D`` and ``D_v`` must be >= 1.
    """


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None, stream=None):
    return _fused(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend, stream)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None, stream=None):
    return _fused(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend, stream)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, rpb=None, return_lse=False, backend=None, stream=None):
    return _fused(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend, stream)


def na_subdomain(query, key, value, kernel_size, *, domain, query_offset, kv_offset, stride=1, dilation=1,
                 is_causal=False, scale=None, additional_keys=None, additional_values=None, rpb=None,
                 return_lse=False, backend=None, stream=None):
    """Neighborhood attention of a block of queries against a slab of keys, both parts of a larger
    domain: one rank's share of sharded attention (``natten_mlx.distributed``).

    query ``[B, *q_spatial, H, D]`` holds the queries at global positions ``query_offset +
    (0 .. q_spatial - 1)`` per axis; key/value ``[B, *kv_spatial, H_kv, D|D_v]`` the keys at
    ``kv_offset + (0 .. kv_spatial - 1)``; ``domain`` is the global spatial shape, which the window
    rules (borders, dilation groups, strides, causal) apply to. Every window of the local queries
    (every slot, valid or not) must lie inside the key slab, else ValueError:
    :func:`natten_mlx.windows.key_extent` (or :func:`natten_mlx.geometry.key_extent`) gives, per
    axis, the smallest slab ``[lo, hi)`` a query range needs. The rank (1, 2 or 3 spatial axes) is
    read from the query.

    The result equals the matching slice of the whole-domain op:
    ``na{n}d(Q, K, V, ...)[query range] == na_subdomain(Q[query range], K[slab], V[slab], ...,
    domain=Q.spatial, query_offset=..., kv_offset=...)``, and so do the gradients (the slab's key
    and value gradients are its share of the whole-domain ones). The other arguments, the return
    value (``out [B, *q_spatial, H, D_v]``, and the float32 lse ``[B, *q_spatial, H]`` with
    ``return_lse=True``), ``backend`` and ``stream`` are those of :func:`na1d`; rpb columns are
    relative offsets as always. Backends that do not serve sub-domain problems say so in
    ``supports()``; the pure backend serves them with every strategy.
    """
    if not isinstance(query, mx.array):
        raise TypeError(f"query must be an mlx.core.array, got {type(query).__name__}")
    na_dim = query.ndim - 3
    if na_dim not in (1, 2, 3):
        raise ValueError(f"query has shape {tuple(query.shape)} (rank {query.ndim}); na_subdomain takes rank 4, 5 or 6 "
                         "([B, *spatial, H, D] with 1-3 spatial axes)")
    subdomain = dict(domain=domain, query_offset=query_offset, kv_offset=kv_offset)
    return _fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, backend, stream, subdomain)


na1d.__doc__ = _FUSED_DOC.format(n=1, axes="L", rpb="2K-1")
na2d.__doc__ = _FUSED_DOC.format(n=2, axes="X, Y", rpb="2K1-1, 2K2-1")
na3d.__doc__ = _FUSED_DOC.format(n=3, axes="X, Y, Z", rpb="2K1-1, 2K2-1, 2K3-1")


def _qk(na_dim, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend, stream):
    problem = _p.qk_problem(na_dim, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys,
                            stream)
    return _call(problem, backend, dict(query=query, key=key, additional_keys=additional_keys, rpb=rpb), stream)[0]


def _av(na_dim, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend, stream):
    problem = _p.av_problem(na_dim, attn, value, kernel_size, stride, dilation, is_causal, additional_values, stream)
    return _call(problem, backend, dict(attn=attn, value=value, additional_values=additional_values), stream)[0]


_QK_DOC = """Attention scores of {n}D neighborhood attention (split op).

    query ``[B, {axes}, H, D]``, key ``[B, {axes}, H_kv, D]`` -> ``[B, {axes}, H, K_total (+N_extra)]``
    with ``K_total = prod(kernel_size)``: scores times ``scale`` (default ``D ** -0.5``) plus ``rpb``,
    slots row-major over the per-axis window offsets, causal slots past the query ``-inf``, then the
    scores of ``additional_keys``. ``na{n}d_av(softmax(scores), value) == na{n}d(query, key, value)``.
    ``backend`` and ``stream`` as for ``na{n}d``.
    """

_AV_DOC = """Weighted sum of values of {n}D neighborhood attention (split op).

    attn ``[B, {axes}, H, K_total (+N_extra)]`` (as ``na{n}d_qk`` lays it out), value
    ``[B, {axes}, H_kv, D_v]``, ``additional_values [B, N_extra, H_kv, D_v]`` -> ``[B, {axes}, H, D_v]``.
    ``backend`` and ``stream`` as for ``na{n}d``.
    """


def na1d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None, stream=None):
    return _qk(1, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend, stream)


def na2d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None, stream=None):
    return _qk(2, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend, stream)


def na3d_qk(query, key, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None,
            additional_keys=None, backend=None, stream=None):
    return _qk(3, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys, backend, stream)


def na1d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None,
            stream=None):
    return _av(1, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend, stream)


def na2d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None,
            stream=None):
    return _av(2, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend, stream)


def na3d_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, backend=None,
            stream=None):
    return _av(3, attn, value, kernel_size, stride, dilation, is_causal, additional_values, backend, stream)


for _n, (_qkf, _avf) in enumerate(((na1d_qk, na1d_av), (na2d_qk, na2d_av), (na3d_qk, na3d_av)), start=1):
    _axes = ("L", "X, Y", "X, Y, Z")[_n - 1]
    _qkf.__doc__ = _QK_DOC.format(n=_n, axes=_axes)
    _avf.__doc__ = _AV_DOC.format(n=_n, axes=_axes)


def merge_attentions(outputs, lses, stream=None):
    """Merge attentions over disjoint key sets by their logsumexps.

    outputs: a sequence of ``[B, *spatial, H, D_v]`` arrays; lses: matching ``[B, *spatial, H]``.
    Returns ``(out, lse)``: ``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``,
    computed in float32; out in the outputs' dtype, lse float32. ``stream``: an ``mx.Stream`` or
    ``mx.Device`` to run on (None: MLX's default).
    """
    _p.device_type(stream)  # a bad stream is a TypeError naming it
    with _on(stream):
        return _merge(outputs, lses)


def _merge(outputs, lses):
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
