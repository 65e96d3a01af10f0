"""NATTEN 0.21.7's public API on MLX: ``import natten_mlx.compat.v021 as natten``.

Heads-last ``na1d/na2d/na3d`` with ``stride``, dense ``attention``, ``merge_attentions``, modules
``NeighborhoodAttention1D/2D/3D(embed_dim, num_heads, kernel_size, stride, dilation, is_causal, ...)``,
the context switches and backend configuration queries; GQA/MQA, ``return_lse``, causal and varlen ``attention``, and ``merge_attentions`` returning
``(output, lse)``.
``HAS_LIBNATTEN`` is False (no libnatten CUDA kernels). See docs/compat.md for the differences
from upstream.
"""

from .. import _modern

# attn_merge and types are attributes of upstream's package too (its functional imports them)
from . import attn_merge, backends, context, functional, modules, types  # noqa: F401

HAS_LIBNATTEN = False

__version__ = "0.21.7"

__all__ = _modern.top_level(globals(), backends, context, functional, modules)
