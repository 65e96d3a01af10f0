"""``explain``: which backend a call would use, and every other backend's reason."""

from __future__ import annotations

from . import problem as _p
from .dispatch import Explanation, explain_problem

_FUSED = ("kernel_size", "stride", "dilation", "is_causal", "scale", "additional_keys", "additional_values", "rpb",
          "return_lse")
_QK = ("kernel_size", "stride", "dilation", "is_causal", "rpb", "scale", "additional_keys")
_AV = ("kernel_size", "stride", "dilation", "is_causal", "additional_values")
_DEFAULTS = dict(stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None, additional_values=None,
                 rpb=None, return_lse=False)


def _bind(names, args, kwargs, op):
    values = dict(zip(names, args))
    if len(args) > len(names):
        raise TypeError(f"explain({op!r}, ...) got {len(args)} positional arguments after the arrays; at most {len(names)}")
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"explain({op!r}, ...) got an unexpected keyword argument {k!r}")
        if k in values:
            raise TypeError(f"explain({op!r}, ...) got multiple values for argument {k!r}")
        values[k] = v
    if "kernel_size" not in values:
        raise TypeError(f"explain({op!r}, ...) is missing kernel_size")
    return [values.get(n, _DEFAULTS.get(n)) for n in names]


def explain(*args, backend=None, stream=None, **kwargs) -> Explanation:
    """Same arguments as the op, optionally preceded by the op's name.

    ``explain(q, k, v, 7, dilation=2)`` explains the fused op of q's rank;
    ``explain("na2d_qk", q, k, 7)`` or ``explain("na2d_av", attn, v, 7)`` a split op. ``backend``
    and ``stream`` as for the op. Returns an :class:`~natten_mlx.dispatch.Explanation`
    (``.chosen``, ``.how``, ``.reasons``, ``.differentiation``, ``.problem.device``).
    """
    op = args[0] if args and isinstance(args[0], str) else None
    if op is not None:
        args = args[1:]
    if op is None:
        if not args or not hasattr(args[0], "ndim"):
            raise TypeError("explain() takes the op's arrays (query, key, value, ...) optionally after its name")
        op = f"na{args[0].ndim - 3}d"
    kind = {"": "fused", "_qk": "qk", "_av": "av"}
    if len(op) < 4 or not op.startswith("na") or op[2] not in "123" or op[3] != "d" or op[4:] not in kind:
        raise ValueError(f"op={op!r} is not an op; use na1d/na2d/na3d, na*d_qk or na*d_av")
    na_dim, kind = int(op[2]), kind[op[4:]]
    if kind == "fused":
        problem = _p.fused_problem(na_dim, *args[:3], *_bind(_FUSED, args[3:], kwargs, op), stream)
    elif kind == "qk":
        problem = _p.qk_problem(na_dim, *args[:2], *_bind(_QK, args[2:], kwargs, op), stream)
    else:
        problem = _p.av_problem(na_dim, *args[:2], *_bind(_AV, args[2:], kwargs, op), stream)
    return explain_problem(problem, backend)
