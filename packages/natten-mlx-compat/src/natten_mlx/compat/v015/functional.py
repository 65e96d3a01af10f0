"""``natten.functional`` of NATTEN 0.15.1: heads-first split ops with additional keys/values.

``query``/``key``/``value``: ``[B, H, *spatial, D]``; attention weights
``[B, H, *spatial, K1*K2*K3 + N_extra]`` (the neighborhood slots row-major, then one slot per
additional token); ``additional_keys``/``additional_values``: ``[B, H, N_extra, D]``. The QK ops do
not scale. 3D ops take ``kernel_size_d, kernel_size`` and ``dilation_d, dilation``: the depth axis
first, then one value shared by height and width. The ``natten*`` names are 0.14's aliases.
"""

from __future__ import annotations

from .. import _capabilities, _exports, _heads_first

_PROBES = _exports.reexport(globals(), _capabilities, _capabilities.PROBES_015)
_SWITCHES = _capabilities.KernelSwitches()


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


def _split_ops(na_dim):
    """``na{n}d_qk``, ``na{n}d_qk_with_bias``, ``na{n}d_av`` and ``natten{n}dqkrpb`` of the 1D/2D form."""

    def qk(query, key, kernel_size, dilation, additional_keys=None):
        return _heads_first.qk(na_dim, query, key, kernel_size, dilation, additional_keys=additional_keys)

    def qk_with_bias(query, key, bias, kernel_size, dilation, additional_keys=None):
        return _heads_first.qk(na_dim, query, key, kernel_size, dilation, rpb=bias, additional_keys=additional_keys)

    def av(attn, value, kernel_size, dilation, additional_values=None):
        return _heads_first.av(na_dim, attn, value, kernel_size, dilation, additional_values=additional_values)

    def qkrpb(query, key, rpb, kernel_size, dilation):
        return qk_with_bias(query, key, rpb, kernel_size, dilation)

    return (_exports.named(f"na{na_dim}d_qk", qk), _exports.named(f"na{na_dim}d_qk_with_bias", qk_with_bias),
            _exports.named(f"na{na_dim}d_av", av), _exports.named(f"natten{na_dim}dqkrpb", qkrpb))


na1d_qk, na1d_qk_with_bias, na1d_av, natten1dqkrpb = _split_ops(1)
na2d_qk, na2d_qk_with_bias, na2d_av, natten2dqkrpb = _split_ops(2)


def _3d(kernel_size_d, kernel_size, dilation_d, dilation):
    return (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)


def na3d_qk_with_bias(query, key, bias, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.qk(3, query, key, ks, dil, rpb=bias, additional_keys=additional_keys)


def na3d_qk(query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.qk(3, query, key, ks, dil, additional_keys=additional_keys)


def na3d_av(attn, value, kernel_size_d, kernel_size, dilation_d, dilation, additional_values=None):
    ks, dil = _3d(kernel_size_d, kernel_size, dilation_d, dilation)
    return _heads_first.av(3, attn, value, ks, dil, additional_values=additional_values)


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
    *_PROBES,
    "enable_tf32", "disable_tf32", "enable_tiled_na", "disable_tiled_na", "enable_gemm_na", "disable_gemm_na",
]
