"""``natten.types`` of NATTEN 0.20.1: the type aliases and ``KernelSchedule`` used in upstream's
signatures (``from natten.types import KernelSchedule`` ports as
``from natten_mlx.compat.v020.types import KernelSchedule``). See :mod:`natten_mlx.compat._types`.

In 0.20 the backward configurations also carry the number of KV splits and whether torch
computes the delta: ``(query_tile_shape, kv_tile_shape, num_kv_splits, use_pt_reduction)`` for
FNA, ``(q_tile_size, kv_tile_size, num_kv_splits, use_pt_reduction)`` for FMHA.
"""

# no `from __future__ import annotations`: every public name here is one of upstream's
from typing import Tuple, Union

from .. import _types
from .._exports import reexport as _reexport
from .._types import Dimension1DType, Dimension2DType, Dimension3DType

_names = _reexport(globals(), _types, _types.COMMON)

CutlassFnaBackwardConfigType = Union[
    Tuple[Dimension1DType, Dimension1DType, Dimension1DType, bool],
    Tuple[Dimension2DType, Dimension2DType, Dimension2DType, bool],
    Tuple[Dimension3DType, Dimension3DType, Dimension3DType, bool],
]
CutlassFmhaBackwardConfigType = Tuple[int, int, int, bool]

del _names
