"""The pure backend's strategies as the tools see them: which one runs here, and how to force one.

The pure backend computes the same function three ways (``slices``, ``gather``, ``tiled``) and
picks one per device. ``check`` compares them with each other and ``bench`` times each.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

import mlx.core as mx

import natten_mlx


def _module():
    from natten_mlx.backends import pure

    return pure


def names() -> tuple[str, ...]:
    """The pure backend's strategies, e.g. ``("slices", "gather", "tiled")``."""
    return tuple(getattr(_module(), "STRATEGIES", ()))


def device_type(device=None) -> str:
    """``"cpu"`` or ``"gpu"``: the type of ``device`` (default: MLX's default device)."""
    device = mx.default_device() if device is None else device
    return "gpu" if device == mx.gpu else "cpu"


def forced_by_environment() -> str | None:
    """The strategy named by ``NATTEN_MLX_PURE_STRATEGY`` where the core still reads it, else None."""
    env = getattr(_module(), "STRATEGY_ENV", None)
    return (os.environ.get(env) or None) if env else None


def here(device=None) -> str:
    """The strategy the pure backend runs on ``device`` (default: MLX's default device) when none
    is forced. ``slices`` may still hand a geometry with too many slices to ``gather``."""
    pure = _module()
    configured = getattr(natten_mlx.get_backend("pure"), "strategy", None)
    if configured:
        return configured
    choose = pure.default_strategy
    # protocol v2 picks by the problem's device; the older core reads the default device itself
    if inspect.signature(choose).parameters:
        return choose(device_type(device))
    return choose()


def forcing(strategy: str) -> tuple[object, Callable[[], ContextManager]]:
    """``(backend, around)``: pass ``backend=backend`` to an op and make the call (forward and
    backward) inside ``with around():`` to run the pure backend's ``strategy``."""
    if strategy not in names():
        raise ValueError(f"strategy={strategy!r} is not a pure strategy; choose one of {names()}")
    pure = natten_mlx.get_backend("pure")
    if hasattr(pure, "configure"):
        return pure.configure(strategy=strategy), nullcontext
    # Before protocol v2 (issue 7) the strategy could only be forced through the environment;
    # remove this branch once the core's configure() has landed.
    env = _module().STRATEGY_ENV
    return "pure", lambda: _environ({env: strategy})


@contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
