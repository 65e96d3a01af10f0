// emu_runtime.h: the interface between an emulated kernel (a Metal body compiled as C++ against
// metal_shim.h) and the scheduler in emu_runtime.cpp. Plain C++17, no standard headers beyond
// <stdint.h>/<stddef.h>, so that a kernel translation unit sees no std:: math overloads that could
// hide a missing Metal function.
#ifndef NATTEN_MLX_METAL_EMU_RUNTIME_H
#define NATTEN_MLX_METAL_EMU_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

namespace emu {

enum BufKind { BUF_INPUT = 0, BUF_OUTPUT = 1, BUF_THREADGROUP = 2, BUF_CONSTANT = 3 };

// Access history of one element of tracked memory (outputs and threadgroup arrays). An "epoch" is
// the interval between two threadgroup barriers; two accesses of different threads to one element
// in the same epoch, one of them a write, are a race unless both threads are in one simdgroup and
// a simdgroup synchronisation (barrier or collective) separates them.
struct Shadow {
  int32_t w_tid;    // writer: thread index in threadgroup (threadgroup memory) or global linear id (outputs); -1: never written
  int32_t w_group;  // outputs: linear threadgroup of the writer
  uint32_t w_epoch;
  uint32_t w_sge;   // simdgroup epoch of the writer at the write
  int32_t r_tid;    // threadgroup memory: the one reader of r_epoch, -2 several
  int32_t r_sg;     // simdgroup of every reader of r_epoch, -1 several
  uint32_t r_epoch;
  uint32_t r_sge;   // largest simdgroup epoch among the readers of r_epoch
};

struct Buf {
  const char* name;
  char* data;
  int64_t n;            // elements
  int64_t esize;        // bytes per element
  int32_t kind;         // BufKind
  int32_t initialised;  // outputs: filled with init_value before the launch
  Shadow* shadow;       // outputs and threadgroup arrays; null for inputs
};

struct Thread {
  uint32_t tid;          // thread_index_in_threadgroup
  uint32_t lane, sg;     // thread_index_in_simdgroup, simdgroup_index_in_threadgroup
  uint32_t pos_tg[3];    // thread_position_in_threadgroup
  uint32_t group[3];     // threadgroup_position_in_grid
  uint32_t pos_grid[3];  // thread_position_in_grid
  int64_t global_id;     // linear thread id over the grid (x fastest)
  int64_t group_id;      // linear threadgroup id
};

struct Group {
  uint32_t tg_size[3];   // threads_per_threadgroup of this group
  uint32_t nthreads, nsg;
  uint32_t groups[3];    // threadgroups_per_grid
  uint32_t epoch;        // threadgroup barrier epoch, starts at 1
  uint32_t sg_epoch[32]; // simdgroup synchronisation epochs
};

struct Launch {
  uint32_t grid[3];
  uint32_t tg[3];
  int32_t nbufs;
  Buf* bufs;
  int32_t order;             // 0: threads in index order, 1: reverse, >= 2: shuffled (seed)
  int32_t allow_nonuniform;  // grid not a multiple of the threadgroup: edge groups shrink
  int64_t tg_mem_limit;      // bytes of threadgroup memory a group may declare
  int32_t max_errors;        // messages kept
  int32_t check_unwritten;   // outputs without init_value must be written entirely
  char* errors;              // out: messages, one a line
  int64_t errors_cap;
  int64_t nerrors;           // out: number of errors (all, not only the kept ones)
  int64_t tg_mem_peak;       // out: largest threadgroup memory of one group, bytes
  int64_t collectives;       // out: simdgroup collectives executed (statistics)
  int64_t barriers;          // out: threadgroup barriers executed
};

extern Thread* cur;
extern Group* grp;
extern Launch* launch;
extern char dummy[256];  // target of out-of-bounds accesses after they are reported

void report(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// kind 0: threadgroup_barrier, 1: simdgroup_barrier
void barrier(int kind);
// A simdgroup collective: deposit nbytes (<= 64) of this lane's value, wait for every live lane of
// the simdgroup, and return the 32 slots (64 bytes apart) and the mask of participating lanes.
// All live lanes must arrive at the same op, else it is reported as divergence.
const char* simd_exchange(const void* val, int nbytes, int op, uint32_t* active);
// Threadgroup array declared at `site` of the body: one allocation per threadgroup, shared by
// its threads, shadowed for race detection, counted against the threadgroup memory limit.
void* tg_alloc(int site, const char* name, int64_t n, int64_t esize, Buf** buf);

int run(Launch* L, void (*entry)());

}  // namespace emu

#endif
