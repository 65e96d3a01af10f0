"""natten-mlx's core ops by number of spatial axes, for the era modules."""

from __future__ import annotations

import natten_mlx

FUSED = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
QK = {1: natten_mlx.na1d_qk, 2: natten_mlx.na2d_qk, 3: natten_mlx.na3d_qk}
AV = {1: natten_mlx.na1d_av, 2: natten_mlx.na2d_av, 3: natten_mlx.na3d_av}
