"""``mlx.nn`` modules: NeighborhoodAttention1D/2D/3D on ``[B, *spatial, embed_dim]`` inputs.

Layers and parameters carry upstream NATTEN's names (``qkv``, ``proj``, ``rpb``) so state dicts
port across. The fused op runs when ``attn_drop == 0`` or in eval mode; the split ops
(``qk`` -> softmax -> dropout -> ``av``) otherwise. Both paths compute the same function.

With ``group=`` (an ``mx.distributed.Group``) a module takes each rank's slab of the input along
spatial axis ``shard_axis`` and runs :mod:`natten_mlx.distributed` (halo exchange with the
neighbouring ranks); its parameters are replicated, their gradients are this rank's partial sums
(average them over the group as for any data-parallel weight, ``mlx.nn.average_gradients``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import functional as F
from .problem import normalize_causal, normalize_tuple

_OPS = {
    1: (F.na1d, F.na1d_qk, F.na1d_av),
    2: (F.na2d, F.na2d_qk, F.na2d_av),
    3: (F.na3d, F.na3d_qk, F.na3d_av),
}


_ARGS_DOC = """
    Arguments:
        embed_dim:    channels of the input and output (``C``); divisible by ``num_heads``.
        num_heads:    query heads ``H``; the head dim is ``embed_dim // num_heads``.
        kernel_size:  window size, an int or one per spatial axis, each ``>= 2`` and
                      ``kernel_size * dilation <= `` the axis' length at call time.
        stride:       queries per shared window along each axis (int or tuple, ``1 <= stride <= kernel_size``).
        dilation:     gap between window keys along each axis (int or tuple, ``>= 1``).
        is_causal:    causal masking, a bool or one per axis (not with ``rel_pos_bias``).
        num_kv_heads: key/value heads ``H_kv`` (GQA/MQA), dividing ``num_heads``; None: ``num_heads``.
        qkv_bias:     whether the fused ``qkv`` projection (``C -> (H + 2 H_kv) * head_dim``) has a bias.
        qk_scale:     softmax scale; None: ``head_dim ** -0.5``.
        rel_pos_bias: learn a relative positional bias ``rpb [H, 2K_1-1, ...]`` (NATTEN's name and layout).
        attn_drop:    dropout on the attention weights in training, in ``[0, 1)``; when > 0 the split
                      ops (qk -> softmax -> dropout -> av) run instead of the fused op.
        proj_drop:    dropout after the output projection ``proj`` (``C -> C``), in ``[0, 1)``.
        group:        an ``mx.distributed.Group``: the input is this rank's slab along ``shard_axis``
                      and the sharded op (:mod:`natten_mlx.distributed`) runs; None: one device.
        shard_axis:   the spatial axis the slabs split (0 = the first spatial axis).

    Call: ``x [B, {axes}, embed_dim]`` -> ``[B, {axes}, embed_dim]``. The op runs on the backend
    the dispatcher chooses (:func:`natten_mlx.use_backend` selects one for a block of calls).
    """


class _NeighborhoodAttention(nn.Module):
    na_dim: int = 0

    def __init__(self, embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, num_kv_heads=None,
                 qkv_bias=True, qk_scale=None, rel_pos_bias=False, attn_drop=0.0, proj_drop=0.0, group=None,
                 shard_axis=0):
        """See the class docstring for every argument."""
        super().__init__()
        n = self.na_dim
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or num_heads % kv:
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive int dividing num_heads={num_heads}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p!r} must be in [0, 1)")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, kv
        self.head_dim = embed_dim // num_heads
        self.kernel_size = normalize_tuple("kernel_size", kernel_size, n, 2)
        self.stride = normalize_tuple("stride", stride, n, 1)
        self.dilation = normalize_tuple("dilation", dilation, n, 1)
        self.is_causal = normalize_causal(is_causal, n)
        if rel_pos_bias and any(self.is_causal):
            raise ValueError(f"rel_pos_bias=True cannot be combined with causal masking (is_causal={is_causal!r})")
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * kv) * self.head_dim, bias=qkv_bias)
        if rel_pos_bias:
            shape = (num_heads,) + tuple(2 * k - 1 for k in self.kernel_size)
            self.rpb = mx.random.truncated_normal(-2.0, 2.0, shape) * 0.02
        else:
            self.rpb = None
        if group is not None:
            if not isinstance(group, mx.distributed.Group):
                raise TypeError(f"group={group!r} must be an mlx.core.distributed.Group or None")
            if attn_drop:
                raise ValueError(
                    f"attn_drop={attn_drop!r} with group=: the sharded op is fused only (no attention weights to drop)"
                )
        if isinstance(shard_axis, bool) or not isinstance(shard_axis, int) or not 0 <= shard_axis < n:
            raise ValueError(f"shard_axis={shard_axis!r} must be a spatial axis index in 0..{n - 1}")
        # a Group is not an array: nn.Module keeps it as a plain attribute, outside parameters()
        self.group, self.shard_axis = group, shard_axis
        self.attn_drop_p = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _window(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal)

    def __call__(self, x: mx.array) -> mx.array:
        """``x [B, *spatial, embed_dim]`` -> ``[B, *spatial, embed_dim]``."""
        n = self.na_dim
        if x.ndim != n + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; {type(self).__name__} expects [B, {n} spatial axes, {self.embed_dim}]"
            )
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        qkv = self.qkv(x)
        q = qkv[..., :hq].reshape(*lead, self.num_heads, d)
        k = qkv[..., hq : hq + hkv].reshape(*lead, self.num_kv_heads, d)
        v = qkv[..., hq + hkv :].reshape(*lead, self.num_kv_heads, d)
        fused, qk, av = _OPS[n]
        rpb = self.rpb
        if self.group is not None:
            from . import distributed

            sharded = (distributed.na1d, distributed.na2d, distributed.na3d)[n - 1]
            out = sharded(q, k, v, scale=self.scale, rpb=rpb, group=self.group, axis=self.shard_axis, **self._window())
        elif self.attn_drop_p == 0.0 or not self.training:
            out = fused(q, k, v, scale=self.scale, rpb=rpb, **self._window())
        else:
            attn = qk(q, k, scale=self.scale, rpb=rpb, **self._window())
            attn = self.attn_drop(mx.softmax(attn.astype(mx.float32), axis=-1).astype(attn.dtype))
            out = av(attn, v, **self._window())
        return self.proj_drop(self.proj(out.reshape(*lead, self.embed_dim)))

    def _extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}"
            + (f", group=<{self.group.size()} ranks>, shard_axis={self.shard_axis}" if self.group is not None else "")
        )


class NeighborhoodAttention1D(_NeighborhoodAttention):
    na_dim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    na_dim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    na_dim = 3


NeighborhoodAttention1D.__doc__ = "1D neighborhood attention on ``[B, L, embed_dim]``.\n" + _ARGS_DOC.format(axes="L")
NeighborhoodAttention2D.__doc__ = "2D neighborhood attention on ``[B, X, Y, embed_dim]``.\n" + _ARGS_DOC.format(axes="X, Y")
NeighborhoodAttention3D.__doc__ = ("3D neighborhood attention on ``[B, X, Y, Z, embed_dim]``.\n"
                                   + _ARGS_DOC.format(axes="X, Y, Z"))
