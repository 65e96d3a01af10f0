// Python bindings (nanobind, NB_DOMAIN mlx so that mlx.core.array crosses the boundary).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "driver.h"
#include "ops.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "natten-mlx's compiled CPU tier: neighborhood attention primitives for MLX";
  m.attr("MLX_VERSION") = NA_MLX_VERSION;
  m.def("fused_forward", &na::op_fused_forward, "query"_a, "key"_a, "value"_a, "additional_keys"_a = nb::none(),
        "additional_values"_a = nb::none(), "rpb"_a = nb::none(), nb::kw_only(), "kernel_size"_a, "stride"_a,
        "dilation"_a, "is_causal"_a, "scale"_a = nb::none(), "domain"_a = nb::none(), "query_offset"_a = nb::none(),
        "kv_offset"_a = nb::none(), "stream"_a = nb::none(),
        "q [B, *spatial, H, D], k [B, *spatial, H_kv, D], v [B, *spatial, H_kv, D_v] -> "
        "[out [B, *spatial, H, D_v], lse [B, *spatial, H] float32]; with domain/query_offset/kv_offset "
        "(sub-domain, sharded attention) k and v hold the key slab [B, *kv_spatial, H_kv, D]");
  m.def("qk_forward", &na::op_qk_forward, "query"_a, "key"_a, "additional_keys"_a = nb::none(), "rpb"_a = nb::none(),
        nb::kw_only(), "kernel_size"_a, "stride"_a, "dilation"_a, "is_causal"_a, "scale"_a = nb::none(),
        "stream"_a = nb::none(), "scores [B, *spatial, H, prod(kernel_size) (+N_extra)]; invalid causal slots -inf");
  m.def("av_forward", &na::op_av_forward, "attn"_a, "value"_a, "additional_values"_a = nb::none(), nb::kw_only(),
        "kernel_size"_a, "stride"_a, "dilation"_a, "is_causal"_a, "stream"_a = nb::none(),
        "attn [B, *spatial, H, prod(kernel_size) (+N_extra)] x value -> [B, *spatial, H, D_v]");
  m.def("num_threads", &na::num_threads, "threads of the kernel pool (NATTEN_MLX_NUM_THREADS overrides)");
  m.def("path_counts", &na::path_counts, "reset"_a = false,
        "queries served since the last reset: [forward exact-window runs, border blocks, tiles, backward runs, "
        "border blocks, tiles, forward calls and backward calls on a ring of transposed key rows, backward calls with "
        "their key-side sums on a ring, forward calls whose P.V read heads-last value rows, forward and backward calls "
        "that wrote their outputs with non-temporal stores, forward and backward calls that read q, k or v in place from "
        "a view with a longer token stride, forward and backward tile rows (query x head) whose windows are the whole "
        "key box, backward calls whose whole-group tiles stored dk and dv] (tests check that every path ran); "
        "reset=True zeroes them");
  m.def("pool_bytes", &na::pool_bytes,
        "bytes of output buffers kept for reuse by later calls (CPU-only MLX builds; at most NATTEN_MLX_POOL_MB "
        "megabytes, default 1024, 0 = none kept)");
  m.def("pool_clear", &na::pool_clear, "frees the output buffers kept for reuse");
  m.def("pool_poison", &na::pool_poison,
        "sets every byte of the kept output buffers to 0xFF, NaN in every float dtype (tests: an output value a "
        "kernel leaves unwritten shows as NaN)");
  m.def("upper_state", &na::upper_state,
        "(before, after): whether the upper halves of the ymm registers were in use on MLX's stream thread at the end "
        "of the last op's task, before and after the vzeroupper that ends it (1 / 0; -1 where the CPU cannot say). "
        "Left in use they slow MLX's own SSE code on that thread about 3x");
  m.def("simd", &na::simd_name, "instruction set of the kernels chosen for this CPU (NATTEN_MLX_SIMD overrides)");
}
