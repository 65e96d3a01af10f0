"""The ``NeighborhoodAttention{1,2,3}D`` modules of NATTEN 0.20.1 / 0.21.7 (unchanged between them).

``(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
qk_scale=None, proj_drop=0.0)``; parameters ``qkv.weight [3*embed_dim, embed_dim]``,
``qkv.bias``, ``proj.weight [embed_dim, embed_dim]``, ``proj.bias``; no positional bias, no
attention dropout. Input and output ``[B, *spatial, embed_dim]``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import _args
from ._core_ops import FUSED


class NeighborhoodAttentionGeneric(nn.Module):
    def __init__(self, na_dim: int, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1, is_causal=False,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, proj_drop: float = 0.0):
        super().__init__()
        kernel_size = _args.kernel_size_arg(na_dim, kernel_size)
        stride = _args.stride_arg(na_dim, stride)
        dilation = _args.dilation_arg(na_dim, dilation)
        is_causal = _args.causal_arg(na_dim, is_causal)
        if embed_dim % num_heads != 0:
            raise ValueError(
                "Number of attention heads must evenly divide embedding dimension, "
                f"got {embed_dim=}, {num_heads=}."
            )
        self.na_dim = na_dim
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        # Plain attributes (tuples would otherwise join MLX's parameter tree).
        object.__setattr__(self, "kernel_size", kernel_size)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "is_causal", is_causal)
        self.expected_input_tensor_rank = na_dim + 2
        self.qkv = nn.Linear(embed_dim, embed_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def __call__(self, x: mx.array) -> mx.array:
        if x.ndim != self.expected_input_tensor_rank:
            raise ValueError(
                f"NeighborhoodAttention{self.na_dim}D expected a tensor with rank {self.expected_input_tensor_rank} "
                f"({self.na_dim} for token layout, 1 for batch, 1 for embedding dimension), got {x.ndim=}."
            )
        batch, *spatial, channels = x.shape
        if channels != self.embed_dim:
            raise ValueError(f"Expected embedding dimension {self.embed_dim}, got {channels} ({x.shape=}).")
        qkv = self.qkv(x).reshape(batch, *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        out = FUSED[self.na_dim](
            q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal,
            scale=self.scale,
        )
        return self.proj_drop(self.proj(out.reshape(batch, *spatial, channels)))

    def _extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}"
        )


class NeighborhoodAttention1D(NeighborhoodAttentionGeneric):
    """``NeighborhoodAttention1D(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
    qkv_bias=True, qk_scale=None, proj_drop=0.0)``: ``[B, L, embed_dim]`` -> same."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0):
        super().__init__(1, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


class NeighborhoodAttention2D(NeighborhoodAttentionGeneric):
    """``NeighborhoodAttention2D(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
    qkv_bias=True, qk_scale=None, proj_drop=0.0)``: ``[B, X, Y, embed_dim]`` -> same."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0):
        super().__init__(2, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


class NeighborhoodAttention3D(NeighborhoodAttentionGeneric):
    """``NeighborhoodAttention3D(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
    qkv_bias=True, qk_scale=None, proj_drop=0.0)``: ``[B, X, Y, Z, embed_dim]`` -> same."""

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
                 qk_scale=None, proj_drop=0.0):
        super().__init__(3, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale,
                         proj_drop)


__all__ = ["NeighborhoodAttentionGeneric", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
