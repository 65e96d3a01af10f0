"""What the benchmark times: each installed backend, the pure backend's other strategies, and the
baseline a user would write without this package (dense SDPA under the neighborhood mask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

import natten_mlx

from .. import strategies
from .cases import Case
from .memory import too_big
from .reference import neighborhood_mask

BASELINE = "mlx-sdpa-mask"
# --quick runs the dense baseline only up to this many tokens: beyond it each row takes seconds
QUICK_DENSE_TOKENS = 1024


@dataclass
class Impl:
    """A way to compute a case: ``build(case)`` returns ``f(q, k, v) -> out`` (called per mode).

    ``skip(case, mode)`` returns a reason to leave a row out (e.g. memory), or None.
    """

    name: str
    build: Callable[[Case], Callable]
    skip: Callable[[Case, str], str | None] = lambda case, mode: None


def natten_fn(case: Case, backend) -> Callable:
    """``f(q, k, v)``: the case's op forced onto ``backend`` (a name or a backend object)."""
    op = getattr(natten_mlx, case.op)
    ks, ds = case.kernel_size, case.dilation
    return lambda q, k, v: op(q, k, v, ks, dilation=ds, backend=backend)


def backend_impls(case: Case, q, k, v, strategies_too: bool = True) -> tuple[list[Impl], dict[str, str]]:
    """One Impl per available backend that supports the case; and the reason of every other.

    With ``strategies_too``, each of the pure backend's strategies other than the one it runs
    here gets its own row (``pure[tiled]`` on the CPU).
    """
    impls, skipped = [], {}
    for backend in natten_mlx.list_backends():
        why = natten_mlx.explain(case.op, q, k, v, kernel_size=case.kernel_size, dilation=case.dilation,
                                 backend=backend.name).reasons.get(backend.name)
        if why is not None:
            skipped[backend.name] = why
            continue
        impls.append(Impl(backend.name, lambda c, name=backend.name: natten_fn(c, name)))
        if backend.name == "pure" and strategies_too:
            impls.extend(pure_strategy_impls())
    return impls, skipped


def pure_strategy_impls() -> list[Impl]:
    """``pure[<strategy>]`` for each strategy the pure backend does not run here by default (none
    when the environment already forces one: every row would then run that one)."""
    if strategies.forced_by_environment():
        return []
    default = strategies.here()
    return [Impl(f"pure[{s}]", lambda c, s=s: natten_fn(c, strategies.configured(s)))
            for s in strategies.names() if s != default]


def sdpa_mask_fn(case: Case) -> Callable:
    """``mx.fast.scaled_dot_product_attention`` on ``[B, H, N, D]`` with the dense ``[N, N]`` mask
    (built here, outside the timing; the transposes from and to heads-last are timed)."""
    mask = mx.array(neighborhood_mask(case))
    mx.eval(mask)
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    scale = d**-0.5

    def f(q, k, v):
        t = lambda x: x.reshape(b, n, h, -1).transpose(0, 2, 1, 3)  # noqa: E731
        o = mx.fast.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale, mask=mask)
        return o.transpose(0, 2, 1, 3).reshape(q.shape)

    return f


def baseline_impl(max_bytes: int | None = None, max_tokens: int | None = None) -> Impl:
    """The dense baseline, skipped where it would not fit in ``max_bytes`` (default: what is
    available) or has more than ``max_tokens`` tokens (``--quick``)."""

    def skip(case: Case, mode: str) -> str | None:
        if max_tokens is not None and case.tokens > max_tokens:
            return f"skipped in --quick (more than {max_tokens} tokens)"
        return too_big(case, mode, max_bytes)

    return Impl(BASELINE, sdpa_mask_fn, skip)
