"""natten_mlx/tiling.h (the GPU tiers' tile walk) against the float64 oracle's masks, in C++.

The header is compiled with g++ into a small program (tiling_walk.cpp) that prints, for random
axis geometries (sub-domain slabs included), every query tile, its key range and key tiles with
their classes, and every key's query range. Each is checked against ``oracle.axis_mask``: the
query tiles partition the local queries, a tile's key range is exactly the union of its queries'
windows, FULL/PARTIAL/SKIP match the mask block, and the backward's query range of a key is
exactly the mask column. Skipped without a C++ compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import oracle
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "..", "..", "packages", "natten-mlx-core", "src", "natten_mlx", "include")
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("tiling") / "tiling_walk")
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", INCLUDE, os.path.join(HERE, "tiling_walk.cpp"), "-o", exe], check=True)
    return exe


def random_geometries(rng, count):
    out = []
    while len(out) < count:
        L = int(rng.integers(2, 48))
        K = int(rng.integers(2, L + 1))
        d = int(rng.integers(1, L // K + 1))
        s = int(rng.integers(1, K + 1))
        causal = int(rng.integers(0, 2))
        if rng.random() < 0.5:
            off, n = 0, L
        else:
            off = int(rng.integers(0, L))
            n = int(rng.integers(1, L - off + 1))
        out.append((L, K, s, d, causal, off, n, int(rng.integers(1, 10)), int(rng.integers(1, 10))))
    return out


def parse(text):
    blocks, cur = [], None
    for line in text.splitlines():
        tag, *vals = line.split()
        vals = list(map(int, vals))
        if tag == "G":
            cur = {"grid_tiles": vals[0], "tiles": [], "queries": {}}
        elif tag == "T":
            cur["tiles"].append({"g": vals[0], "c0": vals[1], "c1": vals[2], "kb": vals[3], "ke": vals[4], "K": [], "A": []})
        elif tag in ("K", "A"):
            cur["tiles"][-1][tag].append(tuple(vals))
        elif tag == "Q":
            cur["queries"][(vals[0], vals[1])] = (vals[2], vals[3])
        elif tag == "E":
            blocks.append(cur)
    return blocks


def check_class(mask, rows, g, d, k0, k1, cls):
    block = mask[np.ix_(rows, np.arange(k0, k1) * d + g)]
    want = 2 if block.all() else (0 if not block.any() else 1)
    assert cls == want, (k0, k1, cls, want)


@pytest.mark.parametrize("seed", range(4))
def test_walk_matches_oracle(walk, seed):
    rng = np.random.default_rng(seed)
    geoms = random_geometries(rng, 150)
    text = "\n".join(" ".join(map(str, g)) for g in geoms) + "\n"
    res = subprocess.run([walk], input=text, capture_output=True, text=True, check=True).stdout
    blocks = parse(res)
    assert len(blocks) == len(geoms)
    for (L, K, s, d, causal, off, n, T, TK), blk in zip(geoms, blocks):
        where = f"L={L} K={K} s={s} d={d} causal={causal} off={off} n={n} T={T} TK={TK}"
        mask = oracle.axis_mask(L, K, s, d, bool(causal))
        seen = []
        per_group = {}
        for t in blk["tiles"]:
            g, c0, c1 = t["g"], t["c0"], t["c1"]
            assert c1 - c0 + 1 <= T and c1 >= c0, where
            rows = np.arange(c0, c1 + 1) * d + g
            seen.extend(rows.tolist())
            per_group[g] = per_group.get(g, 0) + 1
            # the tile's key range is exactly the union of its queries' windows, in group coordinates
            cols = np.nonzero(mask[rows].any(axis=0))[0]
            assert np.all(cols % d == g), where
            assert (cols // d).tolist() == list(range(t["kb"], t["ke"])), (where, t)
            covered = []
            for k0, k1, cls in t["K"]:
                assert 0 < k1 - k0 <= TK, where
                covered.extend(range(k0, k1))
                check_class(mask, rows, g, d, k0, k1, cls)
            assert covered == list(range(t["kb"], t["ke"])), where
            for k0, k1, cls in t["A"]:
                check_class(mask, rows, g, d, k0, k1, cls)
        assert sorted(seen) == list(range(off, off + n)), where
        assert max(per_group.values()) <= blk["grid_tiles"], where
        for (g, kc), (qb, qe) in blk["queries"].items():
            col = mask[:, kc * d + g]
            qs = np.nonzero(col)[0]
            assert np.all(qs % d == g), where
            assert (qs // d).tolist() == list(range(qb, qe)), (where, g, kc, qb, qe)
