"""``natten.functional`` of NATTEN 0.15.1: heads-first split ops with additional keys/values.

``query``/``key``/``value``: ``[B, H, *spatial, D]``; attention weights
``[B, H, *spatial, K1*K2*K3 + N_extra]`` (the neighborhood slots row-major, then one slot per
additional token); ``additional_keys``/``additional_values``: ``[B, H, N_extra, D]``. The QK ops do
not scale. 3D ops take ``kernel_size_d, kernel_size`` and ``dilation_d, dilation``: the depth axis
first, then one value shared by height and width. The ``natten*`` names are 0.14's aliases.
"""

from __future__ import annotations

from .. import _heads_first
from .._capabilities import (
    KernelSwitches,
    has_bfloat,
    has_cuda,
    has_fp32_gemm,
    has_fp64_gemm,
    has_gemm,
    has_half,
    has_tf32_gemm,
)

_SWITCHES = KernelSwitches()


def enable_tf32() -> bool:
    """Upstream enables TF32 only where ``has_tf32_gemm()``: here never, so it returns False."""
    return False


def disable_tf32() -> bool:
    return False


def enable_tiled_na():
    _SWITCHES.tiled_na = True


def disable_tiled_na():
    _SWITCHES.tiled_na = False


def enable_gemm_na():
    _SWITCHES.gemm_na = True


def disable_gemm_na():
    _SWITCHES.gemm_na = False


def _3d(kernel_size_d, kernel_size, dilation_d, dilation):
    return (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)


def na1d_qk(query, key, kernel_size, dilation, additional_keys=None):
    return _heads_first.qk(1, query, key, kernel_size, dilation, additional_keys=additional_keys)


def na1d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
    return _heads_first.qk(1, query, key, kernel_size, dilation, rpb=bias, additional_keys=additional_keys)


def na1d_av(attn, value, kernel_size, dilation, additional_values=None):
    return _heads_first.av(1, attn, value, kernel_size, dilation, additional_values=additional_values)


def na2d_qk(query, key, kernel_size, dilation, additional_keys=None):
    return _heads_first.qk(2, query, key, kernel_size, dilation, additional_keys=additional_keys)


def na2d_qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
    return _heads_first.qk(2, query, key, kernel_size, dilation, rpb=bias, additional_keys=additional_keys)


def na2d_av(attn, value, kernel_size, dilation, additional_values=None):
    return _heads_first.av(2, attn, value, kernel_size, dilation, additional_values=additional_values)


def na3d_qk_with_bias(query, key, bias, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.qk(3, query, key, ks, dil, rpb=bias, additional_keys=additional_keys)


def na3d_qk(query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.qk(3, query, key, ks, dil, additional_keys=additional_keys)


def na3d_av(attn, value, kernel_size_d, kernel_size, dilation_d, dilation, additional_values=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.av(3, attn, value, ks, dil, additional_values=additional_values)


def natten1dqkrpb(query, key, rpb, kernel_size, dilation):
    return na1d_qk_with_bias(query, key, rpb, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    return na2d_qk_with_bias(query, key, rpb, kernel_size, dilation)


def natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation):
    return na3d_qk_with_bias(query, key, rpb, kernel_size_d, kernel_size, dilation_d, dilation)


natten1dqk = na1d_qk
natten1dav = na1d_av
natten2dqk = na2d_qk
natten2dav = na2d_av
natten3dqk = na3d_qk
natten3dav = na3d_av

__all__ = [
    "na1d_qk", "na1d_qk_with_bias", "na1d_av", "na2d_qk", "na2d_qk_with_bias", "na2d_av",
    "na3d_qk", "na3d_qk_with_bias", "na3d_av",
    "natten1dqkrpb", "natten2dqkrpb", "natten3dqkrpb",
    "natten1dqk", "natten1dav", "natten2dqk", "natten2dav", "natten3dqk", "natten3dav",
    "has_cuda", "has_half", "has_bfloat", "has_gemm", "has_tf32_gemm", "has_fp32_gemm", "has_fp64_gemm",
    "enable_tf32", "disable_tf32", "enable_tiled_na", "disable_tiled_na", "enable_gemm_na", "disable_gemm_na",
]
