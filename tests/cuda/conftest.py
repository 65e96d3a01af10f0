"""tests/cuda: put the cuda tier's source tree on sys.path when it is not installed."""

import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "packages", "natten-mlx-cuda", "src")
try:
    import natten_mlx_cuda  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.abspath(_SRC))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
