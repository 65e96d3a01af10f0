"""The backward kernels' tile tables in the CPU emulator (emu.py). fmha_bwd_dq tabulates a block's key
tiles and fmha_bwd_dkdv its query tiles, up to 128 a table (NA_BWD_TABLE), and build the next table
when the walk leaves one. Walks that long are too slow to emulate, so these tests compile the exact
kernel text with a table of 3 entries (the one line `#define NA_BWD_TABLE 3` in front of the body)
and check problems whose walks are longer than that, forward and backward, against the float64
oracle. Skipped without g++."""

from __future__ import annotations

import numpy as np
import pytest

__import__("cuda_cases").require_emulator()

import emu  # noqa: E402
from cuda_cases import TOL, run_and_compare  # noqa: E402
from natten_mlx_cuda import source  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402
from walk_cases import longest_walks  # noqa: E402

BACKEND = CudaBackend(runner=emu.mlx_runner, require_device=False)
TABLE = 3


@pytest.fixture
def small_table(monkeypatch):
    body = source.body

    def with_table(name):
        text = body(name)
        return f"#define NA_BWD_TABLE {TABLE}\n" + text if name.startswith("fmha_bwd") else text

    monkeypatch.setattr(source, "body", with_table)


CASES = [
    (dict(na_dim=2, shape=(20, 13), B=1, H=2, Hkv=2, D=16, Dv=8, E=0, K=(9, 5), s=(1, 2), d=(1, 1),
          c=(False, False), rpb=True, scale=None), (8, 8), (8, 8)),
    (dict(na_dim=2, shape=(13, 40), B=1, H=2, Hkv=1, D=8, Dv=16, E=1, K=(7, 5), s=(2, 1), d=(1, 2),
          c=(True, False), rpb=False, scale=0.4), (4, 16), (4, 16)),
    (dict(na_dim=3, shape=(9, 8, 7), B=1, H=3, Hkv=1, D=16, Dv=16, E=0, K=(4, 3, 5), s=(1, 2, 1), d=(2, 1, 1),
          c=(False, True, False), rpb=False, scale=None), (4, 4, 4), (4, 4, 4)),
]


@pytest.mark.parametrize("cfg,tile,key_tile", CASES, ids=["2d-rpb", "2d-causal-gqa-extra", "3d-gqa"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_walk_longer_than_table(small_table, cfg, tile, key_tile, dtype):
    most_k, most_q = longest_walks(cfg, tile, key_tile)
    assert most_k > TABLE and most_q > TABLE, (most_k, most_q)  # both passes rebuild their table
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=key_tile), cfg, dtype, np.random.default_rng(3))
    assert max(errs.values()) < TOL[dtype], errs


def test_large_head_dims(small_table):
    """Head dims whose padded sum exceeds 128 (D = 64, Dv = 72): fmha_bwd_dkdv takes each query tile
    in two parts of 32 queries (fewer live accumulators beside dK and dV)."""
    cfg = dict(na_dim=2, shape=(12, 11), B=1, H=2, Hkv=1, D=64, Dv=72, E=0, K=(5, 4), s=(1, 2), d=(1, 1),
               c=(False, True), rpb=False, scale=None)
    tile = key_tile = (8, 8)
    most_k, most_q = longest_walks(cfg, tile, key_tile)
    assert most_k > TABLE or most_q > TABLE, (most_k, most_q)
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=key_tile), cfg, "float16", np.random.default_rng(4))
    assert max(errs.values()) < TOL["float16"], errs
