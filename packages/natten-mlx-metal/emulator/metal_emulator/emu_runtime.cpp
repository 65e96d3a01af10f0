// emu_runtime.cpp: runs the threadgroups of an emulated Metal dispatch on the CPU.
//
// One threadgroup at a time; its threads are fibers (ucontext) that run until they block on a
// threadgroup barrier, a simdgroup collective or the end of the kernel. A barrier releases when
// every thread of the group waits at it; a collective releases when every live lane of the
// simdgroup waits at the same op. Anything else that stops progress is reported (divergent
// barriers, threads that returned while others wait, lanes at different collectives).
#include "emu_runtime.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace emu {

Thread* cur = nullptr;
Group* grp = nullptr;
Launch* launch = nullptr;
char dummy[256];

namespace {

enum State { RUNNABLE, WAIT_TG, WAIT_SG, DONE };

struct Fiber {
  ucontext_t ctx;      // used once, to enter the fiber's stack
  jmp_buf jb;          // every later switch: _setjmp/_longjmp, no signal-mask system call
  bool started = false;
  char* stack = nullptr;
  State state = RUNNABLE;
  int op = 0;          // collective the fiber waits at
  uint32_t seq = 0;    // sequence number of that collective in its simdgroup
  Thread t;
};

struct SimdGroup {
  uint32_t seq = 0;                 // collectives completed
  char slots[2][32][64];            // double-buffered by seq parity (see simd_exchange)
  uint32_t active[2] = {0, 0};
};

struct TgAlloc {
  int site;
  Buf buf;
  std::vector<char> data;
  std::vector<Shadow> shadow;
};

constexpr size_t kStack = 256 * 1024;

jmp_buf sched_jb;
std::vector<Fiber> fibers;
SimdGroup sgs[32];
std::vector<TgAlloc*> allocs;
int64_t tg_bytes = 0;
void (*kernel_entry)() = nullptr;
Fiber* running = nullptr;
std::string errors;

void trampoline() {
  kernel_entry();
  running->state = DONE;
  _longjmp(sched_jb, 1);
}

void yield_to_scheduler() {
  if (!_setjmp(running->jb)) _longjmp(sched_jb, 1);
}

// Run fiber f until it yields or returns. The first entry goes through swapcontext (to get onto
// the fiber's own stack); afterwards plain _setjmp/_longjmp switch stacks in both directions.
void resume(Fiber& f) {
  if (_setjmp(sched_jb)) return;
  if (!f.started) {
    f.started = true;
    setcontext(&f.ctx);
  }
  _longjmp(f.jb, 1);
}

const char* op_name(int op) {
  switch (op) {
    case 1: return "simdgroup_barrier";
    case 2: return "simd_sum";
    case 3: return "simd_max";
    case 4: return "simd_min";
    case 5: return "simd_shuffle";
    case 6: return "simd_shuffle_xor";
    case 7: return "simd_shuffle_down";
    case 8: return "simd_shuffle_up";
    case 9: return "simd_broadcast";
    case 10: return "simdgroup_multiply_accumulate";
    case 11: return "simd_prefix";
    case 12: return "simd_any/all";
    default: return "collective";
  }
}

void init_shadow(Shadow* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    s[i].w_tid = -1;
    s[i].w_group = -1;
    s[i].w_epoch = 0;
    s[i].w_sge = 0;
    s[i].r_tid = -1;
    s[i].r_sg = -1;
    s[i].r_epoch = 0;
    s[i].r_sge = 0;
  }
}

// Release whatever can be released; false when nothing could (deadlock).
bool release(Group& g) {
  bool any = false;
  uint32_t live = 0, at_tg = 0, done = 0;
  for (auto& f : fibers) {
    if (f.state == DONE) ++done; else ++live;
    if (f.state == WAIT_TG) ++at_tg;
  }
  if (live && at_tg == live) {
    if (done)
      report("threadgroup_barrier reached by %u threads of threadgroup (%u,%u,%u) while %u had returned: "
             "every thread of a threadgroup must reach every barrier",
             live, fibers[0].t.group[0], fibers[0].t.group[1], fibers[0].t.group[2], done);
    g.epoch++;
    for (uint32_t s = 0; s < g.nsg; ++s) g.sg_epoch[s]++;
    for (auto& f : fibers)
      if (f.state == WAIT_TG) f.state = RUNNABLE;
    launch->barriers++;
    return true;
  }
  for (uint32_t s = 0; s < g.nsg; ++s) {
    uint32_t lo = s * 32, hi = std::min<uint32_t>(lo + 32, g.nthreads);
    uint32_t slive = 0, at_sg = 0;
    int op = -1;
    bool same = true;
    for (uint32_t i = lo; i < hi; ++i) {
      Fiber& f = fibers[i];
      if (f.state == DONE) continue;
      ++slive;
      if (f.state == WAIT_SG) {
        ++at_sg;
        if (op < 0) op = f.op; else if (op != f.op) same = false;
      }
    }
    if (slive && at_sg == slive) {
      if (!same) {
        report("simdgroup %u of threadgroup (%u,%u,%u): lanes wait at different collectives (divergent control flow)",
               s, fibers[lo].t.group[0], fibers[lo].t.group[1], fibers[lo].t.group[2]);
      }
      SimdGroup& sg = sgs[s];
      sg.seq++;
      g.sg_epoch[s]++;
      for (uint32_t i = lo; i < hi; ++i)
        if (fibers[i].state == WAIT_SG) fibers[i].state = RUNNABLE;
      launch->collectives++;
      any = true;
    }
  }
  return any;
}

void describe_deadlock(Group& g) {
  std::string states;
  for (auto& f : fibers) {
    const char* s = f.state == WAIT_TG ? "B" : f.state == WAIT_SG ? "C" : f.state == DONE ? "." : "R";
    states += s;
  }
  report("deadlock in threadgroup (%u,%u,%u): no barrier or collective can complete "
         "(thread states, B=threadgroup_barrier C=collective .=returned: %s)",
         fibers[0].t.group[0], fibers[0].t.group[1], fibers[0].t.group[2], states.c_str());
}

void run_group(Launch* L, Group& g, const uint32_t gpos[3], int64_t gid) {
  uint32_t n = g.nthreads;
  for (uint32_t s = 0; s < g.nsg; ++s) {
    sgs[s].seq = 0;
    sgs[s].active[0] = sgs[s].active[1] = 0;
  }
  for (auto* a : allocs) delete a;
  allocs.clear();
  tg_bytes = 0;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.state = RUNNABLE;
    f.started = false;
    f.op = 0;
    Thread& t = f.t;
    t.tid = i;
    t.lane = i % 32;
    t.sg = i / 32;
    t.pos_tg[0] = i % g.tg_size[0];
    t.pos_tg[1] = (i / g.tg_size[0]) % g.tg_size[1];
    t.pos_tg[2] = i / (g.tg_size[0] * g.tg_size[1]);
    for (int d = 0; d < 3; ++d) {
      t.group[d] = gpos[d];
      t.pos_grid[d] = gpos[d] * L->tg[d] + t.pos_tg[d];
    }
    t.global_id = (int64_t)t.pos_grid[0] + (int64_t)L->grid[0] * ((int64_t)t.pos_grid[1] + (int64_t)L->grid[1] * t.pos_grid[2]);
    t.group_id = gid;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::vector<uint32_t> order(n);
  for (uint32_t i = 0; i < n; ++i) order[i] = L->order == 1 ? n - 1 - i : i;
  std::mt19937 rng(L->order >= 2 ? (uint32_t)(L->order * 7919u + gid) : 0u);
  for (;;) {
    if (L->order >= 2) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (uint32_t k = 0; k < n; ++k) {
      Fiber& f = fibers[order[k]];
      if (f.state != RUNNABLE) continue;
      running = &f;
      cur = &f.t;
      resume(f);
      ran = true;
    }
    bool all_done = true;
    for (auto& f : fibers)
      if (f.state != DONE) { all_done = false; break; }
    if (all_done) break;
    if (!release(g) && !ran) {
      describe_deadlock(g);
      break;  // the group's fibers are abandoned; their stacks are reused by the next group
    }
  }
  for (auto* a : allocs) delete a;
  allocs.clear();
}

}  // namespace

void report(const char* fmt, ...) {
  launch->nerrors++;
  if (launch->nerrors > launch->max_errors) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  errors += buf;
  errors += "\n";
}

void barrier(int kind) {
  if (kind == 0) {
    running->state = WAIT_TG;
    yield_to_scheduler();
  } else {
    uint32_t act;
    simd_exchange(nullptr, 0, 1, &act);
  }
}

// Slots are double-buffered by the parity of the collective's sequence number: a lane can only
// deposit for collective n+2 after every lane has resumed from collective n (n+1 needs them all),
// and a lane reads its result as soon as it resumes, before it can yield again.
const char* simd_exchange(const void* val, int nbytes, int op, uint32_t* active) {
  SimdGroup& sg = sgs[cur->sg];
  uint32_t seq = sg.seq;
  int p = seq & 1;
  if (nbytes > 64) {
    report("internal: collective payload of %d bytes", nbytes);
    nbytes = 64;
  }
  if (nbytes) memcpy(sg.slots[p][cur->lane], val, nbytes);
  // the first lane to arrive starts a fresh mask for this collective
  bool first = true;
  uint32_t lo = cur->sg * 32, hi = std::min<uint32_t>(lo + 32, grp->nthreads);
  for (uint32_t i = lo; i < hi; ++i)
    if (&fibers[i] != running && fibers[i].state == WAIT_SG && fibers[i].seq == seq) first = false;
  if (first) sg.active[p] = 0;
  sg.active[p] |= 1u << cur->lane;
  running->state = WAIT_SG;
  running->op = op;
  running->seq = seq;
  yield_to_scheduler();
  *active = sg.active[p];
  return &sg.slots[p][0][0];
}

void* tg_alloc(int site, const char* name, int64_t n, int64_t esize, Buf** buf) {
  for (auto* a : allocs)
    if (a->site == site) {
      *buf = &a->buf;
      return a->data.data();
    }
  auto* a = new TgAlloc;
  a->site = site;
  a->data.assign((size_t)(n * esize), 0);
  // poison: reads before writes are reported by the shadow, this makes them visible in values too
  memset(a->data.data(), 0xFF, a->data.size());
  a->shadow.resize((size_t)n);
  init_shadow(a->shadow.data(), n);
  a->buf.name = name;
  a->buf.data = a->data.data();
  a->buf.n = n;
  a->buf.esize = esize;
  a->buf.kind = BUF_THREADGROUP;
  a->buf.initialised = 0;
  a->buf.shadow = a->shadow.data();
  allocs.push_back(a);
  tg_bytes += n * esize;
  if (tg_bytes > launch->tg_mem_peak) launch->tg_mem_peak = tg_bytes;
  if (tg_bytes > launch->tg_mem_limit && tg_bytes - n * esize <= launch->tg_mem_limit)
    report("threadgroup memory: %lld bytes declared (array %s adds %lld), the limit is %lld",
           (long long)tg_bytes, name, (long long)(n * esize), (long long)launch->tg_mem_limit);
  *buf = &a->buf;
  return a->data.data();
}

int run(Launch* L, void (*entry)()) {
  launch = L;
  kernel_entry = entry;
  errors.clear();
  L->nerrors = 0;
  L->tg_mem_peak = 0;
  L->collectives = 0;
  L->barriers = 0;
  uint32_t tgn = L->tg[0] * L->tg[1] * L->tg[2];
  if (tgn == 0 || tgn > 1024) {
    report("threadgroup (%u,%u,%u) has %u threads; Apple GPUs allow 1 to 1024", L->tg[0], L->tg[1], L->tg[2], tgn);
  } else {
    for (int b = 0; b < L->nbufs; ++b) {
      Buf& bf = L->bufs[b];
      if (bf.kind == BUF_OUTPUT && bf.shadow) init_shadow(bf.shadow, bf.n);
    }
    uint32_t groups[3];
    bool uniform = true;
    for (int d = 0; d < 3; ++d) {
      groups[d] = (L->grid[d] + L->tg[d] - 1) / L->tg[d];
      if (L->grid[d] % L->tg[d]) uniform = false;
    }
    if (!uniform && !L->allow_nonuniform) {
      report("grid (%u,%u,%u) is not a multiple of the threadgroup (%u,%u,%u): MLX dispatches it with "
             "shrunken edge threadgroups, whose threads_per_threadgroup value is unconfirmed",
             L->grid[0], L->grid[1], L->grid[2], L->tg[0], L->tg[1], L->tg[2]);
    } else {
      fibers.assign(tgn, Fiber());
      for (auto& f : fibers) f.stack = (char*)malloc(kStack);
      Group g;
      int64_t gid = 0;
      for (uint32_t gz = 0; gz < groups[2]; ++gz)
        for (uint32_t gy = 0; gy < groups[1]; ++gy)
          for (uint32_t gx = 0; gx < groups[0]; ++gx, ++gid) {
            uint32_t gpos[3] = {gx, gy, gz};
            for (int d = 0; d < 3; ++d) {
              g.tg_size[d] = std::min(L->tg[d], L->grid[d] - gpos[d] * L->tg[d]);
              g.groups[d] = groups[d];
            }
            g.nthreads = g.tg_size[0] * g.tg_size[1] * g.tg_size[2];
            g.nsg = (g.nthreads + 31) / 32;
            g.epoch = 1;
            for (int s = 0; s < 32; ++s) g.sg_epoch[s] = 1;
            grp = &g;
            // a shrunken edge group uses the first nthreads fibers
            std::vector<Fiber> keep;
            if (g.nthreads < tgn) {
              keep.assign(fibers.begin() + g.nthreads, fibers.end());
              fibers.resize(g.nthreads);
            }
            run_group(L, g, gpos, gid);
            if (!keep.empty()) fibers.insert(fibers.end(), keep.begin(), keep.end());
          }
      for (auto& f : fibers) free(f.stack);
      fibers.clear();
      if (L->check_unwritten) {
        for (int b = 0; b < L->nbufs; ++b) {
          Buf& bf = L->bufs[b];
          if (bf.kind != BUF_OUTPUT || bf.initialised || !bf.shadow) continue;
          int64_t missing = 0, first = -1;
          for (int64_t i = 0; i < bf.n; ++i)
            if (bf.shadow[i].w_tid < 0) {
              if (first < 0) first = i;
              ++missing;
            }
          if (missing)
            report("output %s: %lld of %lld elements never written (first: %lld); without init_value MLX "
                   "leaves them uninitialised",
                   bf.name, (long long)missing, (long long)bf.n, (long long)first);
        }
      }
    }
  }
  if (L->errors && L->errors_cap > 0) {
    size_t m = std::min<size_t>(errors.size(), (size_t)L->errors_cap - 1);
    memcpy(L->errors, errors.data(), m);
    L->errors[m] = 0;
  }
  return (int)std::min<int64_t>(L->nerrors, 1 << 30);
}

}  // namespace emu
