"""``natten.types`` of NATTEN 0.21.7: the type aliases and ``KernelSchedule`` used in upstream's
signatures (``from natten.types import KernelSchedule`` ports as
``from natten_mlx.compat.v021.types import KernelSchedule``). See :mod:`natten_mlx.compat._types`.

In 0.21 every backward configuration is a ``(query_tile_shape, kv_tile_shape)`` pair (FNA) or a
pair of tile sizes (FMHA).
"""

# no `from __future__ import annotations`: every public name here is one of upstream's
from .. import _types
from .._exports import reexport as _reexport
from .._types import FmhaForwardConfigType, QKTileShapeType

_names = _reexport(globals(), _types, _types.COMMON)

CutlassFnaBackwardConfigType = QKTileShapeType
CutlassBlackwellFnaBackwardConfigType = QKTileShapeType
CutlassHopperFnaBackwardConfigType = QKTileShapeType
CutlassFmhaBackwardConfigType = FmhaForwardConfigType
CutlassBlackwellFmhaBackwardConfigType = FmhaForwardConfigType
CutlassHopperFmhaBackwardConfigType = FmhaForwardConfigType

del _names
