"""Runs the CUDA tier's kernels on the CPU: the exact text mx.fast.cuda_kernel compiles
(natten_mlx_cuda.source.full_source), with MLX's default header replaced by emu_prelude.h, built
with g++ into a shared library and launched over NumPy arrays with the grid that natten_mlx_cuda.plan
computes. Used by test_emulated.py; slow (one OS thread per CUDA thread), so problems stay small.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np
from natten_mlx_cuda import source

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = shutil.which("g++") or shutil.which("c++")
_CACHE = os.path.join(tempfile.gettempdir(), f"natten_mlx_cuda_emu_{os.getuid()}")
_LIBS: dict = {}

NP_TYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Host array in the kernel's storage format for dtype."""
    if dtype == "bfloat16":
        return to_bf16_bits(x)
    return np.ascontiguousarray(x, dtype=NP_TYPES[dtype])


def to_float(x: np.ndarray, dtype: str) -> np.ndarray:
    return from_bf16_bits(x) if dtype == "bfloat16" else x.astype(np.float64)


def _build(variant) -> ctypes.CDLL:
    ins, outs = variant.arg_dtypes()
    src = source.full_source(variant, default_header='#include "emu_prelude.h"\n')
    casts = []
    for i, (_, dt) in enumerate(ins):
        casts.append(f"(const {source.CUDA_TYPES[dt]}*)args[{i}]")
    for i, (_, dt) in enumerate(outs):
        casts.append(f"({source.CUDA_TYPES[dt]}*)args[{len(ins) + i}]")
    src += (
        'extern "C" void na_emu_launch(void** args, int gx, int gy, int gz, int tx, int shared) {\n'
        f"  na_emu_run(gx, gy, gz, tx, shared, [&] {{ mlx::core::cu::{variant.kernel_name}({', '.join(casts)}); }});\n}}\n"
    )
    key = hashlib.sha1((src + open(os.path.join(HERE, "emu_prelude.h")).read()).encode()).hexdigest()[:16]
    if key in _LIBS:
        return _LIBS[key]
    os.makedirs(_CACHE, exist_ok=True)
    lib = os.path.join(_CACHE, f"{variant.body}_{key}.so")
    if not os.path.exists(lib):
        cpp = lib[:-3] + ".cpp"
        with open(cpp, "w") as f:
            f.write(src)
        tmp = lib + f".{os.getpid()}.tmp"
        subprocess.run([CXX, "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-w", "-I", HERE, cpp, "-o", tmp], check=True)
        os.replace(tmp, lib)
    _LIBS[key] = ctypes.CDLL(lib)
    return _LIBS[key]


def run(launch, inputs: dict, poison: float = np.nan) -> list:
    """Run ``launch`` (natten_mlx_cuda.plan.Launch) on host arrays; ``inputs`` maps input names to
    arrays already in storage format (as_dtype). Outputs start poisoned unless the launch asks for
    an initial value. Returns the outputs in storage format."""
    v = launch.variant
    ins, outs = v.arg_dtypes()
    lib = _build(v)
    keep = []
    for name, dt in ins:
        if name == "prm":
            arr = np.asarray(launch.prm, dtype=np.int32)
        elif name == "scl":
            arr = inputs["scl"]
        else:
            arr = inputs[name]
        arr = np.ascontiguousarray(arr)
        assert arr.dtype == NP_TYPES[dt], (name, arr.dtype, dt)
        keep.append(arr)
    results = []
    for (_name, dt), shape in zip(outs, launch.output_shapes):
        if launch.init_value is not None:
            arr = np.full(shape, launch.init_value, dtype=np.float32).astype(NP_TYPES[dt]) if dt != "bfloat16" else as_dtype(np.full(shape, launch.init_value), dt)
        elif dt == "bfloat16":
            arr = np.full(shape, 0x7FC0, dtype=np.uint16)
        else:
            arr = np.full(shape, poison, dtype=NP_TYPES[dt])
        results.append(arr)
    ptrs = (ctypes.c_void_p * (len(keep) + len(results)))(*[a.ctypes.data for a in keep + results])
    tx = launch.threadgroup[0]
    gx = -(-launch.grid[0] // tx)
    lib.na_emu_launch(ptrs, gx, launch.grid[1], launch.grid[2], tx, v.shared_memory)
    return results


def mlx_runner(launch, inputs: list) -> list:
    """A natten_mlx_cuda runner that executes launches in the emulator (MLX arrays in and out)."""
    import mlx.core as mx

    ins, outs = launch.variant.arg_dtypes()
    host = {}
    for (name, dt), x in zip(ins, inputs):
        x = mx.contiguous(x)
        if dt == "bfloat16":
            host[name] = np.array(x.view(mx.uint16))
        else:
            host[name] = np.array(x).astype(NP_TYPES[dt])
    res = run(launch, host)
    out = []
    for (_name, dt), r in zip(outs, res):
        a = mx.array(r)
        out.append(a.view(mx.bfloat16) if dt == "bfloat16" else a)
    return out
