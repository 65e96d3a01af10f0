"""natten_mlx.compat from the source tree when the natten-mlx-compat distribution is not installed.

The root conftest already put the core on ``sys.path`` (or found it installed). Without an
installed compat distribution, the in-repo ``packages/natten-mlx-compat/src/natten_mlx`` is added
to ``natten_mlx.__path__``, which is exactly what core's ``pkgutil.extend_path`` does for an
editable install.
"""

from __future__ import annotations

import os

import natten_mlx

_COMPAT_PKG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "packages", "natten-mlx-compat", "src", "natten_mlx",
)

try:
    import natten_mlx.compat  # noqa: F401
except ImportError:
    if os.path.isdir(_COMPAT_PKG) and _COMPAT_PKG not in natten_mlx.__path__:
        natten_mlx.__path__.append(_COMPAT_PKG)
