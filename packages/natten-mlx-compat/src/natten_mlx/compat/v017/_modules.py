"""The ``NeighborhoodAttention1D/2D/3D`` modules of NATTEN 0.17.5."""

from __future__ import annotations

from .. import _args
from .._legacy_modules import LegacyNeighborhoodAttention
from .context import is_fna_enabled


class _NeighborhoodAttention(LegacyNeighborhoodAttention):
    _NA_DIM = 0

    def __init__(self, dim, num_heads, kernel_size, dilation=1, is_causal=False, rel_pos_bias=False, qkv_bias=True,
                 qk_scale=None, attn_drop=0.0, proj_drop=0.0, use_experimental_ops=False):
        n = self._NA_DIM
        kernel_size = _args.kernel_size_arg(n, kernel_size)
        dilation = _args.dilation_arg(n, dilation)
        is_causal = _args.causal_arg(n, is_causal)
        if any(is_causal) and rel_pos_bias:
            raise NotImplementedError(
                "Causal neighborhood attention is undefined with positional biases. "
                "Please consider disabling positional biases (rel_pos_bias=False)."
            )
        super().__init__(
            na_dim=n, dim=dim, num_heads=num_heads, kernel_size=kernel_size, dilation=dilation, is_causal=is_causal,
            rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=proj_drop, pad_axes=(False,) * n, fused_skips_attn_drop=is_fna_enabled,
        )
        # Plain attributes (tuples would otherwise join MLX's parameter tree).
        object.__setattr__(self, "kernel_size", kernel_size)
        object.__setattr__(self, "dilation", dilation)
        object.__setattr__(self, "is_causal", is_causal)
        self.use_experimental_ops = use_experimental_ops

    def _extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, is_causal={self.is_causal}, has_bias={self.rpb is not None}"
        )
