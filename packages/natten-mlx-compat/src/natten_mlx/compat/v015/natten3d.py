"""``natten.natten3d`` of NATTEN 0.15.1."""

from __future__ import annotations

from .._legacy_modules import LegacyNeighborhoodAttention


class NeighborhoodAttention3D(LegacyNeighborhoodAttention):
    """``NeighborhoodAttention3D(dim, num_heads, kernel_size, kernel_size_d=None, dilation=1,
    dilation_d=None, bias=True, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)``:
    ``[B, D, H, W, dim]`` -> same.

    ``kernel_size``/``dilation`` apply to height and width, ``kernel_size_d``/``dilation_d`` (default:
    the same values) to depth. Parameters: ``qkv.weight``, ``qkv.bias``,
    ``rpb [num_heads, 2Kd-1, 2K-1, 2K-1]`` (when ``bias``), ``proj.weight``, ``proj.bias``. As in
    0.15.1, only height and width are zero-padded up to ``kernel_size * dilation``; a depth below
    ``kernel_size_d * dilation_d`` is an error (upstream's padding skipped the depth axis too).
    """

    def __init__(self, dim, num_heads, kernel_size, kernel_size_d=None, dilation=1, dilation_d=None, bias=True,
                 qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        kernel_size_d = kernel_size_d or kernel_size
        dilation = dilation or 1
        dilation_d = dilation_d or dilation
        if not (isinstance(kernel_size, int) and kernel_size > 1 and kernel_size % 2 == 1):
            raise ValueError(f"Kernel size must be an odd number greater than 1, got {kernel_size}.")
        if dilation < 1:
            raise ValueError(f"Dilation must be greater than or equal to 1, got {dilation}.")
        if dilation_d < 1:
            raise ValueError(f"Dilation (depth) must be greater than or equal to 1, got {dilation_d}.")
        super().__init__(
            na_dim=3, dim=dim, num_heads=num_heads, kernel_size=(kernel_size_d, kernel_size, kernel_size),
            dilation=(dilation_d, dilation, dilation), is_causal=(False,) * 3, rel_pos_bias=bias,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop,
            pad_axes=(False, True, True),
        )
        self.kernel_size = kernel_size
        self.kernel_size_d = kernel_size_d
        self.dilation = dilation
        self.dilation_d = dilation_d
        self.window_size = kernel_size * dilation
        self.window_size_d = kernel_size_d * dilation_d

    def _extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size_d={self.kernel_size_d}, "
            f"dilation_d={self.dilation_d}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"has_bias={self.rpb is not None}"
        )


__all__ = ["NeighborhoodAttention3D"]
