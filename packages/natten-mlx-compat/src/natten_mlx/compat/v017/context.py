"""``natten.context`` of NATTEN 0.17.5: global switches, recorded and readable back.

None of them changes a result here: upstream's fused (FNA), Flex Attention, GEMM and tiled
kernels, its auto-tuner, KV parallelism and memory preference pick among CUDA implementations of
the same function. Two behaviours follow upstream because they are observable:
``NeighborhoodAttention*D`` skip attention dropout while fused NA is enabled (upstream's fused
kernels have none), and deterministic mode refuses KV parallelism and the auto-tuner
(RuntimeError), as upstream.
"""

from __future__ import annotations

from .. import _capabilities, _context, _exports
from .._context import MemoryUsagePreference

_PROBES = _exports.reexport(globals(), _capabilities, _capabilities.PROBES_017)


class NattenContext(_context.GlobalSwitches):
    _DEFAULTS = _context.natten_context_defaults(
        is_fused_na_enabled=False, is_kv_parallelism_enabled=False, use_flex_attention=False, force_flex_attention=False
    )


_SHARED = _context.shared_switches(NattenContext, __name__)
globals().update(vars(_SHARED))


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False):
    if not mode:
        NattenContext.is_fused_na_enabled = False
        NattenContext.use_flex_attention = False
        NattenContext.force_flex_attention = False
        _SHARED.use_kv_parallelism_in_fused_na(False)
        return
    _SHARED.use_kv_parallelism_in_fused_na(kv_parallel)
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


class AutotunerContext(_context.GlobalSwitches):
    _DEFAULTS = {
        "enabled_for_forward": False, "enabled_for_backward": False,
        "thorough_mode_forward": False, "thorough_mode_backward": False,
        "warmup_steps_forward": 5, "warmup_steps_backward": 5, "steps_forward": 5, "steps_backward": 5,
    }


def _set(name: str, value, kind):
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"Expected `{kind.__name__}`, got {type(value)}.")
    if name.startswith("enabled_for_") and value and _SHARED.are_deterministic_algorithms_enabled():
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


_SWITCHES = _capabilities.KernelSwitches()


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


def _switch(name: str, use, is_enabled, mode: bool):
    def switch() -> bool:
        use(mode)
        return is_enabled()

    return _exports.named(name, switch)


enable_tf32 = _switch("enable_tf32", use_tf32_in_gemm_na, is_tf32_in_gemm_na_enabled, True)
disable_tf32 = _switch("disable_tf32", use_tf32_in_gemm_na, is_tf32_in_gemm_na_enabled, False)
enable_gemm_na = _switch("enable_gemm_na", use_gemm_na, is_gemm_na_enabled, True)
disable_gemm_na = _switch("disable_gemm_na", use_gemm_na, is_gemm_na_enabled, False)
enable_tiled_na = _switch("enable_tiled_na", use_tiled_na, is_tiled_na_enabled, True)
disable_tiled_na = _switch("disable_tiled_na", use_tiled_na, is_tiled_na_enabled, False)


__all__ = [
    "MemoryUsagePreference", "NattenContext", "AutotunerContext", *vars(_SHARED),
    "use_fused_na", "is_fused_na_enabled", "use_flex_attention",
    "force_flex_attention", "should_use_flex_attention", "should_force_flex_attention", "use_fna",
    "is_fna_enabled", "use_autotuner", "disable_autotuner", "is_autotuner_enabled",
    "is_autotuner_enabled_for_forward", "is_autotuner_enabled_for_backward",
    "is_autotuner_thorough_for_forward", "is_autotuner_thorough_for_backward", *_PROBES,
    "use_tf32_in_gemm_na", "is_tf32_in_gemm_na_enabled", "use_tiled_na",
    "is_tiled_na_enabled", "use_gemm_na", "is_gemm_na_enabled", "enable_tf32", "disable_tf32",
    "enable_gemm_na", "disable_gemm_na", "enable_tiled_na", "disable_tiled_na",
]
