"""``natten.backends`` configuration queries of NATTEN 0.21.7: each returns ``[]`` (natten-mlx has none
of upstream's CUDA/Flex tile configurations)."""

from __future__ import annotations

from .. import _backend_configs, _exports

__all__ = _exports.reexport(globals(), _backend_configs, _backend_configs.NAMES_021)
