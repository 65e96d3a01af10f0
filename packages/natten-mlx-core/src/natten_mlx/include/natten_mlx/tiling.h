// natten_mlx/tiling.h: the tile walk of the GPU tiers (CUDA and Metal), built on window.h.
// Include window.h first (the tiers prepend both texts, window.h then this one). Plain functions
// over ints with the NA_FUNC qualifier, valid C++, CUDA and MSL alike.
//
// The walk, per spatial axis and dilation group g:
//   1. The local queries of group g are the in-group coordinates [na_group_first, na_group_end)
//      (local slab of n queries starting at global index off; whole-domain problems have off = 0).
//   2. They are cut into query tiles of T coordinates; tile t holds [c0, c1] with
//      c0 = first + t * T and c1 = min(c0 + T, end) - 1. A kernel's query tile is the box product
//      of one such range per axis, all in one dilation group per axis.
//   3. The keys of the tile are the range [na_tile_key_begin(c0), na_tile_key_end(c1)) (window.h),
//      cut into key tiles of TK coordinates starting at the range's beginning.
//   4. Each key tile is classified along each axis (na_tile_class): NA_TILE_SKIP (no query of the
//      tile sees any of its keys), NA_TILE_PARTIAL (a per-element mask is needed), NA_TILE_FULL
//      (every query sees every key). A box key tile is skipped if any axis says SKIP, needs no
//      mask only if every axis says FULL.
// The backward's key-major walk inverts this: the queries whose windows contain the keys [k0, k1)
// are the in-group coordinates [na_query_begin(k0), na_query_end(k1 - 1)), since both window ends
// are non-decreasing in the query coordinate.
#ifndef NATTEN_MLX_TILING_H
#define NATTEN_MLX_TILING_H

#ifndef NATTEN_MLX_WINDOW_H
#error "include natten_mlx/window.h before natten_mlx/tiling.h"
#endif

#define NA_TILE_SKIP 0
#define NA_TILE_PARTIAL 1
#define NA_TILE_FULL 2

// First in-group coordinate of group g whose global index c * d + g is >= off.
NA_FUNC int na_group_first(int off, int d, int g) { return off <= g ? 0 : (off - g + d - 1) / d; }

// One past the last in-group coordinate of group g whose global index is < off + n.
NA_FUNC int na_group_end(int off, int n, int d, int g) {
  int hi = off + n - g;  // global indices < off + n
  return hi <= 0 ? 0 : (hi + d - 1) / d;
}

// Query tiles per dilation group that a grid must provide along one axis: enough for the group
// with the most local coordinates (at most ceil(n / d) + 1 of them when the slab is offset).
NA_FUNC int na_query_tiles(int off, int n, int d, int T) {
  int most = 0;
  for (int g = 0; g < d; ++g) {
    int m = na_group_end(off, n, d, g) - na_group_first(off, d, g);
    most = na_max(most, m);
  }
  return (most + T - 1) / T;
}

// Number of key tiles of TK coordinates covering [kb, ke).
NA_FUNC int na_key_tiles(int kb, int ke, int TK) { return ke > kb ? (ke - kb + TK - 1) / TK : 0; }

// Class of keys [k0, k1) for the queries [c0, c1] along one axis.
NA_FUNC int na_tile_class(int c0, int c1, int k0, int k1, int Lg, int K, int s, bool causal) {
  if (!na_tile_meets(c0, c1, k0, k1, Lg, K, s, causal)) return NA_TILE_SKIP;
  return na_tile_full(c0, c1, k0, k1, Lg, K, s, causal) ? NA_TILE_FULL : NA_TILE_PARTIAL;
}

// First query (in-group coordinate) whose window ends after key kc: the first c with
// na_window_end(c) > kc (Lg if none).
NA_FUNC int na_query_begin(int kc, int Lg, int K, int s, bool causal) {
  if (causal) return na_min(kc, Lg);
  int lo = 0, hi = Lg;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (na_window_end(mid, Lg, K, s, false) > kc) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// One past the last query whose window starts at or before key kc: the first c with
// na_window_start(c) > kc (Lg if none).
NA_FUNC int na_query_end(int kc, int Lg, int K, int s, bool causal) {
  int lo = 0, hi = Lg;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (na_window_start(mid, Lg, K, s, causal) > kc) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// ---- the grid: which tile box a threadgroup (block) owns ----
// A tier launches one threadgroup per tile box and numbers the boxes by one flat index, axis 2
// fastest. Along axis a the index has a digit u in [0, d_a * tiles_a): dilation group
// u / tiles_a, tile u % tiles_a of that group (steps 1 and 2 above). tiles_a is what the grid
// provides per group (na_query_tiles for query tiles), so groups with fewer local coordinates
// have empty tiles at their end: na_tile_last < na_tile_first there, and the whole box is empty.
// Key-major walks (the backward's dK/dV) decode key tiles the same way, with the key slab's
// offset and extent.

// Digit of axis a (0, 1, 2) of a flat tile index; per1, per2 are d * tiles of axes 1 and 2.
NA_FUNC int na_tile_digit(int tile, int per1, int per2, int a) {
  if (a == 2) return tile % per2;
  if (a == 1) return (tile / per2) % per1;
  return tile / (per2 * per1);
}

// Dilation group of digit u along an axis with `tiles` tiles per group.
NA_FUNC int na_tile_group(int u, int tiles) { return u / tiles; }

// First in-group coordinate c0 of the tile of digit u (local slab [off, off + n), tiles of T).
NA_FUNC int na_tile_first(int u, int tiles, int off, int d, int T) {
  return na_group_first(off, d, u / tiles) + (u % tiles) * T;
}

// Last in-group coordinate c1 (inclusive) of the tile of digit u; below na_tile_first when the
// tile is empty.
NA_FUNC int na_tile_last(int u, int tiles, int off, int n, int d, int T) {
  return na_min(na_tile_first(u, tiles, off, d, T) + T, na_group_end(off, n, d, u / tiles)) - 1;
}

#endif  // NATTEN_MLX_TILING_H
