"""``natten.modules`` of NATTEN 0.21.7."""

from __future__ import annotations

from .._modern_modules import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
    NeighborhoodAttentionGeneric,
)

__all__ = ["NeighborhoodAttentionGeneric", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
