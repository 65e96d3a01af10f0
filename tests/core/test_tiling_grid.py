"""tiling.h's grid decode (na_tile_digit, na_tile_group, na_tile_first, na_tile_last: which tile box
a threadgroup of the Metal and CUDA kernels owns), compiled with g++ and checked against an
independent Python enumeration over random 3-axis grids (sub-domain slabs and dilation included):
the flat index is row-major over per-axis digits (axis 2 fastest); each axis' non-empty tiles are
exactly the local coordinates of each dilation group cut into runs of T; the non-empty boxes
partition the local slab; empty boxes are exactly those past the end of a shorter group; and
natten_mlx.geometry.grid_tiles (the Python side of the grid size) equals na_query_tiles.
Skipped without a C++ compiler."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from natten_mlx import geometry

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "..", "..", "packages", "natten-mlx-core", "src", "natten_mlx", "include")
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("tiling_grid") / "tiling_grid")
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", INCLUDE, os.path.join(HERE, "tiling_grid.cpp"),
                    "-o", exe], check=True)
    return exe


def _axis(rng):
    L = int(rng.integers(1, 40))
    d = int(rng.integers(1, min(L, 6) + 1))
    if rng.random() < 0.5:
        off, n = 0, L
    else:
        off = int(rng.integers(0, L))
        n = int(rng.integers(1, L - off + 1))
    return off, n, d, int(rng.integers(1, 9))


def _expected_axis(off, n, d, T):
    """Per group g: the runs [c0, c1] of T in-group coordinates covering the local tokens of g."""
    runs = {}
    for g in range(d):
        cs = [i // d for i in range(off, off + n) if i % d == g]
        runs[g] = [(cs[i], cs[min(i + T, len(cs)) - 1]) for i in range(0, len(cs), T)]
    return runs


def _parse(text):
    grids, cur = [], None
    for line in text.splitlines():
        tag, *vals = line.split()
        vals = list(map(int, vals))
        if tag == "G":
            cur = {"per": tuple(vals), "boxes": []}
        elif tag == "B":
            cur["boxes"].append([tuple(vals[4 * a: 4 * a + 4]) for a in range(3)])
        else:
            grids.append(cur)
    return grids


@pytest.mark.parametrize("seed", range(3))
def test_grid_decode_matches_python(decode, seed):
    rng = np.random.default_rng(900 + seed)
    geoms = [[_axis(rng) for _ in range(3)] for _ in range(60)]
    text = "\n".join(" ".join(str(x) for ax in g for x in ax) for g in geoms) + "\n"
    grids = _parse(subprocess.run([decode], input=text, capture_output=True, text=True, check=True).stdout)
    assert len(grids) == len(geoms)
    for axes, grid in zip(geoms, grids):
        where = f"axes={axes}"
        per = grid["per"]
        want = [_expected_axis(*ax) for ax in axes]
        tiles = [max(len(r) for r in w.values()) for w in want]
        assert per == tuple(ax[2] * t for ax, t in zip(axes, tiles)), where
        # the Python twin of na_query_tiles that tiers size their grids with
        assert tuple(geometry.grid_tiles(*ax) for ax in axes) == tuple(tiles), where
        assert len(grid["boxes"]) == int(np.prod(per)), where
        seen = []
        for flat, box in enumerate(grid["boxes"]):
            assert tuple(u for u, *_ in box) == tuple(int(x) for x in np.unravel_index(flat, per)), where
            empty = False
            for (u, g, c0, c1), w, t in zip(box, want, tiles):
                assert g == u // t, where
                j = u % t
                if j < len(w[g]):
                    assert (c0, c1) == w[g][j], (where, flat)
                else:
                    assert c1 < c0, (where, flat)  # past the end of a shorter group: empty
                    empty = True
            if not empty:
                ranges = [[c * ax[2] + g for c in range(c0, c1 + 1)] for (u, g, c0, c1), ax in zip(box, axes)]
                seen += [(i0, i1, i2) for i0 in ranges[0] for i1 in ranges[1] for i2 in ranges[2]]
        slab = [(i0, i1, i2) for i0 in range(axes[0][0], axes[0][0] + axes[0][1])
                for i1 in range(axes[1][0], axes[1][0] + axes[1][1]) for i2 in range(axes[2][0], axes[2][0] + axes[2][1])]
        assert sorted(seen) == slab, where
