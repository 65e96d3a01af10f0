"""Shared test configuration.

* Puts ``tests/`` on ``sys.path`` (so ``import oracle`` works from every sub-folder) and, when
  natten_mlx is not installed, the in-repo source tree ``packages/natten-mlx-core/src``.
* Helpers to convert between NumPy and MLX and to draw random valid configurations.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_SRC = os.path.join(_ROOT, "packages", "natten-mlx-core", "src")

if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
try:  # prefer an installed natten_mlx; fall back to the source tree
    import natten_mlx  # noqa: F401
except ImportError:
    if os.path.isdir(_SRC) and _SRC not in sys.path:
        sys.path.insert(0, _SRC)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running sweep (deselect with -m 'not slow')")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
