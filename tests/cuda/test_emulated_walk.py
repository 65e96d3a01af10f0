"""The backward kernels' tile tables in the CPU emulator (emu.py). fmha_bwd_dq tabulates a block's key
tiles and fmha_bwd_dkdv its query tiles, up to 128 a table (NA_BWD_TABLE), and build the next table
when the walk leaves one. Walks that long are too slow to emulate, so these tests compile the exact
kernel text with a table of 3 entries (the one line `#define NA_BWD_TABLE 3` in front of the body)
and check problems whose walks are longer than that, forward and backward, against the float64
oracle. Skipped without g++."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("mlx.core")
if shutil.which("g++") is None:
    pytest.skip("no g++ for the CUDA emulator", allow_module_level=True)
_why = __import__("cuda_cases").skip_cpu_check_on_gpu()
if _why:
    pytest.skip(_why, allow_module_level=True)

import emu  # noqa: E402
import oracle  # noqa: E402
from cuda_cases import TOL, run_and_compare  # noqa: E402
from natten_mlx_cuda import source  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402

BACKEND = CudaBackend(runner=emu.mlx_runner, require_device=False)
TABLE = 3


@pytest.fixture
def small_table(monkeypatch):
    body = source.body

    def with_table(name):
        text = body(name)
        return f"#define NA_BWD_TABLE {TABLE}\n" + text if name.startswith("fmha_bwd") else text

    monkeypatch.setattr(source, "body", with_table)


def _axis_walks(L, K, s, d, c, tq, tk):
    """Along one axis: the most key tiles (tk keys) that one query tile (tq queries) walks, and the
    most query tiles (tq) whose windows meet one key tile (tk), from the oracle's windows."""
    most_k = most_q = 0
    for g in range(d):
        idx = list(range(g, L, d))
        win = [oracle.axis_window(i, L, K, s, d, c)[1:] for i in idx]  # in-group [first, last]
        n = len(idx)
        for c0 in range(0, n, tq):
            most_k = max(most_k, -(-(win[min(c0 + tq, n) - 1][1] + 1 - win[c0][0]) // tk))
        for k0 in range(0, n, tk):
            qs = [i for i in range(n) if win[i][0] < k0 + tk and win[i][1] >= k0]
            most_q = max(most_q, -(-(max(qs) + 1 - min(qs)) // tq) if qs else 0)
    return most_k, most_q


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
    most_k = most_q = 1
    for a in range(cfg["na_dim"]):
        k, q = _axis_walks(cfg["shape"][a], cfg["K"][a], cfg["s"][a], cfg["d"][a], cfg["c"][a], tile[a], key_tile[a])
        most_k, most_q = most_k * k, most_q * q
    assert most_k > TABLE and most_q > TABLE, (most_k, most_q)  # both passes rebuild their table
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=key_tile), cfg, dtype, np.random.default_rng(3))
    assert max(errs.values()) < TOL[dtype], errs
