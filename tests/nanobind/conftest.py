"""Puts the in-repo natten_mlx_nanobind source on sys.path when the package is not installed."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "packages", "natten-mlx-nanobind", "src")
try:
    import natten_mlx_nanobind  # noqa: F401
except ImportError:
    sys.path.insert(0, _SRC)
