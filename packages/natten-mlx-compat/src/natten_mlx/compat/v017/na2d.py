"""``natten.na2d`` of NATTEN 0.17.5."""

from __future__ import annotations

from ._modules import _NeighborhoodAttention


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """``NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=1, is_causal=False,
    rel_pos_bias=False, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
    use_experimental_ops=False)``: ``[B, H, W, dim]`` -> same.

    Parameters as upstream: ``qkv.weight [3*dim, dim]``, ``qkv.bias``, ``rpb [num_heads, 2K1-1, 2K2-1]``
    (when ``rel_pos_bias``), ``proj.weight [dim, dim]``, ``proj.bias``. No padding of small
    inputs (0.17 dropped it). ``use_experimental_ops`` (torch.compile support upstream) is accepted
    and changes nothing.
    """

    _NA_DIM = 2


__all__ = ["NeighborhoodAttention2D"]
