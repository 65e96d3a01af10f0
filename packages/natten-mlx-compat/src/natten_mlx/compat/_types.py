"""The type aliases and the enum shared by ``natten.types`` of NATTEN 0.20.1 and 0.21.7.

Per-axis arguments: ``Dimension{1,2,3}DType`` (tuples of ints), ``CausalArg{1,2,3}DType`` (tuples
of bools), their ``...OrDed`` forms that also take one int/bool for every axis ("or
dimension-independent"), and unions over the ranks. ``QKTileShapeType`` is a pair
``(query_tile_shape, kv_tile_shape)``; ``KernelSchedule`` names the schedules of upstream's Hopper
kernels. The ``*ConfigType`` aliases describe the tile configurations upstream's backends accept;
on natten-mlx they are accepted and ignored (see docs/compat.md).
"""

from __future__ import annotations

from enum import Enum
from typing import Tuple, Union

NoneType = type(None)

Dimension1DType = Tuple[int]
Dimension2DType = Tuple[int, int]
Dimension3DType = Tuple[int, int, int]
CausalArg1DType = Tuple[bool]
CausalArg2DType = Tuple[bool, bool]
CausalArg3DType = Tuple[bool, bool, bool]

Dimension1DTypeOrDed = Union[int, Dimension1DType]
Dimension2DTypeOrDed = Union[int, Dimension2DType]
Dimension3DTypeOrDed = Union[int, Dimension3DType]
CausalArg1DTypeOrDed = Union[bool, CausalArg1DType]
CausalArg2DTypeOrDed = Union[bool, CausalArg2DType]
CausalArg3DTypeOrDed = Union[bool, CausalArg3DType]

DimensionType = Union[Dimension1DType, Dimension2DType, Dimension3DType]
CausalArgType = Union[CausalArg1DType, CausalArg2DType, CausalArg3DType]
DimensionTypeOrDed = Union[int, DimensionType]
CausalArgTypeOrDed = Union[bool, CausalArgType]

QKTileShapeType = Union[
    Tuple[Dimension1DType, Dimension1DType],
    Tuple[Dimension2DType, Dimension2DType],
    Tuple[Dimension3DType, Dimension3DType],
]


class KernelSchedule(Enum):
    """Kernel schedules of upstream's Hopper kernels (accepted and ignored by natten-mlx)."""

    NonPersistent = 0
    WarpSpecializedCooperative = 1
    WarpSpecializedPingpong = 2


CutlassFnaForwardConfigType = QKTileShapeType
CutlassBlackwellFnaForwardConfigType = QKTileShapeType
CutlassHopperFnaForwardConfigType = Tuple[QKTileShapeType, KernelSchedule]
FlexFnaForwardConfigType = QKTileShapeType

FmhaForwardConfigType = Tuple[int, int]
CutlassFmhaForwardConfigType = FmhaForwardConfigType
FlexFmhaForwardConfigType = FmhaForwardConfigType
CutlassBlackwellFmhaForwardConfigType = FmhaForwardConfigType
CutlassHopperFmhaForwardConfigType = Tuple[FmhaForwardConfigType, KernelSchedule]

COMMON = [
    "NoneType", "Dimension1DType", "Dimension2DType", "Dimension3DType", "CausalArg1DType", "CausalArg2DType",
    "CausalArg3DType", "Dimension1DTypeOrDed", "Dimension2DTypeOrDed", "Dimension3DTypeOrDed",
    "CausalArg1DTypeOrDed", "CausalArg2DTypeOrDed", "CausalArg3DTypeOrDed", "DimensionType", "CausalArgType",
    "DimensionTypeOrDed", "CausalArgTypeOrDed", "QKTileShapeType", "KernelSchedule", "CutlassFnaForwardConfigType",
    "CutlassBlackwellFnaForwardConfigType", "CutlassHopperFnaForwardConfigType", "FlexFnaForwardConfigType",
    "FmhaForwardConfigType", "CutlassFmhaForwardConfigType", "FlexFmhaForwardConfigType",
    "CutlassBlackwellFmhaForwardConfigType", "CutlassHopperFmhaForwardConfigType",
]
