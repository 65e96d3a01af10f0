"""NATTEN 0.17.5's public API on MLX: ``import natten_mlx.compat.v017 as natten``.

Modules ``NeighborhoodAttention1D/2D/3D`` (``rel_pos_bias``, ``is_causal``) and the context
switches (``use_fused_na``, ``use_autotuner``, ... recorded, see ``natten.context``) at the top
level; ``natten.functional`` holds the heads-first split ops ``na{1,2,3}d_qk``/``na{1,2,3}d_av`` and
the heads-last fused ``na{1,2,3}d``. See docs/compat.md for the differences from upstream.
"""

from .. import _exports
from . import context, functional  # noqa: F401 (submodules as attributes, as upstream)
from .na1d import NeighborhoodAttention1D
from .na2d import NeighborhoodAttention2D
from .na3d import NeighborhoodAttention3D

__version__ = "0.17.5"

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    *_exports.reexport(globals(), context, [  # upstream's order
        "are_deterministic_algorithms_enabled",
        "use_deterministic_algorithms",
        "use_kv_parallelism_in_fused_na",
        "is_kv_parallelism_in_fused_na_enabled",
        "use_fna",
        "is_fna_enabled",
        "use_fused_na",
        "is_fused_na_enabled",
        "use_autotuner",
        "force_flex_attention",
        "disable_autotuner",
        "is_autotuner_enabled",
        "is_autotuner_enabled_for_forward",
        "is_autotuner_enabled_for_backward",
        "is_autotuner_thorough_for_forward",
        "is_autotuner_thorough_for_backward",
        "has_cuda",
        "has_half",
        "has_bfloat",
        "has_gemm",
        "has_fna",
        "has_fused_na",
        "has_tf32_gemm",
        "has_fp32_gemm",
        "has_fp64_gemm",
        "use_tf32_in_gemm_na",
        "use_tiled_na",
        "use_gemm_na",
        "use_flex_attention",
        "is_tf32_in_gemm_na_enabled",
        "is_tiled_na_enabled",
        "is_gemm_na_enabled",
        "set_memory_usage_preference",
        "get_memory_usage_preference",
        "is_memory_usage_default",
        "is_memory_usage_strict",
        "is_memory_usage_unrestricted",
        "enable_tf32",
        "disable_tf32",
        "enable_gemm_na",
        "disable_gemm_na",
        "enable_tiled_na",
        "disable_tiled_na",
    ]),
]
