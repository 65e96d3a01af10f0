// natten_mlx/window.h: the per-axis window arithmetic of neighborhood attention (SEMANTICS.md),
// one source for every compiled dialect: C++ (the nanobind tier), CUDA (NVRTC, mx.fast.cuda_kernel)
// and Metal (MSL, mx.fast.metal_kernel). Plain functions over ints: no includes, no std::, no
// structs, so the same text is valid in all three. It is the C twin of natten_mlx/windows.py and is
// tested against that module's tables.
//
// Qualifiers: define NA_FUNC before this header (CUDA: `__device__ __forceinline__`; Metal and C++:
// the default `inline`). Python code reads the text with natten_mlx.geometry.window_header().
//
// Coordinates. Along one axis of length L with dilation d, token i belongs to dilation group
// g = i % d and has in-group coordinate c = i / d; the group holds Lg = na_group_len(L, d, g) tokens.
// Queries only see keys of their own group, and every rule below is in group coordinates.
// Within a group, a query's keys are the contiguous range [na_window_start, na_window_end) of
// in-group coordinates; input index of in-group coordinate kc is kc * d + g.
// Both ends are non-decreasing in c, which is what the tile functions at the bottom rely on.
//
// Sub-domains (sharded attention): the rules are always applied in global coordinates (the full
// axis length L); a kernel that holds a slab converts local indices to global ones and back.
#ifndef NATTEN_MLX_WINDOW_H
#define NATTEN_MLX_WINDOW_H

#ifndef NA_FUNC
#define NA_FUNC inline
#endif

NA_FUNC int na_min(int a, int b) { return a < b ? a : b; }
NA_FUNC int na_max(int a, int b) { return a > b ? a : b; }

// Number of tokens of dilation group g (0 <= g < d <= L): ceil((L - g) / d).
NA_FUNC int na_group_len(int L, int d, int g) { return (L - g + d - 1) / d; }

// First key (in-group coordinate) of the window of the query with in-group coordinate c.
// Non-causal: stride groups of s queries share the window of their leader (the middle query,
// clamped to the group); the window of K keys is centred on the leader, shifted inwards at the borders.
// Causal: the leader is the last query of the stride group; the window ends at the query itself.
NA_FUNC int na_window_start(int c, int Lg, int K, int s, bool causal) {
  if (causal) {
    int leader = na_min((c / s) * s + s - 1, Lg - 1);
    return na_max(leader - K + 1, 0);
  }
  int wl = K / 2;
  int wr = K / 2 + (K % 2) - 1;
  int leader = na_min((c / s) * s + s / 2, Lg - 1);
  int centre = na_min(na_max(leader, wl), Lg - 1 - wr);
  return centre - wl;
}

// One past the last key (in-group coordinate) of the window of query c: start + K, or c + 1 causal.
NA_FUNC int na_window_end(int c, int Lg, int K, int s, bool causal) {
  return causal ? c + 1 : na_window_start(c, Lg, K, s, false) + K;
}

// Whether key input index j is in the window of query input index i along this axis.
NA_FUNC bool na_in_window(int i, int j, int L, int K, int s, int d, bool causal) {
  int g = i % d;
  if (j % d != g) return false;
  int c = i / d, kc = j / d, Lg = na_group_len(L, d, g);
  return kc >= na_window_start(c, Lg, K, s, causal) && kc < na_window_end(c, Lg, K, s, causal);
}

// Input index of the first key of query i's window, and the number of keys in it (K unless causal).
NA_FUNC int na_key_first(int i, int L, int K, int s, int d, bool causal) {
  int g = i % d;
  return na_window_start(i / d, na_group_len(L, d, g), K, s, causal) * d + g;
}
NA_FUNC int na_key_count(int i, int L, int K, int s, int d, bool causal) {
  int g = i % d, c = i / d, Lg = na_group_len(L, d, g);
  return na_window_end(c, Lg, K, s, causal) - na_window_start(c, Lg, K, s, causal);
}

// Column of the relative positional bias for (query c, key kc) in group coordinates: kc - c + K - 1,
// in [0, 2K - 1) for every key of the window (non-causal; rpb is not allowed with causal masking).
NA_FUNC int na_rpb_index(int c, int kc, int K) { return kc - c + K - 1; }

// ---- tiles (all in group coordinates of one dilation group of length Lg) ----
// A query tile holds the queries [c0, c1] (inclusive). Because both window ends are non-decreasing
// in c, the union of the tile's windows is the single range [na_tile_key_begin, na_tile_key_end).
NA_FUNC int na_tile_key_begin(int c0, int Lg, int K, int s, bool causal) {
  return na_window_start(c0, Lg, K, s, causal);
}
NA_FUNC int na_tile_key_end(int c1, int Lg, int K, int s, bool causal) {
  return na_window_end(c1, Lg, K, s, causal);
}
// Whether the keys [k0, k1) lie inside the window of every query of [c0, c1]: such a key tile
// needs no per-element mask along this axis.
NA_FUNC bool na_tile_full(int c0, int c1, int k0, int k1, int Lg, int K, int s, bool causal) {
  return k0 >= na_window_start(c1, Lg, K, s, causal) && k1 <= na_window_end(c0, Lg, K, s, causal);
}
// Whether the keys [k0, k1) meet the window of at least one query of [c0, c1]: a key tile for
// which this is false on any axis is skipped.
NA_FUNC bool na_tile_meets(int c0, int c1, int k0, int k1, int Lg, int K, int s, bool causal) {
  return k0 < na_window_end(c1, Lg, K, s, causal) && k1 > na_window_start(c0, Lg, K, s, causal);
}

#endif  // NATTEN_MLX_WINDOW_H
