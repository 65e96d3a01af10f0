"""CUDA source generation: the kernel bodies (``cu/*.cu``, package data), the shared header, and
the exact text ``mx.fast.cuda_kernel`` compiles around a body.

A kernel variant is a body plus its template arguments; the same :func:`full_source` text feeds
MLX (through ``mx.fast.cuda_kernel``), the CI compile check (``nvcc -arch=sm_90``) and the CPU
emulator of ``tests/cuda``, so what is checked here is what runs on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

CU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cu")

# mx dtype name -> CUDA type (as MLX's dtype_to_cuda_type)
CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int32_t"}

# MLX's default header of every cuda_kernel (mlx/backend/cuda/custom_kernel.cpp, MLX 0.32)
MLX_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

#define inf cuda::std::numeric_limits<float>::infinity()

"""

# inputs (name, dtype: a template name or a fixed dtype) and outputs of each body
T_IN = ("query", "key", "value")
BODIES = {
    "simple_fwd": (T_IN + ("rpb", "prm", "scl"), ("out", "lse")),
    "fmha_fwd": (T_IN + ("rpb", "prm", "scl"), ("out", "lse")),
    "simple_dq": (T_IN + ("d_out", "lse", "delta", "rpb", "prm", "scl"), ("d_query", "d_rpb")),
    "simple_dkdv": (T_IN + ("d_out", "lse", "delta", "rpb", "prm", "scl"), ("d_key", "d_value")),
    "fmha_bwd_dq": (T_IN + ("d_out", "lse", "delta", "rpb", "prm", "scl"), ("d_query", "d_rpb")),
    "fmha_bwd_dkdv": (T_IN + ("d_out", "lse", "delta", "rpb", "prm", "scl"), ("d_key", "d_value")),
    "merge_parts": (("parts", "parts_lse", "rows"), ("out", "lse")),
}
FIXED_DTYPES = {"prm": "int32", "scl": "float32", "lse": "float32", "delta": "float32", "d_rpb": "float32",
                "d_query": "float32", "d_key": "float32", "d_value": "float32",
                "parts": "float32", "parts_lse": "float32", "rows": "int32"}


def _core_include_dir() -> str:
    try:  # protocol v2: natten_mlx.geometry.include_dir()
        from natten_mlx import geometry

        return geometry.include_dir()
    except (ImportError, AttributeError):
        import natten_mlx

        return os.path.join(os.path.dirname(os.path.abspath(natten_mlx.__file__)), "include")


COMPACT = True  # False: the files as written (benchmarks/gpu measure what the comments cost a launch)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return compact(text) if COMPACT else text


def compact(text: str) -> str:
    """C/C++ text without its comments, indentation and blank lines (string and character literals kept as
    written; a line after a backslash continuation is never dropped). MLX hashes a kernel's whole source on
    every launch (custom_kernel.cpp, eval_gpu: the JIT module's name) and copies it on every call: fmha_fwd's
    52 KB with comments cost G1 ~6 us per call more than these 30 KB on the H200. Every consumer (MLX, the nvcc
    check, the emulator) takes this text."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":  # a literal: copied up to its closing quote, escapes included
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append(" ")
            i = n if j < 0 else j + 2
        else:
            j = i
            while j < n and text[j] not in "\"'/":
                j += 1
            if j == i:  # a lone '/'
                j += 1
            out.append(text[i:j])
            i = j
    lines, cont = [], False
    for line in "".join(out).split("\n"):
        line = line.strip()
        if line or cont:
            lines.append(line)
        cont = line.endswith("\\")
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=None)
def header() -> str:
    """The header= text of every kernel: NA_FUNC for CUDA, window.h, tiling.h, common.cuh."""
    inc = os.path.join(_core_include_dir(), "natten_mlx")
    parts = [
        "#ifndef NA_FUNC\n#define NA_FUNC __device__ __forceinline__\n#endif\n",
        _read(os.path.join(inc, "window.h")),
        _read(os.path.join(inc, "tiling.h")),
        _read(os.path.join(CU_DIR, "common.cuh")),
    ]
    return "\n".join(parts)


@lru_cache(maxsize=None)
def header_for(threads: int = 0, min_blocks: int = 0) -> str:
    """header() plus, with min_blocks, a __global__ that carries __launch_bounds__(threads, min_blocks):
    mx.fast.cuda_kernel writes the kernel's declaration itself and passes no compiler options, and
    host_defines.h (included by NVRTC and nvcc alike) defines __global__ as a macro, so redefining it
    after MLX's includes reaches only the kernel that follows."""
    if not min_blocks:
        return header()
    return header() + (
        "\n#if !defined(NA_EMU) && defined(__global__)\n#undef __global__\n"
        f"#define __global__ __location__(global) __launch_bounds__({threads}, {min_blocks})\n#endif\n"
    )


@lru_cache(maxsize=None)
def body(name: str) -> str:
    return _read(os.path.join(CU_DIR, name + ".cu"))


@dataclass(frozen=True)
class Variant:
    """One specialisation: a body and its template arguments ``((name, int | bool | dtype name), ...)``,
    plus the dynamic shared memory (bytes) it is launched with."""

    body: str
    template: tuple
    shared_memory: int = 0
    # > 0: the kernel is declared __launch_bounds__(threads, min_blocks), so ptxas keeps its registers
    # within what that many resident blocks of ``threads`` allow (spilling if it must); a separate
    # kernel name, since MLX builds one kernel object per name and header
    min_blocks: int = 0

    @property
    def name(self) -> str:
        return "natten_" + self.body + (f"_lb{self.min_blocks}" if self.min_blocks else "")

    @property
    def threads(self) -> int:
        """Threads per block of the tensor-core forward (NW warps); 128 for the other bodies."""
        return 32 * dict(self.template).get("NW", 4)

    @property
    def kernel_name(self) -> str:
        """The function name MLX gives it: custom_kernel_<name> plus one suffix per template argument."""
        suffix = ""
        for _, v in self.template:
            if isinstance(v, bool):
                suffix += "_t" if v else "_f"
            elif isinstance(v, int):
                suffix += f"_{v}"
            else:
                suffix += f"_{v}"
        return "custom_kernel_" + self.name + suffix

    def arg_dtypes(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(inputs, outputs) as (name, dtype name)."""
        tmpl = dict(self.template)
        ins, outs = BODIES[self.body]

        def dt(n):
            if n in FIXED_DTYPES:
                return FIXED_DTYPES[n]
            return tmpl["OT"] if n == "out" else tmpl["T"]

        return [(n, dt(n)) for n in ins], [(n, dt(n)) for n in outs]


def full_source(v: Variant, default_header: str = MLX_DEFAULT_HEADER, kernel_name: str | None = None) -> str:
    """The translation unit MLX builds for ``v`` (mlx/backend/cuda/custom_kernel.cpp, build_kernel)."""
    ins, outs = v.arg_dtypes()
    text = default_header + header_for(v.threads, v.min_blocks)
    text += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += "__global__ void " + (kernel_name or v.kernel_name) + "(\n"
    for n, dt in ins:
        text += f"    const {CUDA_TYPES[dt]}* {n},\n"
    text += ",\n".join(f"    {CUDA_TYPES[dt]}* {n}" for n, dt in outs) + ") {\n"
    for n, val in v.template:
        if isinstance(val, bool):
            text += f"  constexpr bool {n} = {'true' if val else 'false'};\n"
        elif isinstance(val, int):
            text += f"  constexpr int {n} = {val};\n"
        else:
            text += f"  using {n} = {CUDA_TYPES[val]};\n"
    if v.template:
        text += "\n"
    text += body(v.body)
    text += "\n}\n\n} // namespace mlx::core::cu\n"
    return text
