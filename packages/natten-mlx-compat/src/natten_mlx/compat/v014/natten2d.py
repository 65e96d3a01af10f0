"""``natten.natten2d`` of NATTEN 0.14.6."""

from __future__ import annotations

from ._modules import _SquareNeighborhoodAttention


class NeighborhoodAttention2D(_SquareNeighborhoodAttention):
    """``NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0)``: input and output ``[B, H, W, dim]``.

    Parameters as upstream: ``qkv.weight [3*dim, dim]``, ``qkv.bias``,
    ``rpb [num_heads, 2K-1, 2K-1]`` (when ``bias``), ``proj.weight [dim, dim]``, ``proj.bias``.
    Height or width below ``kernel_size * dilation`` is zero-padded at the end (bottom/right) and
    the output cropped back.
    """

    _NA_DIM = 2


__all__ = ["NeighborhoodAttention2D"]
