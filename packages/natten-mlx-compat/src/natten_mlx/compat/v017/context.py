"""``natten.context`` of NATTEN 0.17.5: global switches, recorded and readable back.

None of them changes a result here: upstream's fused (FNA), Flex Attention, GEMM and tiled
kernels, its auto-tuner, KV parallelism and memory preference pick among CUDA implementations of
the same function. Two behaviours follow upstream because they are observable:
``NeighborhoodAttention*D`` skip attention dropout while fused NA is enabled (upstream's fused
kernels have none), and deterministic mode refuses KV parallelism and the auto-tuner
(RuntimeError), as upstream.
"""

from __future__ import annotations

from enum import Enum

from .._capabilities import (
    KernelSwitches,
    has_bfloat,
    has_cuda,
    has_fna,
    has_fp32_gemm,
    has_fp64_gemm,
    has_fused_na,
    has_gemm,
    has_half,
    has_tf32_gemm,
)


class MemoryUsagePreference(Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


class NattenContext:
    is_deterministic_mode_enabled: bool = False
    is_fused_na_enabled: bool = False
    is_kv_parallelism_enabled: bool = False
    use_flex_attention: bool = False
    force_flex_attention: bool = False
    training_memory_preference: MemoryUsagePreference = MemoryUsagePreference.Default

    @staticmethod
    def reset():
        NattenContext.is_deterministic_mode_enabled = False
        NattenContext.is_fused_na_enabled = False
        NattenContext.use_flex_attention = False
        NattenContext.force_flex_attention = False
        NattenContext.is_kv_parallelism_enabled = False
        NattenContext.training_memory_preference = MemoryUsagePreference.Default


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


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False):
    if not mode:
        NattenContext.is_fused_na_enabled = False
        NattenContext.use_flex_attention = False
        NattenContext.force_flex_attention = False
        use_kv_parallelism_in_fused_na(False)
        return
    use_kv_parallelism_in_fused_na(kv_parallel)
    NattenContext.is_fused_na_enabled = True
    NattenContext.use_flex_attention = use_flex_attention
    NattenContext.force_flex_attention = force_flex_attention


def is_fused_na_enabled() -> bool:
    return NattenContext.is_fused_na_enabled


def use_flex_attention():
    return use_fused_na(mode=True, use_flex_attention=True, force_flex_attention=False)


def force_flex_attention():
    return use_fused_na(mode=True, use_flex_attention=True, force_flex_attention=True)


def should_use_flex_attention() -> bool:
    return NattenContext.use_flex_attention


def should_force_flex_attention() -> bool:
    return NattenContext.force_flex_attention


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


class AutotunerContext:
    enabled_for_forward: bool = False
    enabled_for_backward: bool = False
    thorough_mode_forward: bool = False
    thorough_mode_backward: bool = False
    warmup_steps_forward: int = 5
    warmup_steps_backward: int = 5
    steps_forward: int = 5
    steps_backward: int = 5

    @staticmethod
    def reset():
        for name, value in _AUTOTUNER_DEFAULTS.items():
            setattr(AutotunerContext, name, value)


_AUTOTUNER_DEFAULTS = {
    "enabled_for_forward": False, "enabled_for_backward": False,
    "thorough_mode_forward": False, "thorough_mode_backward": False,
    "warmup_steps_forward": 5, "warmup_steps_backward": 5, "steps_forward": 5, "steps_backward": 5,
}


def _set(name: str, value, kind):
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"Expected `{kind.__name__}`, got {type(value)}.")
    if name.startswith("enabled_for_") and value and are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "You enabled NATTEN's deterministic mode, but attempted to enable auto-tuning, "
            "which results in non-determinism."
        )
    setattr(AutotunerContext, name, value)


def use_autotuner(forward_pass=None, backward_pass=None, thorough_mode_forward=None, thorough_mode_backward=None,
                  warmup_steps_forward=None, warmup_steps_backward=None, steps_forward=None, steps_backward=None):
    if forward_pass is not None and backward_pass is not None and not forward_pass and not backward_pass:
        AutotunerContext.enabled_for_forward = False
        AutotunerContext.enabled_for_backward = False
        return
    _set("enabled_for_forward", forward_pass, bool)
    _set("enabled_for_backward", backward_pass, bool)
    _set("thorough_mode_forward", thorough_mode_forward, bool)
    _set("thorough_mode_backward", thorough_mode_backward, bool)
    _set("warmup_steps_forward", warmup_steps_forward, int)
    _set("warmup_steps_backward", warmup_steps_backward, int)
    _set("steps_forward", steps_forward, int)
    _set("steps_backward", steps_backward, int)


def disable_autotuner():
    AutotunerContext.enabled_for_forward = False
    AutotunerContext.enabled_for_backward = False
    AutotunerContext.thorough_mode_forward = False
    AutotunerContext.thorough_mode_backward = False


def is_autotuner_enabled() -> bool:
    return AutotunerContext.enabled_for_forward or AutotunerContext.enabled_for_backward


def is_autotuner_enabled_for_forward() -> bool:
    return AutotunerContext.enabled_for_forward


def is_autotuner_enabled_for_backward() -> bool:
    return AutotunerContext.enabled_for_backward


def is_autotuner_thorough_for_forward() -> bool:
    return AutotunerContext.thorough_mode_forward


def is_autotuner_thorough_for_backward() -> bool:
    return AutotunerContext.thorough_mode_backward


_SWITCHES = KernelSwitches()


def use_tf32_in_gemm_na(mode: bool = True):
    """Accepted; TF32 stays off (there is no GEMM kernel), as in a libnatten without CUTLASS."""


def is_tf32_in_gemm_na_enabled() -> bool:
    return False


def use_tiled_na(mode: bool = True):
    _SWITCHES.tiled_na = bool(mode)


def is_tiled_na_enabled() -> bool:
    return _SWITCHES.tiled_na


def use_gemm_na(mode: bool = True):
    _SWITCHES.gemm_na = bool(mode)


def is_gemm_na_enabled() -> bool:
    return _SWITCHES.gemm_na


def enable_tf32() -> bool:
    use_tf32_in_gemm_na(True)
    return is_tf32_in_gemm_na_enabled()


def disable_tf32() -> bool:
    use_tf32_in_gemm_na(False)
    return is_tf32_in_gemm_na_enabled()


def enable_gemm_na() -> bool:
    use_gemm_na(True)
    return is_gemm_na_enabled()


def disable_gemm_na() -> bool:
    use_gemm_na(False)
    return is_gemm_na_enabled()


def enable_tiled_na() -> bool:
    use_tiled_na(True)
    return is_tiled_na_enabled()


def disable_tiled_na() -> bool:
    use_tiled_na(False)
    return is_tiled_na_enabled()


__all__ = [
    "MemoryUsagePreference", "NattenContext", "AutotunerContext",
    "set_memory_usage_preference", "get_memory_usage_preference", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "use_deterministic_algorithms",
    "are_deterministic_algorithms_enabled", "use_kv_parallelism_in_fused_na",
    "is_kv_parallelism_in_fused_na_enabled", "use_fused_na", "is_fused_na_enabled", "use_flex_attention",
    "force_flex_attention", "should_use_flex_attention", "should_force_flex_attention", "use_fna",
    "is_fna_enabled", "use_autotuner", "disable_autotuner", "is_autotuner_enabled",
    "is_autotuner_enabled_for_forward", "is_autotuner_enabled_for_backward",
    "is_autotuner_thorough_for_forward", "is_autotuner_thorough_for_backward",
    "has_cuda", "has_half", "has_bfloat", "has_gemm", "has_fna", "has_fused_na", "has_tf32_gemm",
    "has_fp32_gemm", "has_fp64_gemm", "use_tf32_in_gemm_na", "is_tf32_in_gemm_na_enabled", "use_tiled_na",
    "is_tiled_na_enabled", "use_gemm_na", "is_gemm_na_enabled", "enable_tf32", "disable_tf32",
    "enable_gemm_na", "disable_gemm_na", "enable_tiled_na", "disable_tiled_na",
]
