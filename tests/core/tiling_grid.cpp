// Prints tiling.h's grid decode (na_tile_digit/group/first/last) for the 3-axis tile grids read
// from stdin, one per line: "off0 n0 d0 T0 off1 n1 d1 T1 off2 n2 d2 T2". For each grid: a line
// "G per0 per1 per2" (per_a = d_a * na_query_tiles), then one line per flat tile index
// "B u0 g0 c00 c10 u1 g1 c01 c11 u2 g2 c02 c12", then "E".
#include <cstdio>

#include "natten_mlx/window.h"
#include "natten_mlx/tiling.h"

int main() {
  int off[3], n[3], d[3], T[3];
  while (true) {
    for (int a = 0; a < 3; ++a)
      if (std::scanf("%d %d %d %d", &off[a], &n[a], &d[a], &T[a]) != 4) return 0;
    int tiles[3], per[3];
    for (int a = 0; a < 3; ++a) {
      tiles[a] = na_query_tiles(off[a], n[a], d[a], T[a]);
      per[a] = d[a] * tiles[a];
    }
    std::printf("G %d %d %d\n", per[0], per[1], per[2]);
    for (int tile = 0; tile < per[0] * per[1] * per[2]; ++tile) {
      std::printf("B");
      for (int a = 0; a < 3; ++a) {
        int u = na_tile_digit(tile, per[1], per[2], a);
        std::printf(" %d %d %d %d", u, na_tile_group(u, tiles[a]), na_tile_first(u, tiles[a], off[a], d[a], T[a]),
                    na_tile_last(u, tiles[a], off[a], n[a], d[a], T[a]));
      }
      std::printf("\n");
    }
    std::printf("E\n");
  }
}
