"""``natten.natten2d`` of NATTEN 0.15.1 (the 0.14 module; input rank checked)."""

from __future__ import annotations

from ..v014._modules import _SquareNeighborhoodAttention


class NeighborhoodAttention2D(_SquareNeighborhoodAttention):
    """``NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0)``: ``[B, H, W, dim]`` -> same; parameters
    ``qkv.weight``, ``qkv.bias``, ``rpb [num_heads, 2K-1, 2K-1]`` (when ``bias``), ``proj.weight``,
    ``proj.bias``; height/width below ``kernel_size * dilation`` are zero-padded at the end.
    """

    _NA_DIM = 2
    _BIAS_REPR = "has_bias"


__all__ = ["NeighborhoodAttention2D"]
