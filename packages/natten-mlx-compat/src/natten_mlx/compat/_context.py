"""What ``natten.context`` of NATTEN 0.17.5 and of 0.20.1/0.21.7 have in common.

Each era keeps its own state (its ``NattenContext``, with its own defaults: KV parallelism is off by
default in 0.17 and on in 0.2x); :func:`shared_switches` makes, for one era's state, the switches
both eras define alike: the memory usage preference, deterministic mode and KV parallelism (which
deterministic mode refuses with a RuntimeError, as upstream).
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace

from ._exports import named


class MemoryUsagePreference(Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


class GlobalSwitches:
    """Upstream's context classes: the switches are class attributes, ``reset()`` restores ``_DEFAULTS``."""

    _DEFAULTS: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.reset()

    @classmethod
    def reset(cls):
        for name, value in cls._DEFAULTS.items():
            setattr(cls, name, value)


def natten_context_defaults(**era_defaults) -> dict:
    """Defaults of an era's ``NattenContext``: those of the shared switches, then the era's own."""
    return {
        "is_deterministic_mode_enabled": False,
        "training_memory_preference": MemoryUsagePreference.Default,
        **era_defaults,
    }


_PREFERENCES = {
    "default": MemoryUsagePreference.Default,
    "strict": MemoryUsagePreference.Strict,
    "unrestricted": MemoryUsagePreference.Unrestricted,
}


def shared_switches(context: type[GlobalSwitches], module: str) -> SimpleNamespace:
    """The shared switches of the era module ``module``, on its ``NattenContext`` ``context``.

    The attributes, in upstream's ``__all__`` order, are the functions for the era module to bind.
    """

    def set_memory_usage_preference(pref: str = "default"):
        if pref not in _PREFERENCES:
            raise ValueError(
                "natten.set_memory_usage_preference allows only one of three settings: "
                f"`default`, `strict`, and `unrestricted`; got {pref!r}."
            )
        context.training_memory_preference = _PREFERENCES[pref]

    def get_memory_usage_preference() -> MemoryUsagePreference:
        return context.training_memory_preference

    def is_memory_usage_default() -> bool:
        return get_memory_usage_preference() == MemoryUsagePreference.Default

    def is_memory_usage_strict() -> bool:
        return get_memory_usage_preference() == MemoryUsagePreference.Strict

    def is_memory_usage_unrestricted() -> bool:
        return get_memory_usage_preference() == MemoryUsagePreference.Unrestricted

    def use_deterministic_algorithms(mode: bool = True):
        context.is_deterministic_mode_enabled = mode

    def are_deterministic_algorithms_enabled() -> bool:
        return context.is_deterministic_mode_enabled

    def use_kv_parallelism_in_fused_na(mode: bool = True):
        if not mode:
            context.is_kv_parallelism_enabled = False
            return
        if are_deterministic_algorithms_enabled():
            raise RuntimeError(
                "You enabled NATTEN's deterministic mode, but attempted to enable KV parallelism, "
                "which results in non-determinism."
            )
        context.is_kv_parallelism_enabled = True

    def is_kv_parallelism_in_fused_na_enabled() -> bool:
        return context.is_kv_parallelism_enabled

    functions = (
        set_memory_usage_preference, get_memory_usage_preference, is_memory_usage_default, is_memory_usage_strict,
        is_memory_usage_unrestricted, use_deterministic_algorithms, are_deterministic_algorithms_enabled,
        use_kv_parallelism_in_fused_na, is_kv_parallelism_in_fused_na_enabled,
    )
    return SimpleNamespace(**{f.__name__: named(f.__name__, f, module) for f in functions})
