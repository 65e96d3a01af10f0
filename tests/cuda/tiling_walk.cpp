// Prints the tile walk of natten_mlx/tiling.h for axis geometries read from stdin, one per line:
//   L K s d causal off n T TK
// Output per geometry: "G" line, then for every group g and query tile: "T g c0 c1 kb ke", one
// "K k0 k1 class" per key tile, and for every key coordinate kc of every group "Q g kc begin end".
// tests/cuda/test_tiling.py compares this with the float64 oracle's masks.
#include <cstdio>
#include "natten_mlx/window.h"
#include "natten_mlx/tiling.h"

int main() {
  int L, K, s, d, causal, off, n, T, TK;
  while (std::scanf("%d %d %d %d %d %d %d %d %d", &L, &K, &s, &d, &causal, &off, &n, &T, &TK) == 9) {
    std::printf("G %d\n", na_query_tiles(off, n, d, T));
    for (int g = 0; g < d; ++g) {
      int Lg = na_group_len(L, d, g);
      int first = na_group_first(off, d, g), end = na_group_end(off, n, d, g);
      for (int c0 = first; c0 < end; c0 += T) {
        int c1 = na_min(c0 + T, end) - 1;
        int kb = na_tile_key_begin(c0, Lg, K, s, causal), ke = na_tile_key_end(c1, Lg, K, s, causal);
        std::printf("T %d %d %d %d %d\n", g, c0, c1, kb, ke);
        for (int t = 0; t < na_key_tiles(kb, ke, TK); ++t) {
          int k0 = kb + t * TK, k1 = na_min(k0 + TK, ke);
          std::printf("K %d %d %d\n", k0, k1, na_tile_class(c0, c1, k0, k1, Lg, K, s, causal));
        }
        // the whole group's key axis in tiles of TK from 0, to exercise SKIP too
        for (int k0 = 0; k0 < Lg; k0 += TK) {
          int k1 = na_min(k0 + TK, Lg);
          std::printf("A %d %d %d\n", k0, k1, na_tile_class(c0, c1, k0, k1, Lg, K, s, causal));
        }
      }
      for (int kc = 0; kc < Lg; ++kc)
        std::printf("Q %d %d %d %d\n", g, kc, na_query_begin(kc, Lg, K, s, causal), na_query_end(kc, Lg, K, s, causal));
    }
    std::printf("E\n");
  }
  return 0;
}
