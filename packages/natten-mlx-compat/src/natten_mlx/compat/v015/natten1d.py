"""``natten.natten1d`` of NATTEN 0.15.1 (the 0.14 module; input rank checked)."""

from __future__ import annotations

from ..v014._modules import _SquareNeighborhoodAttention


class NeighborhoodAttention1D(_SquareNeighborhoodAttention):
    """``NeighborhoodAttention1D(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0)``: ``[B, L, dim]`` -> ``[B, L, dim]``; parameters
    ``qkv.weight``, ``qkv.bias``, ``rpb [num_heads, 2K-1]`` (when ``bias``), ``proj.weight``,
    ``proj.bias``; inputs shorter than ``kernel_size * dilation`` are zero-padded at the end.
    """

    _NA_DIM = 1
    _BIAS_REPR = "has_bias"


__all__ = ["NeighborhoodAttention1D"]
