"""What each backend serves, found by asking its own ``supports()`` about representative problems."""

from __future__ import annotations

import mlx.core as mx

from .dispatch import _reason, list_backends
from .plugins import registry
from .problem import Problem
from .protocol import differentiation_of

FEATURES = ("na1d", "na2d", "na3d", "float32", "float16", "bfloat16", "stride", "dilation", "causal", "gqa",
            "rpb", "extra_kv", "return_lse", "split_qk", "split_av")


def devices_served(backend) -> tuple[str, ...]:
    """The device types (``"cpu"``, ``"gpu"``) for which ``backend`` serves a plain 2D problem."""
    return tuple(d for d in ("cpu", "gpu") if _reason(backend, _base(device=d)) is None)


def _base(na_dim: int = 2, **changes) -> Problem:
    n = na_dim
    p = Problem(op="fused", batch=1, spatial=(16,) * n, heads=4, kv_heads=4, head_dim=32, value_head_dim=32,
                kernel_size=(3,) * n, stride=(1,) * n, dilation=(1,) * n, is_causal=(False,) * n,
                scale=32**-0.5, dtype=mx.float32)
    return p.with_(**changes)


def feature_problems() -> dict[str, Problem]:
    """The representative problem of each feature of :data:`FEATURES` (2D unless the feature is a rank)."""
    return {
        "na1d": _base(1),
        "na2d": _base(2),
        "na3d": _base(3),
        "float32": _base(),
        "float16": _base(dtype=mx.float16),
        "bfloat16": _base(dtype=mx.bfloat16),
        "stride": _base(stride=(2, 2)),
        "dilation": _base(dilation=(2, 2)),
        "causal": _base(is_causal=(True, False)),
        "gqa": _base(kv_heads=1),
        "rpb": _base(has_rpb=True),
        "extra_kv": _base(num_extra=8),
        "return_lse": _base(return_lse=True),
        "split_qk": _base(op="qk", value_head_dim=0),
        "split_av": _base(op="av", head_dim=0, scale=1.0),
    }


_BACKWARD_WORDS = {"backward": "own", "primitive": "its primitives' vjp", "pure": "the pure backend's"}


def get_support_matrix() -> list[dict]:
    """One row per registered backend: name, priority, distribution, version, availability (None or
    why not), ``features`` (feature -> None or the backend's reason), ``differentiation``
    ("backward", "primitive" or "pure", see :mod:`natten_mlx.protocol`), ``backward`` (in words:
    "own", "its primitives' vjp", or "the pure backend's") and ``devices`` (the device types it
    serves, asked through ``supports()``: ``("cpu", "gpu")``, ``("cpu",)``, ...)."""
    reg = registry()
    rows = []
    problems = feature_problems()
    for backend in list_backends():
        r = reg.backends[backend.name]
        try:
            unavailable = backend.available()
        except Exception as exc:
            unavailable = f"available() raised {type(exc).__name__}: {exc}"
        rows.append({
            "name": backend.name,
            "priority": backend.priority,
            "distribution": r.distribution,
            "version": r.version,
            "plugin": r.plugin,
            "description": getattr(backend, "description", ""),
            "available": unavailable,
            "features": {f: _reason(backend, p) for f, p in problems.items()},
            "differentiation": differentiation_of(backend),
            "backward": _BACKWARD_WORDS[differentiation_of(backend)],
            "devices": devices_served(backend),
        })
    return rows
