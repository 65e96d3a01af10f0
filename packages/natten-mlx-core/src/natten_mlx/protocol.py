"""The backend protocol: what a plugin's backend object provides. This file is the contract.

A plugin registers backends through the ``natten_mlx_register_backends(register)`` hook
(:mod:`natten_mlx.hookspecs`). The core never passes anything to a backend but a
:class:`~natten_mlx.problem.Problem` and arrays; it validates every call before a backend sees it.

Required
--------
``name: str``
    Unique, lower-case; what ``backend="..."``, ``use_backend`` and ``NATTEN_BACKEND`` name.
``priority: int``
    Higher wins in automatic selection. The pure backend has 0; compiled tiers use 100 and up.
``available() -> str | None``
    None when the backend can run in this process, else why not (missing device, library, ...).
``supports(problem) -> str | None``
    None when the backend computes this problem exactly, else a human-readable reason. It is
    called for every dispatch and must be cheap. A backend without the split ops must answer
    for ``problem.op in ("qk", "av")`` with a reason.
``fused_forward(problem, query, key, value, additional_keys=None, additional_values=None, rpb=None)``
    ``-> (out, lse)``: out ``[B, *spatial, H, Dv]`` in ``problem.dtype``; lse ``[B, *spatial, H]``
    float32 (natural log). lse may be None when ``problem.return_lse`` is False.

Optional
--------
``fused_backward(problem, query, key, value, additional_keys, additional_values, rpb, out, lse, d_out, d_lse)``
    ``-> tuple`` of gradients, one per input in the order of ``fused_forward`` (None for an input
    that was None). Without it, the core differentiates the pure backend's forward.
``qk_forward(problem, query, key, additional_keys=None, rpb=None)``
    ``-> scores [B, *spatial, H, Kt (+N_extra)]``, scaled by ``problem.scale``, rpb added,
    invalid causal slots ``-inf``; slot order as :mod:`natten_mlx.windows` documents.
``av_forward(problem, attn, value, additional_values=None)``
    ``-> out [B, *spatial, H, Dv]``; weights of invalid slots are ignored.
``qk_backward`` / ``av_backward``
    Same convention as ``fused_backward`` (inputs, then outputs, then output cotangents).
``distribution: str``, ``description: str``
    Shown by ``natten-mlx info``; the distribution defaults to the plugin's.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import mlx.core as mx

from .problem import Problem


@runtime_checkable
class Backend(Protocol):
    name: str
    priority: int

    def available(self) -> Optional[str]: ...

    def supports(self, problem: Problem) -> Optional[str]: ...

    def fused_forward(
        self,
        problem: Problem,
        query: mx.array,
        key: mx.array,
        value: mx.array,
        additional_keys: Optional[mx.array] = None,
        additional_values: Optional[mx.array] = None,
        rpb: Optional[mx.array] = None,
    ) -> tuple[mx.array, Optional[mx.array]]: ...


REQUIRED = ("name", "priority", "available", "supports", "fused_forward")
OPTIONAL_METHODS = ("fused_backward", "qk_forward", "av_forward", "qk_backward", "av_backward")


def check_backend(obj) -> None:
    """Raise TypeError naming what a registered object lacks."""
    missing = [a for a in REQUIRED if not hasattr(obj, a)]
    if missing:
        raise TypeError(f"backend {obj!r} lacks {', '.join(missing)} (see natten_mlx.protocol)")
    if not isinstance(obj.name, str) or not obj.name:
        raise TypeError(f"backend {obj!r} has name={obj.name!r}; it must be a non-empty str")
    if isinstance(obj.priority, bool) or not isinstance(obj.priority, int):
        raise TypeError(f"backend {obj.name!r} has priority={obj.priority!r}; it must be an int")
