"""``natten.context`` of NATTEN 0.20.1 and 0.21.7 (identical in both; ``v020.context`` and
``v021.context`` re-export this module, so the two eras share its state).

Switches recorded and readable back; none changes a result: KV parallelism, the memory preference
and Flex compilation concern upstream's CUDA/Flex kernels. Deterministic mode refuses KV
parallelism with a RuntimeError, as upstream. The switches 0.17 defines alike (memory preference,
deterministic mode, KV parallelism) come from ``_context``; the Flex compilation ones are 0.2x's own.
"""

from __future__ import annotations

from ._context import GlobalSwitches, MemoryUsagePreference, natten_context_defaults, shared_switches


class NattenContext(GlobalSwitches):
    _DEFAULTS = natten_context_defaults(
        is_kv_parallelism_enabled=True, flex_compile_allowed=False, flex_compile_backprop_allowed=False
    )


_SHARED = shared_switches(NattenContext, __name__)
globals().update(vars(_SHARED))


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
    *vars(_SHARED),
    "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed",
    "allow_flex_compile",
    "allow_flex_compile_backprop",
    "disable_flex_compile",
    "disable_flex_compile_backprop",
]
