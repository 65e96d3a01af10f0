"""NATTEN 0.15.1's public API on MLX: ``import natten_mlx.compat.v015 as natten``.

Modules ``NeighborhoodAttention1D/2D/3D``, the capability probes (``has_cuda()`` is False) and
kernel switches at the top level; ``natten.functional`` holds the heads-first split ops
``na{1,2,3}d_qk``, ``na{1,2,3}d_qk_with_bias``, ``na{1,2,3}d_av`` (with additional keys/values) and
the 0.14 ``natten*`` aliases. See docs/compat.md for the differences from upstream.
"""

from .. import _exports
from . import functional
from .natten1d import NeighborhoodAttention1D
from .natten2d import NeighborhoodAttention2D
from .natten3d import NeighborhoodAttention3D

__version__ = "0.15.1"

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    *_exports.reexport(globals(), functional, [  # the probes and kernel switches, from natten.functional
        "disable_gemm_na", "disable_tf32", "disable_tiled_na", "enable_gemm_na", "enable_tf32", "enable_tiled_na",
        "has_bfloat", "has_cuda", "has_gemm", "has_half", "has_tf32_gemm", "has_fp32_gemm", "has_fp64_gemm",
    ]),
]
