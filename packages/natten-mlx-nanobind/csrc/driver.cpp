// Tile drivers: a query tile (a box of queries of one dilation group, times the G query heads of
// one kv head) attends to the union of its windows, which window.h guarantees is one box of keys
// per axis. Scores are then small dense GEMMs ([G*T, D] x [D, box]) with the window mask applied
// only when the softmax reads them; the extra keys/values are extra columns of the same box.
#include "driver.h"

#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <xmmintrin.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"
#include "natten_mlx/window.h"

namespace na {

// ---------------------------------------------------------------- thread pool
namespace {

// Orders this thread's non-temporal stores (add_transposed's, the kernels' row stores) before whatever
// it does next: every pool task ends with one, before the caller learns the job is done
inline void nt_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

int default_threads() {
  if (const char* env = std::getenv("NATTEN_MLX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
#if defined(__linux__)
  // the CPUs this process may run on (a container's or taskset's share), where Linux says
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long the pool's threads wait awake (spinning) for the next job, and the caller for the workers, before
// they sleep: NATTEN_MLX_SPIN_US microseconds (read per job; 0: sleep at once)
int64_t spin_ns() {
  const char* env = std::getenv("NATTEN_MLX_SPIN_US");
  if (!env) return 200000;
  return std::max<int64_t>(0, std::atoll(env)) * 1000;
}

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  int size() const { return n_; }

  void run(int64_t n, void (*fn)(int64_t, void*), void* ctx) {
    // one job at a time: a second stream (another Python thread) waits for the pool
    std::lock_guard<std::mutex> submit(submit_);
    const int64_t spin = spin_ns();
    if (n_ <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i, ctx);
      nt_fence();
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = fn;
      ctx_ = ctx;
      total_ = n;
      next_.store(0);
      active_ = 0;
      closed_ = false;
      error_ = nullptr;
      ++generation_;
      spin_ns_.store(spin, std::memory_order_relaxed);
      gen_.store(generation_, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    // Every item is taken: close the job to workers not in it yet and wait only for those in it. A
    // worker still waking up (tens of microseconds on a busy machine, ~25 us per call on small
    // problems when the caller waited for every worker) skips the closed job.
    std::unique_lock<std::mutex> lk(m_);
    closed_ = true;
    if (active_ != 0 && spin) {
      lk.unlock();
      spin_until([this] { return busy_.load(std::memory_order_acquire) == 0; }, spin);
      lk.lock();
    }
    done_.wait(lk, [this] { return active_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= total_) {
        nt_fence();
        return;
      }
      try {
        fn_(i, ctx_);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_m_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }
  // Spins (pausing) until done() or for ns nanoseconds: a thread that sleeps on a futex takes tens of
  // microseconds to wake on a virtual CPU that halted, on the critical path of every call.
  template <class F>
  static void spin_until(F&& done, int64_t ns) {
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (done()) return;
        cpu_relax();
      }
      if (std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count() > ns)
        return;
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      // the next job often follows within microseconds (a model's next op): wait for it awake a while
      const int64_t spin = spin_ns_.load(std::memory_order_relaxed);
      if (spin) spin_until([&] { return gen_.load(std::memory_order_acquire) != seen; }, spin);
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (closed_) continue;
      ++active_;
      busy_.store(active_, std::memory_order_release);
      lk.unlock();
      work();
      lk.lock();
      busy_.store(active_ - 1, std::memory_order_release);
      if (--active_ == 0 && closed_) done_.notify_all();
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex submit_, m_, err_m_;
  std::condition_variable cv_, done_;
  void (*fn_)(int64_t, void*) = nullptr;
  void* ctx_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;     // workers inside the current job
  bool closed_ = true;  // the caller took its last item: no worker joins any more
  uint64_t generation_ = 0;
  std::exception_ptr error_;
  // lock-free mirrors of generation_ and active_ for the spinning waits, and the job's spin budget
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> busy_{0};
  std::atomic<int64_t> spin_ns_{0};
};

std::mutex pool_mutex;
Pool* pool_ptr = nullptr;
pid_t pool_pid = 0;

Pool& pool() {
  std::lock_guard<std::mutex> lk(pool_mutex);
  // a forked child has no worker threads: make a new pool there (the old one is left behind)
  if (!pool_ptr || pool_pid != getpid()) {
    pool_ptr = new Pool(default_threads());
    pool_pid = getpid();
  }
  return *pool_ptr;
}

}  // namespace

void parallel_for(int64_t n, void (*fn)(int64_t, void*), void* ctx) { pool().run(n, fn, ctx); }

namespace {
// queries served: forward runs, border blocks, tiles; backward the same (tests read them); 6-11: the
// switches below; 12 / 13: forward / backward tile rows (query x head) whose windows are the whole box;
// 14: backward calls whose tiles stored dk / dv (tiles_store)
std::atomic<int64_t> path_count[15];
constexpr int kPaths = static_cast<int>(sizeof(path_count) / sizeof(path_count[0]));
// Large scratch buffers (the transposed key/value slices, the backward's sums: megabytes read in
// strides of a row of tokens) in transparent huge pages where the kernel offers them: the exact path
// reads 32 features x 8 key rows of keys and as many of values per block, ~100 distinct 4 KiB pages,
// more than the L1 TLB holds. Below 1 MiB, plain malloc.
template <class T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <class U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T), huge = size_t(2) << 20;
    void* p = nullptr;
    if (bytes >= (size_t(1) << 20)) {
      const size_t sz = (bytes + huge - 1) / huge * huge;
      p = std::aligned_alloc(huge, sz);
#ifdef MADV_HUGEPAGE
      if (p) madvise(p, sz, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
#endif
    } else {
      p = std::malloc(bytes ? bytes : 1);
    }
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const HugeAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const HugeAlloc<U>&) const { return false; }
};

struct Scratch {
  std::vector<std::vector<float, HugeAlloc<float>>> bufs;
  size_t next = 0;
};
thread_local Scratch tls_scratch;
// memory kept between calls beyond this is given back
constexpr size_t kScratchKeep = size_t(256) << 20;
}  // namespace

void scratch_reset() {
  Scratch& s = tls_scratch;
  size_t total = 0;
  for (auto& b : s.bufs) total += b.capacity() * sizeof(float);
  if (total > kScratchKeep) s.bufs.clear();
  s.next = 0;
}

float* scratch(size_t n, bool zero) {
  Scratch& s = tls_scratch;
  if (s.next == s.bufs.size()) s.bufs.emplace_back();
  auto& b = s.bufs[s.next++];
  if (b.size() < n + 16) b.resize(n + 16);  // 16 floats of slack for the padded row helpers
  if (zero) std::memset(b.data(), 0, sizeof(float) * n);
  return b.data();
}
int num_threads() { return pool().size(); }
std::vector<int64_t> path_counts(bool reset) {
  std::vector<int64_t> out(kPaths);
  for (int i = 0; i < kPaths; ++i) out[i] = reset ? path_count[i].exchange(0) : path_count[i].load();
  return out;
}
const char* simd_name() { return select_kernels().name; }

// ---------------------------------------------------------------- geometry helpers
namespace {

struct Tile {
  int g[3], c0[3], c1[3];  // dilation group and inclusive query range, group coordinates
};

struct Plan {
  int tq[3];
  std::vector<Tile> tiles;
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int max_group_len(const Geo& g, int a) { return na_group_len(g.dom[a], g.Dl[a], 0); }

// there are tiles and every one covers its whole group along every axis (DiNAT's dilation groups of K, NAT's
// 7 x 7 maps at K = 7): no two tiles' key boxes overlap, so the tiles pack their keys straight from the
// heads-last rows (pack_keys_hl) instead of from a transposed copy of every slice made for them
bool whole_group_tiles(const Geo& g, const Plan& p) {
  for (int a = 0; a < 3; ++a)
    if (p.tq[a] < max_group_len(g, a)) return false;
  return !p.tiles.empty();
}

// The exact-window path: along the last axis, blocks of vw queries whose windows start at
// consecutive keys (stride 1, away from borders) are served one query per vector lane, from queries,
// keys and values stored transposed with each dilation group's tokens contiguous. The tile path takes
// the remaining queries (borders, strided or short causal windows, groups shorter than vw) and the
// problems this path does not serve (sub-domains, extra keys).
struct ExactBlock {
  int c, skip;  // first query (group coordinate); lanes before skip are written by another block
  int ws, nx;   // lane 0's window along the last axis (lane l's starts at ws + l)
  int run;      // index in runs[g2]
};

// A maximal run [u0, u1] of queries (group coordinates) whose windows shift by one key per query:
// query u0 + t has the nx keys ws0 + t + [0, nx); its blocks are blocks[g2][b0, b1).
// A border block (masked) is a run of vw queries whose windows do not all shift by one: its slots are
// keys ws0 + t + [0, nx) too, of which query u0 + t holds those x with lo[t] <= x < hi[t]; the
// queries it serves are those with lo < hi (the others are written elsewhere and get lo = hi = 0).
struct ExactRun {
  int u0, u1, ws0, nx, b0, b1;
  bool masked;
  int lohi[32];  // lo[vw] then hi[vw] (masked runs only)
};

struct ExactPlan {
  bool on = false;
  int64_t nfast = 0, nborder = 0;  // queries per (batch, head) this path serves, and in border blocks
  std::vector<std::vector<ExactBlock>> blocks;  // per last-axis group
  std::vector<std::vector<ExactRun>> runs;      // per last-axis group
  std::vector<std::vector<char>> fast;          // per last-axis group and coordinate: served here
  // offset of each last-axis group in the permuted axis, after front padding: border blocks read a
  // few keys before and after their group, which must be finite (zeros or a neighbour's keys)
  std::vector<int64_t> gstart;
  int64_t front = 0, ld = 0;  // padding before a slice row's first token; row length (transposed buffers)
  struct Row {
    int g[3], c0, c1;
  };
  std::vector<Row> rows;
  // 2D/3D: rows r and r + 1 are neighbours along the second-to-last axis (same group), whose blocks
  // at the same lanes share most key rows and go in pairs
  bool pairs_with_next(size_t r) const {
    if (r + 1 >= rows.size()) return false;
    const Row &x = rows[r], &y = rows[r + 1];
    return x.g[0] == y.g[0] && x.g[1] == y.g[1] && x.g[2] == y.g[2] && x.c0 == y.c0 && y.c1 == x.c1 + 1;
  }
};

// 2D/3D: the flat index of token (c0, c1, 0) of groups g0, g1 along the first two axes (its row along
// the last axis starts there)
inline int64_t row_token(const Geo& g, int g0, int g1, int c0, int c1) {
  return ((static_cast<int64_t>(c0) * g.Dl[0] + g0) * g.L[1] + (static_cast<int64_t>(c1) * g.Dl[1] + g1)) * g.L[2];
}

// 2D/3D: fn(i0, i1) for the key rows of an exact-plan row's window in ascending order, (i0, i1) their group
// coordinates along the first two axes
template <class F>
void for_window_rows(const Geo& g, const ExactPlan::Row& row, F&& fn) {
  const int lg0 = na_group_len(g.L[0], g.Dl[0], row.g[0]), lg1 = na_group_len(g.L[1], g.Dl[1], row.g[1]);
  const int ws0 = na_window_start(row.c0, lg0, g.K[0], g.S[0], g.C[0]);
  const int we0 = na_window_end(row.c0, lg0, g.K[0], g.S[0], g.C[0]);
  const int ws1 = na_window_start(row.c1, lg1, g.K[1], g.S[1], g.C[1]);
  const int we1 = na_window_end(row.c1, lg1, g.K[1], g.S[1], g.C[1]);
  for (int i0 = ws0; i0 < we0; ++i0)
    for (int i1 = ws1; i1 < we1; ++i1) fn(i0, i1);
}

// 2D/3D: the key rows of an exact-plan row's window in ascending order, fn(base) with base the index
// of the key row's first token in the permuted layout (its last-axis group starts at ep.gstart)
template <class F>
void for_window_key_rows(const Geo& g, const ExactPlan& ep, const ExactPlan::Row& row, F&& fn) {
  for_window_rows(g, row, [&](int i0, int i1) { fn(row_token(g, row.g[0], row.g[1], i0, i1) + ep.gstart[row.g[2]]); });
}

// 2D/3D with rpb: per key row of an exact-plan row's window (for_window_key_rows' order), the offset in a
// head's rpb [R0][R1][R2] of its entry for key - query = 0 along the last axis; slot x of a block whose first
// query c has window start ws is then entry + ws - c + x (its key - query along the last axis, as RowSlots'
// d), in [-(K2 - 1), K2 - 1] for every old slot of every block (make_exact_plan's block_span)
void window_rpb_rows(const Geo& g, const ExactPlan::Row& row, int64_t* out) {
  int n = 0;
  for_window_rows(g, row, [&](int i0, int i1) {
    out[n++] = ((i0 - row.c0 + g.K[0] - 1) * g.R[1] + (i1 - row.c1 + g.K[1] - 1)) * g.R[2] + g.K[2] - 1;
  });
}

// NATTEN_MLX_EXACT=0 turns the exact-window path off, =runs keeps its runs but leaves the border
// queries to the tile path (tests run every path on the same problem); read on every call so that a
// test can flip it between calls. 0: off, 1: runs only, 2 (default; also "all"): border blocks too.
int exact_mode() {
  const char* env = std::getenv("NATTEN_MLX_EXACT");
  if (!env) return 2;
  if (std::strcmp(env, "0") == 0) return 0;
  if (std::strcmp(env, "runs") == 0) return 1;
  return 2;
}

// NATTEN_MLX_ROW1D=0 sends the 1D exact path (forward and backward) through transposed copies (the
// seventh pass's kernels) instead of kt.row_fwd / kt.row_bwd on the heads-last rows; read on every
// call (tests run both)
bool row1d_mode() {
  const char* env = std::getenv("NATTEN_MLX_ROW1D");
  return !env || std::strcmp(env, "0") != 0;
}

// NATTEN_MLX_ROW2D=1 serves the 2D/3D exact path's forward from the heads-last rows too (kt.row_fwd_g:
// a query's window is its K0 (x K1) last-axis segments, gathered as offsets), instead of the
// transposed slices and exact_fwd2; read on every call (tests run both)
bool row2d_mode() {
  const char* env = std::getenv("NATTEN_MLX_ROW2D");
  return env && std::strcmp(env, "1") == 0;
}

// NATTEN_MLX_SHORT=0 leaves 2D/3D last-axis groups shorter than vw to the tile path (read per call; tests
// compare the two)
bool short_mode() {
  const char* env = std::getenv("NATTEN_MLX_SHORT");
  return !(env && env[0] == '0');
}

// borders: serve the queries next to the runs with masked blocks too (needs finite values: a masked
// slot's weight is 0, and 0 * inf is not)
ExactPlan make_exact_plan(const Geo& g, int vw, bool borders) {
  ExactPlan ep;
  const int mode = exact_mode();
  if (g.E || mode == 0) return ep;
  borders = borders && mode == 2;
  for (int a = 0; a < 3; ++a)
    if (g.qoff[a] || g.koff[a] || g.dom[a] != g.L[a] || g.Lk[a] != g.L[a]) return ep;
  const int Dl2 = g.Dl[2];
  // 2D/3D, AVX-512: groups along the last axis shorter than vw but at least 5/8 of it (10-15 tokens: NAT's
  // 14 x 14 maps) take one border block each, its lanes past the group idle, rather than the tile path
  // (paired at 14 x 14, K = 7: forward 0.44, forward+backward 0.71 of the tiles' time; K = 3 and 5 gain as
  // much). Shorter groups (NAT's 7 x 7, DiNAT's dilation groups of 7) stay on the tiles: there the backward
  // took 1.2-2x their time (its key side one row per pass, most lanes idle); so do AVX2's groups of 5-7
  // (1.1-1.5x the tiles' time). 1D rows that short are small problems the tiles serve.
  const bool short_groups = vw >= 16 && !(g.L[0] == 1 && g.L[1] == 1) && short_mode();
  ep.blocks.resize(Dl2);
  ep.runs.resize(Dl2);
  ep.fast.resize(Dl2);
  ep.gstart.resize(Dl2);
  const int64_t front = 16;
  int64_t off = front;
  bool any = false;
  for (int g2 = 0; g2 < Dl2; ++g2) {
    const int lg = na_group_len(g.L[2], Dl2, g2);
    ep.gstart[g2] = off;
    off += lg;
    auto ws = [&](int c) { return na_window_start(c, lg, g.K[2], g.S[2], g.C[2]); };
    auto we = [&](int c) { return na_window_end(c, lg, g.K[2], g.S[2], g.C[2]); };
    // the slots a block of vw queries from cb spans (its lanes' windows relative to its lane 0; the lanes
    // of queries in the group: all vw, or the lg of a group shorter than vw)
    auto block_span = [&](int cb, int* base_out) {
      int base = 1 << 30, top = -(1 << 30);
      const int nl = std::min(vw, lg - cb);
      for (int l = 0; l < nl; ++l) base = std::min(base, ws(cb + l) - l);
      for (int l = 0; l < nl; ++l) top = std::max(top, we(cb + l) - l);
      if (base_out) *base_out = base;
      return top - base;
    };
    // The group's blocks: runs (use_runs) and border blocks, or border blocks only. Returns the slots
    // its blocks compute (the kernels' work), or -1 when a query the runs would serve is left over.
    auto build = [&](bool use_runs, std::vector<ExactBlock>& blocks, std::vector<ExactRun>& runs,
                     std::vector<char>& fast) -> int64_t {
      blocks.clear();
      runs.clear();
      fast.assign(lg, 0);
      int64_t cost = 0;
      int c = 0;
      while (use_runs && c < lg) {
        // a maximal run [u0, u1] of queries whose windows shift by one key per query
        int u0 = c;
        while (c + 1 < lg && ws(c + 1) == ws(c) + 1 && we(c + 1) == we(c) + 1) ++c;
        int u1 = c++;
        if (u1 - u0 + 1 < vw) continue;
        // With border blocks, a run that starts (ends) less than vw queries from the group's edge
        // starts (ends) vw queries in instead: the edge's border block then serves all of its lanes
        // rather than the few the run leaves, and the run saves a block (C2's rows of 64 queries,
        // K = 7: 8 blocks of 7 slots and two border blocks of 10 became 6 and two; 18% fewer slots)
        if (borders && lg >= 2 * vw) {
          int t0 = u0, t1 = u1;
          if (t0 > 0 && t0 < vw && block_span(0, nullptr) <= g.K[2] + vw) t0 = vw;
          if (t1 < lg - 1 && t1 > lg - 1 - vw && block_span(lg - vw, nullptr) <= g.K[2] + vw) t1 = lg - 1 - vw;
          if (t1 - t0 + 1 >= vw) {
            u0 = t0;
            u1 = t1;
          }
        }
        const int b0 = static_cast<int>(blocks.size()), ri = static_cast<int>(runs.size());
        int next = u0;
        for (; next + vw <= u1 + 1; next += vw) blocks.push_back({next, 0, ws(next), we(next) - ws(next), ri});
        // the run's tail: one block ending at u1 that writes only the lanes not written yet
        if (next <= u1) {
          const int cb = u1 - vw + 1;
          blocks.push_back({cb, next - cb, ws(cb), we(cb) - ws(cb), ri});
        }
        for (int i = b0; i < static_cast<int>(blocks.size()); ++i) cost += blocks[i].nx;
        ExactRun run{u0, u1, ws(u0), we(u0) - ws(u0), b0, static_cast<int>(blocks.size()), false, {}};
        runs.push_back(run);
        for (int x = u0; x <= u1; ++x) fast[x] = 1;
      }
      if (!borders || (lg < vw && !(short_groups && lg * 8 >= vw * 5))) return use_runs ? cost : -1;
      // the remaining queries, in masked blocks of vw consecutive queries, when a block's slots stay
      // within K + vw (more would cost more than the tile path); a group shorter than vw is one block
      // whose lanes past the group serve no query
      for (int c = 0; c < lg; ++c) {
        if (fast[c]) continue;
        const int cb = std::max(0, std::min(c, lg - vw));
        int base;
        const int nx = block_span(cb, &base);
        if (nx > g.K[2] + vw) {
          if (!use_runs) return -1;
          continue;
        }
        ExactRun run{cb, cb + vw - 1, base, nx, 0, 0, true, {}};
        for (int l = 0; l < std::min(vw, lg - cb); ++l) {
          if (fast[cb + l]) continue;  // served by a run or an earlier border block
          run.lohi[l] = ws(cb + l) - l - base;
          run.lohi[vw + l] = we(cb + l) - l - base;
          fast[cb + l] = 1;
        }
        run.b0 = static_cast<int>(blocks.size());
        run.b1 = run.b0 + 1;
        blocks.push_back({cb, 0, base, nx, static_cast<int>(runs.size())});
        runs.push_back(run);
        cost += nx;
      }
      return cost;
    };
    const int64_t with_runs = build(true, ep.blocks[g2], ep.runs[g2], ep.fast[g2]);
    // Border blocks alone, where they compute fewer slots: a group too short for a run to keep a
    // whole block once its ends go to the edges' border blocks (2 vw > lg - K + 1) keeps the run's
    // first block and its tail, and border blocks for the few queries at each end (AVX-512, vw = 16,
    // C4's rows of 32 at K = 7: 7 + 7 + 10 + 10 slots, each border block serving 3 queries), where two
    // border blocks serve all of them (10 + 10)
    if (borders && lg >= vw && with_runs > 0) {
      std::vector<ExactBlock> blocks;
      std::vector<ExactRun> runs;
      std::vector<char> fast;
      const int64_t alone = build(false, blocks, runs, fast);
      if (alone >= 0 && alone < with_runs) {
        ep.blocks[g2] = std::move(blocks);
        ep.runs[g2] = std::move(runs);
        ep.fast[g2] = std::move(fast);
      }
    }
    for (char f : ep.fast[g2]) any = any || f;
  }
  // rows: front padding, the tokens, then room for the border blocks' reads and the key side's
  // whole-vector writes past a run; never a multiple of 1024 floats (the same L1 sets for every row)
  ep.front = front;
  ep.ld = round_up(front + g.L[0] * int64_t(g.L[1]) * g.L[2] + g.K[2] + 4 * vw, 16) + 16;
  if (ep.ld % 1024 == 0) ep.ld += 16;
  if (!any) return ep;
  ep.on = true;
  for (int g0 = 0; g0 < g.Dl[0]; ++g0)
    for (int g1 = 0; g1 < g.Dl[1]; ++g1)
      for (int g2 = 0; g2 < Dl2; ++g2) {
        if (ep.blocks[g2].empty()) continue;
        const int l0 = na_group_len(g.L[0], g.Dl[0], g0), l1 = na_group_len(g.L[1], g.Dl[1], g1);
        for (int c0 = 0; c0 < l0; ++c0)
          for (int c1 = 0; c1 < l1; ++c1) ep.rows.push_back({{g0, g1, g2}, c0, c1});
        int64_t served = 0, inruns = 0;
        for (char f : ep.fast[g2]) served += f;
        for (const ExactRun& run : ep.runs[g2])
          if (!run.masked) inruns += run.u1 - run.u0 + 1;
        ep.nfast += served * l0 * l1;
        ep.nborder += (served - inruns) * l0 * l1;
      }
  return ep;
}

void count_paths(int which, const Geo& g, const ExactPlan& ep) {
  const int64_t all = g.B * g.H * g.N, fast = ep.on ? g.B * g.H * ep.nfast : 0;
  const int64_t border = ep.on ? g.B * g.H * ep.nborder : 0;
  path_count[3 * which].fetch_add(fast - border);
  path_count[3 * which + 1].fetch_add(border);
  path_count[3 * which + 2].fetch_add(all - fast);
}

// The 2D/3D exact backward takes a row's runs and border blocks together, with P and dS indexed by
// d = key - query (group coordinates along the last axis): slot x of a block whose first query c has
// window start ws (lane l: key ws + l + x) is d = ws - c + x, for runs and border blocks alike. Per
// last-axis group: the d its blocks' slots span, [dlo, dhi), and per vector v of keys (v * vw +
// [0, vw)) the d - dlo, [vr[2v], vr[2v + 1]), of the in-window slots that reach those keys (the key
// side's sums for them; empty: lo == hi).
struct RowSlots {
  int dlo = 0, dhi = 0;
  std::vector<int> vr;
};

std::vector<RowSlots> row_slots(const Geo& g, const ExactPlan& ep, int vw) {
  std::vector<RowSlots> out(ep.blocks.size());
  for (size_t g2 = 0; g2 < ep.blocks.size(); ++g2) {
    if (ep.blocks[g2].empty()) continue;
    RowSlots& rs = out[g2];
    rs.dlo = 1 << 30;
    rs.dhi = -(1 << 30);
    for (const ExactBlock& blk : ep.blocks[g2]) {
      rs.dlo = std::min(rs.dlo, blk.ws - blk.c);
      rs.dhi = std::max(rs.dhi, blk.ws - blk.c + blk.nx);
    }
    const int lg = na_group_len(g.L[2], g.Dl[2], static_cast<int>(g2)), nvec = (lg + vw - 1) / vw;
    std::vector<int> lo(nvec, 1 << 30), hi(nvec, -(1 << 30));
    for (const ExactBlock& blk : ep.blocks[g2]) {
      const ExactRun& run = ep.runs[g2][blk.run];
      const int d0 = blk.ws - blk.c;
      for (int l = 0; l < vw; ++l) {
        const int x0 = run.masked ? run.lohi[l] : 0, x1 = run.masked ? run.lohi[vw + l] : blk.nx;
        for (int x = x0; x < x1; ++x) {
          const int v = (blk.c + l + d0 + x) / vw;  // the key, within [0, lg) for an in-window slot
          lo[v] = std::min(lo[v], d0 + x - rs.dlo);
          hi[v] = std::max(hi[v], d0 + x - rs.dlo + 1);
        }
      }
    }
    rs.vr.resize(2 * nvec);
    for (int v = 0; v < nvec; ++v) {
      rs.vr[2 * v] = lo[v] <= hi[v] ? lo[v] : 0;
      rs.vr[2 * v + 1] = lo[v] <= hi[v] ? hi[v] : 0;
    }
  }
  return out;
}

Plan make_plan(const Geo& g, int vw, const ExactPlan* ep = nullptr) {
  // per-query cost of a tile shape: GEMM rows are computed in blocks of ~6, every row of the tile
  // computes the whole key box, and a tile pays for packing its box once
  static const int cand[] = {1, 2, 4, 8, 16, 32, 64};
  double best = 1e300;
  int bt[3] = {1, 1, 1};
  // along the last axis, tiles cover what the exact path leaves: with it on, segments at the borders
  // (3 queries at K = 7), so a tile's extent there is the longest segment, not the group length (the
  // plan chose its other extents for tiles 8 long that then held 3 queries; C4's backward tiles cost
  // ~20% less per query with them chosen for the real extent)
  int len[3] = {max_group_len(g, 0), max_group_len(g, 1), max_group_len(g, 2)};
  if (ep && ep->on) {
    int seg = 1;
    for (const std::vector<char>& f : ep->fast)
      for (size_t c = 0, run = 0; c < f.size(); ++c) {
        run = f[c] ? 0 : run + 1;
        seg = std::max(seg, static_cast<int>(run));
      }
    len[2] = std::min(len[2], seg);
  }
  for (int t0 : cand) {
    if (t0 > 1 && t0 >= 2 * len[0]) break;
    for (int t1 : cand) {
      if (t1 > 1 && t1 >= 2 * len[1]) break;
      for (int t2 : cand) {
        if (t2 > 1 && t2 >= 2 * len[2]) break;
        int t[3] = {t0, t1, t2};
        double T = 1, box = 1;
        for (int a = 0; a < 3; ++a) {
          const int lg = len[a];
          int tt = std::min(t[a], lg);
          T *= tt;
          box *= std::min(tt + g.K[a] - 1, max_group_len(g, a));
        }
        double M = T * g.G;
        double np = static_cast<double>(round_up(static_cast<int64_t>(box) + g.E, vw));
        if (T > 1 && M * np > 65536) continue;  // scores of a tile stay in L2
        // GEMM rows plus the per-block loads of B, packing the box, the softmax over it, a fixed cost.
        // Packing (and the backward's sums scattered back) gathers heads-last rows: weighed at 24 per
        // float, as measured (NATTEN_MLX_TILE sweeps, 2026-12-01: the weight 1.5 chose tiles of 6
        // queries at C4's backward borders, 2x4x4 ran ~6% faster end to end, 1x8x8 ~10% at C3's, and
        // with the exact path off 1x4x4 ~17% faster than 1x2x2 at C2); 24 chooses those
        double gemm = (M + 2.0 * std::ceil(M / 6.0)) * np * (g.D + g.Dv);
        double cost = (gemm + np * (g.D + g.Dv) * 24.0 + M * np * 3.0 + 3000.0) / T;
        if (cost < best) {
          best = cost;
          bt[0] = t0;
          bt[1] = t1;
          bt[2] = t2;
        }
      }
    }
  }
  if (const char* env = std::getenv("NATTEN_MLX_TILE")) {
    // "t0,t1,t2" (for experiments): query tile extents per axis of the 3D-padded problem
    int t[3];
    if (std::sscanf(env, "%d,%d,%d", &t[0], &t[1], &t[2]) == 3 && t[0] > 0 && t[1] > 0 && t[2] > 0)
      for (int a = 0; a < 3; ++a) bt[a] = t[a];
  }
  Plan p;
  for (int a = 0; a < 3; ++a) p.tq[a] = bt[a];
  for (int g0 = 0; g0 < g.Dl[0]; ++g0)
    for (int g1 = 0; g1 < g.Dl[1]; ++g1)
      for (int g2 = 0; g2 < g.Dl[2]; ++g2) {
        int gs[3] = {g0, g1, g2};
        int lo[3], hi[3];  // in-group coordinates of this group's local queries
        bool empty = false;
        for (int a = 0; a < 3; ++a) {
          const int first = g.qoff[a] - gs[a], last = g.qoff[a] + g.L[a] - 1 - gs[a];
          if (last < 0) empty = true;
          lo[a] = first <= 0 ? 0 : (first + g.Dl[a] - 1) / g.Dl[a];
          hi[a] = last < 0 ? -1 : last / g.Dl[a];
          if (hi[a] < lo[a]) empty = true;
        }
        if (empty) continue;
        // last-axis segments the tile path serves: all of it, or the gaps between exact-path runs
        std::vector<std::pair<int, int>> segs;
        if (ep && ep->on) {
          const std::vector<char>& f = ep->fast[g2];
          for (int c = lo[2]; c <= hi[2];) {
            if (f[c]) {
              ++c;
              continue;
            }
            int e = c;
            while (e + 1 <= hi[2] && !f[e + 1]) ++e;
            segs.emplace_back(c, e);
            c = e + 1;
          }
        } else {
          segs.emplace_back(lo[2], hi[2]);
        }
        for (int c0 = lo[0]; c0 <= hi[0]; c0 += bt[0])
          for (int c1 = lo[1]; c1 <= hi[1]; c1 += bt[1])
            for (const auto& sg : segs)
              for (int c2 = sg.first; c2 <= sg.second; c2 += bt[2]) {
                Tile t;
                int cs[3] = {c0, c1, c2};
                const int he[3] = {hi[0], hi[1], sg.second};
                for (int a = 0; a < 3; ++a) {
                  t.g[a] = gs[a];
                  t.c0[a] = cs[a];
                  t.c1[a] = std::min(cs[a] + bt[a] - 1, he[a]);
                }
                p.tiles.push_back(t);
              }
      }
  return p;
}

float* grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

struct Workspace {
  std::vector<float> qp, kt, kp, vp, vt, s, p, dp, ds, tr, o, dob, dkb, dvb;
};
thread_local Workspace tls_ws;
thread_local std::vector<RowQuery> tls_rowq;
thread_local std::vector<int64_t> tls_seg, tls_off;  // row_chunk_nd's key rows and offsets

// Everything one tile needs to know about its queries and keys.
// tile t's key box along axis a: its first key (group coordinate) and how many
inline void tile_keys(const Geo& g, const Tile& t, int a, int* kb, int* nk) {
  const int lg = na_group_len(g.dom[a], g.Dl[a], t.g[a]);
  *kb = na_tile_key_begin(t.c0[a], lg, g.K[a], g.S[a], g.C[a]);
  *nk = na_tile_key_end(t.c1[a], lg, g.K[a], g.S[a], g.C[a]) - *kb;
}

struct TileGeo {
  int kb[3], nk[3];
  int64_t T, Nbox, Ncol, NP;
  std::vector<int64_t> qtok, ktok, rowtok;  // rowtok: first key token of each box row (last axis)
  std::vector<int> qc, ws, we;  // per query and axis: group coordinate, box-local window [ws, we)
  bool all_full = false;  // every query's window is the whole box (kt.full_softmax / full_p_ds)
  // per column: box coordinates (padding columns get coordinates no window holds) and whether it is
  // an extra key (valid for every query)
  std::vector<int> colc[3], always;
  int64_t cols_key[5] = {0, 0, 0, 0, 0};
  bool cols_valid = false;

  // build() unless this thread built it for tile t of the same pass last (an item of the tile path
  // serves one tile for several kv heads in turn: building it again for each was 7% of a dilated
  // problem's forward on tiles)
  const Tile* built_tile = nullptr;
  int64_t built_pass = -1;
  void ensure(const Geo& g, const Tile& t, int vw, int64_t pass) {
    if (built_tile == &t && built_pass == pass) return;
    build(g, t, vw);
    built_tile = &t;
    built_pass = pass;
  }
  const TileGeo& ensured(const Geo& g, const Tile& t, int vw, int64_t pass) {
    ensure(g, t, vw, pass);
    return *this;
  }

  void build(const Geo& g, const Tile& t, int vw) {
    int tq[3];
    T = 1;
    Nbox = 1;
    for (int a = 0; a < 3; ++a) {
      tile_keys(g, t, a, &kb[a], &nk[a]);
      tq[a] = t.c1[a] - t.c0[a] + 1;
      T *= tq[a];
      Nbox *= nk[a];
    }
    Ncol = Nbox + g.E;
    NP = round_up(Ncol, vw);
    const int64_t st1 = g.L[2], st0 = static_cast<int64_t>(g.L[1]) * g.L[2];
    const int64_t kst1 = g.Lk[2], kst0 = static_cast<int64_t>(g.Lk[1]) * g.Lk[2];
    ktok.resize(Nbox);
    int64_t j = 0;
    for (int i0 = 0; i0 < nk[0]; ++i0)
      for (int i1 = 0; i1 < nk[1]; ++i1)
        for (int i2 = 0; i2 < nk[2]; ++i2)
          ktok[j++] = static_cast<int64_t>((kb[0] + i0) * g.Dl[0] + t.g[0] - g.koff[0]) * kst0 +
                      static_cast<int64_t>((kb[1] + i1) * g.Dl[1] + t.g[1] - g.koff[1]) * kst1 +
                      ((kb[2] + i2) * g.Dl[2] + t.g[2] - g.koff[2]);
    // the column tables depend only on the box extents: interior tiles reuse the previous tile's
    const int64_t key[5] = {nk[0], nk[1], nk[2], g.E, NP};
    bool same = cols_valid;
    for (int i = 0; i < 5; ++i) same = same && cols_key[i] == key[i];
    if (!same) {
      for (int i = 0; i < 5; ++i) cols_key[i] = key[i];
      cols_valid = true;
      for (int a = 0; a < 3; ++a) colc[a].assign(NP, -(1 << 30));
      always.assign(NP, 0);
      int64_t jj = 0;
      for (int i0 = 0; i0 < nk[0]; ++i0)
        for (int i1 = 0; i1 < nk[1]; ++i1)
          for (int i2 = 0; i2 < nk[2]; ++i2, ++jj) colc[0][jj] = i0, colc[1][jj] = i1, colc[2][jj] = i2;
      for (int64_t e = 0; e < g.E; ++e) always[Nbox + e] = -1;
    }
    rowtok.resize(Nbox / nk[2]);
    for (int64_t r = 0; r < Nbox / nk[2]; ++r) rowtok[r] = ktok[r * nk[2]];
    qtok.resize(T);
    qc.resize(T * 3);
    ws.resize(T * 3);
    we.resize(T * 3);
    int64_t q = 0;
    for (int a0 = 0; a0 < tq[0]; ++a0)
      for (int a1 = 0; a1 < tq[1]; ++a1)
        for (int a2 = 0; a2 < tq[2]; ++a2, ++q) {
          int c[3] = {t.c0[0] + a0, t.c0[1] + a1, t.c0[2] + a2};
          int64_t tok = 0;
          const int64_t st[3] = {st0, st1, 1};
          for (int a = 0; a < 3; ++a) {
            int lg = na_group_len(g.dom[a], g.Dl[a], t.g[a]);
            qc[q * 3 + a] = c[a];
            ws[q * 3 + a] = na_window_start(c[a], lg, g.K[a], g.S[a], g.C[a]) - kb[a];
            we[q * 3 + a] = na_window_end(c[a], lg, g.K[a], g.S[a], g.C[a]) - kb[a];
            tok += static_cast<int64_t>(c[a] * g.Dl[a] + t.g[a] - g.qoff[a]) * st[a];
          }
          qtok[q] = tok;
        }
    all_full = true;
    for (int64_t i = 0; i < T * 3; ++i) all_full = all_full && ws[i] == 0 && we[i] == nk[i % 3];
  }

  // f(off, len, rpb_offset) for every run of valid box columns of query q along the last axis
  template <class F>
  void runs(const Geo& g, int64_t q, F&& f) const {
    const int* s = &ws[q * 3];
    const int* e = &we[q * 3];
    const int* c = &qc[q * 3];
    for (int i0 = s[0]; i0 < e[0]; ++i0)
      for (int i1 = s[1]; i1 < e[1]; ++i1) {
        int64_t off = (static_cast<int64_t>(i0) * nk[1] + i1) * nk[2] + s[2];
        int64_t r = ((kb[0] + i0 - c[0] + g.K[0] - 1) * g.R[1] + (kb[1] + i1 - c[1] + g.K[1] - 1)) * g.R[2] +
                    (kb[2] + s[2] - c[2] + g.K[2] - 1);
        f(off, static_cast<int>(e[2] - s[2]), r);
      }
  }
};

thread_local TileGeo tls_tg;
// numbers the forward and backward passes (a TileGeo built in one pass is not reused by another, whose
// plan may hold another tile at the same address)
std::atomic<int64_t> tile_passes{0};

// The exact backward's per-thread buffers. P, dS and the run's queries / output gradients live at
// column padA of rows lds apart, with zeros around the run that are written once per geometry (the
// run's columns are overwritten on every use, the padding never).
// call: the backward call's number; zeros written once per call, as the blocks that write a buffer's
// columns (and leave the rest zero) may differ between calls of the same geometry.
struct ExactBwdWs {
  std::vector<float> pt, ds, xq, xo, s, dq, lc;
  // keyrow: the row's window key rows (bases in the permuted layout); kvrow / accrow: the same in the
  // rings of transposed keys and values and of the key side's sums (equal to keyrow without them)
  std::vector<int64_t> rbq, keyrow, kvrow, accrow;
  // rpb: the window's key rows' rpb offsets (window_rpb_rows) and a run's bias rows
  std::vector<int64_t> roff;
  std::vector<const float*> bias;
  std::vector<float*> accp;  // (the rpb gradient's vectors of each key row and d)
  int64_t key[7] = {-1, -1, -1, -1, -1, -1, -1};
  void prepare(int64_t nslots, int64_t lds, int64_t padA, int64_t runlen, int64_t D, int64_t Dv, int64_t call) {
    const int64_t k[7] = {nslots, lds, padA, runlen, D, Dv, call};
    if (std::equal(k, k + 7, key)) return;
    std::copy(k, k + 7, key);
    pt.assign(nslots * lds + 16, 0.f);
    ds.assign(nslots * lds + 16, 0.f);
    xq.assign(D * lds + 16, 0.f);
    xo.assign(Dv * lds + 16, 0.f);
  }
  // pt / ds from their first 64-byte boundary (the 16 floats of slack cover the shift)
  static float* align64(std::vector<float>& v) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(v.data());
    return v.data() + ((64 - (p & 63)) & 63) / sizeof(float);
  }
  float* ptA() { return align64(pt); }
  float* dsA() { return align64(ds); }
};
// 1D: [0] runs, [1] border blocks (their geometries alternate along a row); 2D/3D: [0], [2] the rows of a pair
thread_local ExactBwdWs tls_xbw[3];
// exact_row's key rows of two query rows: in both windows (base, index in row 0's and row 1's lists)
// or in one only; p0 / p1 the weight rows passed to exact_bwd_kv2
struct KvLists {
  std::vector<int64_t> both, one[2];
  std::vector<int> both0, both1, one_r[2];
  std::vector<const float*> p0, p1;
  void clear() {
    both.clear(), both0.clear(), both1.clear();
    for (int i = 0; i < 2; ++i) one[i].clear(), one_r[i].clear();
  }
};
thread_local KvLists tls_kvl;
std::atomic<int64_t> bwd_calls{0};

// KT[d][j] = key j (box keys, then extras), from keys stored transposed per slice (kT [D][N],
// ekT [D][E]); zero columns up to NP. Box rows along the last axis are runs of nk2 keys Dl2 apart.
void pack_keys_t(const KernelTable& kt, const Geo& g, const TileGeo& tg, const float* kT, int64_t ldk,
                 const float* ekT, float* KT, int64_t W) {
  const int64_t rows = tg.Nbox / tg.nk[2], nk2 = tg.nk[2], d2 = g.Dl[2];
  if (d2 == 1) {
    kt.pack_kt(KT, tg.NP, kT, ldk, tg.rowtok.data(), rows, static_cast<int>(nk2), W);
  } else {
    for (int64_t d = 0; d < W; ++d) {
      float* dst = KT + d * tg.NP;
      const float* src = kT + d * ldk;
      for (int64_t r = 0; r < rows; ++r) {
        const float* s = src + tg.ktok[r * nk2];
        float* o = dst + r * nk2;
        for (int64_t x = 0; x < nk2; ++x) o[x] = s[x * d2];
      }
    }
  }
  for (int64_t d = 0; d < W; ++d) {
    float* dst = KT + d * tg.NP;
    for (int64_t e = 0; e < g.E; ++e) dst[tg.Nbox + e] = ekT[d * g.E + e];
    for (int64_t j = tg.Ncol; j < tg.NP; ++j) dst[j] = 0.f;
  }
}

// pack_keys_t from the heads-last rows of x (kv head hk of batch b, rows W wide, tokens ts floats apart), 8 box
// keys at a time (the columns past the box are written over by the extras and the zero padding after)
void pack_keys_hl(const KernelTable& kt, const Geo& g, const TileGeo& tg, int64_t b, int64_t hk, const float* x,
                  int64_t ts, const float* ekT, float* KT, int64_t W) {
  const float* base = x + b * g.Nk * ts + hk * W;
  for (int64_t j = 0; j < tg.Nbox; j += 8) {
    const float* src[8];
    for (int64_t jj = 0; jj < 8; ++jj) src[jj] = base + tg.ktok[std::min(j + jj, tg.Nbox - 1)] * ts;
    kt.transpose8(src, W, KT + j, tg.NP);
  }
  for (int64_t d = 0; d < W; ++d) {
    float* dst = KT + d * tg.NP;
    for (int64_t e = 0; e < g.E; ++e) dst[tg.Nbox + e] = ekT[d * g.E + e];
    for (int64_t j = tg.Ncol; j < tg.NP; ++j) dst[j] = 0.f;
  }
}

// Heads-last rows read 8 tokens at a time are H * D floats apart: the next block's rows are pages
// away, where hardware prefetchers do not follow, so the transposes stalled on their loads (perf:
// most of transpose8's samples on the source loads). Each caller asks for the rows it reads next.
inline void prefetch_row(const float* p, int64_t w) {
  for (int64_t c = 0; c < w; c += 16) __builtin_prefetch(p + c);
  __builtin_prefetch(p + w - 1);
}

// rpb [H][R] with vector slack after it (the padded row helpers read past a run)
// heads-last x [B][n][hx][w] (tokens ts floats apart; default hx * w) -> per (b, h) slice [w][ld] (ld >= n;
// default n)
float* transpose_heads_last(const float* x, int64_t B, int64_t n, int64_t hx, int64_t w, int64_t ld = 0, int64_t ts = 0) {
  if (ld < n) ld = n;
  if (ts == 0) ts = hx * w;
  float* t = scratch(static_cast<size_t>(B * ld * hx * w));
  parallel_for(B * hx, [&](int64_t sl) {
    const int64_t b = sl / hx, h = sl % hx;
    float* dst = t + sl * ld * w;
    constexpr int64_t kB = 16;
    for (int64_t n0 = 0; n0 < n; n0 += kB) {
      const int64_t n1 = std::min(n, n0 + kB);
      for (int64_t c = 0; c < w; ++c)
        for (int64_t r = n0; r < n1; ++r) dst[c * ld + r] = x[(b * n + r) * ts + h * w + c];
    }
  });
  return t;
}

// Slice (b, h) of heads-last x [B][n][.][w] (tokens ts floats apart) into dst [w][ld], rows [rb, re) along the first two axes
// (a row: L2 tokens along the last axis), where token i2 of a row moves to gstart[i2 % Dl2] + i2 / Dl2
// (each dilation group contiguous). check: returns whether every value is finite (else true).
// ring > 0: row r (along the first two axes) goes to row slot r % ring of dst instead of r (the streamed
// paths keep only the rows in use, in L2, rather than a whole slice written once and evicted)
bool transpose_rows_grouped(const KernelTable& kt, const float* x, int64_t b, int64_t h, int64_t n, int64_t ts,
                            int64_t w, int L2, int Dl2, const int64_t* gstart, int64_t ld, float* __restrict dst,
                            int64_t rb, int64_t re, bool check = false, int64_t ring = 0) {
  bool fin = true;
  // 8 tokens x 8 features at a time: the destination rows are n floats apart (often a multiple of
  // 4 KiB, so token-major stores would fight over a few cache sets); this writes 8 floats per row
  for (int64_t r0 = rb * L2; r0 < re * L2; r0 += L2)
    for (int g2 = 0; g2 < Dl2; ++g2) {
      const int lg = na_group_len(L2, Dl2, g2);
      for (int j0 = 0; j0 < lg; j0 += 8) {
        const int nj = std::min(8, lg - j0);
        const float* srcs[8];
        for (int j = 0; j < nj; ++j) srcs[j] = x + (b * n + r0 + g2 + static_cast<int64_t>(j0 + j) * Dl2) * ts + h * w;
        for (int j = 0; j < 8 && j0 + 16 + j < lg; ++j)
          prefetch_row(x + (b * n + r0 + g2 + static_cast<int64_t>(j0 + 16 + j) * Dl2) * ts + h * w, w);
        float* d0 = dst + (ring ? (r0 / L2) % ring * L2 : r0) + gstart[g2] + j0;
        if (nj == 8) {
          if (check)
            fin = kt.transpose8_finite(srcs, w, d0, ld) && fin;
          else
            kt.transpose8(srcs, w, d0, ld);
          continue;
        }
        for (int64_t c = 0; c < w; ++c)
          for (int j = 0; j < nj; ++j) d0[c * ld + j] = srcs[j][c];
        if (check)
          for (int j = 0; j < nj; ++j) fin = kt.all_finite(srcs[j], w) && fin;
      }
    }
  return fin;
}

// the padding before (front) and after the n tokens of every row of a slice [w][ld] is zero (border
// blocks read there; 0 * finite weight is 0)
// columns [col, col + n) of w rows ld floats apart (a ring slot of every feature row) set to zero
void zero_columns(float* dst, int64_t w, int64_t ld, int64_t col, int64_t n) {
  for (int64_t c = 0; c < w; ++c) std::memset(dst + c * ld + col, 0, sizeof(float) * n);
}

void zero_slice_padding(float* dst, int64_t w, int64_t n, int64_t ld, int64_t front) {
  for (int64_t c = 0; c < w; ++c) {
    std::memset(dst + c * ld, 0, sizeof(float) * front);
    std::memset(dst + c * ld + front + n, 0, sizeof(float) * (ld - front - n));
  }
}

// The streamed exact path (2D, forward and backward): a task transposes its slice's key and value rows
// just before the first row pair whose window reaches them. key_rows_needed: the key rows along the first
// two axes that exact-plan rows r and r2 (< 0: none) read, as the last one + 1.
int64_t key_rows_needed(const Geo& g, const ExactPlan& ep, int64_t r, int64_t r2) {
  int64_t top = 0;
  for (const int64_t rr : {r, r2}) {
    if (rr < 0) continue;
    const ExactPlan::Row& row = ep.rows[rr];
    for_window_key_rows(g, ep, row, [&](int64_t base) { top = std::max(top, (base - ep.gstart[row.g[2]]) / g.L[2] + 1); });
  }
  return top;
}

// The units in the order of the key rows they need (stable): with dilation along the second axis the
// plan lists each dilation group's rows in turn, whose windows interleave in memory (C3: a window's 13
// key rows are 26 rows apart), so in plan order the first group's rows would transpose every row long
// before the other groups read them; in this order all groups follow the transposes' front together.
std::vector<int64_t> order_by_need(const std::vector<int64_t>& need) {
  std::vector<int64_t> seq(need.size());
  for (size_t i = 0; i < seq.size(); ++i) seq[i] = static_cast<int64_t>(i);
  std::stable_sort(seq.begin(), seq.end(), [&](int64_t x, int64_t y) { return need[x] < need[y]; });
  return seq;
}

// Whether an output of this many bytes is written with non-temporal stores where it is stored as whole,
// aligned cache lines (the 2D/3D exact path's out, dq, dk, dv): they bypass the caches, so no line is read
// from memory only to be overwritten, and the op's operands are not evicted for it. Outputs of 1 MiB or
// more (paired, even with a consumer reading them back: C2 forward 0.94, forward+backward 0.94). Read per
// call: NATTEN_MLX_NT=0 never, 2 at every size (tests).
bool nt_for(int64_t bytes) {
  const char* env = std::getenv("NATTEN_MLX_NT");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "2") == 0) return true;
  return bytes >= (int64_t(1) << 20);
}

// NATTEN_MLX_PVROWS=0 keeps the streamed forward's P.V on transposed values (exact_fwd2) instead of value rows
// (exact_fwd2r, AVX-512, Dv a multiple of 16); read on every call (tests run both)
bool pvrows_mode() {
  const char* env = std::getenv("NATTEN_MLX_PVROWS");
  return !env || std::strcmp(env, "0") != 0;
}

// NATTEN_MLX_RING=0 keeps every transposed row of a streamed slice in its own place instead of a ring of
// row slots (read once per process; tests compare the two)
bool ring_mode() {
  static const bool on = [] {
    const char* env = std::getenv("NATTEN_MLX_RING");
    return !env || std::strcmp(env, "0") != 0;
  }();
  return on;
}

// The rows (along the first two axes) a stream transposes past the last one a unit needs: border blocks
// read up to K2 + 4 vw tokens past their group's last key (ep.ld's slack)
inline int64_t stream_ahead(const Geo& g, int vw) { return (g.K[2] + 4 * vw + g.L[2] - 1) / g.L[2]; }

// Row slots for a stream over units in the order seq[c0, c1), unit i needing key rows [lo[i], need[i]),
// from row `start` on: at each unit, the rows from lo - before (border blocks read a few keys before a
// row) up to the stream's front must still be in their slots. 0 when that is every row (no ring).
int64_t ring_rows(const Geo& g, const ExactPlan& ep, int vw, const std::vector<int64_t>& seq, size_t c0, size_t c1,
                  const std::vector<int64_t>& lo, const std::vector<int64_t>& need, int64_t start) {
  const int64_t rows = g.Nk / g.L[2], ahead = stream_ahead(g, vw);
  // border blocks read at most ep.front keys before a group's first: into the row before, or several
  // when rows are shorter
  const int64_t before = (ep.front + g.L[2] - 1) / g.L[2];
  int64_t done = start, r = 0;
  for (size_t c = c0; c < c1; ++c) {
    const int64_t i = seq[c];
    done = std::min(rows, std::max(need[i] + ahead, done));
    r = std::max(r, done - std::max<int64_t>(lo[i] - before, 0));
  }
  return r >= rows ? 0 : r;
}

// the row length of a ring of r row slots, pitch floats apart (default L2; as ep.ld: slack for the border
// blocks' reads past the end, never a multiple of 1024 floats)
inline int64_t ring_ld(const Geo& g, const ExactPlan& ep, int vw, int64_t r, int64_t pitch = 0) {
  int64_t ld = round_up(ep.front + r * (pitch ? pitch : g.L[2]) + g.K[2] + 4 * vw, 16) + 16;
  return ld % 1024 == 0 ? ld + 16 : ld;
}

// a key row base (ep's permuted layout: row r's group g2 at r * L2 + gstart[g2]) in a ring of r slots (r = 0:
// every row its own), the rows pitch floats apart (default L2)
inline int64_t ring_base(const Geo& g, const ExactPlan& ep, int64_t base, int64_t r, int64_t pitch = 0) {
  if (!r && !pitch) return base;
  const int64_t row = (base - ep.front) / g.L[2];
  return base + (r ? row % r : row) * (pitch ? pitch : g.L[2]) - row * g.L[2];
}

// One task's streamed slice (b, h) of keys k and values v into ks [D][ld] / vs [Dv][ld] (padding zeroed
// here); advance(need) transposes the rows up to need + ahead. Border blocks read up to K2 + 4 vw tokens
// past their group's last key (ep.ld's slack): those of the rows after it must be transposed already
// (finite), so the transposes run that far ahead. advance returns false when a value it checked (keys
// with check_k, values with check_v) was not finite. ring > 0: the rows go to row slots r % ring (see
// transpose_rows_grouped; ks/vs hold ring rows, ld from ring_ld, read through ring_base).
struct SliceStream {
  const KernelTable& kt;
  const Geo& g;
  const ExactPlan& ep;
  const float *k, *v;
  int64_t b, h, ld;
  float *ks, *vs;
  bool check_k, check_v;
  int64_t rows, ahead, done, ring, start;
  bool vrows;  // values copied as rows (vs: row slot r's L2 tokens of Dv floats at r * L2 * Dv), not transposed
  SliceStream(const KernelTable& kt_, const Geo& g_, const ExactPlan& ep_, const float* k_, const float* v_, int64_t b_,
              int64_t h_, int64_t ld_, float* ks_, float* vs_, bool check_k_, bool check_v_, int64_t start_ = 0,
              int64_t ring_ = 0, bool vrows_ = false)
      : kt(kt_), g(g_), ep(ep_), k(k_), v(v_), b(b_), h(h_), ld(ld_), ks(ks_), vs(vs_), check_k(check_k_),
        check_v(check_v_), rows(g_.Nk / g_.L[2]), ahead(stream_ahead(g_, kt_.vw)), done(start_), ring(ring_), start(start_),
        vrows(vrows_) {
    const int64_t n = ring ? ring * g.L[2] : g.Nk;
    zero_slice_padding(ks, g.D, n, ld, ep.front);
    if (!vrows) zero_slice_padding(vs, g.Dv, n, ld, ep.front);
  }
  bool advance(int64_t need) {
    const int64_t upto = std::min(rows, std::max(need + ahead, done));
    if (upto <= done) return true;
    const bool fk = transpose_rows_grouped(kt, k, b, h, g.Nk, g.tk, g.D, g.L[2], g.Dl[2], ep.gstart.data(), ld, ks,
                                           done, upto, check_k, ring);
    bool fv = true;
    if (!vrows) {
      fv = transpose_rows_grouped(kt, v, b, h, g.Nk, g.tv, g.Dv, g.L[2], g.Dl[2], ep.gstart.data(), ld, vs, done, upto,
                                  check_v, ring);
    } else {
      // the forward's P.V from value rows (exact_fwd2r): this head's rows copied as they are, one after another
      // (the tokens' order kept), onto 64-byte lines; read from MLX's buffer (at 24 mod 64) each row of 128
      // bytes straddled three lines and every load of it two (paired, 0.93-0.94 of reading it there)
      const int64_t L2 = g.L[2], Dv = g.Dv;
      for (int64_t r = done; r < upto; ++r) {
        float* dst = vs + (ring ? r % ring : r) * L2 * Dv;
        const float* src = v + (b * g.Nk + r * L2) * g.tv + h * Dv;
        const int64_t step = g.tv;
        for (int64_t t = 0; t < L2; ++t) {
          if (t + 16 < L2) prefetch_row(src + (t + 16) * step, Dv);
          std::memcpy(dst + t * Dv, src + t * step, sizeof(float) * Dv);
        }
      }
    }
    // border blocks of the last row read up to K2 + 4 vw keys past its slot, into the next slots (up to
    // the ring's end, then its zeroed padding): a slot whose rows this stream never wrote (it started
    // late: a part's stream) holds another call's values, maybe not finite; zeros, as without a ring
    if (ring && upto == rows) {
      const int64_t s = (rows - 1) % ring, L2 = g.L[2];
      for (int64_t p = s + 1; p <= std::min(s + ahead, ring - 1); ++p)
        if (rows - 1 - s + p - ring < start) {
          zero_columns(ks, g.D, ld, ep.front + p * L2, L2);
          if (!vrows) zero_columns(vs, g.Dv, ld, ep.front + p * L2, L2);
        }
    }
    done = upto;
    return fk && fv;
  }
};

// heads-last x [B][n][hx][w] (tokens ts floats apart) -> per (b, h) slice [w][ld] (ld >= front + n + padding), tokens permuted
// as transpose_rows_grouped says (gstart[0] == front); the padding before and after them is zeroed.
// finite (may be null): cleared when any value is inf or NaN.
float* transpose_heads_last_grouped(const float* x, int64_t B, int64_t n, int64_t hx, int64_t w, int64_t ts, int L2, int Dl2,
                                    const int64_t* gstart, int64_t ld, int64_t front,
                                    std::atomic<bool>* finite = nullptr) {
  const KernelTable& kt = select_kernels();
  float* t = scratch(static_cast<size_t>(B * ld * hx * w));
  parallel_for(B * hx, [&](int64_t sl) {
    float* dst = t + sl * ld * w;
    zero_slice_padding(dst, w, n, ld, front);
    if (!transpose_rows_grouped(kt, x, sl / hx, sl % hx, n, ts, w, L2, Dl2, gstart, ld, dst, 0, n / L2, finite))
      finite->store(false, std::memory_order_relaxed);
  });
  return t;
}

// X[j][:] = value row of box key j (heads-last storage, tokens ts floats apart), then extras; zero rows up to NP
void pack_rows_hl(const Geo& g, const TileGeo& tg, int64_t b, int64_t hk, int64_t Dv, const float* v, int64_t ts,
                  const float* ev, float* X) {
  for (int64_t j = 0; j < tg.Nbox; ++j)
    std::memcpy(X + j * Dv, v + (b * g.Nk + tg.ktok[j]) * ts + hk * Dv, sizeof(float) * Dv);
  for (int64_t e = 0; e < g.E; ++e)
    std::memcpy(X + (tg.Nbox + e) * Dv, ev + ((b * g.E + e) * g.Hkv + hk) * Dv, sizeof(float) * Dv);
  std::memset(X + tg.Ncol * Dv, 0, sizeof(float) * Dv * (tg.NP - tg.Ncol));
}

// dst[i * tstride + c] += xT[c * ld + i] for i < n tokens and c < W features: a transposed sum
// added back to token rows, 8 x 8 blocks at a time (add false: stored, dst's old values unread)
void add_transposed(const KernelTable& kt, const float* xT, int64_t ld, int64_t W, int64_t n, float* dst,
                    int64_t tstride, bool add = true, bool nt = false) {
  float tmp[64];
  int64_t i = 0;
#if defined(__x86_64__) || defined(__i386__)
  // nt (stores, not adds, of rows that are whole cache lines): 8 rows transposed into a buffer, then
  // streamed out (the caller's pool task ends with nt_fence)
  if (nt && !add && W % 16 == 0 && W <= 256 && tstride % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    alignas(64) float rows[8 * 256];
    for (; i + 8 <= n; i += 8) {
      for (int64_t c = 0; c < W; c += 8) {
        const float* src[8];
        for (int j = 0; j < 8; ++j) src[j] = xT + (c + j) * ld + i;
        kt.transpose8(src, 8, rows + c, W);
      }
      for (int r = 0; r < 8; ++r) {
        float* d = dst + (i + r) * tstride;
        for (int64_t c = 0; c < W; c += 4) _mm_stream_ps(d + c, _mm_load_ps(rows + r * W + c));
      }
    }
  }
#endif
  for (; i + 8 <= n; i += 8) {
    // the token rows two blocks ahead, requested for writing: their lines are rarely in cache (an
    // output MLX has just allocated), and a store that misses holds the store buffer until it arrives
    for (int64_t r = i + 16; r < std::min(n, i + 24); ++r) {
      float* d = dst + r * tstride;
      for (int64_t c = 0; c < W; c += 16) __builtin_prefetch(d + c, 1);
      __builtin_prefetch(d + W - 1, 1);
    }
    int64_t c = 0;
    for (; c + 8 <= W; c += 8) {
      const float* src[8];
      for (int j = 0; j < 8; ++j) src[j] = xT + (c + j) * ld + i;
      if (!add) {
        kt.transpose8(src, 8, dst + i * tstride + c, tstride);
        continue;
      }
      kt.transpose8(src, 8, tmp, 8);
      for (int r = 0; r < 8; ++r) {
        float* d = dst + (i + r) * tstride + c;
        for (int k = 0; k < 8; ++k) d[k] += tmp[r * 8 + k];
      }
    }
    for (; c < W; ++c)
      for (int r = 0; r < 8; ++r) {
        float* d = dst + (i + r) * tstride + c;
        *d = (add ? *d : 0.f) + xT[c * ld + i + r];
      }
  }
  for (; i < n; ++i)
    for (int64_t c = 0; c < W; ++c) {
      float* d = dst + i * tstride + c;
      *d = (add ? *d : 0.f) + xT[c * ld + i];
    }
}

// A block's results xT [W][vw] (lane l: a query) to token rows dst + l * tstride, lanes [skip, vw),
// of a border block (lohi) only those it serves (all of them, at a group's edges, go as one transpose)
void store_lanes(const KernelTable& kt, const float* xT, int64_t W, int vw, int skip, const int* lohi, float* dst,
                 int64_t tstride, bool nt = false) {
  // the rows of the next block along the row (where a run's blocks go next), requested for writing
  // now, so that they arrive while that block computes (a prefetch past the output faults nothing);
  // not for non-temporal stores, which need no line in cache
  for (int l = vw; l < 2 * vw && !nt; ++l) {
    float* d = dst + l * tstride;
    for (int64_t c = 0; c < W; c += 16) __builtin_prefetch(d + c, 1);
    __builtin_prefetch(d + W - 1, 1);
  }
  bool all = true;
  for (int l = 0; lohi && l < vw; ++l) all = all && lohi[l] < lohi[vw + l];
  if (all) {
    add_transposed(kt, xT + skip, vw, W, vw - skip, dst + skip * tstride, tstride, false, nt);
    return;
  }
  for (int l = skip; l < vw; ++l) {
    if (lohi[l] >= lohi[vw + l]) continue;  // another block's query
    float* d = dst + l * tstride;
    for (int64_t c = 0; c < W; ++c) d[c] = xT[c * vw + l];
  }
}

// Keys and values of the group's coordinates j in [kmin, kmax) (token tok0 + j * dl, kv head hk of
// heads-last rows, tokens tk / tv floats apart) transposed into kl [D][ldl] and vl [Dv][ldl] at column j - kmin, 8 tokens at a
// time; the columns of coordinates outside [0, lg) are zero. Returns whether every value copied is finite
// (check_keys: and every key).
bool gather_keys_transposed(const KernelTable& kt, const float* k, const float* v, int64_t D, int64_t Dv,
                            int64_t tk, int64_t tv, int64_t hk, int64_t tok0, int64_t dl, int kmin, int kmax, int lg,
                            float* kl, float* vl, int64_t ldl, bool check_keys = false) {
  const int j0 = std::max(kmin, 0), j1 = std::min(kmax, lg);
  for (int64_t d = 0; d < D; ++d) {
    std::fill(kl + d * ldl, kl + d * ldl + (j0 - kmin), 0.f);
    std::fill(kl + d * ldl + (j1 - kmin), kl + (d + 1) * ldl, 0.f);
  }
  for (int64_t d = 0; d < Dv; ++d) {
    std::fill(vl + d * ldl, vl + d * ldl + (j0 - kmin), 0.f);
    std::fill(vl + d * ldl + (j1 - kmin), vl + (d + 1) * ldl, 0.f);
  }
  bool fin = true;
  auto krow = [&](int j) { return k + (tok0 + static_cast<int64_t>(j) * dl) * tk + hk * D; };
  auto vrow = [&](int j) { return v + (tok0 + static_cast<int64_t>(j) * dl) * tv + hk * Dv; };
  int j = j0;
  for (; j + 8 <= j1; j += 8) {
    const float *sk[8], *sv[8];
    for (int i = 0; i < 8; ++i) sk[i] = krow(j + i), sv[i] = vrow(j + i);
    for (int i = 0; i < 8 && j + 16 + i < j1; ++i) {
      prefetch_row(krow(j + 16 + i), D);
      prefetch_row(vrow(j + 16 + i), Dv);
    }
    if (check_keys)
      fin = kt.transpose8_finite(sk, D, kl + (j - kmin), ldl) && fin;
    else
      kt.transpose8(sk, D, kl + (j - kmin), ldl);
    fin = kt.transpose8_finite(sv, Dv, vl + (j - kmin), ldl) && fin;
  }
  for (; j < j1; ++j) {
    for (int64_t d = 0; d < D; ++d) kl[d * ldl + (j - kmin)] = krow(j)[d];
    for (int64_t d = 0; d < Dv; ++d) vl[d * ldl + (j - kmin)] = vrow(j)[d];
    fin = kt.all_finite(vrow(j), Dv) && (!check_keys || kt.all_finite(krow(j), D)) && fin;
  }
  return fin;
}

// kt.all_finite over the pool (a pass over whole inputs: memory-bound, so every core helps)
bool all_finite_par(const KernelTable& kt, const float* x, int64_t n) {
  constexpr int64_t kChunk = int64_t(1) << 16;
  if (n <= kChunk) return kt.all_finite(x, n);
  std::atomic<bool> ok{true};
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t c) {
    if (!ok.load(std::memory_order_relaxed)) return;
    const int64_t i0 = c * kChunk;
    if (!kt.all_finite(x + i0, std::min(kChunk, n - i0))) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// all_finite_par over n token rows of w floats, ts floats apart (ts == w: one span)
bool all_finite_rows(const KernelTable& kt, const float* x, int64_t n, int64_t w, int64_t ts) {
  if (ts == w) return all_finite_par(kt, x, n * w);
  constexpr int64_t kTok = 1024;
  std::atomic<bool> ok{true};
  parallel_for((n + kTok - 1) / kTok, [&](int64_t c) {
    for (int64_t t = c * kTok, e = std::min(n, t + kTok); t < e && ok.load(std::memory_order_relaxed); ++t)
      if (!kt.all_finite(x + t * ts, w)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

float* padded_rpb(const Geo& g, const float* rpb) {
  // scratch() leaves slack after the buffer
  if (!rpb) return nullptr;
  float* r = scratch(static_cast<size_t>(g.H * g.Rtot), true);
  std::memcpy(r, rpb, sizeof(float) * g.H * g.Rtot);
  return r;
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: 8 rows at a time by kt.transpose8, the rest one at a
// time (the tile backward's dS and P before its dK / dV GEMMs; a scalar loop before, paired fwd+bwd 0.94-0.96 on
// DiNAT's dilated layers and NAT's 7 x 7)
void transpose_rows(const KernelTable& kt, const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                    int64_t ldd) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    const float* p[8];
    for (int j = 0; j < 8; ++j) p[j] = src + (r + j) * lds;
    kt.transpose8(p, cols, dst + r, ldd);
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

}  // namespace

// ---------------------------------------------------------------- fused forward
namespace {
// One pass of the forward. borders: border blocks are planned as if every value were finite (a masked
// slot's weight is 0, and 0 * inf is not), which the exact path checks where it transposes the values
// anyway (a separate pass over them cost 3-5% of C1/C2's forward); false when a value it read was not
// finite and border blocks ran, so that the caller runs the forward again without them.
// The plans of the last geometry this thread planned, per value of borders, shared by the forward and
// the backward (both plan make_exact_plan(g, vw, borders) and make_plan on it): making them again on
// every call cost ~2% of C1's forward at one thread, before the pool's threads start. rslots: the
// backward's row_slots of ep, made on its first use.
struct CachedPlans {
  bool valid = false;
  std::vector<int64_t> key;
  std::string env;
  ExactPlan ep;
  Plan plan;
  bool has_rslots = false;
  std::vector<RowSlots> rslots;
  // every tile's geometry, built once per plan (tile_geos) where they fit in kTileGeoCap bytes: a thread rebuilt
  // a tile's for every slice and every call (6% of DiNAT's dilated fwd+bwd)
  bool has_tgeo = false;
  std::vector<TileGeo> tgeo;
};
constexpr double kTileGeoCap = 32.0 * (1 << 20);

// the plan's tile geometries (built on first use, in parallel), or null where they would take more than
// kTileGeoCap (then each thread builds the tile it serves, TileGeo::ensure)
const std::vector<TileGeo>* tile_geos(CachedPlans& cp, const Geo& g, int vw) {
  const Plan& plan = cp.plan;
  if (!cp.has_tgeo) {
    cp.has_tgeo = true;
    double T = 1, box = 1;
    for (int a = 0; a < 3; ++a) {
      T *= plan.tq[a];
      box *= std::min(plan.tq[a] + g.K[a] - 1, max_group_len(g, a));
    }
    const double bytes = static_cast<double>(plan.tiles.size()) * (T * 64 + (box + g.E + 16) * 40 + 512);
    if (plan.tiles.empty() || bytes > kTileGeoCap) return nullptr;
    cp.tgeo.resize(plan.tiles.size());
    parallel_for(static_cast<int64_t>(plan.tiles.size()), [&](int64_t i) { cp.tgeo[i].build(g, plan.tiles[i], vw); });
  }
  return cp.tgeo.empty() ? nullptr : &cp.tgeo;
}
thread_local CachedPlans tls_plans[2];

CachedPlans& cached_plans(const Geo& g, const KernelTable& kt, bool borders) {
  std::vector<int64_t> key;
  for (int x = 0; x < 3; ++x)
    key.insert(key.end(), {g.L[x], g.K[x], g.S[x], g.Dl[x], g.C[x], g.Lk[x], g.dom[x], g.qoff[x], g.koff[x], g.R[x]});
  key.insert(key.end(), {g.N, g.Nk, g.B, g.H, g.Hkv, g.G, g.D, g.Dv, g.E, g.Rtot, g.Kt, g.has_rpb, kt.vw});
  // the plans also follow these (tests flip them between calls)
  std::string env;
  for (const char* name : {"NATTEN_MLX_EXACT", "NATTEN_MLX_TILE", "NATTEN_MLX_SHORT"}) {
    const char* v = std::getenv(name);
    env += v ? v : "\x01";
    env += '\x02';
  }
  CachedPlans& cp = tls_plans[borders ? 1 : 0];
  if (!cp.valid || cp.key != key || cp.env != env) {
    cp.valid = false;
    cp.ep = make_exact_plan(g, kt.vw, borders);
    cp.plan = make_plan(g, kt.vw, &cp.ep);
    cp.has_rslots = false;
    cp.rslots.clear();
    cp.has_tgeo = false;
    cp.tgeo.clear();
    cp.key = std::move(key);
    cp.env = std::move(env);
    cp.valid = true;
  }
  return cp;
}

bool forward_pass(const Geo& g, const FwdArgs& a, bool borders) {
  const KernelTable& kt = select_kernels();
  const int64_t pass = tile_passes.fetch_add(1);  // (TileGeo::ensure)
  // the outputs stored with non-temporal stores (see nt_for)
  const bool nt_out = a.final_out && g.Dv % 16 == 0 && nt_for(g.B * g.N * g.H * g.Dv * int64_t(sizeof(float)));
  CachedPlans& cp = cached_plans(g, kt, borders);
  const ExactPlan& ep = cp.ep;
  const Plan& plan = cp.plan;
  const std::vector<TileGeo>* tgs = tile_geos(cp, g, kt.vw);  // (null: per-thread TileGeo::ensure)
  // cleared by a transpose of values that met inf or NaN (tiles check their own packed values)
  std::atomic<bool> v_ok{true};
  const bool check = borders && ep.nborder > 0;
  const int64_t slices = g.B * g.Hkv, ntiles = static_cast<int64_t>(plan.tiles.size());
  // 1D problems (one row per dilation group): rows are cut into chunks of blocks whose keys and
  // values each chunk transposes into its thread's own buffer (they stay in cache, and no copy of the
  // whole slice is written and read back); in 2D/3D every key row serves many query rows, so the
  // slices are transposed once up front
  const bool local = ep.on && g.L[0] == 1 && g.L[1] == 1;
  // (row_chunk below; multiplies only in-window pairs, so it needs no finite values)
  // (rpb: the transposed copies, whose kernels add the bias; the row kernels do not)
  const bool rows1d = local && row1d_mode() && !g.has_rpb;
  const bool rowsnd = ep.on && !local && row2d_mode() && !g.has_rpb;
  struct Chunk {
    int row, row2, b0, b1;  // ep.rows[row] (and ep.rows[row2] unless -1), their blocks order[g2][b0, b1)
  };
  std::vector<std::vector<int>> order(ep.on ? g.Dl[2] : 0);
  for (size_t g2 = 0; g2 < order.size(); ++g2) {
    order[g2].resize(ep.blocks[g2].size());
    for (size_t i = 0; i < order[g2].size(); ++i) order[g2][i] = static_cast<int>(i);
    std::sort(order[g2].begin(), order[g2].end(),
              [&](int x, int y) { return ep.blocks[g2][x].c < ep.blocks[g2][y].c; });
  }
  std::vector<Chunk> chunks;
  for (size_t r = 0; r < ep.rows.size(); ++r) {
    const int n = static_cast<int>(order[ep.rows[r].g[2]].size()), step = local ? 32 : n;
    const int r2 = !local && ep.pairs_with_next(r) ? static_cast<int>(r + 1) : -1;
    for (int b0 = 0; b0 < n; b0 += step)
      chunks.push_back({static_cast<int>(r), r2, b0, std::min(n, b0 + step)});
    if (r2 >= 0) ++r;
  }
  const int64_t nrowsx = static_cast<int64_t>(chunks.size()), per_slice = nrowsx + ntiles;
  // transposed rows one cache line longer than a multiple of 16 floats: rows n floats apart with n a
  // multiple of 1024 would all fall in the same few L1 sets (the exact path reads D of them at once)
  const int64_t ldx = ep.ld;
  int64_t ldk = round_up(g.Nk, 16) + 16;
  // (whole-group tiles pack their keys from the heads-last rows: whole_group_tiles)
  const bool hl_pack = whole_group_tiles(g, plan);
  const float* kT = (ntiles && !hl_pack && (rowsnd || !(ep.on && g.Dl[2] == 1 && !local)))
                        ? transpose_heads_last(a.k, g.B, g.Nk, g.Hkv, g.D, ldk, g.tk)
                        : nullptr;
  // Streamed (2D/3D, no tiles, at least two slices per thread): one task per slice transposes its key
  // and value rows just before the first row pair whose window reaches them, so the kernels read them
  // from L1/L2 a moment after they were written; transposing whole slices up front left them in L3
  // (C2: 4 MiB of transposed keys and values), read back by the kernels and rewritten on every call.
  // Paired, C2 0.92 at one thread and at two. 3D was left out while the rows stayed in whole-slice
  // buffers (a window's rows span K0 planes, C4: ~1 MiB of transposed rows between a row's first and
  // last use; C4 0.99 at one thread, 1.00-1.06 at two); in the ring of row slots below, C4 0.98.
  const bool streamed = ep.on && !local && !rowsnd && ntiles == 0 && slices >= 2 * int64_t(num_threads());
  // the streamed path's P.V from value rows (exact_fwd2r): the stream copies each head's value rows as they
  // are (a key's Dv features contiguous) instead of transposing them, the kernels write outputs as rows (no
  // transposes back), and border blocks multiply no value outside a window, so no value needs to be finite
  // (no check, no second round). Bitwise the same outputs; paired, C2 / C3 / C4 forward 0.936 / 0.907 / 0.897.
  const bool pvrows = streamed && kt.exact_fwd2r && g.Dv % 16 == 0 && pvrows_mode();
  const float *kTx = nullptr, *vTx = nullptr;
  float *kTs = nullptr, *vTs = nullptr;
  std::vector<int64_t> need;  // streamed: rows along the first two axes transposed before chunk i
  std::vector<int64_t> seq;   // streamed: the chunks in the order a task serves them
  if (streamed) {
    kTs = scratch(static_cast<size_t>(slices * ldx * g.D));
    vTs = scratch(static_cast<size_t>(slices * ldx * g.Dv));
    kTx = kTs;
    vTx = vTs;
    need.resize(chunks.size());
    for (size_t i = 0; i < chunks.size(); ++i) need[i] = key_rows_needed(g, ep, chunks[i].row, chunks[i].row2);
    seq = order_by_need(need);
  } else if (ep.on && !local && !rowsnd) {
    kTx = transpose_heads_last_grouped(a.k, g.B, g.Nk, g.Hkv, g.D, g.tk, g.L[2], g.Dl[2], ep.gstart.data(), ldx,
                                       ep.front);
    vTx = transpose_heads_last_grouped(a.v, g.B, g.Nk, g.Hkv, g.Dv, g.tv, g.L[2], g.Dl[2], ep.gstart.data(), ldx, ep.front,
                                       check ? &v_ok : nullptr);
    // the permutation is the identity without dilation along the last axis
    if (!kT && g.Dl[2] == 1) kT = kTx + ep.front, ldk = ldx;
  }
  const float* ekT = g.E ? transpose_heads_last(a.ek, g.B, g.E, g.Hkv, g.D) : nullptr;
  const float* rpbp = padded_rpb(g, a.rpb);
  // (kTb / vTb: the transposed keys and values the exact rows read, kTx / vTx but for a streamed part's own,
  // rows ldb long, in a ring of `ring` row slots when not 0)
  auto item_fn_on = [&](int64_t item, const float* kTb, const float* vTb, int64_t ldb, int64_t ring) {
    const int64_t slice = item / per_slice, b = slice / g.Hkv, hk = slice % g.Hkv;
    const int64_t idx = item % per_slice;
    Workspace& w = tls_ws;
    if (idx < nrowsx) {
      // a row of queries along the last axis (or a chunk of one), vw at a time, exact windows; in
      // 2D/3D two neighbouring rows at once, whose blocks at the same lanes share most key rows
      const Chunk& ch = chunks[idx];
      const int nr = ch.row2 >= 0 ? 2 : 1;
      const ExactPlan::Row* rws[2] = {&ep.rows[ch.row], nr == 2 ? &ep.rows[ch.row2] : nullptr};
      const int vw = kt.vw, g0 = rws[0]->g[0], g1 = rws[0]->g[1], g2 = rws[0]->g[2];
      const int64_t D = g.D, Dv = g.Dv;
      const int64_t kwin = static_cast<int64_t>(g.K[0]) * g.K[1];
      // per row: its window's key row bases (krow), the current block's (rb), at most K0 * K1 each
      int64_t* ib = reinterpret_cast<int64_t*>(grow(w.tr, 8 * static_cast<size_t>(kwin) + 16));
      int64_t *krow[2] = {ib, ib + kwin}, *rb[2] = {ib + 2 * kwin, ib + 3 * kwin};
      int nrows[2] = {0, 0};
      int64_t qrow[2] = {0, 0};
      // pvrows: per row, its key rows' value rows (the stream's copies) at last-axis coordinate 0 of their
      // group (vrow0) and at the current block's window start (vr)
      const float** vp = pvrows ? reinterpret_cast<const float**>(grow(w.dob, 8 * static_cast<size_t>(kwin) + 16))
                                : nullptr;
      const float **vrow0[2] = {vp, vp ? vp + kwin : nullptr}, **vr[2] = {vp ? vp + 2 * kwin : nullptr,
                                                                          vp ? vp + 3 * kwin : nullptr};
      // rpb: per row, its key rows' rpb offsets (window_rpb_rows) and the current block's bias rows (bias)
      int64_t* roff[2] = {nullptr, nullptr};
      const float** bias[2] = {nullptr, nullptr};
      if (rpbp) {
        int64_t* rb2 = reinterpret_cast<int64_t*>(grow(w.ds, 8 * static_cast<size_t>(kwin) + 16));
        roff[0] = rb2;
        roff[1] = rb2 + kwin;
        const float** bp = reinterpret_cast<const float**>(rb2 + 2 * kwin);
        bias[0] = bp;
        bias[1] = bp + kwin;
        for (int i = 0; i < nr; ++i) window_rpb_rows(g, *rws[i], roff[i]);
      }
      for (int i = 0; i < nr; ++i) {
        for_window_key_rows(g, ep, *rws[i], [&](int64_t base) {
          if (pvrows) {
            // the key row's token g2 (its group's coordinate 0) in this slice's copied value rows
            const int64_t row = (base - ep.gstart[g2]) / g.L[2];
            vrow0[i][nrows[i]] = vTb + slice * ldb * g.Dv + ((ring ? row % ring : row) * g.L[2] + g2) * g.Dv;
          }
          krow[i][nrows[i]++] = ring_base(g, ep, base, ring);
        });
        qrow[i] = row_token(g, g0, g1, rws[i]->c0, rws[i]->c1);
      }
      const int64_t vstep = static_cast<int64_t>(g.Dl[2]) * g.Dv;  // value rows of consecutive keys (copied rows)
      const int lgrp = na_group_len(g.L[2], g.Dl[2], g2);
      const float* kslice = local ? nullptr : kTb + slice * ldb * D;
      const float* vslice = local ? nullptr : vTb + slice * ldb * Dv;
      int64_t ldl = ldb, shift = 0;  // row length of kslice/vslice; added to every key row base
      if (local) {
        // the chunk's keys [kmin, kmax) of this group, transposed; zeros outside the group
        int kmin = 1 << 30, kmax = -(1 << 30);
        for (int oi = ch.b0; oi < ch.b1; ++oi) {
          const ExactBlock& blk = ep.blocks[g2][order[g2][oi]];
          kmin = std::min(kmin, blk.ws);
          kmax = std::max(kmax, blk.ws + blk.nx + vw - 1);
        }
        const int lg = na_group_len(g.L[2], g.Dl[2], g2);
        ldl = round_up(kmax - kmin, 8) + 8;
        float* kl = grow(w.kp, D * ldl + 16);
        float* vl = grow(w.vp, Dv * ldl + 16);
        if (!gather_keys_transposed(kt, a.k, a.v, D, Dv, g.tk, g.tv, hk, b * g.Nk + g2, g.Dl[2], kmin, kmax, lg, kl, vl,
                                    ldl))
          v_ok.store(false, std::memory_order_relaxed);
        kslice = kl;
        vslice = vl;
        // key row bases below are ep.gstart[g2] + blk.ws in the slice; here blk.ws - kmin
        shift = -(ep.gstart[g2] + kmin);
      }
      for (int oi = ch.b0; oi < ch.b1; ++oi) {
        const ExactBlock& blk = ep.blocks[g2][order[g2][oi]];
        const int cb = blk.c, nx = blk.nx;
        const ExactRun& run = ep.runs[g2][blk.run];
        const int* lohi = run.masked ? run.lohi : nullptr;
        for (int i = 0; i < nr; ++i)
          for (int r = 0; r < nrows[i]; ++r) {
            rb[i][r] = krow[i][r] + blk.ws + shift;
            if (pvrows) vr[i][r] = vrow0[i][r] + blk.ws * vstep;
          }
        float* S[2] = {grow(w.s, static_cast<size_t>(nrows[0] * nx + 2 * D) * vw + vw),
                       nr == 2 || pvrows ? grow(w.p, static_cast<size_t>(nrows[nr - 1] * nx) * vw + vw) : nullptr};
        unsigned serve = 0;
        for (int l = blk.skip; l < vw; ++l)
          if (!lohi || lohi[l] < lohi[vw + l]) serve |= 1u << l;
        float* ob = grow(w.o, 2 * (Dv * vw + vw));
        float* oT[2] = {ob, ob + Dv * vw + vw};
        float* lsev[2] = {oT[0] + Dv * vw, oT[1] + Dv * vw};
        float* qb = grow(w.qp, 2 * (D * vw + vw));
        float* qloc[2] = {qb, qb + D * vw + vw};
        // heads-last rows of the block's first query and of consecutive ones (Dl2 tokens apart)
        // (the queries' own rows: tokens g.tq floats apart)
        int64_t row0[2], qtok0[2];
        for (int i = 0; i < nr; ++i) {
          qtok0[i] = b * g.N + qrow[i] + static_cast<int64_t>(cb) * g.Dl[2] + g2;
          row0[i] = qtok0[i] * g.H;
        }
        const int64_t tstep = g.Dl[2] * g.H, qstep = g.Dl[2] * g.tq;
        for (int64_t gg = 0; gg < g.G; ++gg) {
          const int64_t h = hk * g.G + gg;
          if (rpbp)
            for (int i = 0; i < nr; ++i)
              for (int r = 0; r < nrows[i]; ++r) bias[i][r] = rpbp + h * g.Rtot + roff[i][r] + (blk.ws - cb);
          // the block's queries transposed to [D][vw] here, 8 at a time, rather than all of them up front
          for (int i = 0; i < nr; ++i)
            for (int l0 = 0; l0 < vw; l0 += 8) {
              const float* src[8];
              // (lanes past a group shorter than vw serve no query: they read lane 0's)
              for (int j = 0; j < 8; ++j)
                src[j] = a.q + qtok0[i] * g.tq + (cb + l0 + j < lgrp ? l0 + j : 0) * qstep + h * D;
              // the next block's queries (past the row's end: the next row's, or an unused line)
              for (int j = 0; j < 8; ++j) {
                prefetch_row(a.q + qtok0[i] * g.tq + (l0 + vw + j) * qstep + h * D, D);
                // and the lines its outputs go to (written 8 floats at a time, read for ownership)
                float* o = a.out + ((row0[i] + (l0 + vw + j) * tstep) + h) * Dv;
                for (int64_t c = 0; c < Dv && !nt_out; c += 16) __builtin_prefetch(o + c, 1);
              }
              kt.transpose8(src, D, qloc[i] + l0, vw);
            }
          if (pvrows) {
            RowPV rp{vr[0], nr == 2 ? vr[1] : vr[0], vstep, -blk.ws, lgrp - blk.ws,
                     a.out + (row0[0] + h) * Dv, nr == 2 ? a.out + (row0[1] + h) * Dv : nullptr, tstep * Dv,
                     a.lse + row0[0] + h, nr == 2 ? a.lse + row0[1] + h : nullptr, tstep, serve, nt_out};
            kt.exact_fwd2r(qloc[0], nr == 2 ? qloc[1] : qloc[0], vw, g.scale, D, kslice, ldl, Dv, rb[0], nrows[0],
                           rb[1], nr == 2 ? nrows[1] : 0, nx, lohi, S[0], S[1], rp, bias[0], bias[1]);
            continue;
          }
          if (nr == 2)
            kt.exact_fwd2(qloc[0], qloc[1], vw, g.scale, D, kslice, ldl, vslice, ldl, Dv, rb[0], nrows[0], rb[1],
                          nrows[1], nx, lohi, S[0], S[1], oT[0], oT[1], lsev[0], lsev[1], bias[0], bias[1]);
          else
            kt.exact_fwd(qloc[0], vw, g.scale, D, kslice, ldl, vslice, ldl, Dv, rb[0], nrows[0], nx, lohi, S[0], oT[0],
                         lsev[0], bias[0]);
          for (int i = 0; i < nr; ++i) {
            store_lanes(kt, oT[i], Dv, vw, blk.skip, lohi, a.out + (row0[i] + h) * Dv, tstep * Dv, nt_out);
            for (int l = blk.skip; l < vw; ++l)
              if (!lohi || lohi[l] < lohi[vw + l]) a.lse[row0[i] + l * tstep + h] = lsev[i][l];
          }
        }
      }
      return;
    }
    const Tile& t = plan.tiles[idx - nrowsx];
    const TileGeo& tg = tgs ? (*tgs)[idx - nrowsx] : tls_tg.ensured(g, t, kt.vw, pass);
    const int64_t M = tg.T * g.G, NP = tg.NP, D = g.D, Dv = g.Dv;
    float* Qp = grow(w.qp, M * D);
    const float scale = g.scale;  // a local: the compiler cannot tell Qp from g
    for (int64_t gg = 0; gg < g.G; ++gg) {
      for (int64_t q = 0; q < tg.T; ++q) {
        const float* src = a.q + (b * g.N + tg.qtok[q]) * g.tq + (hk * g.G + gg) * D;
        float* dst = Qp + (gg * tg.T + q) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
      }
    }
    float* KT = grow(w.kt, D * NP + 2 * kt.vw);
    if (kT)
      pack_keys_t(kt, g, tg, kT + slice * ldk * D, ldk, g.E ? ekT + slice * g.E * D : nullptr, KT, D);
    else
      pack_keys_hl(kt, g, tg, b, hk, a.k, g.tk, g.E ? ekT + slice * g.E * D : nullptr, KT, D);
    float* S = grow(w.s, M * NP + kt.vw);
    kt.gemm(static_cast<int>(M), static_cast<int>(NP), static_cast<int>(D), Qp, D, KT, NP, S, NP, false);
    float* P = grow(w.p, M * NP + kt.vw);
    float* O = grow(w.o, M * (Dv + 2));
    float* mrow = O + M * Dv;  // lse per row
    float* inv = mrow + M;
    const int* cc[3] = {tg.colc[0].data(), tg.colc[1].data(), tg.colc[2].data()};
    // windows that are the whole box (DiNAT's dilation groups of K, NAT's K x K maps): the bias, then the
    // softmax of every row at once with no window test (masked_max / masked_exp's six compares per vector
    // and a std::log per row were a quarter of DiNAT's dilated forward)
    if (tg.all_full) {
      for (int64_t r = 0; g.has_rpb && r < M; ++r) {
        const float* rp = rpbp + (hk * g.G + r / tg.T) * g.Rtot;
        tg.runs(g, r % tg.T, [&](int64_t off, int len, int64_t ri) { kt.add_pad(S + r * NP + off, rp + ri, len); });
      }
      kt.full_softmax(P, S, NP, static_cast<int>(M), static_cast<int>(NP), static_cast<int>(tg.Ncol), mrow, inv);
      path_count[12].fetch_add(M, std::memory_order_relaxed);
    }
    for (int64_t r = 0; !tg.all_full && r < M; ++r) {
      const int64_t gg = r / tg.T, q = r % tg.T, h = hk * g.G + gg;
      float* srow = S + r * NP;
      float* prow = P + r * NP;
      // the bias added to the window's scores (runs along the last axis), then one vector pass over the
      // whole box row under the query's window mask for the max and one for the exps (per-run max and
      // exp calls, 7 of each per query at K = 7, were 32% of C2's forward with rpb)
      if (g.has_rpb) {
        const float* rp = rpbp + h * g.Rtot;
        tg.runs(g, q, [&](int64_t off, int len, int64_t ri) { kt.add_pad(srow + off, rp + ri, len); });
      }
      float m = kt.masked_max(srow, cc, tg.always.data(), &tg.ws[q * 3], &tg.we[q * 3], static_cast<int>(NP));
      if (m == -INFINITY) m = 0.f;  // only NaN scores: let the NaN through exp
      const float sum =
          kt.masked_exp(prow, srow, cc, tg.always.data(), &tg.ws[q * 3], &tg.we[q * 3], static_cast<int>(NP), m);
      mrow[r] = m + std::log(sum);
      inv[r] = 1.f / sum;
    }
    float* Vp = grow(w.vp, NP * Dv);
    pack_rows_hl(g, tg, b, hk, Dv, a.v, g.tv, a.ev, Vp);
    if (kt.all_finite(Vp, tg.Ncol * Dv)) {
      // (over the Ncol real columns: the padding up to NP has P = 0)
      kt.gemm(static_cast<int>(M), static_cast<int>(Dv), static_cast<int>(tg.Ncol), P, NP, Vp, Dv, O, Dv, false);
    } else {
      // an inf/NaN value outside a query's window must not reach it through a zero weight
      std::memset(O, 0, sizeof(float) * M * Dv);
      for (int64_t r = 0; r < M; ++r) {
        const float* prow = P + r * NP;
        float* orow = O + r * Dv;
        tg.runs(g, r % tg.T, [&](int64_t off, int len, int64_t) {
          for (int x = 0; x < len; ++x) kt.axpy(orow, prow[off + x], Vp + (off + x) * Dv, static_cast<int>(Dv));
        });
        for (int64_t e = 0; e < g.E; ++e)
          kt.axpy(orow, prow[tg.Nbox + e], Vp + (tg.Nbox + e) * Dv, static_cast<int>(Dv));
      }
    }
    for (int64_t r = 0; r < M; ++r) {
      const int64_t gg = r / tg.T, q = r % tg.T, h = hk * g.G + gg;
      const int64_t row = (b * g.N + tg.qtok[q]) * g.H + h;
      float* dst = a.out + row * Dv;
      const float* src = O + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = src[d] * inv[r];
      a.lse[row] = mrow[r];
    }
  };
  // 1D on heads-last rows (kt.row_fwd, as the backward's row_bwd): a chunk's queries one at a time,
  // every head of a token together, straight from q, k, v into out and lse: no transposes, and the
  // threads write different tokens' lines
  auto row_chunk = [&](int64_t b, const Chunk& ch) {
    const int vw = kt.vw, g2 = ep.rows[ch.row].g[2];
    const int64_t D = g.D, Dv = g.Dv, Dl2 = g.Dl[2];
    Workspace& w = tls_ws;
    float* zeros = grow(w.kp, static_cast<size_t>(D));
    std::memset(zeros, 0, sizeof(float) * D);
    const int64_t kstep = Dl2 * g.tk, vstep = Dl2 * g.tv;
    const float* kg = a.k + (b * g.Nk + g2) * g.tk;
    const float* vg = a.v + (b * g.Nk + g2) * g.tv;
    const int64_t tok0 = row_token(g, ep.rows[ch.row].g[0], ep.rows[ch.row].g[1], ep.rows[ch.row].c0,
                                   ep.rows[ch.row].c1) + g2;
    std::vector<RowQuery>& rq = tls_rowq;
    rq.resize(g.H);
    for (int oi = ch.b0; oi < ch.b1; ++oi) {
      const ExactBlock& blk = ep.blocks[g2][order[g2][oi]];
      const ExactRun& run = ep.runs[g2][blk.run];
      const int* lohi = run.masked ? run.lohi : nullptr;
      float* s = grow(w.s, static_cast<size_t>(2 * (round_up(blk.nx, vw) + vw)));
      for (int l = blk.skip; l < vw; ++l) {
        if (lohi && lohi[l] >= lohi[vw + l]) continue;
        const int ws = blk.ws + l + (lohi ? lohi[l] : 0), n = lohi ? lohi[vw + l] - lohi[l] : blk.nx;
        const int64_t tok = tok0 + static_cast<int64_t>(blk.c + l) * Dl2;
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t hk = h / g.G, r = (b * g.N + tok) * g.H + h;
          rq[h] = {a.q + (b * g.N + tok) * g.tq + h * D, kg + ws * kstep + hk * D, vg + ws * vstep + hk * Dv,
                   a.out + r * Dv, a.lse + r};
        }
        kt.row_fwd(rq.data(), static_cast<int>(g.H), kstep, vstep, n, D, Dv, g.scale, zeros, s);
      }
    }
  };
  // 2D/3D on heads-last rows (NATTEN_MLX_ROW2D=1): as row_chunk, a query's window being the K0 (x K1)
  // key rows of its exact-plan row, each a segment of n keys along the last axis (Dl2 tokens apart)
  auto row_chunk_nd = [&](int64_t b, const Chunk& ch) {
    const int vw = kt.vw;
    const int64_t D = g.D, Dv = g.Dv, Dl2 = g.Dl[2];
    Workspace& w = tls_ws;
    float* zeros = grow(w.kp, static_cast<size_t>(D));
    std::memset(zeros, 0, sizeof(float) * D);
    const float* kb = a.k + b * g.Nk * g.tk;
    const float* vb = a.v + b * g.Nk * g.tv;
    std::vector<RowQuery>& rq = tls_rowq;
    rq.resize(g.H);
    std::vector<int64_t>& seg = tls_seg;
    std::vector<int64_t>& off = tls_off;
    for (int ri : {ch.row, ch.row2}) {
      if (ri < 0) continue;
      const ExactPlan::Row& row = ep.rows[ri];
      const int g2 = row.g[2];
      seg.clear();
      // the token of each key row's (group coordinate 0) key
      for_window_key_rows(g, ep, row, [&](int64_t base) { seg.push_back(base - ep.gstart[g2] + g2); });
      const int nseg = static_cast<int>(seg.size());
      const int64_t tok0 = row_token(g, row.g[0], row.g[1], row.c0, row.c1) + g2;
      for (int oi = ch.b0; oi < ch.b1; ++oi) {
        const ExactBlock& blk = ep.blocks[g2][order[g2][oi]];
        const ExactRun& run = ep.runs[g2][blk.run];
        const int* lohi = run.masked ? run.lohi : nullptr;
        const int nmax = nseg * blk.nx;
        float* s = grow(w.s, static_cast<size_t>(2 * (round_up(nmax, vw) + vw)));
        off.resize(static_cast<size_t>(nmax));
        int64_t* koff = off.data();
        for (int l = blk.skip; l < vw; ++l) {
          if (lohi && lohi[l] >= lohi[vw + l]) continue;
          const int ws = blk.ws + l + (lohi ? lohi[l] : 0), n = lohi ? lohi[vw + l] - lohi[l] : blk.nx;
          int j = 0;
          for (int r = 0; r < nseg; ++r)
            for (int x = 0; x < n; ++x, ++j) koff[j] = seg[r] + (ws + x) * Dl2;
          const int64_t tok = tok0 + static_cast<int64_t>(blk.c + l) * Dl2;
          // every head of the query in one call (two heads at a time along the whole row, to keep fewer
          // key lines in L1, was slower: paired C2 1.05, C4 1.08, that build second)
          for (int64_t h = 0; h < g.H; ++h) {
            const int64_t hk = h / g.G, r = (b * g.N + tok) * g.H + h;
            rq[h] = {a.q + (b * g.N + tok) * g.tq + h * D, kb + hk * D, vb + hk * Dv, a.out + r * Dv, a.lse + r};
          }
          kt.row_fwd_g(rq.data(), static_cast<int>(g.H), koff, g.tk, g.tv, j, D, Dv, g.scale, zeros, s);
        }
      }
    }
  };
  auto item_fn = [&](int64_t item) { item_fn_on(item, kTx, vTx, ldx, 0); };
  // on rows (1D, or 2D/3D with NATTEN_MLX_ROW2D=1): the exact plan's chunks per batch, then the tiles
  if (rows1d || rowsnd)
    parallel_for(g.B * nrowsx + slices * ntiles, [&](int64_t it) {
      if (it < g.B * nrowsx)
        return rows1d ? row_chunk(it % g.B, chunks[it / g.B]) : row_chunk_nd(it % g.B, chunks[it / g.B]);
      it -= g.B * nrowsx;
      item_fn((it / ntiles) * per_slice + nrowsx + it % ntiles);
    });
  // 1D: chunk-major, the heads of one chunk one after another and on both threads at once, so the
  // heads-last rows they share are read from memory once while in cache (paired C1 0.92); 2D/3D keep
  // slice-major order, whose items read one slice's transposed keys and values (C4 1.08 otherwise)
  // 2D/3D: an item serves the same row (or tile) of all of a batch's kv heads (up to 8; more: two),
  // one after the other, reading whole heads-last q rows and writing whole out rows (see the
  // streamed tasks below; paired, C4 forward 0.983 with two heads, 0.964 more with all four)
  else if (!streamed && !local && (g.Hkv % 2 == 0 || (g.Hkv > 1 && g.Hkv <= 8))) {
    const int64_t per = g.Hkv <= 8 ? g.Hkv : 2;
    parallel_for(slices / per * per_slice, [&](int64_t it) {
      const int64_t grp = it / per_slice, idx = it % per_slice;
      for (int64_t j = 0; j < per; ++j) item_fn((grp * per + j) * per_slice + idx);
    });
  }
  else if (!streamed)
    parallel_for(slices * per_slice, [&](int64_t it) {
      item_fn(local ? (it % slices) * per_slice + it / slices : it);
    });
  else {
    // neighbouring heads in one task, their chunks in turn: the task reads whole lines of the
    // heads-last rows of q, k, v and writes whole lines of out (a head's 128 bytes at D = 32 span
    // three lines, MLX's buffers starting off a line; its neighbour's task read and wrote the shared
    // ones again, from another core). Paired, C2 forward 0.954, C3 0.981.
    // All of a batch's heads in one task where their rows in use fit in a MiB: the task reads whole
    // heads-last rows; when that leaves fewer tasks than threads, each task takes a part of the chunks
    // (in seq order) and transposes, into its own copy, the key rows from its first chunk's on
    const int64_t nthr = num_threads();
    int64_t span = 0;  // the most key rows along the first two axes a chunk's windows span
    std::vector<int64_t> lo(chunks.size());
    for (size_t c = 0; c < chunks.size(); ++c) {
      int64_t l = g.Nk / g.L[2], h = 0;
      for (const int rr : {chunks[c].row, chunks[c].row2}) {
        if (rr < 0) continue;
        const ExactPlan::Row& row = ep.rows[rr];
        for_window_key_rows(g, ep, row, [&](int64_t base) {
          l = std::min(l, (base - ep.gstart[row.g[2]]) / g.L[2]);
          h = std::max(h, (base - ep.gstart[row.g[2]]) / g.L[2] + 1);
        });
      }
      lo[c] = l;
      span = std::max(span, h - l);
    }
    const bool whole = g.Hkv <= 8 && g.Hkv * (span + 2) * g.L[2] * (g.D + g.Dv) * 4 <= (int64_t(1) << 20);
    const int64_t per = whole ? g.Hkv : g.Hkv % 2 == 0 ? 2 : 1, groups = slices / per;
    const int64_t parts = whole && groups < nthr ? std::min<int64_t>((nthr + groups - 1) / groups, 4) : 1;
    // each part's rows of transposed keys and values in a ring of row slots, as few as its chunks keep
    // in use (C2: 11 of 64 rows), so they stay in L2 from call to call instead of being written to
    // 4 MiB of buffers and evicted (NATTEN_MLX_RING=0: every row its own)
    std::vector<int64_t> firsts(parts);
    int64_t ring = ring_mode() ? 1 : 0;
    for (int64_t part = 0; part < parts; ++part) {
      const size_t c0 = seq.size() * part / parts, c1 = seq.size() * (part + 1) / parts;
      int64_t first = g.Nk / g.L[2];
      for (size_t c = c0; c < c1; ++c) first = std::min(first, lo[seq[c]]);
      firsts[part] = part == 0 ? 0 : std::max<int64_t>(0, first - stream_ahead(g, kt.vw));
      const int64_t r = ring ? ring_rows(g, ep, kt.vw, seq, c0, c1, lo, need, firsts[part]) : 0;
      ring = r ? std::max(ring, r) : 0;
    }
    const int64_t ldb = ring ? ring_ld(g, ep, kt.vw, ring) : ldx;
    if (ring) path_count[6].fetch_add(1);
    if (pvrows) path_count[9].fetch_add(1);
    float *kTp = nullptr, *vTp = nullptr;  // parts 1.. : their own copies
    if (parts > 1) {
      kTp = scratch(static_cast<size_t>((parts - 1) * slices * ldb * g.D));
      vTp = scratch(static_cast<size_t>((parts - 1) * slices * ldb * g.Dv));
    }
    parallel_for(groups * parts, [&](int64_t task) {
      const int64_t grp = task / parts, part = task % parts;
      const size_t c0 = seq.size() * part / parts, c1 = seq.size() * (part + 1) / parts;
      if (c0 >= c1) return;
      float* kb = part == 0 ? kTs : kTp + (part - 1) * slices * ldb * g.D;
      float* vb = part == 0 ? vTs : vTp + (part - 1) * slices * ldb * g.Dv;
      // (firsts: from the lowest key row the part's chunks read, less the rows a border block may read
      // before a row's start, the stream's reach ahead taken as far back)
      std::vector<std::optional<SliceStream>> st(per);
      for (int64_t j = 0; j < per; ++j) {
        const int64_t slice = grp * per + j;
        st[j].emplace(kt, g, ep, a.k, a.v, slice / g.Hkv, slice % g.Hkv, ldb, kb + slice * ldb * g.D,
                      vb + slice * ldb * g.Dv, false, check && !pvrows, firsts[part], ring, pvrows);
      }
      for (size_t c = c0; c < c1; ++c)
        for (int64_t j = 0; j < per; ++j) {
          const int64_t i = seq[c];
          if (!st[j]->advance(need[i])) v_ok.store(false, std::memory_order_relaxed);
          item_fn_on((grp * per + j) * per_slice + i, kb, vb, ldb, ring);
        }
    });
  }
  if (check && !v_ok.load()) return false;
  count_paths(0, g, ep);
  if (nt_out && ep.on && !rows1d && !rowsnd) path_count[10].fetch_add(1);
  return true;
}
}  // namespace

// g with its token strides filled in (0: contiguous)
// (path_counts()[11]: the calls that read one of them from a view with a longer token stride)
static Geo with_strides(const Geo& g) {
  Geo s = g;
  if ((g.tq && g.tq != g.H * g.D) || (g.tk && g.tk != g.Hkv * g.D) || (g.tv && g.tv != g.Hkv * g.Dv))
    path_count[11].fetch_add(1);
  if (!s.tq) s.tq = g.H * g.D;
  if (!s.tk) s.tk = g.Hkv * g.D;
  if (!s.tv) s.tv = g.Hkv * g.Dv;
  return s;
}

void fused_forward(const Geo& g0, const FwdArgs& a) {
  const Geo g = with_strides(g0);
  if (!forward_pass(g, a, true)) forward_pass(g, a, false);
}

// ---------------------------------------------------------------- fused backward
namespace {
// One pass of the backward. The exact-window path (which multiplies zeros into its padding instead of
// masking) needs finite keys, queries and output gradients, and its border blocks finite values.
// optimistic: plans as if they were, and checks them where the exact path transposes them anyway
// (separate passes over k, q, dO and v cost 1-5% of C1-C4's forward+backward; tiles check their own
// operands); false when one was not finite (or the exact path does not serve the problem), so that
// the caller runs the pass again with the checks up front.
bool backward_pass(const Geo& g, const BwdArgs& a, bool optimistic) {
  const KernelTable& kt = select_kernels();
  const int64_t pass = tile_passes.fetch_add(1);  // (TileGeo::ensure)
  const int64_t D = g.D, Dv = g.Dv, N = g.N, Nk = g.Nk, E = g.E;
  // dk/dv and dq stored (not added) with non-temporal stores (see nt_for)
  // (rows of whole lines: D and Dv multiples of 16 floats, the outputs' bases on a line, see ops.cpp)
  const bool nt_kv = a.final_out && D % 16 == 0 && Dv % 16 == 0 && nt_for(g.B * Nk * g.Hkv * D * int64_t(sizeof(float)));
  const bool nt_q = a.final_out && D % 16 == 0 && nt_for(g.B * N * g.H * D * int64_t(sizeof(float)));
  // known_fin: keys, queries and output gradients are known to be finite (tiles skip their own check)
  bool known_fin = false, v_finite = true;
  // the plans (the forward's cache; without the exact path, when an operand is not finite, made here)
  CachedPlans* cp = nullptr;
  CachedPlans own;
  if (optimistic) {
    cp = &cached_plans(g, kt, true);
    if (!cp->ep.on) return false;
  } else {
    known_fin = all_finite_rows(kt, a.k, g.B * Nk, g.Hkv * D, g.tk) && (!E || kt.all_finite(a.ek, g.B * E * g.Hkv * D)) &&
                all_finite_rows(kt, a.q, g.B * N, g.H * D, g.tq) && all_finite_par(kt, a.dout, g.B * N * g.H * Dv);
    v_finite = all_finite_rows(kt, a.v, g.B * Nk, g.Hkv * Dv, g.tv);
    if (known_fin) {
      cp = &cached_plans(g, kt, v_finite);
    } else {
      own.plan = make_plan(g, kt.vw, &own.ep);
      cp = &own;
    }
  }
  const ExactPlan& ep = cp->ep;
  const Plan& plan = cp->plan;
  const std::vector<TileGeo>* tgs = tile_geos(*cp, g, kt.vw);  // (null: per-thread TileGeo::ensure)
  // optimistic: cleared by a transpose that met inf or NaN
  std::atomic<bool> ok{true};
  auto fail = [&] { ok.store(false, std::memory_order_relaxed); };
  const int64_t slices = g.B * g.Hkv, ntiles = static_cast<int64_t>(plan.tiles.size());
  const int64_t nrowsx = static_cast<int64_t>(ep.rows.size());
  const int nthr = num_threads();
  // key/value gradients are sums over tiles: a slice's tiles are split among `splits` tasks, each
  // with its own accumulators (split 0 writes the outputs directly), added up afterwards
  // several tasks per thread let an idle thread take over the work of one that was descheduled (a
  // shared machine), at the price of one more accumulator (and its reduction) per extra split
  const int64_t over = ep.on ? 2 : 4;
  // (1D exact rows run in their own waves, see `local` below)
  const bool local1d = ep.on && g.L[0] == 1 && g.L[1] == 1;
  if (ep.on && !local1d && !cp->has_rslots) {
    cp->rslots = row_slots(g, ep, kt.vw);
    cp->has_rslots = true;
  }
  const std::vector<RowSlots>& rslots = cp->rslots;
  const int64_t call = bwd_calls.fetch_add(1);
  int64_t splits = std::min<int64_t>(ntiles + (local1d ? 0 : nrowsx), (over * nthr + slices - 1) / slices);
  const int64_t ldx = ep.ld;  // see make_exact_plan
  // The key side's sums (2D/3D exact rows) per key row of the last axis, rows P2 apart: L2, or vw where the
  // rows are shorter (NAT's 14 x 14 maps), so that every key row of a pass has its own vectors and
  // exact_kv_all sums three rows per register pass instead of one (apart). A row's sums hold its L2 keys
  // and then (P2 > L2) the zeros the key side's whole-vector writes add past them.
  const int64_t P2 = ep.on && !local1d && g.L[2] < kt.vw ? kt.vw : g.L[2];
  const int64_t xacc_size = ep.on && !local1d ? (D + Dv) * ring_ld(g, ep, kt.vw, Nk / g.L[2], P2) + 16 : 0;
  const int64_t per_split = ((Nk + g.E) * (D + Dv) + xacc_size) * slices * static_cast<int64_t>(sizeof(float));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 1 + (int64_t(256) << 20) / std::max<int64_t>(per_split, 1)));
  const int64_t ntasks = slices * splits;
  const int64_t acc_size = Nk * (D + Dv) + E * (D + Dv);
  float* priv = splits > 1 ? scratch(static_cast<size_t>((splits - 1) * slices * acc_size), true) : nullptr;
  // each task's rpb accumulator is followed by vector slack: the padded adds write whole vectors back
  // (unchanged past a run), which must not land in another task's accumulator
  const int64_t racc_stride = g.G * g.Rtot + 16;
  float* rpb_acc = g.has_rpb ? scratch(static_cast<size_t>(ntasks * racc_stride), true) : nullptr;
  // and (2D/3D exact rows) a vector of 16 floats per entry, summed across at the end (a row's sums of dS per key
  // row and d were ~90 dot products of 14-64 floats: ~15% of NAT's 14 x 14 backward with rpb)
  const bool rowsv = g.has_rpb && ep.on && !(g.L[0] == 1 && g.L[1] == 1);
  float* rpb_accv = rowsv ? scratch(static_cast<size_t>(ntasks * g.G * g.Rtot * 16), true) : nullptr;
  // The exact-window path reads keys and values transposed per (batch, head) with each last-axis
  // dilation group contiguous (as the forward), and sums key/value gradients per task in that order
  // ([D][ldx] then [Dv][ldx]); queries, output gradients, lse and dlse are gathered per run.
  // 1D problems transpose keys and values per piece of a row (see fused_forward)
  const bool local = local1d;
  const float *kTx = nullptr, *vTx = nullptr;
  float* xacc = nullptr;
  const int L2 = g.L[2], Dl2 = g.Dl[2];
  // Streamed (2D, no tiles, one task per slice, at least two slices per thread), as the forward's:
  // a task transposes its slice's key and value rows just before the first row pair whose window
  // reaches them, so the query and key sides read them from L1/L2 instead of from L3 after a
  // whole-slice pass up front. units: the row pairs in the order served, need: the key rows along
  // the first two axes each one reads.
  const bool streamed = ep.on && !local && g.L[0] == 1 && ntiles == 0 && splits == 1 && slices >= 2 * int64_t(nthr);
  // one task per slice (splits == 1) with 2D/3D exact rows: the task stores its transposed sums into
  // dk/dv (every key of the slice) before its tiles add theirs, so dk/dv are not zeroed first and
  // read back by a separate pass (4 MiB each way at C2)
  const bool direct = ep.on && !local && splits == 1;
  float *kTs = nullptr, *vTs = nullptr;
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<int64_t> need;
  // direct: after units[i], no later unit adds to the key rows along the first two axes below
  // final_rows[i] (nor to any key of theirs, the padded key-side writes past a row adding zeros), so
  // the task stores them then, from sums still in cache, and the stores' misses spread over the
  // rows' work (one pass at the end, reading the sums back from L3 at C4, was 6-8% of C2/C4 fwd+bwd)
  std::vector<int64_t> final_rows;
  if (streamed || direct) {
    for (int64_t idx = 0; idx < nrowsx; ++idx) {
      const bool pair = idx + 1 < nrowsx && ep.pairs_with_next(static_cast<size_t>(idx));
      units.emplace_back(idx, pair ? idx + 1 : -1);
      if (pair) ++idx;
    }
  }
  if (streamed) {
    std::vector<int64_t> top(units.size());
    for (size_t i = 0; i < units.size(); ++i) top[i] = key_rows_needed(g, ep, units[i].first, units[i].second);
    std::vector<std::pair<int64_t, int64_t>> sorted;
    for (const int64_t i : order_by_need(top)) sorted.push_back(units[i]), need.push_back(top[i]);
    units.swap(sorted);
  }
  // direct: the lowest key row along the first two axes a unit reads, and the last one + 1
  std::vector<int64_t> lo_u(units.size()), hi_u(units.size());
  if (direct) {
    final_rows.resize(units.size());
    int64_t lowest = Nk / L2;
    for (size_t i = units.size(); i-- > 0;) {
      final_rows[i] = lowest;
      int64_t lo = Nk / L2, hi = 0;
      for (const int64_t rr : {units[i].first, units[i].second}) {
        if (rr < 0) continue;
        const ExactPlan::Row& row = ep.rows[rr];
        for_window_key_rows(g, ep, row, [&](int64_t base) {
          lo = std::min(lo, (base - ep.gstart[row.g[2]]) / L2);
          hi = std::max(hi, (base - ep.gstart[row.g[2]]) / L2 + 1);
        });
      }
      lowest = std::min(lowest, lo);
      lo_u[i] = lo;
      hi_u[i] = hi;
    }
  }
  // streamed: the transposed keys and values in a ring of row slots (as the forward's streamed tasks;
  // NATTEN_MLX_RING=0: every row its own), rows ldkv long
  int64_t kv_ring = 0, ldkv = ldx;
  if (streamed && ring_mode()) {
    std::vector<int64_t> ident(units.size());
    for (size_t i = 0; i < ident.size(); ++i) ident[i] = static_cast<int64_t>(i);
    kv_ring = ring_rows(g, ep, kt.vw, ident, 0, units.size(), lo_u, need, 0);
    if (kv_ring) {
      ldkv = ring_ld(g, ep, kt.vw, kv_ring);
      path_count[7].fetch_add(1);
    }
  }
  // direct: the key side's sums in a ring of row slots too, rows ldacc long: a row's slot is stored
  // into dk/dv once no later unit adds to it (final_rows) and zeroed for the row that takes it next, so
  // the slots hold the rows from the lowest not yet stored to the highest added to (C4: 96 of 512 rows,
  // against 4 MiB of sums per slice). The key side's whole-vector writes past a row add zeros to the
  // next slot, whichever row it holds (or the ring's padding). NATTEN_MLX_RING=0: every row its own.
  int64_t acc_ring = 0, ldacc = ring_ld(g, ep, kt.vw, Nk / L2, P2);
  if (direct && ring_mode()) {
    // (a store after unit i reads rows [stored, final_rows[i]), some of which no unit may have added to
    // (keys no exact-path window reaches): their slots must not be another live row's, so they count)
    int64_t r = 0, top = 0, stored = 0;
    for (size_t i = 0; i < units.size(); ++i) {
      top = std::max(top, hi_u[i]);
      r = std::max(r, std::max(top, final_rows[i]) - stored);
      stored = std::max(stored, final_rows[i]);
    }
    if (r < Nk / L2) {
      acc_ring = r;
      ldacc = ring_ld(g, ep, kt.vw, r, P2);
      path_count[8].fetch_add(1);
    }
  }
  if (ep.on) {
    if (streamed) {
      kTs = scratch(static_cast<size_t>(slices * ldkv * D));
      vTs = scratch(static_cast<size_t>(slices * ldkv * Dv));
      kTx = kTs;
      vTx = vTs;
      xacc = scratch(static_cast<size_t>(ntasks * xacc_size));
    } else if (!local) {
      kTx = transpose_heads_last_grouped(a.k, g.B, Nk, g.Hkv, D, g.tk, L2, Dl2, ep.gstart.data(), ldx, ep.front,
                                         optimistic ? &ok : nullptr);
      vTx = transpose_heads_last_grouped(a.v, g.B, Nk, g.Hkv, Dv, g.tv, L2, Dl2, ep.gstart.data(), ldx, ep.front,
                                         optimistic ? &ok : nullptr);
      xacc = scratch(static_cast<size_t>(ntasks * xacc_size));
    }
  }
  // the tile path's keys, transposed per slice (the exact path's copy when it is the same order)
  int64_t ldk = round_up(Nk, 16) + 16;
  const float* kT = nullptr;
  // and its values transposed the same way (the exact path's copy; else the tiles gather value rows)
  const float* vT = nullptr;
  // (whole-group tiles pack keys and values from the heads-last rows: whole_group_tiles)
  const bool hl_pack = whole_group_tiles(g, plan);
  // whole-group tiles alone (no exact rows), one task per slice, whose key boxes hold every key once (one
  // tile per group, so disjoint): each tile stores its keys' dK / dV, and dk / dv are neither zeroed first
  // nor read back by per-key adds
  bool tiles_store = false;
  if (!ep.on && hl_pack && splits == 1) {
    int64_t keys = 0;
    for (const Tile& t : plan.tiles) {
      int64_t n = 1;
      for (int ax = 0; ax < 3; ++ax) {
        int kb, nk;
        tile_keys(g, t, ax, &kb, &nk);
        n *= nk;
      }
      keys += n;
    }
    tiles_store = keys == Nk;
    if (tiles_store) path_count[14].fetch_add(1);
  }
  if (ep.on && Dl2 == 1 && !local) {
    kT = kTx + ep.front;
    vT = vTx + ep.front;
    ldk = ldx;
  } else if (ntiles && !hl_pack) {
    kT = transpose_heads_last(a.k, g.B, Nk, g.Hkv, D, ldk, g.tk);
  }
  const float* ekT = E ? transpose_heads_last(a.ek, g.B, E, g.Hkv, D) : nullptr;
  const float* rpbp = padded_rpb(g, a.rpb);
  // the gradients are written in MLX's heads-last order: token n of slice (b, kv head hk) at
  // dk_of(slice) + n * tsk, and query token n of head h of batch b at dq_of(b, h) + n * tsq
  const int64_t tsq = g.H * D, tsk = g.Hkv * D, tsv = g.Hkv * Dv;
  auto dq_of = [&](int64_t b, int64_t h) { return a.dq + (b * N * g.H + h) * D; };
  auto dk_of = [&](int64_t slice) { return a.dk + ((slice / g.Hkv) * Nk * g.Hkv + slice % g.Hkv) * D; };
  auto dv_of = [&](int64_t slice) { return a.dv + ((slice / g.Hkv) * Nk * g.Hkv + slice % g.Hkv) * Dv; };
  auto dek_of = [&](int64_t slice) { return a.dek + ((slice / g.Hkv) * E * g.Hkv + slice % g.Hkv) * D; };
  auto dev_of = [&](int64_t slice) { return a.dev + ((slice / g.Hkv) * E * g.Hkv + slice % g.Hkv) * Dv; };
  // the sums of key rows [rho0, rho1) along the first two axes (all: rho1 = Nk / L2), ldacc long
  auto store_exact_sums = [&](int64_t slice, const float* xk, bool add, int64_t rho0, int64_t rho1) {
    const float* xv = xk + D * ldacc;
    float* dk = dk_of(slice);
    float* dv = dv_of(slice);
    // per row of the last axis and dilation group: consecutive positions, tokens Dl2 apart
    for (int64_t r0 = rho0 * L2; r0 < rho1 * L2; r0 += L2)
      for (int g2 = 0; g2 < Dl2; ++g2) {
        const int64_t lg = na_group_len(L2, Dl2, g2), n0 = r0 + g2;
        const int64_t p0 = ring_base(g, ep, r0 + ep.gstart[g2], acc_ring, P2);
        add_transposed(kt, xk + p0, ldacc, D, lg, dk + n0 * tsk, Dl2 * tsk, add, nt_kv);
        add_transposed(kt, xv + p0, ldacc, Dv, lg, dv + n0 * tsv, Dl2 * tsv, add, nt_kv);
      }
  };
  // (1D: the pieces store their sums where they write first, below, and zero the keys none writes)
  if (!direct && !local && !tiles_store) {
    std::memset(a.dk, 0, sizeof(float) * g.B * g.Hkv * Nk * D);
    std::memset(a.dv, 0, sizeof(float) * g.B * g.Hkv * Nk * Dv);
  }
  if (E) {
    std::memset(a.dek, 0, sizeof(float) * g.B * g.Hkv * E * D);
    std::memset(a.dev, 0, sizeof(float) * g.B * g.Hkv * E * Dv);
  }
  const int64_t tstep = Dl2 * g.H;  // heads-last rows of consecutive queries of a last-axis group
  // queries t in [0, n) of one head at heads-last rows row0 + t * tstep: the scaled queries and the
  // output gradients transposed into xq [D][lds] / xo [Dv][lds] at column t, lse at lc[t] and dlse
  // at lc[cap + t] (the kernels compute c = dO.O - dlse from P and dP: the outputs are not read)
  auto load_queries = [&](int64_t row0, int n, float* xq, float* xo, int64_t lds, float* lc, int64_t cap) {
    bool fin = true;
    // the queries' own rows: tokens g.tq floats apart (row0 is token row0 / H's head row0 % H)
    const float* q0 = a.q + (row0 / g.H) * g.tq + (row0 % g.H) * D;
    const int64_t qstep = Dl2 * g.tq;
    int t = 0;
    for (; t + 8 <= n; t += 8) {
      const float *sq[8], *so[8];
      for (int j = 0; j < 8; ++j) {
        sq[j] = q0 + (t + j) * qstep;
        so[j] = a.dout + (row0 + (t + j) * tstep) * Dv;
      }
      for (int j = 0; j < 8 && t + 16 + j < n; ++j) {
        prefetch_row(q0 + (t + 16 + j) * qstep, D);
        prefetch_row(a.dout + (row0 + (t + 16 + j) * tstep) * Dv, Dv);
      }
      if (optimistic) {
        fin = kt.transpose8_finite(sq, D, xq + t, lds) && fin;
        fin = kt.transpose8_finite(so, Dv, xo + t, lds) && fin;
      } else {
        kt.transpose8(sq, D, xq + t, lds);
        kt.transpose8(so, Dv, xo + t, lds);
      }
    }
    for (; t < n; ++t) {
      for (int64_t d = 0; d < D; ++d) xq[d * lds + t] = q0[t * qstep + d];
      for (int64_t d = 0; d < Dv; ++d) xo[d * lds + t] = a.dout[(row0 + t * tstep) * Dv + d];
      if (optimistic)
        fin = kt.all_finite(q0 + t * qstep, D) && kt.all_finite(a.dout + (row0 + t * tstep) * Dv, Dv) && fin;
    }
    if (!fin) fail();
    const float scale = g.scale;  // a local: the compiler cannot tell xq from g
    for (int64_t d = 0; d < D; ++d) {
      float* x = xq + d * lds;
      for (int l = 0; l < n; ++l) x[l] *= scale;
    }
    for (int l = 0; l < n; ++l) {
      const int64_t row = row0 + l * tstep;
      lc[l] = a.lse[row];
      lc[cap + l] = a.dlse ? a.dlse[row] : 0.f;
    }
    // the lanes past the queries (a group shorter than vw: a block's idle lanes) read zeros, not what an
    // earlier call left (their weights are 0, but 0 * a stale NaN is not)
    for (int64_t l = n; l < cap; ++l) lc[l] = lc[cap + l] = 0.f;
  };
  // dq (already times scale) of a block's lanes [skip, vw) (a border block's own lanes only) of head h; lane l is query
  // token tok0 + l * Dl2
  auto store_dq = [&](int64_t b, int64_t h, int64_t tok0, int skip, const int* lohi, float* dqT) {
    store_lanes(kt, dqT, D, kt.vw, skip, lohi, dq_of(b, h) + tok0 * tsq, Dl2 * tsq, nt_q);
  };
  // blocks of vw queries of a run of n: fn(t0, skip) at t0 = 0, vw, ..., and one ending at the run's
  // end for the rest (its lanes before skip were served by the previous block)
  auto for_blocks = [&](int n, auto&& fn) {
    for (int t0 = 0, done = 0; done < n;) {
      fn(t0, t0 < done ? done - t0 : 0);
      done = t0 + kt.vw;
      t0 = std::min(done, n - kt.vw);
    }
  };
  // 1D: queries u0 + [tb, te) of one run of a row (a border block: all of it) of a slice. Per query
  // head, the query side computes P, dS and dQ block by block and leaves P and dS of the queries in
  // zero-padded buffers; the key side then sums dK = dS^T q and dV = P^T dO over their keys from them,
  // one key per lane. The row's key row starts at shift in ks / vs and in the accumulators xk / xv
  // (rows ld apart).
  // rpb: the bias of slot x is entry K2 - 1 + ws0 - u0 + x of the head's rpb (d = key - query, the same for
  // every block of the run) and its gradient the sum of dS over the piece's queries, added to racc ([G][Rtot][16]:
  // vectors, as exact_row's)
  auto exact_run = [&](int64_t slice, const ExactPlan::Row& row, int64_t shift, const ExactRun& run, int tb, int te,
                       const float* ks, const float* vs, int64_t ld, float* xk, float* xv, float* racc) {
    const int64_t b = slice / g.Hkv, hk = slice % g.Hkv;
    const int vw = kt.vw, g2 = row.g[2];
    const int u0 = run.u0 + tb, runlen = te - tb, ws0 = run.ws0 + tb;
    const int nx = run.nx, nk = runlen + nx - 1;
    // zeros before the run (>= nx - 1 columns) and after it (>= nx + vw): the key side reads there
    const int64_t padA = round_up(nx, 8), lds = round_up(padA + runlen + nx + vw, 8);
    const int* lohi = run.masked ? run.lohi : nullptr;
    const int64_t cap = round_up(runlen, 8) + vw;
    // runs and border blocks keep separate buffers (their geometries alternate along a row)
    ExactBwdWs& w = tls_xbw[run.masked ? 1 : 0];
    w.prepare(nx, lds, padA, runlen, D, Dv, call);
    const int64_t rbk = ws0 + shift;
    float* S = grow(w.s, 2 * static_cast<size_t>(nx) * vw + vw);
    float* dqT = grow(w.dq, D * vw + vw);
    float* lc = grow(w.lc, 2 * cap);
    float *xq = w.xq.data() + padA, *xo = w.xo.data() + padA, *pt = w.pt.data() + padA, *dst = w.ds.data() + padA;
    const int64_t tok0 = row_token(g, row.g[0], row.g[1], row.c0, row.c1) + static_cast<int64_t>(u0) * Dl2 + g2;
    const int64_t d0 = g.K[2] - 1 + run.ws0 - run.u0;  // rpb entry of slot 0
    for (int64_t gg = 0; gg < g.G; ++gg) {
      const int64_t h = hk * g.G + gg;
      const float* brow = racc ? rpbp + h * g.Rtot + d0 : nullptr;
      load_queries((b * N + tok0) * g.H + h, runlen, xq, xo, lds, lc, cap);
      for_blocks(runlen, [&](int t0, int skip) {
        const int64_t rbq = rbk + t0;
        const SlotOut so{pt + t0, dst + t0, lds, nx * lds, false};
        kt.exact_bwd_q(xq + t0, lds, D, ks, ld, vs, ld, Dv, xo + t0, lds, lc + t0, lc + cap + t0, &rbq, 1, nx, lohi, S,
                       so, dqT, g.scale, racc ? &brow : nullptr);
        store_dq(b, h, tok0 + static_cast<int64_t>(t0) * Dl2, skip, lohi, dqT);
      });
      if (racc) {
        // (every lane of every block is stored, zero outside its window: columns [0, runlen) of each slot, and
        // the buffer's zeros after them, nx + vw columns of them)
        w.accp.resize(nx);
        for (int x = 0; x < nx; ++x) w.accp[x] = racc + (gg * g.Rtot + d0 + x) * 16;
        kt.row_sums(dst, 0, lds, 1, nx, (runlen + vw - 1) / vw, w.accp.data());
      }
      kt.exact_bwd_kv(dst, lds, nx * lds, xq, lds, D, xk, ld, &rbk, 1, nx, nk, nullptr);
      kt.exact_bwd_kv(pt, lds, nx * lds, xo, lds, Dv, xv, ld, &rbk, 1, nx, nk, nullptr);
    }
  };
  // 2D/3D: one row of exact-path queries of a slice (two neighbouring rows when idx2 >= 0, whose
  // blocks at the same lanes share key/value loads), runs and border blocks together. Per query head,
  // the row's queries and output gradients are transposed once; the query side computes P, dS and dQ
  // block by block into buffers indexed [key row][d = key - query][query] (rs says which d), and the
  // key side sums dK = dS^T q and dV = P^T dO over every key of the row's key rows, one key per lane,
  // each vector of keys over the d its queries use: no key is visited per run edge or per border
  // block (a border block's slots span K + vw keys; summed on their own they cost more than tiles).
  // rpb: the query side adds the bias (its bias rows per run) and the rpb gradient of each (key row, d) is
  // the sum of dS over the row's queries, into racc ([G][Rtot][16]: vectors, the task's)
  auto exact_row = [&](int64_t slice, int64_t idx, int64_t idx2, float* xk, float* racc) {
    const int64_t b = slice / g.Hkv, hk = slice % g.Hkv;
    const int nr = idx2 >= 0 ? 2 : 1, vw = kt.vw;
    const ExactPlan::Row* rws[2] = {&ep.rows[idx], nr == 2 ? &ep.rows[idx2] : nullptr};
    const int g2 = rws[0]->g[2], lg = na_group_len(L2, Dl2, g2);
    const RowSlots& rs = rslots[g2];
    const int nd = rs.dhi - rs.dlo, nvec = (lg + vw - 1) / vw;
    // query t at column padA + t; the key side reads t in [1 - dhi, nvec * vw - dlo), zeros outside [0, lg)
    // P and dS rows lds = 1 (mod 16) apart, key rows ldr = 0 (mod 16) apart and padA - dlo = 0 (mod 16)
    // from 64-byte aligned bases: the key side's loads of them (slot d of key kk at query kk - d) are
    // aligned vectors
    const int64_t padA = rs.dlo + round_up(std::max(rs.dhi, 1) - rs.dlo, 16);
    const int64_t lds = round_up(padA + nvec * vw + std::max(-rs.dlo, 0) + vw, 16) + 1, ldr = round_up(nd * lds, 16);
    const int64_t cap = round_up(lg, 8) + vw;
    const float* ks = kTx + slice * ldkv * D;
    const float* vs = vTx + slice * ldkv * Dv;
    ExactBwdWs* ws[2];
    int nrows[2] = {0, 0};
    int64_t tok0[2] = {0, 0};
    float *S[2], *dqT[2], *lc[2];
    for (int i = 0; i < nr; ++i) {
      const ExactPlan::Row& row = *rws[i];
      ExactBwdWs& w = tls_xbw[2 * i];
      ws[i] = &w;
      w.keyrow.clear();
      for_window_key_rows(g, ep, row, [&](int64_t base) { w.keyrow.push_back(base); });
      nrows[i] = static_cast<int>(w.keyrow.size());
      w.kvrow.resize(nrows[i]);
      w.accrow.resize(nrows[i]);
      for (int r = 0; r < nrows[i]; ++r) {
        w.kvrow[r] = ring_base(g, ep, w.keyrow[r], kv_ring);
        w.accrow[r] = ring_base(g, ep, w.keyrow[r], acc_ring, P2);
      }
      w.prepare(static_cast<int64_t>(nrows[i]) * (nd + 1), lds, padA, lg, D, Dv, call);
      w.rbq.resize(nrows[i]);
      if (racc) {
        w.roff.resize(nrows[i]);
        w.bias.resize(nrows[i]);
        window_rpb_rows(g, row, w.roff.data());
      }
      tok0[i] = row_token(g, row.g[0], row.g[1], row.c0, row.c1) + g2;
      S[i] = grow(w.s, 2 * static_cast<size_t>(nrows[i]) * nd * vw + vw);
      dqT[i] = grow(w.dq, D * vw + vw);
      lc[i] = grow(w.lc, 2 * cap);
    }
    for (int64_t gg = 0; gg < g.G; ++gg) {
      const int64_t h = hk * g.G + gg;
      for (int i = 0; i < nr; ++i)
        load_queries((b * N + tok0[i]) * g.H + h, lg, ws[i]->xq.data() + padA, ws[i]->xo.data() + padA, lds, lc[i], cap);
      for (const ExactRun& run : ep.runs[g2]) {
        const int* lohi = run.masked ? run.lohi : nullptr;
        // slot x of query t of this run is d = ws0 - u0 + x
        const int64_t drow = (run.ws0 - run.u0 - rs.dlo) * lds + padA;
        if (racc)
          for (int i = 0; i < nr; ++i)
            for (int r = 0; r < nrows[i]; ++r)
              ws[i]->bias[r] = rpbp + h * g.Rtot + ws[i]->roff[r] + (run.ws0 - run.u0);
        const float* const* bias[2] = {racc ? ws[0]->bias.data() : nullptr,
                                       racc && nr == 2 ? ws[1]->bias.data() : nullptr};
        for_blocks(run.u1 - run.u0 + 1, [&](int tb, int skip) {
          const int t0 = run.u0 + tb;
          SlotOut so[2];
          const float *xq[2], *xo[2];
          for (int i = 0; i < nr; ++i) {
            ExactBwdWs& w = *ws[i];
            for (int r = 0; r < nrows[i]; ++r) w.rbq[r] = w.kvrow[r] + run.ws0 + tb;
            so[i] = {w.ptA() + drow + t0, w.dsA() + drow + t0, lds, ldr, true};
            xq[i] = w.xq.data() + padA + t0;
            xo[i] = w.xo.data() + padA + t0;
          }
          if (nr == 2)
            kt.exact_bwd_q2(xq[0], xq[1], lds, D, ks, ldkv, vs, ldkv, Dv, xo[0], xo[1], lds, lc[0] + t0, lc[1] + t0,
                            lc[0] + cap + t0, lc[1] + cap + t0, ws[0]->rbq.data(), nrows[0], ws[1]->rbq.data(),
                            nrows[1], run.nx, lohi, S[0], S[1], so[0], so[1], dqT[0], dqT[1], g.scale, bias[0],
                            bias[1]);
          else
            kt.exact_bwd_q(xq[0], lds, D, ks, ldkv, vs, ldkv, Dv, xo[0], lds, lc[0] + t0, lc[0] + cap + t0,
                           ws[0]->rbq.data(), nrows[0], run.nx, lohi, S[0], so[0], dqT[0], g.scale, bias[0]);
          for (int i = 0; i < nr; ++i) store_dq(b, h, tok0[i] + static_cast<int64_t>(t0) * Dl2, skip, lohi, dqT[i]);
        });
      }
      if (racc) {
        // the rpb gradient: per key row r and d, dS summed over the row's queries (zero where no exact-path
        // window holds the pair: the buffers' zeros, and the tiles' queries are never written here; so are
        // the columns past the row's queries up to nvec * vw), as vectors into the task's
        for (int i = 0; i < nr; ++i) {
          ExactBwdWs& w = *ws[i];
          w.accp.resize(static_cast<size_t>(nrows[i]) * nd);
          for (int r = 0; r < nrows[i]; ++r)
            for (int d = 0; d < nd; ++d) w.accp[r * nd + d] = racc + (gg * g.Rtot + w.roff[r] + rs.dlo + d) * 16;
          kt.row_sums(w.dsA() + padA, ldr, lds, nrows[i], nd, nvec, w.accp.data());
        }
      }
      const int64_t o = padA - rs.dlo;  // d = dlo at row 0, query 0 at column padA
      if (nr == 2) {
        // key rows of both windows: both rows' sums in one pass over their accumulators (row 0's
        // additions first, as two calls would make them); the others from their own row
        ExactBwdWs &w0 = *ws[0], &w1 = *ws[1];
        KvLists& kl = tls_kvl;
        if (gg == 0) {
          kl.clear();
          int i0 = 0, i1 = 0;
          while (i0 < nrows[0] || i1 < nrows[1]) {
            const int64_t b0 = i0 < nrows[0] ? w0.keyrow[i0] : INT64_MAX, b1 = i1 < nrows[1] ? w1.keyrow[i1] : INT64_MAX;
            if (b0 == b1) {
              kl.both.push_back(w0.accrow[i0]);
              kl.both0.push_back(i0++);
              kl.both1.push_back(i1++);
            } else {
              const int i = b0 < b1 ? 0 : 1;
              kl.one[i].push_back(i ? w1.accrow[i1] : w0.accrow[i0]);
              kl.one_r[i].push_back(i ? i1++ : i0++);
            }
          }
        }
        auto rows_of = [&](const std::vector<int>& idx, float* buf, std::vector<const float*>& out) {
          out.resize(idx.size());
          for (size_t j = 0; j < idx.size(); ++j) out[j] = buf + o + idx[j] * ldr;
        };
        // dK from dS and the scaled queries, dV from P and the output gradients
        for (int side = 0; side < 2; ++side) {
          const int64_t W = side ? Dv : D;
          float* acc = side ? xk + D * ldacc : xk;
          float* b0 = side ? w0.ptA() : w0.dsA();
          float* b1 = side ? w1.ptA() : w1.dsA();
          const float* x0 = (side ? w0.xo.data() : w0.xq.data()) + o;
          const float* x1 = (side ? w1.xo.data() : w1.xq.data()) + o;
          rows_of(kl.both0, b0, kl.p0);
          rows_of(kl.both1, b1, kl.p1);
          kt.exact_bwd_kv2(kl.p0.data(), kl.p1.data(), lds, x0, x1, lds, W, acc, ldacc, kl.both.data(),
                           static_cast<int>(kl.both.size()), nd, nvec * vw, rs.vr.data());
          for (int i = 0; i < 2; ++i) {
            if (kl.one[i].empty()) continue;
            rows_of(kl.one_r[i], i ? b1 : b0, kl.p0);
            kt.exact_bwd_kv2(kl.p0.data(), nullptr, lds, i ? x1 : x0, nullptr, lds, W, acc, ldacc, kl.one[i].data(),
                             static_cast<int>(kl.one[i].size()), nd, nvec * vw, rs.vr.data());
          }
        }
      } else {
        ExactBwdWs& w = *ws[0];
        kt.exact_bwd_kv(w.dsA() + o, lds, ldr, w.xq.data() + o, lds, D, xk, ldacc, w.accrow.data(), nrows[0], nd,
                        nvec * vw, rs.vr.data());
        kt.exact_bwd_kv(w.ptA() + o, lds, ldr, w.xo.data() + o, lds, Dv, xk + D * ldacc, ldacc, w.accrow.data(),
                        nrows[0], nd, nvec * vw, rs.vr.data());
      }
    }
  };
  float* racc1d = nullptr;  // (1D with rpb: the waves' accumulators, n1d of them)
  int64_t n1d = 0;
  if (local) {
    // 1D: runs cut into pieces of about 128 queries (256 with NATTEN_MLX_ROW1D=0), each with its own
    // key/value gradient sums (a ring of rows, or transposed copies of its keys and values and sums in
    // their order), stored or added to dk/dv as below. Pieces whose
    // keys overlap (neighbours; strided border blocks, several deep) must not add at the same time:
    // per row, a piece goes to the first wave whose pieces so far all end before its keys begin.
    // (see row_piece below)
    // (rpb: the transposed copies, as the forward's)
    const bool rows1d = row1d_mode() && !g.has_rpb;
    // (no per-piece transposes on rows: smaller pieces balance the waves better)
    const int piece_len = rows1d ? 128 : 256;
    struct Unit {
      int row, run, tb, te, klo, khi;  // keys [klo, khi) of the group get its sums
    };
    std::vector<std::vector<Unit>> waves;
    for (size_t r = 0; r < ep.rows.size(); ++r) {
      const int g2 = ep.rows[r].g[2];
      std::vector<Unit> row_units;
      for (size_t ri = 0; ri < ep.runs[g2].size(); ++ri) {
        const ExactRun& run = ep.runs[g2][ri];
        const int len = run.u1 - run.u0 + 1, pieces = run.masked ? 1 : (len + piece_len - 1) / piece_len;
        for (int p = 0; p < pieces; ++p) {
          const int tb = len * p / pieces, te = len * (p + 1) / pieces;
          row_units.push_back({static_cast<int>(r), static_cast<int>(ri), tb, te, run.ws0 + tb, run.ws0 + te + run.nx - 1});
        }
      }
      std::sort(row_units.begin(), row_units.end(), [](const Unit& x, const Unit& y) { return x.klo < y.klo; });
      std::vector<int> wave_end;
      for (const Unit& u : row_units) {
        size_t wv = 0;
        while (wv < wave_end.size() && wave_end[wv] > u.klo) ++wv;
        if (wv == wave_end.size()) wave_end.push_back(0);
        if (wv == waves.size()) waves.emplace_back();
        wave_end[wv] = u.khi;
        waves[wv].push_back(u);
      }
    }
    // per row: the first wave whose pieces write each key of its group (-1: none). Those pieces store
    // their sums there (nothing was written before them; later waves and tiles add), so dk/dv are
    // neither zeroed up front nor read back by the first writer; the keys no piece writes are zeroed.
    std::vector<std::vector<int>> first(ep.rows.size());
    for (size_t r = 0; r < ep.rows.size(); ++r) first[r].assign(na_group_len(g.L[2], Dl2, ep.rows[r].g[2]), -1);
    for (size_t wv = 0; wv < waves.size(); ++wv)
      for (const Unit& u : waves[wv]) {
        std::vector<int>& fw = first[u.row];
        for (int j = std::max(u.klo, 0); j < std::min<int>(u.khi, static_cast<int>(fw.size())); ++j)
          if (fw[j] < 0) fw[j] = static_cast<int>(wv);
      }
    {
      std::vector<int64_t> unwritten;  // tokens
      for (int g2 = 0; g2 < Dl2; ++g2) {
        const std::vector<int>* fw = nullptr;
        for (size_t r = 0; r < ep.rows.size(); ++r)
          if (ep.rows[r].g[2] == g2) fw = &first[r];
        const int lg = na_group_len(g.L[2], Dl2, g2);
        for (int j = 0; j < lg; ++j)
          if (!fw || (*fw)[j] < 0) unwritten.push_back(static_cast<int64_t>(j) * Dl2 + g2);
      }
      if (!unwritten.empty())
        for (int64_t slice = 0; slice < slices; ++slice)
          for (const int64_t n : unwritten) {
            std::memset(dk_of(slice) + n * tsk, 0, sizeof(float) * D);
            std::memset(dv_of(slice) + n * tsv, 0, sizeof(float) * Dv);
          }
    }
    // The pieces' queries one at a time in the inputs' own heads-last rows (kt.row_bwd): the transposes of q, dO, k, v in and of dq, dk, dv out were ~45% of
    // C1's backward. A piece's key/value gradient sums live in a ring of rows (keys leave it, stored or
    // added as above, once the windows have moved past them), so they stay in L1.
    auto row_piece = [&](int64_t b, const Unit& u, int wv) {
      const ExactPlan::Row& row = ep.rows[u.row];
      const ExactRun& run = ep.runs[row.g[2]][u.run];
      const std::vector<int>& fw = first[u.row];
      const int g2 = row.g[2], lg = na_group_len(g.L[2], Dl2, g2), vw = kt.vw;
      const int64_t Hkv = g.Hkv;
      // live keys: a run's current window (nx; a piece's last keys end with its last window), or all
      // of a border block's (at most nx + vw - 1)
      int R = 8;
      while (R < run.nx + (run.masked ? vw : 0) + 1) R <<= 1;
      // one ring per kv head, rows of [D | Dv] sums
      const int64_t rw = D + Dv, rs = R * rw;
      Workspace& w = tls_ws;
      float* ring = grow(w.dkb, static_cast<size_t>(Hkv * rs));
      float* zeros = grow(w.kp, static_cast<size_t>(std::max(D, Dv)));
      std::memset(zeros, 0, sizeof(float) * std::max(D, Dv));
      float* s = grow(w.s, static_cast<size_t>(2 * (round_up(run.nx, vw) + vw)));
      const int64_t kstep = Dl2 * g.tk, vstep = Dl2 * g.tv, dkstep = Dl2 * tsk, dvstep = Dl2 * tsv;
      // group coordinate j of kv head hk at kg + j * kstep + hk * D (values likewise; the gradients at dkg + j *
      // dkstep + hk * D)
      const float* kg = a.k + (b * Nk + g2) * g.tk;
      const float* vg = a.v + (b * Nk + g2) * g.tv;
      float* dkg = a.dk + (b * Nk + g2) * Hkv * D;
      float* dvg = a.dv + (b * Nk + g2) * Hkv * Dv;
      const int64_t tok0 = row_token(g, row.g[0], row.g[1], row.c0, row.c1) + g2;
      const int a0 = std::max(u.klo, 0), a1 = std::min(u.khi, lg);
      int lo = a0, hi = a0;  // the rings hold keys [lo, hi)
      auto flush = [&](int upto) {
        for (; lo < upto; ++lo) {
          const bool store = fw[lo] == wv;
          for (int64_t hk = 0; hk < Hkv; ++hk) {
            const float* r = ring + hk * rs + static_cast<int64_t>(lo & (R - 1)) * rw;
            float* dk = dkg + lo * dkstep + hk * D;
            float* dv = dvg + lo * dvstep + hk * Dv;
            if (store) {
              std::memcpy(dk, r, sizeof(float) * D);
              std::memcpy(dv, r + D, sizeof(float) * Dv);
            } else {
              kt.axpy(dk, 1.f, r, static_cast<int>(D));
              kt.axpy(dv, 1.f, r + D, static_cast<int>(Dv));
            }
          }
        }
      };
      auto enter = [&](int upto) {
        for (; hi < upto; ++hi)
          for (int64_t hk = 0; hk < Hkv; ++hk)
            std::memset(ring + hk * rs + static_cast<int64_t>(hi & (R - 1)) * rw, 0, sizeof(float) * rw);
      };
      // query c (group coordinate) of every head, keys [ws, ws + n)
      auto query = [&](int c, int ws, int n) {
        enter(ws + n);
        const int64_t tok = tok0 + static_cast<int64_t>(c) * Dl2;
        for (int64_t h = 0; h < g.H; ++h) {
          const int64_t hk = h / g.G, r = (b * N + tok) * g.H + h;
          kt.row_bwd(a.q + (b * N + tok) * g.tq + h * D, a.dout + r * Dv, kg + ws * kstep + hk * D, kstep, vg + ws * vstep + hk * Dv, vstep,
                     n, D, Dv, g.scale, a.lse[r], a.dlse ? a.dlse[r] : 0.f, zeros, s, a.dq + r * D, ring + hk * rs, rw,
                     R - 1, ws);
        }
      };
      if (!run.masked) {
        for (int t = u.tb; t < u.te; ++t) {
          flush(run.ws0 + t);
          query(run.u0 + t, run.ws0 + t, run.nx);
        }
      } else {
        for (int l = 0; l < vw; ++l)
          if (run.lohi[l] < run.lohi[vw + l])
            query(run.u0 + l, run.ws0 + l + run.lohi[l], run.lohi[vw + l] - run.lohi[l]);
      }
      // every key of [a0, a1) is this piece's to store or add (zeros where no window of it reached)
      enter(a1);
      flush(a1);
    };
    // rpb: each item of the waves below sums its rpb gradient into its own accumulator (items of one slice
    // run at once), added up in order at the end; item i of a wave is slice i % slices
    std::vector<int64_t> wave_base(waves.size() + 1, 0);
    for (size_t wv = 0; wv < waves.size(); ++wv) wave_base[wv + 1] = wave_base[wv] + slices * int64_t(waves[wv].size());
    if (g.has_rpb && !rows1d) {
      n1d = wave_base.back();
      racc1d = scratch(static_cast<size_t>(n1d * g.G * g.Rtot * 16), true);
    }
    for (size_t wv = 0; wv < waves.size(); ++wv) {
      const std::vector<Unit>& wave = waves[wv];
      const int64_t nu = static_cast<int64_t>(wave.size());
      if (rows1d) {
        // piece-major, every head of a token together: the threads work on different tokens, so no
        // two write the same lines of dq, dk, dv (heads-last rows of different heads share lines)
        parallel_for(g.B * nu, [&](int64_t item) { row_piece(item % g.B, wave[item / g.B], static_cast<int>(wv)); });
        continue;
      }
      parallel_for(slices * nu, [&](int64_t item) {
        // piece-major: the heads of one piece run one after another (and on both threads at once), so
        // the heads-last rows they share (H * D floats per token; a head's part straddles cache lines,
        // MLX's buffers being 8 bytes off a line) are read from memory once while they are still in
        // cache, not once per head a whole pass apart (paired C1 fwd+bwd 0.91)
        const int64_t slice = item % slices, b = slice / g.Hkv, hk = slice % g.Hkv;
        const Unit& u = wave[item / slices];
        const ExactPlan::Row& row = ep.rows[u.row];
        const ExactRun& run = ep.runs[row.g[2]][u.run];
        const int g2 = row.g[2], lg = na_group_len(g.L[2], Dl2, g2), vw = kt.vw;
        // keys [kmin, kmax) of the group: the piece's windows, border reads and whole-vector writes
        const int kmin = run.ws0 + u.tb, kmax = run.ws0 + u.te + run.nx + 2 * vw;
        const int64_t ldl = round_up(kmax - kmin, 8) + 8;
        Workspace& w = tls_ws;
        float* kl = grow(w.kp, D * ldl + 16);
        float* vl = grow(w.vp, Dv * ldl + 16);
        float* al = grow(w.dkb, (D + Dv) * ldl + 16);
        std::memset(al, 0, sizeof(float) * (D + Dv) * ldl);
        if (!gather_keys_transposed(kt, a.k, a.v, D, Dv, g.tk, g.tv, hk, b * Nk + g2, Dl2, kmin, kmax, lg, kl, vl, ldl,
                                    optimistic) &&
            optimistic)
          fail();
        exact_run(slice, row, -kmin, run, u.tb, u.te, kl, vl, ldl, al, al + D * ldl,
                  racc1d ? racc1d + (wave_base[wv] + item) * g.G * g.Rtot * 16 : nullptr);
        // the piece's sums into dk / dv ([slice][Nk][D|Dv]); a neighbour adds to the shared keys in the other wave
        float* dk = dk_of(slice);
        float* dv = dv_of(slice);
        const float* av = al + D * ldl;
        // only the keys its slots reach (past them the buffers hold zeros that another wave's
        // piece must not see written back over its sums)
        const int a0 = std::max(u.klo, 0), a1 = std::min(u.khi, lg);
        const std::vector<int>& fw = first[u.row];
        for (int s0 = a0; s0 < a1;) {
          // keys [s0, s1) this piece writes first (stored) or after an earlier wave (added)
          const bool store = fw[s0] == static_cast<int>(wv);
          int s1 = s0 + 1;
          while (s1 < a1 && (fw[s1] == static_cast<int>(wv)) == store) ++s1;
          const int64_t n0 = static_cast<int64_t>(s0) * Dl2 + g2;
          add_transposed(kt, al + (s0 - kmin), ldl, D, s1 - s0, dk + n0 * tsk, Dl2 * tsk, !store);
          add_transposed(kt, av + (s0 - kmin), ldl, Dv, s1 - s0, dv + n0 * tsv, Dl2 * tsv, !store);
          s0 = s1;
        }
      });
    }
  }
  // direct: the exact rows of slices [slice0, slice0 + n), their units in turn (the sums' task of a
  // slice is the slice)
  auto direct_slices = [&](int64_t slice0, int n) {
    std::optional<SliceStream> st[2];
    float* xk[2];
    int64_t stored[2] = {0, 0};
    const int64_t acc_floats = acc_ring ? (D + Dv) * ldacc + 16 : xacc_size;
    for (int j = 0; j < n; ++j) {
      const int64_t slice = slice0 + j;
      xk[j] = xacc + slice * xacc_size;
      std::memset(xk[j], 0, sizeof(float) * acc_floats);
      if (streamed)
        st[j].emplace(kt, g, ep, a.k, a.v, slice / g.Hkv, slice % g.Hkv, ldkv, kTs + slice * ldkv * D,
                      vTs + slice * ldkv * Dv, optimistic, optimistic, 0, kv_ring);
    }
    for (size_t i = 0; i < units.size(); ++i)
      for (int j = 0; j < n; ++j) {
        if (st[j] && !st[j]->advance(need[i])) fail();
        exact_row(slice0 + j, units[i].first, units[i].second, xk[j],
                  rpb_accv ? rpb_accv + (slice0 + j) * g.G * g.Rtot * 16 : nullptr);
        if (final_rows[i] > stored[j]) {
          store_exact_sums(slice0 + j, xk[j], false, stored[j], final_rows[i]);
          // (their slots start from zero for the rows that take them next)
          for (int64_t rho = stored[j]; acc_ring && rho < final_rows[i]; ++rho)
            zero_columns(xk[j], D + Dv, ldacc, ep.front + rho % acc_ring * P2, P2);
          stored[j] = final_rows[i];
        }
      }
    for (int j = 0; j < n; ++j) store_exact_sums(slice0 + j, xk[j], false, stored[j], Nk / L2);
  };
  // direct without tiles (so without extra keys or rpb): neighbouring heads in one task, their units
  // in turn (see the forward's streamed tasks), where that leaves a task per thread. Paired backward:
  // C2 (K = 7) 0.968, C4 (3D, not streamed) 0.974-0.978. C3 (K = 13, dilation 2: 27 rows of 64 tokens,
  // 0.9 MiB per slice) was 1.02 with pairs while every row had its own place, so it kept one head per
  // task; with keys, values and sums in rings of row slots, pairs: C3 fwd+bwd 0.978.
  const bool pairs = direct && ntiles == 0 && g.Hkv % 2 == 0 && slices / 2 >= nthr;
  if (pairs)
    parallel_for(slices / 2, [&](int64_t pair) { direct_slices(2 * pair, 2); });
  else parallel_for(ntasks, [&](int64_t task) {
    const int64_t slice = task / splits, split = task % splits, b = slice / g.Hkv, hk = slice % g.Hkv;
    float *acck, *accv, *accek, *accev;
    int64_t sk = D, sv = Dv;  // token strides of the accumulators
    if (split == 0) {
      acck = dk_of(slice);
      accv = dv_of(slice);
      accek = E ? dek_of(slice) : nullptr;
      accev = E ? dev_of(slice) : nullptr;
      sk = tsk;
      sv = tsv;
    } else {
      float* base = priv + ((split - 1) * slices + slice) * acc_size;
      acck = base;
      accv = base + Nk * D;
      accek = base + Nk * (D + Dv);
      accev = accek + E * D;
    }
    float* racc = g.has_rpb ? rpb_acc + task * racc_stride : nullptr;
    float* raccv = rpb_accv ? rpb_accv + task * g.G * g.Rtot * 16 : nullptr;
    if (ep.on && !local) {
      float* xk = xacc + task * xacc_size;
      if (direct) {
        direct_slices(slice, 1);
      } else {
        std::memset(xk, 0, sizeof(float) * xacc_size);
        const int64_t r0 = nrowsx * split / splits, r1 = nrowsx * (split + 1) / splits;
        for (int64_t idx = r0; idx < r1; ++idx) {
          if (idx + 1 < r1 && ep.pairs_with_next(static_cast<size_t>(idx))) {
            exact_row(slice, idx, idx + 1, xk, raccv);
            ++idx;
          } else {
            exact_row(slice, idx, -1, xk, raccv);
          }
        }
      }
    }
    const int64_t lo = ntiles * split / splits, hi = ntiles * (split + 1) / splits;
    Workspace& w = tls_ws;
    for (int64_t ti = lo; ti < hi; ++ti) {
      const TileGeo& tg = tgs ? (*tgs)[ti] : tls_tg.ensured(g, plan.tiles[ti], kt.vw, pass);
      const int64_t M = tg.T * g.G, NP = tg.NP;
      const float scale = g.scale;  // a local: the compiler cannot tell Qp from g
      float* Qp = grow(w.qp, M * D);
      float* dO = grow(w.dob, M * (Dv + 3));
      float* delta = dO + M * Dv;
      float* lrow = delta + M;
      float* dl = lrow + M;
      for (int64_t r = 0; r < M; ++r) {
        const int64_t gg = r / tg.T, q = r % tg.T, h = hk * g.G + gg;
        const int64_t row = (b * N + tg.qtok[q]) * g.H + h;  // heads-last inputs
        const float* src = a.q + (b * N + tg.qtok[q]) * g.tq + h * D;
        for (int64_t d = 0; d < D; ++d) Qp[r * D + d] = src[d] * scale;
        std::memcpy(dO + r * Dv, a.dout + row * Dv, sizeof(float) * Dv);
        // (whole-box windows: c from P and dP instead, kt.full_p_ds)
        delta[r] = tg.all_full ? 0.f : kt.dot(dO + r * Dv, a.out + row * Dv, static_cast<int>(Dv));
        lrow[r] = a.lse[row];
        dl[r] = a.dlse ? a.dlse[row] : 0.f;
      }
      float* KT = grow(w.kt, D * NP + 2 * kt.vw);
      if (kT)
        pack_keys_t(kt, g, tg, kT + slice * ldk * D, ldk, E ? ekT + slice * E * D : nullptr, KT, D);
      else
        pack_keys_hl(kt, g, tg, b, hk, a.k, g.tk, E ? ekT + slice * E * D : nullptr, KT, D);
      float* Kp = grow(w.kp, NP * D);
      pack_rows_hl(g, tg, b, hk, D, a.k, g.tk, a.ek, Kp);
      float* VT = grow(w.vt, Dv * NP + 2 * kt.vw);
      if (vT) {
        pack_keys_t(kt, g, tg, vT + slice * ldk * Dv, ldk, nullptr, VT, Dv);
      } else if (hl_pack && !E) {
        pack_keys_hl(kt, g, tg, b, hk, a.v, g.tv, nullptr, VT, Dv);
      } else {
        float* Vp = grow(w.vp, NP * Dv);
        pack_rows_hl(g, tg, b, hk, Dv, a.v, g.tv, a.ev, Vp);
        transpose_rows(kt, Vp, NP, Dv, Dv, VT, NP);
      }
      float* S = grow(w.s, M * NP + kt.vw);
      kt.gemm(static_cast<int>(M), static_cast<int>(NP), static_cast<int>(D), Qp, D, KT, NP, S, NP, false);
      float* dP = grow(w.dp, M * NP + kt.vw);
      kt.gemm(static_cast<int>(M), static_cast<int>(NP), static_cast<int>(Dv), dO, Dv, VT, NP, dP, NP, false);
      float* P = grow(w.p, M * NP + kt.vw);
      float* dS = grow(w.ds, M * NP + kt.vw);
      const int* cc[3] = {tg.colc[0].data(), tg.colc[1].data(), tg.colc[2].data()};
      if (tg.all_full) path_count[13].fetch_add(M, std::memory_order_relaxed);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t gg = r / tg.T, q = r % tg.T, h = hk * g.G + gg;
        float *srow = S + r * NP, *prow = P + r * NP, *dsrow = dS + r * NP;
        const float* dprow = dP + r * NP;
        const float c = delta[r] - dl[r];
        const int *lo = &tg.ws[q * 3], *hi = &tg.we[q * 3];
        // (rpb: the bias added over the window's runs, P and dS by vector passes under the window mask as
        // without it, then dS summed into the bias gradient per run)
        const float* rp = g.has_rpb ? rpbp + h * g.Rtot : nullptr;
        if (rp) tg.runs(g, q, [&](int64_t off, int len, int64_t ri) { kt.add_pad(srow + off, rp + ri, len); });
        if (tg.all_full) {
          kt.full_p_ds(prow, dsrow, srow, dprow, static_cast<int>(NP), static_cast<int>(tg.Ncol), lrow[r], dl[r]);
        } else {
          kt.masked_exp(prow, srow, cc, tg.always.data(), lo, hi, static_cast<int>(NP), lrow[r]);
          kt.masked_ds(dsrow, prow, dprow, c, cc, tg.always.data(), lo, hi, static_cast<int>(NP));
        }
        if (rp)
          tg.runs(g, q, [&](int64_t off, int len, int64_t ri) { kt.add_pad(racc + gg * g.Rtot + ri, dsrow + off, len); });
      }
      float* dQ = grow(w.o, M * D);
      float* dKb = grow(w.dkb, tg.Ncol * D);
      float* dVb = grow(w.dvb, tg.Ncol * Dv);
      const bool finite = known_fin || (kt.all_finite(Kp, tg.Ncol * D) && kt.all_finite(Qp, M * D) &&
                                                  kt.all_finite(dO, M * Dv));
      if (finite) {
        kt.gemm(static_cast<int>(M), static_cast<int>(D), static_cast<int>(tg.Ncol), dS, NP, Kp, D, dQ, D, false);
        float* tr = grow(w.tr, NP * M);
        transpose_rows(kt, dS, M, tg.Ncol, NP, tr, M);
        kt.gemm(static_cast<int>(tg.Ncol), static_cast<int>(D), static_cast<int>(M), tr, M, Qp, D, dKb, D, false);
        transpose_rows(kt, P, M, tg.Ncol, NP, tr, M);
        kt.gemm(static_cast<int>(tg.Ncol), static_cast<int>(Dv), static_cast<int>(M), tr, M, dO, Dv, dVb, Dv, false);
      } else {
        // inf/NaN operands: touch only (query, key) pairs inside the window, as the definition does
        std::memset(dQ, 0, sizeof(float) * M * D);
        std::memset(dKb, 0, sizeof(float) * tg.Ncol * D);
        std::memset(dVb, 0, sizeof(float) * tg.Ncol * Dv);
        for (int64_t r = 0; r < M; ++r) {
          const float *dsrow = dS + r * NP, *prow = P + r * NP;
          auto pair = [&](int64_t j) {
            kt.axpy(dQ + r * D, dsrow[j], Kp + j * D, static_cast<int>(D));
            kt.axpy(dKb + j * D, dsrow[j], Qp + r * D, static_cast<int>(D));
            kt.axpy(dVb + j * Dv, prow[j], dO + r * Dv, static_cast<int>(Dv));
          };
          tg.runs(g, r % tg.T, [&](int64_t off, int len, int64_t) {
            for (int x = 0; x < len; ++x) pair(off + x);
          });
          for (int64_t e = 0; e < E; ++e) pair(tg.Nbox + e);
        }
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t gg = r / tg.T, q = r % tg.T, h = hk * g.G + gg;
        float* dst = dq_of(b, h) + tg.qtok[q] * tsq;
        for (int64_t d = 0; d < D; ++d) dst[d] = dQ[r * D + d] * g.scale;
      }
      for (int64_t j = 0; j < tg.Nbox; ++j) {
        if (tiles_store) {
          std::memcpy(acck + tg.ktok[j] * sk, dKb + j * D, sizeof(float) * D);
          std::memcpy(accv + tg.ktok[j] * sv, dVb + j * Dv, sizeof(float) * Dv);
        } else {
          kt.axpy(acck + tg.ktok[j] * sk, 1.f, dKb + j * D, static_cast<int>(D));
          kt.axpy(accv + tg.ktok[j] * sv, 1.f, dVb + j * Dv, static_cast<int>(Dv));
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        kt.axpy(accek + e * sk, 1.f, dKb + (tg.Nbox + e) * D, static_cast<int>(D));
        kt.axpy(accev + e * sv, 1.f, dVb + (tg.Nbox + e) * Dv, static_cast<int>(Dv));
      }
    }
  });
  if (splits > 1) {
    parallel_for(slices, [&](int64_t slice) {
      for (int64_t s = 1; s < splits; ++s) {
        const float* base = priv + ((s - 1) * slices + slice) * acc_size;
        for (int64_t n = 0; n < Nk; ++n) {
          kt.axpy(dk_of(slice) + n * tsk, 1.f, base + n * D, static_cast<int>(D));
          kt.axpy(dv_of(slice) + n * tsv, 1.f, base + Nk * D + n * Dv, static_cast<int>(Dv));
        }
        for (int64_t e = 0; e < E; ++e) {
          kt.axpy(dek_of(slice) + e * tsk, 1.f, base + Nk * (D + Dv) + e * D, static_cast<int>(D));
          kt.axpy(dev_of(slice) + e * tsv, 1.f, base + Nk * (D + Dv) + E * D + e * Dv, static_cast<int>(Dv));
        }
      }
    });
  }
  if (ep.on && !local && !direct) {
    // the exact path's per-task sums, transposed back to [Nk][D|Dv] per slice
    parallel_for(slices, [&](int64_t slice) {
      for (int64_t split = 0; split < splits; ++split)
        store_exact_sums(slice, xacc + (slice * splits + split) * xacc_size, true, 0, Nk / L2);
    });
  }
  if (g.has_rpb) {
    std::memset(a.drpb, 0, sizeof(float) * g.H * g.Rtot);
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t hk = (task / splits) % g.Hkv;
      for (int64_t gg = 0; gg < g.G; ++gg)
        kt.axpy(a.drpb + (hk * g.G + gg) * g.Rtot, 1.f, rpb_acc + task * racc_stride + gg * g.Rtot,
                static_cast<int>(g.Rtot));
    }
    // the exact path's vector accumulators ([G][Rtot][16]) of kv head hk, summed across
    auto add_vectors = [&](const float* v, int64_t hk) {
      for (int64_t gg = 0; gg < g.G; ++gg)
        for (int64_t e = 0; e < g.Rtot; ++e) {
          float sum = 0.f;
          for (int l = 0; l < 16; ++l) sum += v[(gg * g.Rtot + e) * 16 + l];
          a.drpb[(hk * g.G + gg) * g.Rtot + e] += sum;
        }
    };
    for (int64_t task = 0; rpb_accv && task < ntasks; ++task)
      add_vectors(rpb_accv + task * g.G * g.Rtot * 16, (task / splits) % g.Hkv);
    for (int64_t i = 0; i < n1d; ++i) add_vectors(racc1d + i * g.G * g.Rtot * 16, (i % slices) % g.Hkv);
  }
  if (!ok.load()) return false;
  count_paths(1, g, ep);
  if (ep.on && !(local && row1d_mode()) && (nt_q || (nt_kv && direct))) path_count[10].fetch_add(1);
  return true;
}
}  // namespace

void fused_backward(const Geo& g0, const BwdArgs& a) {
  const Geo g = with_strides(g0);
  if (!backward_pass(g, a, true)) backward_pass(g, a, false);
}

// ---------------------------------------------------------------- split ops (per-slot loops)
namespace {

struct Slots {
  // the Kt slots of one query: flat key token (or -1 when the slot is invalid) and rpb column
  std::vector<int64_t> tok, rpb;
  void build(const Geo& g, int64_t n) {
    tok.resize(g.Kt);
    rpb.resize(g.Kt);
    int x[3];
    x[2] = static_cast<int>(n % g.L[2]);
    x[1] = static_cast<int>((n / g.L[2]) % g.L[1]);
    x[0] = static_cast<int>(n / (static_cast<int64_t>(g.L[1]) * g.L[2]));
    int c[3], gr[3], st[3];
    for (int a = 0; a < 3; ++a) {
      const int gi = x[a] + g.qoff[a];  // global coordinate
      gr[a] = gi % g.Dl[a];
      c[a] = gi / g.Dl[a];
      st[a] = na_window_start(c[a], na_group_len(g.dom[a], g.Dl[a], gr[a]), g.K[a], g.S[a], g.C[a]);
    }
    int64_t s = 0;
    for (int j0 = 0; j0 < g.K[0]; ++j0)
      for (int j1 = 0; j1 < g.K[1]; ++j1)
        for (int j2 = 0; j2 < g.K[2]; ++j2, ++s) {
          int j[3] = {j0, j1, j2};
          bool valid = true;
          int64_t t = 0, r = 0;
          for (int a = 0; a < 3; ++a) {
            int kc = st[a] + j[a];
            if (g.C[a] && kc > c[a]) valid = false;
            t = t * g.Lk[a] + static_cast<int64_t>(kc) * g.Dl[a] + gr[a] - g.koff[a];
            r = r * g.R[a] + (kc - c[a] + g.K[a] - 1);
          }
          tok[s] = valid ? t : -1;
          rpb[s] = r;
        }
  }
};

}  // namespace

// a thread's slots and slot row pointers, reused from query to query
static thread_local Slots tls_slots;
static thread_local std::vector<const float*> tls_slot_rows;

void qk_forward(const Geo& g, const float* q, const float* k, const float* ek, const float* rpb, float* scores) {
  const KernelTable& kt = select_kernels();
  const int64_t W = g.Kt + g.E, D = g.D;
  parallel_for(g.B * g.N, [&](int64_t item) {
    const int64_t b = item / g.N, n = item % g.N;
    Slots& sl = tls_slots;
    sl.build(g, n);
    std::vector<const float*>& rows = tls_slot_rows;
    rows.resize(g.Kt);
    for (int64_t h = 0; h < g.H; ++h) {
      const int64_t hk = h / g.G;
      const float* qr = q + ((b * g.H + h) * g.N + n) * D;
      const float* ks = k + (b * g.Hkv + hk) * g.Nk * D;
      float* out = scores + ((b * g.H + h) * g.N + n) * W;
      for (int64_t s = 0; s < g.Kt; ++s) rows[s] = sl.tok[s] < 0 ? nullptr : ks + sl.tok[s] * D;
      kt.slot_dots(qr, rows.data(), static_cast<int>(g.Kt), static_cast<int>(D), g.scale, out);
      if (rpb)
        for (int64_t s = 0; s < g.Kt; ++s)
          if (sl.tok[s] >= 0) out[s] += rpb[h * g.Rtot + sl.rpb[s]];
      for (int64_t e = 0; e < g.E; ++e)
        out[g.Kt + e] = kt.dot(qr, ek + ((b * g.Hkv + hk) * g.E + e) * D, static_cast<int>(D)) * g.scale;
    }
  });
}

void qk_backward(const Geo& g, const float* q, const float* k, const float* ek, const float* ds, float* dq, float* dk,
                 float* dek, float* drpb) {
  const KernelTable& kt = select_kernels();
  const int64_t W = g.Kt + g.E, D = g.D, slices = g.B * g.Hkv;
  std::memset(dk, 0, sizeof(float) * slices * g.Nk * D);
  if (g.E) std::memset(dek, 0, sizeof(float) * slices * g.E * D);
  std::vector<float> racc(drpb ? static_cast<size_t>(slices * g.G * g.Rtot) : 0, 0.f);
  parallel_for(slices, [&](int64_t slice) {
    const int64_t b = slice / g.Hkv, hk = slice % g.Hkv;
    const float* ks = k + slice * g.Nk * D;
    Slots sl;
    for (int64_t n = 0; n < g.N; ++n) {
      sl.build(g, n);
      for (int64_t gg = 0; gg < g.G; ++gg) {
        const int64_t h = hk * g.G + gg, row = (b * g.H + h) * g.N + n;
        const float* qr = q + row * D;
        const float* dr = ds + row * W;
        float* dqr = dq + row * D;
        std::memset(dqr, 0, sizeof(float) * D);
        for (int64_t s = 0; s < g.Kt; ++s) {
          if (sl.tok[s] < 0) continue;
          kt.axpy(dqr, dr[s] * g.scale, ks + sl.tok[s] * D, static_cast<int>(D));
          kt.axpy(dk + (slice * g.Nk + sl.tok[s]) * D, dr[s] * g.scale, qr, static_cast<int>(D));
          if (drpb) racc[(slice * g.G + gg) * g.Rtot + sl.rpb[s]] += dr[s];
        }
        for (int64_t e = 0; e < g.E; ++e) {
          kt.axpy(dqr, dr[g.Kt + e] * g.scale, ek + (slice * g.E + e) * D, static_cast<int>(D));
          kt.axpy(dek + (slice * g.E + e) * D, dr[g.Kt + e] * g.scale, qr, static_cast<int>(D));
        }
      }
    }
  });
  if (drpb) {
    std::memset(drpb, 0, sizeof(float) * g.H * g.Rtot);
    for (int64_t slice = 0; slice < slices; ++slice)
      for (int64_t gg = 0; gg < g.G; ++gg)
        kt.axpy(drpb + ((slice % g.Hkv) * g.G + gg) * g.Rtot, 1.f, racc.data() + (slice * g.G + gg) * g.Rtot,
                static_cast<int>(g.Rtot));
  }
}

void av_forward(const Geo& g, const float* attn, const float* v, const float* ev, float* out) {
  const KernelTable& kt = select_kernels();
  const int64_t W = g.Kt + g.E, Dv = g.Dv;
  parallel_for(g.B * g.N, [&](int64_t item) {
    const int64_t b = item / g.N, n = item % g.N;
    Slots& sl = tls_slots;
    sl.build(g, n);
    std::vector<const float*>& rows = tls_slot_rows;
    rows.resize(g.Kt);
    for (int64_t h = 0; h < g.H; ++h) {
      const int64_t hk = h / g.G, row = (b * g.H + h) * g.N + n;
      const float* ar = attn + row * W;
      const float* vs = v + (b * g.Hkv + hk) * g.Nk * Dv;
      float* o = out + row * Dv;
      for (int64_t s = 0; s < g.Kt; ++s) rows[s] = sl.tok[s] < 0 ? nullptr : vs + sl.tok[s] * Dv;
      kt.slot_axpys(ar, rows.data(), static_cast<int>(g.Kt), static_cast<int>(Dv), o);
      for (int64_t e = 0; e < g.E; ++e)
        kt.axpy(o, ar[g.Kt + e], ev + ((b * g.Hkv + hk) * g.E + e) * Dv, static_cast<int>(Dv));
    }
  });
}

void av_backward(const Geo& g, const float* attn, const float* v, const float* ev, const float* dout, float* dattn,
                 float* dv, float* dev) {
  const KernelTable& kt = select_kernels();
  const int64_t W = g.Kt + g.E, Dv = g.Dv, slices = g.B * g.Hkv;
  std::memset(dv, 0, sizeof(float) * slices * g.Nk * Dv);
  if (g.E) std::memset(dev, 0, sizeof(float) * slices * g.E * Dv);
  parallel_for(slices, [&](int64_t slice) {
    const int64_t b = slice / g.Hkv, hk = slice % g.Hkv;
    const float* vs = v + slice * g.Nk * Dv;
    Slots sl;
    for (int64_t n = 0; n < g.N; ++n) {
      sl.build(g, n);
      for (int64_t gg = 0; gg < g.G; ++gg) {
        const int64_t row = (b * g.H + hk * g.G + gg) * g.N + n;
        const float* ar = attn + row * W;
        const float* dor = dout + row * Dv;
        float* da = dattn + row * W;
        for (int64_t s = 0; s < g.Kt; ++s) {
          if (sl.tok[s] < 0) {
            da[s] = 0.f;
            continue;
          }
          da[s] = kt.dot(dor, vs + sl.tok[s] * Dv, static_cast<int>(Dv));
          kt.axpy(dv + (slice * g.Nk + sl.tok[s]) * Dv, ar[s], dor, static_cast<int>(Dv));
        }
        for (int64_t e = 0; e < g.E; ++e) {
          const float* evr = ev + (slice * g.E + e) * Dv;
          da[g.Kt + e] = kt.dot(dor, evr, static_cast<int>(Dv));
          kt.axpy(dev + (slice * g.E + e) * Dv, ar[g.Kt + e], dor, static_cast<int>(Dv));
        }
      }
    }
  });
}

// ---------------------------------------------------------------- kernel selection
bool perm_al = false;

namespace {
// perm_scores2a on this CPU: on AMD (Zen 4: valignd and vpermps issue beside the one 512-bit FMA per
// cycle, vpermt2ps competes with it; C4's forward 0.95 of vpermt2ps's), not elsewhere until measured
// there; NATTEN_MLX_PERM_AL=0/1 overrides
bool want_perm_al() {
  const char* e = std::getenv("NATTEN_MLX_PERM_AL");
  if (e && *e) return std::strcmp(e, "0") != 0;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char v[13];
  std::memcpy(v, &b, 4);
  std::memcpy(v + 4, &d, 4);
  std::memcpy(v + 8, &c, 4);
  v[12] = 0;
  return std::strcmp(v, "AuthenticAMD") == 0;
#else
  return false;
#endif
}
}  // namespace

const KernelTable& select_kernels() {
  static const KernelTable* chosen = [] {
    perm_al = want_perm_al();
    const char* want = std::getenv("NATTEN_MLX_SIMD");
    [[maybe_unused]] auto wanted = [&](const char* name) { return !want || !*want || std::strcmp(want, name) == 0; };
#if defined(NA_HAVE_avx512)
    __builtin_cpu_init();
    if (wanted("avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return kernels_avx512();
#endif
#if defined(NA_HAVE_avx2)
    if (wanted("avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernels_avx2();
#endif
    return kernels_base();
  }();
  return *chosen;
}

}  // namespace na
