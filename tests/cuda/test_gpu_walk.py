"""The backward kernels' tile tables on a real NVIDIA GPU (skipped without MLX's CUDA backend): walks
longer than one table (128 tiles: fmha_bwd_dq's key tiles per query tile, fmha_bwd_dkdv's query tiles
per key tile), reached with one-token-thick tiles along the long axis; forward and backward against
the float64 oracle, outputs poisoned as in test_gpu.py. test_emulated_walk.py checks the same code
path on the CPU with a 3-entry table."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
    pytest.skip("needs MLX's CUDA backend on an NVIDIA GPU", allow_module_level=True)

from cuda_cases import TOL, run_and_compare  # noqa: E402
from test_gpu import BACKEND  # noqa: E402
from walk_cases import longest_walks  # noqa: E402

CASES = [
    # dq walks over 128 key tiles of 1 x 64; rpb, GQA
    (dict(na_dim=2, shape=(170, 3), B=1, H=2, Hkv=1, D=64, Dv=32, E=0, K=(121, 3), s=(1, 1), d=(1, 1),
          c=(False, False), rpb=True, scale=None), (64, 1), (1, 64)),
    # dk/dv walks over 128 query tiles of 1 x 64 per head; causal with stride, GQA, extra keys
    (dict(na_dim=2, shape=(170, 3), B=1, H=4, Hkv=2, D=32, Dv=64, E=2, K=(101, 2), s=(3, 1), d=(1, 1),
          c=(True, False), rpb=False, scale=None), (1, 64), (64, 1)),
]


@pytest.mark.parametrize("cfg,tile,key_tile", CASES, ids=["dq-rpb-gqa", "dkdv-causal-gqa-extra"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_walk_longer_than_table(cfg, tile, key_tile, dtype):
    most_k, most_q = longest_walks(cfg, tile, key_tile)
    assert max(most_k, most_q) > 128, (most_k, most_q)
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=key_tile), cfg, dtype, np.random.default_rng(5))
    assert max(errs.values()) < TOL[dtype], errs
