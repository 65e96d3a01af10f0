"""``natten.context`` of NATTEN 0.20.1 and 0.21.7 (identical in both; ``v020.context`` and
``v021.context`` re-export this module, so the two eras share its state).

Switches recorded and readable back; none changes a result: KV parallelism, the memory preference
and Flex compilation concern upstream's CUDA/Flex kernels. Deterministic mode refuses KV
parallelism with a RuntimeError, as upstream.
"""

from __future__ import annotations

from enum import Enum


class MemoryUsagePreference(Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


class NattenContext:
    is_deterministic_mode_enabled: bool = False
    is_kv_parallelism_enabled: bool = True
    training_memory_preference: MemoryUsagePreference = MemoryUsagePreference.Default
    flex_compile_allowed: bool = False
    flex_compile_backprop_allowed: bool = False

    @staticmethod
    def reset():
        NattenContext.is_deterministic_mode_enabled = False
        NattenContext.is_kv_parallelism_enabled = True
        NattenContext.training_memory_preference = MemoryUsagePreference.Default
        NattenContext.flex_compile_allowed = False
        NattenContext.flex_compile_backprop_allowed = False


_PREFERENCES = {
    "default": MemoryUsagePreference.Default,
    "strict": MemoryUsagePreference.Strict,
    "unrestricted": MemoryUsagePreference.Unrestricted,
}


def set_memory_usage_preference(pref: str = "default"):
    if pref not in _PREFERENCES:
        raise ValueError(
            "natten.set_memory_usage_preference allows only one of three settings: "
            f"`default`, `strict`, and `unrestricted`; got {pref!r}."
        )
    NattenContext.training_memory_preference = _PREFERENCES[pref]


def get_memory_usage_preference() -> MemoryUsagePreference:
    return NattenContext.training_memory_preference


def is_memory_usage_default() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Default


def is_memory_usage_strict() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Strict


def is_memory_usage_unrestricted() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Unrestricted


def use_deterministic_algorithms(mode: bool = True):
    NattenContext.is_deterministic_mode_enabled = mode


def are_deterministic_algorithms_enabled() -> bool:
    return NattenContext.is_deterministic_mode_enabled


def use_kv_parallelism_in_fused_na(mode: bool = True):
    if not mode:
        NattenContext.is_kv_parallelism_enabled = False
        return
    if are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "You enabled NATTEN's deterministic mode, but attempted to enable KV parallelism, "
            "which results in non-determinism."
        )
    NattenContext.is_kv_parallelism_enabled = True


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return NattenContext.is_kv_parallelism_enabled


def is_flex_compile_allowed() -> bool:
    return NattenContext.flex_compile_allowed


def is_flex_compile_backprop_allowed() -> bool:
    return NattenContext.flex_compile_backprop_allowed


def allow_flex_compile(mode: bool = True, backprop: bool = False):
    if not mode:
        NattenContext.flex_compile_allowed = False
        NattenContext.flex_compile_backprop_allowed = False
        return
    NattenContext.flex_compile_allowed = True
    if backprop:
        NattenContext.flex_compile_backprop_allowed = True


def allow_flex_compile_backprop(mode: bool = True):
    return allow_flex_compile(is_flex_compile_allowed(), mode)


def disable_flex_compile():
    return allow_flex_compile(False)


def disable_flex_compile_backprop():
    NattenContext.flex_compile_backprop_allowed = False


__all__ = [
    "MemoryUsagePreference",
    "NattenContext",
    "set_memory_usage_preference",
    "get_memory_usage_preference",
    "is_memory_usage_default",
    "is_memory_usage_strict",
    "is_memory_usage_unrestricted",
    "use_deterministic_algorithms",
    "are_deterministic_algorithms_enabled",
    "use_kv_parallelism_in_fused_na",
    "is_kv_parallelism_in_fused_na_enabled",
    "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed",
    "allow_flex_compile",
    "allow_flex_compile_backprop",
    "disable_flex_compile",
    "disable_flex_compile_backprop",
]
