"""The pure backend's strategies as the tools see them: which one runs here, and how to force one.

The pure backend computes the same function three ways (``slices``, ``gather``, ``tiled``) and
picks one per device. ``check`` compares them with each other and ``bench`` times each.
"""

from __future__ import annotations

import os

import mlx.core as mx

import natten_mlx


def _module():
    from natten_mlx.backends import pure

    return pure


def names() -> tuple[str, ...]:
    """The pure backend's strategies, e.g. ``("slices", "gather", "tiled")``."""
    return tuple(_module().STRATEGIES)


def device_type(device=None) -> str:
    """``"cpu"`` or ``"gpu"``: the type of ``device`` (default: MLX's default device)."""
    device = mx.default_device() if device is None else device
    return "gpu" if device == mx.gpu else "cpu"


def forced_by_environment() -> str | None:
    """The strategy ``NATTEN_MLX_PURE_STRATEGY`` forces on the whole process, or None."""
    return os.environ.get(_module().STRATEGY_ENV) or None


def here(device=None) -> str:
    """The strategy the pure backend runs on ``device`` (default: MLX's default device) when none
    is forced. ``slices`` may still hand a geometry with too many slices to ``gather``."""
    configured = getattr(natten_mlx.get_backend("pure"), "strategy", None)
    return configured or _module().default_strategy(device_type(device))


def configured(strategy: str):
    """The pure backend configured to run ``strategy`` (pass it as an op's ``backend=``)."""
    if strategy not in names():
        raise ValueError(f"strategy={strategy!r} is not a pure strategy; choose one of {names()}")
    return natten_mlx.get_backend("pure").configure(strategy=strategy)
