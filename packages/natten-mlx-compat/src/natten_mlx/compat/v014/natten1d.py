"""``natten.natten1d`` of NATTEN 0.14.6."""

from __future__ import annotations

from ._modules import _SquareNeighborhoodAttention


class NeighborhoodAttention1D(_SquareNeighborhoodAttention):
    """``NeighborhoodAttention1D(dim, num_heads, kernel_size, dilation=1, bias=True, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0)``: input and output ``[B, L, dim]``.

    Parameters as upstream: ``qkv.weight [3*dim, dim]``, ``qkv.bias``, ``rpb [num_heads, 2K-1]``
    (when ``bias``), ``proj.weight [dim, dim]``, ``proj.bias``. An input shorter than
    ``kernel_size * dilation`` is zero-padded at the end and the output cropped back.
    """

    _NA_DIM = 1


__all__ = ["NeighborhoodAttention1D"]
