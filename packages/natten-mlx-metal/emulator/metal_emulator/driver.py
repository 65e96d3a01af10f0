"""Run an ``mx.fast.metal_kernel`` call on the CPU: compile the exact body with the signature MLX
would generate, as C++ against metal_shim.h, and execute the grid with the threads of each
threadgroup as cooperating fibers (emu_runtime.cpp).

``emulate(spec, inputs, grid=..., threadgroup=..., output_shapes=..., output_dtypes=...)`` takes the
same arguments as the kernel object MLX returns (``spec`` holds what ``mx.fast.metal_kernel``
received: name, input_names, output_names, source, header) and returns the outputs as MLX arrays.
Every error the run detects (out-of-bounds access, race, read of unwritten memory, deadlock,
divergent collective, threadgroup memory over the limit, outputs left unwritten) raises
:class:`EmulatorError` listing them.

Compiled kernels are cached as shared objects under ``$NATTEN_MLX_METAL_EMU_CACHE`` (default
``~/.cache/natten-mlx-metal-emulator``), one per hash of the generated C++ text and the compiler
flags, so a test suite compiles each kernel variant once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .signature import SignatureError, build_signature, cpp_source, mlx_source

HERE = Path(__file__).resolve().parent
CXX = os.environ.get("CXX", "g++")
# no _FORTIFY_SOURCE: its longjmp check rejects the fibers' stack switches
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w"]


class EmulatorError(RuntimeError):
    """The emulated kernel did something that is undefined or wrong on a GPU."""

    def __init__(self, kernel: str, messages: list[str], count: int):
        self.kernel = kernel
        self.messages = messages
        self.count = count
        more = "" if count <= len(messages) else f"\n... and {count - len(messages)} more"
        super().__init__(f"{kernel}: {count} error(s) in emulation:\n" + "\n".join(messages) + more)


class CompileError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = Path(os.environ.get("NATTEN_MLX_METAL_EMU_CACHE", Path.home() / ".cache" / "natten-mlx-metal-emulator"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- ctypes mirrors of emu_runtime.h ----
class _Buf(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("data", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("esize", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("initialised", ctypes.c_int32),
        ("shadow", ctypes.c_void_p),
    ]


class _Launch(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("tg", ctypes.c_uint32 * 3),
        ("nbufs", ctypes.c_int32),
        ("bufs", ctypes.POINTER(_Buf)),
        ("order", ctypes.c_int32),
        ("allow_nonuniform", ctypes.c_int32),
        ("tg_mem_limit", ctypes.c_int64),
        ("max_errors", ctypes.c_int32),
        ("check_unwritten", ctypes.c_int32),
        ("errors", ctypes.c_char_p),
        ("errors_cap", ctypes.c_int64),
        ("nerrors", ctypes.c_int64),
        ("tg_mem_peak", ctypes.c_int64),
        ("collectives", ctypes.c_int64),
        ("barriers", ctypes.c_int64),
    ]


_SHADOW_WORDS = 8  # sizeof(emu::Shadow) / 4


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile(args: list[str], what: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise CompileError(f"compiling {what} failed ({' '.join(args)}):\n{r.stderr[-6000:]}")


def _runtime_object() -> Path:
    src, hdr = HERE / "emu_runtime.cpp", HERE / "emu_runtime.h"
    key = _file_hash(src, hdr) + hashlib.sha256(" ".join([CXX, *CXXFLAGS]).encode()).hexdigest()[:8]
    obj = cache_dir() / f"emu_runtime-{key}.o"
    if not obj.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            out = Path(tmp) / "rt.o"
            _compile([CXX, *CXXFLAGS, "-O2", "-c", str(src), "-o", str(out)], "emu_runtime.cpp")
            os.replace(out, obj)
    return obj


_LOADED: dict[str, ctypes.CDLL] = {}


def compile_kernel(cpp: str) -> ctypes.CDLL:
    """Build (or find in the cache) the shared object of one generated translation unit."""
    rt = _runtime_object()
    shim_key = _file_hash(HERE / "metal_shim.h", HERE / "emu_runtime.h")
    key = hashlib.sha256((cpp + shim_key + rt.name + " ".join([CXX, *CXXFLAGS])).encode()).hexdigest()[:24]
    if key in _LOADED:
        return _LOADED[key]
    so = cache_dir() / f"kernel-{key}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = Path(tmp) / "kernel.cpp"
            src.write_text(cpp)
            out = Path(tmp) / "kernel.so"
            _compile([CXX, *CXXFLAGS, "-shared", f"-I{HERE}", str(src), str(rt), "-o", str(out)], "the kernel")
            shutil.copy(src, cache_dir() / f"kernel-{key}.cpp")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    lib.emu_main.argtypes = [ctypes.POINTER(_Launch)]
    lib.emu_main.restype = ctypes.c_int
    _LOADED[key] = lib
    return lib


# ---- arrays ----
_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int32": np.int32, "int64": np.int64,
       "uint32": np.uint32, "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "uint16": np.uint16,
       "int16": np.int16, "uint64": np.uint64, "float64": np.float64}


def _dtype_name(d) -> str:
    s = str(d)
    return s[len("mlx.core."):] if s.startswith("mlx.core.") else s


def _to_host(x):
    """An input as (contiguous numpy array holding its bytes, dtype name, shape)."""
    import mlx.core as mx

    if isinstance(x, bool):
        return np.array(x, dtype=np.bool_), "bool", ()
    if isinstance(x, int):
        dt = "int32" if -(2**31) <= x < 2**31 else "int64"
        return np.array(x, dtype=_NP[dt]), dt, ()
    if isinstance(x, float):
        return np.array(x, dtype=np.float32), "float32", ()
    if isinstance(x, mx.array):
        name = _dtype_name(x.dtype)
        if name == "bfloat16":
            host = np.array(x.view(mx.uint16))
        else:
            host = np.array(x)
        return np.ascontiguousarray(host), name, tuple(x.shape)
    a = np.asarray(x)
    name = str(a.dtype)
    if name not in _NP:
        raise TypeError(f"input of dtype {a.dtype} is not supported by the emulator")
    return np.ascontiguousarray(a), name, tuple(a.shape)


def _to_mlx(host: np.ndarray, name: str):
    import mlx.core as mx

    if name == "bfloat16":
        return mx.array(host).view(mx.bfloat16)
    return mx.array(host)


def _row_strides(shape) -> list[int]:
    s, out = 1, []
    for n in reversed(shape):
        out.append(s)
        s *= n
    return list(reversed(out))


def generated_sources(spec, inputs, output_dtypes, template=()):
    """(Metal text MLX would compile, C++ text the emulator compiles) for one call."""
    hosts = [_to_host(x) for x in inputs]
    sig = build_signature(
        spec.name, spec.input_names, spec.output_names, spec.source,
        [h[2] for h in hosts], [h[1] for h in hosts], [_dtype_name(d) for d in output_dtypes],
        template=tuple(template or ()), atomic_outputs=getattr(spec, "atomic_outputs", False),
    )
    return mlx_source(sig, spec.header, spec.source), cpp_source(sig, spec.header, spec.source), sig, hosts


def emulate(
    spec,
    inputs,
    *,
    grid,
    threadgroup,
    output_shapes,
    output_dtypes,
    template=(),
    init_value=None,
    order: int = 0,
    allow_nonuniform: bool = False,
    tg_mem_limit: int = 32768,
    check_unwritten: bool = True,
    max_errors: int = 20,
    stats: dict | None = None,
):
    """Run ``spec`` as MLX would run ``mx.fast.metal_kernel(**spec)(inputs=..., ...)``.

    order: 0 runs a threadgroup's threads in index order between synchronisation points, 1 in
    reverse, >= 2 shuffled with that seed (results must not depend on it).
    Returns the outputs as MLX arrays; raises EmulatorError on any detected error."""
    if len(inputs) != len(spec.input_names):
        raise ValueError(f"{spec.name}: {len(inputs)} inputs for input_names {spec.input_names}")
    if len(output_shapes) != len(spec.output_names) or len(output_dtypes) != len(spec.output_names):
        raise ValueError(f"{spec.name}: output_shapes/output_dtypes must have one entry per output {spec.output_names}")
    _, cpp, sig, hosts = generated_sources(spec, inputs, output_dtypes, template)
    lib = compile_kernel(cpp)

    keep = []  # keeps every buffer alive during the call
    bufs = []

    def add(arr: np.ndarray, name: str, kind: int, initialised=False, shadow=False):
        arr = np.ascontiguousarray(arr)
        keep.append(arr)
        sh = None
        if shadow:
            sh = np.zeros((max(arr.size, 1), _SHADOW_WORDS), dtype=np.int32)
            keep.append(sh)
        nm = name.encode()
        keep.append(nm)
        bufs.append(_Buf(nm, arr.ctypes.data, arr.size, arr.itemsize, kind, int(initialised),
                         None if sh is None else sh.ctypes.data))
        return arr

    outputs = []
    for p in sig.params:
        if p.kind == "attr":
            continue
        if p.kind == "input":
            host, _, _ = hosts[p.source]
            add(host, p.name, 3 if "constant" in p.mtype else 0)
        elif p.kind == "shape":
            add(np.array(hosts[p.source][2] or [0], dtype=np.int32), p.name, 3)
        elif p.kind == "strides":
            add(np.array(_row_strides(hosts[p.source][2]) or [0], dtype=np.int64), p.name, 3)
        elif p.kind == "ndim":
            add(np.array(len(hosts[p.source][2]), dtype=np.int32), p.name, 3)
        else:
            shape = tuple(int(s) for s in output_shapes[p.source])
            dname = _dtype_name(output_dtypes[p.source])
            if init_value is not None:
                host = _init_array(shape, dname, init_value)
            else:
                host = _poison_array(shape, dname)
            outputs.append((add(host, p.name, 1, initialised=init_value is not None, shadow=True), dname))

    err = ctypes.create_string_buffer(1 << 16)
    launch = _Launch()
    launch.grid = (ctypes.c_uint32 * 3)(*[int(g) for g in grid])
    launch.tg = (ctypes.c_uint32 * 3)(*[int(t) for t in threadgroup])
    arr_t = _Buf * len(bufs)
    launch.bufs = ctypes.cast(arr_t(*bufs), ctypes.POINTER(_Buf))
    keep.append(launch.bufs)
    launch.nbufs = len(bufs)
    launch.order = order
    launch.allow_nonuniform = int(allow_nonuniform)
    launch.tg_mem_limit = tg_mem_limit
    launch.max_errors = max_errors
    launch.check_unwritten = int(check_unwritten)
    launch.errors = ctypes.cast(err, ctypes.c_char_p)
    launch.errors_cap = len(err)
    lib.emu_main(ctypes.byref(launch))
    if stats is not None:
        stats.update(tg_mem_peak=launch.tg_mem_peak, collectives=launch.collectives, barriers=launch.barriers,
                     kernel=sig.kernel_name)
    if launch.nerrors:
        msgs = [m for m in err.value.decode(errors="replace").split("\n") if m]
        raise EmulatorError(sig.kernel_name, msgs, launch.nerrors)
    return [_to_mlx(h, d) for h, d in outputs]


def _init_array(shape, dname, value):
    if dname == "bfloat16":
        import mlx.core as mx

        return np.array(mx.full(shape, value, dtype=mx.bfloat16).view(mx.uint16))
    return np.full(shape, value, dtype=_NP[dname])


def _poison_array(shape, dname):
    # what an unwritten output would show: NaN for floats, a large pattern for integers
    if dname in ("float32", "float16", "float64"):
        return np.full(shape, np.nan, dtype=_NP[dname])
    if dname == "bfloat16":
        return np.full(shape, 0x7FC0, dtype=np.uint16)
    return np.full(shape, 0x5A, dtype=_NP[dname])


__all__ = ["emulate", "EmulatorError", "CompileError", "SignatureError", "generated_sources", "compile_kernel"]
