"""NATTEN 0.14.6's public API on MLX: ``import natten_mlx.compat.v014 as natten``.

``natten.NeighborhoodAttention1D/2D`` and ``natten.functional.natten{1,2}d{qkrpb,qk,av}``
(heads-first ``[B, H, *spatial, D]``). See docs/compat.md for the differences from upstream.
"""

from . import functional
from .natten1d import NeighborhoodAttention1D
from .natten2d import NeighborhoodAttention2D

__version__ = "0.14.6"

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "functional"]
