"""natten_mlx/window.h (the C header every compiled tier includes) equals natten_mlx.windows, in
C++ compiled here with g++: window starts, key counts, membership, rpb columns and the tile
functions, over random geometries, in whole-domain and sub-domain (global) coordinates.
Skipped when no C++ compiler is found."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from natten_mlx import geometry
from natten_mlx.windows import axis_windows, key_extent, neighborhood_mask

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++/clang++) on PATH")

PROGRAM = r"""
#include <cstdio>
#include <natten_mlx/window.h>

// stdin: "A L K s d causal qoff qlen koff klen" (axis tables) or "T L K s d causal g c0 c1 k0 k1" (tiles)
int main() {
  char kind;
  while (std::scanf(" %c", &kind) == 1) {
    if (kind == 'A') {
      int L, K, s, d, c, qoff, qlen, koff, klen;
      if (std::scanf("%d %d %d %d %d %d %d %d %d", &L, &K, &s, &d, &c, &qoff, &qlen, &koff, &klen) != 9) return 1;
      bool causal = c != 0;
      for (int i = qoff; i < qoff + qlen; ++i) {
        int first = na_key_first(i, L, K, s, d, causal), count = na_key_count(i, L, K, s, d, causal);
        std::printf("%d %d", first - koff, count);
        for (int slot = 0; slot < count; ++slot) {
          int kc = (first + slot * d) / d;
          std::printf(" %d", na_rpb_index(i / d, kc, K));
        }
        std::printf(" |");
        for (int j = koff; j < koff + klen; ++j) std::printf("%d", na_in_window(i, j, L, K, s, d, causal) ? 1 : 0);
        std::printf("\n");
      }
    } else {
      int L, K, s, d, c, g, c0, c1, k0, k1;
      if (std::scanf("%d %d %d %d %d %d %d %d %d %d", &L, &K, &s, &d, &c, &g, &c0, &c1, &k0, &k1) != 10) return 1;
      bool causal = c != 0;
      int Lg = na_group_len(L, d, g);
      std::printf("%d %d %d %d\n", na_tile_key_begin(c0, Lg, K, s, causal), na_tile_key_end(c1, Lg, K, s, causal),
                  na_tile_full(c0, c1, k0, k1, Lg, K, s, causal) ? 1 : 0,
                  na_tile_meets(c0, c1, k0, k1, Lg, K, s, causal) ? 1 : 0);
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    d = tmp_path_factory.mktemp("window_h")
    src = d / "check.cpp"
    src.write_text(PROGRAM)
    exe = d / "check"
    run = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", geometry.include_dir(), str(src),
                          "-o", str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return str(exe)


def _geometries(rng, n):
    out = []
    for _ in range(n):
        L = int(rng.integers(2, 40))
        K = int(rng.integers(2, L + 1))
        d = int(rng.integers(1, L // K + 1))
        s = int(rng.integers(1, K + 1))
        c = bool(rng.integers(0, 2))
        if rng.random() < 0.3:  # whole domain
            qoff, qlen = 0, L
        else:
            qoff = int(rng.integers(0, L))
            qlen = int(rng.integers(1, L - qoff + 1))
        lo, hi = key_extent(L, K, s, d, c, qoff, qlen)
        koff = max(0, lo - int(rng.integers(0, 3)))
        klen = min(L, hi + int(rng.integers(0, 3))) - koff
        out.append((L, K, s, d, c, qoff, qlen, koff, klen))
    return out


def test_window_header_text_is_the_file():
    text = geometry.window_header()
    assert "NATTEN_MLX_WINDOW_H" in text and "na_window_start" in text


def test_axis_tables_equal_windows_py(binary):
    rng = np.random.default_rng(2024)
    geoms = _geometries(rng, 600)
    stdin = "".join(f"A {L} {K} {s} {d} {int(c)} {qo} {ql} {ko} {kl}\n" for L, K, s, d, c, qo, ql, ko, kl in geoms)
    run = subprocess.run([binary], input=stdin, capture_output=True, text=True, check=True)
    lines = iter(run.stdout.splitlines())
    checked = 0
    for L, K, s, d, c, qo, ql, ko, kl in geoms:
        w = axis_windows(L, K, s, d, c, qo, ql, ko)
        mask = neighborhood_mask((ql,), (K,), (s,), (d,), (c,), domain=(L,), query_offset=(qo,), kv_spatial=(kl,),
                                 kv_offset=(ko,))
        for i in range(ql):
            head, bits = next(lines).split("|")
            nums = [int(x) for x in head.split()]
            first, count, rels = nums[0], nums[1], nums[2:]
            where = f"L={L} K={K} s={s} d={d} causal={c} qoff={qo} koff={ko} local query {i}"
            assert first == w.start[i], where
            assert count == int(w.valid[i].sum()), where
            assert rels == list(w.rel[i][w.valid[i]]), where
            assert bits.strip() == "".join("1" if b else "0" for b in mask[i]), where
            checked += 1
    assert checked > 3000


def test_tile_functions_equal_windows_py(binary):
    rng = np.random.default_rng(7)
    cases = []
    for L, K, s, d, c, *_ in _geometries(rng, 300):
        g = int(rng.integers(0, d))
        lg = len(range(g, L, d))
        c0 = int(rng.integers(0, lg))
        c1 = int(rng.integers(c0, lg))
        k0 = int(rng.integers(0, lg))
        k1 = int(rng.integers(k0 + 1, lg + 1))
        cases.append((L, K, s, d, c, g, c0, c1, k0, k1))
    stdin = "".join("T " + " ".join(str(int(x)) for x in case) + "\n" for case in cases)
    run = subprocess.run([binary], input=stdin, capture_output=True, text=True, check=True)
    for (L, K, s, d, c, g, c0, c1, k0, k1), line in zip(cases, run.stdout.splitlines(), strict=True):
        w = axis_windows(L, K, s, d, c)
        rows = [g + cc * d for cc in range(c0, c1 + 1)]
        starts = [(w.start[r] - g) // d for r in rows]
        ends = [st + int(w.valid[r].sum()) for st, r in zip(starts, rows)]
        full = all(k0 >= st and k1 <= en for st, en in zip(starts, ends))
        meets = any(k0 < en and k1 > st for st, en in zip(starts, ends))
        assert [int(x) for x in line.split()] == [min(starts), max(ends), int(full), int(meets)], (L, K, s, d, c, g, c0, c1)
