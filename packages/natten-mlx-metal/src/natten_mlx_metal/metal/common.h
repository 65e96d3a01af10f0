// natten_mlx_metal/metal/common.h: what every natten-mlx Metal kernel body shares. The Python side
// prepends `#define NA_FUNC inline`, window.h and tiling.h, then this file, as the header= of
// mx.fast.metal_kernel. Kernels read their geometry from one int buffer `prm`:
// 8 scalars, then NA_AXIS_INTS per spatial axis; problems of rank < 3 are padded in front with
// trivial axes (L = n = nk = K = s = d = 1), so every kernel walks three axes.
#define NA_P_B 0
#define NA_P_H 1
#define NA_P_HKV 2
#define NA_P_N 3      // local queries (product of n)
#define NA_P_NK 4     // local keys (product of nk)
#define NA_P_D 5
#define NA_P_DV 6
#define NA_P_E 7      // additional keys/values (0 when none)
#define NA_AXIS_INTS 12
#define NA_P_RPB 44   // rpb entries per head: prod(2K - 1)
#define NA_P_HASRPB 45
#define NA_P_INTS 46

struct NaAxis {
  int L;       // global axis length: the domain the window rules apply to
  int n;       // local query extent
  int nk;      // local key/value extent
  int qoff;    // global index of local query 0
  int kvoff;   // global index of local key 0
  int K, s, d;
  bool causal;
  int tiles;   // tiles per dilation group along this axis (query tiles, or key tiles in the backward)
  int tq;      // query tile extent (a member named T would meet the kernels' template parameter T)
  int tk;      // key tile extent
};

NA_FUNC NaAxis na_axis(const device int* prm, int a) {
  int o = 8 + NA_AXIS_INTS * a;
  NaAxis x;
  x.L = prm[o]; x.n = prm[o + 1]; x.nk = prm[o + 2]; x.qoff = prm[o + 3]; x.kvoff = prm[o + 4];
  x.K = prm[o + 5]; x.s = prm[o + 6]; x.d = prm[o + 7]; x.causal = prm[o + 8] != 0; x.tiles = prm[o + 9];
  x.tq = prm[o + 10]; x.tk = prm[o + 11];
  return x;
}

// Row-major flat index of a local token from its local coordinates.
NA_FUNC int na_flat(int i0, int i1, int i2, int n1, int n2) { return (i0 * n1 + i1) * n2 + i2; }

// Column of the rpb table (per head, prod(2K - 1) entries) for query/key in-group coordinates.
NA_FUNC int na_rpb_col(thread const NaAxis* ax, thread const int* c, thread const int* kc) {
  int r = 0;
  for (int a = 0; a < 3; ++a) r = r * (2 * ax[a].K - 1) + na_rpb_index(c[a], kc[a], ax[a].K);
  return r;
}

// Keys (or queries) staged per tile in threadgroup memory: the most of 32, 16, 8 whose key and
// value rows fit in 32 KB (Apple GPUs' threadgroup memory) less 2 KB for per-row tables (lse,
// delta, tokens, windows). The Python side computes the same.
constexpr int na_stage_rows(int dp, int dvp, int esize) {
  return (dp + dvp) * esize * 32 <= 32768 - 2048 ? 32 : (dp + dvp) * esize * 16 <= 32768 - 2048 ? 16 : 8;
}

// The tile box of threadgroup `tile`: per axis its dilation group g and in-group coordinate range
// [c0, c1] among the local tokens [off, off + n) (queries, or keys for the key-major backward).
// tiling.h's grid decode (na_tile_digit/group/first/last), the one the CUDA tier uses too.
// Returns false when the tile is empty (its group has fewer tiles than the grid provides).
NA_FUNC bool na_tile_range(thread const NaAxis* ax, int tile, bool keys, thread int* g, thread int* c0, thread int* c1) {
  bool ok = true;
  for (int a = 0; a < 3; ++a) {
    int u = na_tile_digit(tile, ax[1].d * ax[1].tiles, ax[2].d * ax[2].tiles, a);
    int off = keys ? ax[a].kvoff : ax[a].qoff;
    int n = keys ? ax[a].nk : ax[a].n;
    int ext = keys ? ax[a].tk : ax[a].tq;
    g[a] = na_tile_group(u, ax[a].tiles);
    c0[a] = na_tile_first(u, ax[a].tiles, off, ax[a].d, ext);
    c1[a] = na_tile_last(u, ax[a].tiles, off, n, ax[a].d, ext);
    if (c0[a] > c1[a]) ok = false;
  }
  return ok;
}

// The slot of a thread (or staged row) r in a tile box of extents ext[0..2] anchored at c0:
// per-axis coordinates; false when r lies outside the box or past the last coordinate c1.
NA_FUNC bool na_box_slot(int r, thread const int* ext, thread const int* c0, thread const int* c1, thread int* c) {
  bool ok = true;
  for (int a = 2; a >= 0; --a) {
    c[a] = c0[a] + r % ext[a];
    r /= ext[a];
    if (c[a] > c1[a]) ok = false;
  }
  return ok && r == 0;
}

// Local flat token of in-group coordinates c of groups g (local slab of extents n at offset off).
NA_FUNC int na_token(thread const NaAxis* ax, thread const int* g, thread const int* c, bool keys) {
  int t = 0;
  for (int a = 0; a < 3; ++a) {
    int n = keys ? ax[a].nk : ax[a].n;
    int off = keys ? ax[a].kvoff : ax[a].qoff;
    t = t * n + (c[a] * ax[a].d + g[a] - off);
  }
  return t;
}

// Whether key coordinates kc lie in the window of query coordinates qc on every axis.
NA_FUNC bool na_in_windows(thread const NaAxis* ax, thread const int* Lg, thread const int* qc, thread const int* kc) {
  for (int a = 0; a < 3; ++a) {
    if (kc[a] < na_window_start(qc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal)) return false;
    if (kc[a] >= na_window_end(qc[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal)) return false;
  }
  return true;
}

// The window of local query token t (the split ops' kernels): per axis its dilation group g,
// in-group coordinate c, group length Lg and window [ws, we) in in-group coordinates. Slot j of
// the window (row-major over the per-axis slots) is the key ws + j per axis, valid while < we.
NA_FUNC void na_query_window(thread const NaAxis* ax, int t, thread int* g, thread int* c, thread int* Lg,
                             thread int* ws, thread int* we) {
  for (int a = 2; a >= 0; --a) {
    int gi = t % ax[a].n + ax[a].qoff;
    t /= ax[a].n;
    g[a] = gi % ax[a].d;
    c[a] = gi / ax[a].d;
    Lg[a] = na_group_len(ax[a].L, ax[a].d, g[a]);
    ws[a] = na_window_start(c[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
    we[a] = na_window_end(c[a], Lg[a], ax[a].K, ax[a].s, ax[a].causal);
  }
}

// One 8x8x8 multiply-accumulate of the simdgroup, d = a * b + c, on this lane's two elements of
// each fragment (Apple's lane layout; see fwd_mma.metal). Fragments live in float2 registers and
// become simdgroup matrices only here, as in MLX's steel attention (BaseMMAFrag::mma).
NA_FUNC float2 na_mma(float2 a, float2 b, float2 c) {
  simdgroup_matrix<float, 8, 8> A, B, C, Dm;
  A.thread_elements()[0] = a.x;
  A.thread_elements()[1] = a.y;
  B.thread_elements()[0] = b.x;
  B.thread_elements()[1] = b.y;
  C.thread_elements()[0] = c.x;
  C.thread_elements()[1] = c.y;
  simdgroup_multiply_accumulate(Dm, A, B, C);
  return float2(Dm.thread_elements()[0], Dm.thread_elements()[1]);
}
