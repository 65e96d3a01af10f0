"""The ``NeighborhoodAttention{1,2,3}D`` modules of NATTEN 0.14 to 0.17, as ``mlx.nn.Module``.

Upstream's modules hold ``qkv`` (``Linear(dim, 3 * dim, bias=qkv_bias)``), ``proj``
(``Linear(dim, dim)``), an optional ``rpb`` parameter ``[num_heads, 2K1-1, ...]`` and two dropouts;
the forward splits ``qkv`` as ``(3, num_heads, head_dim)``, scales the query, computes the split
QK (+ rpb), softmax, attention dropout and AV, and projects. Here the same computation runs through
the fused core op (``scale`` passed in) whenever attention dropout is inactive, and through the
split core ops with the softmax and dropout in between when it is active.

0.14 and 0.15 zero-pad inputs smaller than ``kernel_size * dilation`` at the end of each padded
axis, run attention on the padded input (padded tokens carry ``qkv``'s bias and are attended to),
and crop the result back; ``pad_axes`` says which axes get that treatment.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ._core_ops import AV, FUSED, QK


def init_rpb(num_heads: int, kernel_size: Sequence[int]) -> mx.array:
    """Upstream's ``trunc_normal_(std=0.02, a=-2, b=2)`` of a ``[num_heads, 2K1-1, ...]`` bias."""
    shape = (num_heads, *(2 * k - 1 for k in kernel_size))
    return mx.clip(mx.random.normal(shape) * 0.02, -2.0, 2.0)


class LegacyNeighborhoodAttention(nn.Module):
    """Shared body of the 0.14/0.15/0.17 modules; the era classes set the public attributes."""

    def __init__(
        self,
        na_dim: int,
        dim: int,
        num_heads: int,
        kernel_size: Sequence[int],
        dilation: Sequence[int],
        is_causal: Sequence[bool],
        rel_pos_bias: bool,
        qkv_bias: bool,
        qk_scale: Optional[float],
        attn_drop: float,
        proj_drop: float,
        pad_axes: Sequence[bool],
        fused_skips_attn_drop: Callable[[], bool] = lambda: False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = init_rpb(num_heads, kernel_size)
        else:
            self.rpb = None
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # Geometry as plain attributes (outside the parameter tree).
        object.__setattr__(self, "_na_dim", na_dim)
        object.__setattr__(self, "_kernel", tuple(kernel_size))
        object.__setattr__(self, "_dilation", tuple(dilation))
        object.__setattr__(self, "_causal", tuple(is_causal))
        object.__setattr__(self, "_pad_axes", tuple(pad_axes))
        object.__setattr__(self, "_fused_skips_attn_drop", fused_skips_attn_drop)

    def _attention_dropout_active(self) -> bool:
        return self.training and self.attn_drop_rate > 0 and not self._fused_skips_attn_drop()

    def __call__(self, x: mx.array) -> mx.array:
        n = self._na_dim
        if x.ndim != n + 2:
            raise ValueError(f"{type(self).__name__} expected a rank-{n + 2} input tensor; got x.ndim={x.ndim}.")
        batch, *spatial, channels = x.shape
        pads = [
            max(0, k * d - size) if pad else 0
            for size, k, d, pad in zip(spatial, self._kernel, self._dilation, self._pad_axes, strict=True)
        ]
        if any(pads):
            x = mx.pad(x, [(0, 0)] + [(0, p) for p in pads] + [(0, 0)])
        padded = x.shape[1:-1]
        qkv = self.qkv(x).reshape(batch, *padded, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        rpb = None if self.rpb is None else self.rpb.astype(q.dtype)
        window = dict(kernel_size=self._kernel, dilation=self._dilation, is_causal=self._causal)
        if self._attention_dropout_active():
            attn = QK[n](q * self.scale, k, rpb=rpb, scale=1.0, **window)
            attn = self.attn_drop(mx.softmax(attn, axis=-1, precise=True))
            out = AV[n](attn, v, **window)
        else:
            out = FUSED[n](q, k, v, rpb=rpb, scale=self.scale, **window)
        out = out.reshape(batch, *padded, channels)
        if any(pads):
            out = out[(slice(None), *(slice(0, size) for size in spatial))]
        return self.proj_drop(self.proj(out))
