"""The ``NeighborhoodAttention1D/2D`` modules of NATTEN 0.14.6 (0.15.1 keeps them unchanged)."""

from __future__ import annotations

from .._legacy_modules import LegacyNeighborhoodAttention


def check_kernel_and_dilation(kernel_size, dilation):
    """0.14's module checks: an odd ``kernel_size > 1`` and ``dilation`` None or ``>= 1``."""
    if not (isinstance(kernel_size, int) and kernel_size > 1 and kernel_size % 2 == 1):
        raise ValueError(f"Kernel size must be an odd number greater than 1, got {kernel_size}.")
    if not (dilation is None or dilation >= 1):
        raise ValueError(f"Dilation must be greater than or equal to 1, got {dilation}.")
    return dilation or 1


class _SquareNeighborhoodAttention(LegacyNeighborhoodAttention):
    """1D/2D module of 0.14/0.15: one int ``kernel_size`` and ``dilation`` for every axis."""

    _NA_DIM = 0
    _BIAS_REPR = "rel_pos_bias"

    def __init__(self, dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        dilation = check_kernel_and_dilation(kernel_size, dilation)
        n = self._NA_DIM
        super().__init__(
            na_dim=n, dim=dim, num_heads=num_heads, kernel_size=(kernel_size,) * n, dilation=(dilation,) * n,
            is_causal=(False,) * n, rel_pos_bias=bias, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=proj_drop, pad_axes=(True,) * n,
        )
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation

    def _extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, {self._BIAS_REPR}={self.rpb is not None}"
        )
