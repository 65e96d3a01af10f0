#!/usr/bin/env python3
"""natten-mlx on the lent NVIDIA GPU: correctness first, then timings against the dense baselines.

Run from the repository root on the GPU machine (see ../shared/device/README.md):

    source .device/setup.sh && python3 benchmarks/gpu/run_gpu.py [--budget 340] [--only check,G1,C2,...]

Three child processes run in turn within the budget (default 340 s): ``check``, then every MLX
measurement, then every torch one. A crash, an out-of-memory or a time-out inside one measurement
loses only that measurement; the parent starts a new child for the rest.

1. ``check``: natten-mlx (every registered backend, each pure strategy) on the GPU against a dense
   masked float32 reference (``natten_mlx.geometry.dense_mask``) and against the pure
   backend on the CPU stream, for small 1D/2D/3D configs with stride, dilation, causal masks,
   even kernels, GQA, float16 and bfloat16; gradients too.
2. ``G1``-``G3``: the device README's large cases (float16, forward, head dim 128, batch 1):
   1D 32768 tokens window 2048 1 head; 2D 256x256 window 80x80 24 heads; 3D 30x48x80 window
   18x24x24 24 heads. Timed: natten-mlx's backends, MLX dense SDPA (no mask: the cost of
   attending to everything), MLX SDPA with the neighborhood mask where its dense scores fit.
   ``C1``-``C4``: the CPU suite's cases (float32, forward and forward+backward), same impls plus
   the pure backend's non-default strategies.
3. torch peers where importable: torch SDPA dense (cuDNN/flash), torch SDPA with the neighborhood
   mask where it fits, and NATTEN 0.21.7's ``flex-fna`` compiled (``torch_compile=True``; forward
   only, float16 only: NATTEN refuses compiled Flex in float32, and compiling FlexAttention's
   backward does not fit the budget). G3's compiled FlexAttention comes last: its compilation
   alone takes more than 100 s, so it needs ``--budget 480`` or so.

Every output is checked on sampled queries against a float64 reference built from the stride-1
clamp rule of SEMANTICS.md (``check`` column). The timing steps keep MLX's default of running
float32 matmuls as TF32 on NVIDIA GPUs (so float32 rows are checked at 3e-3); the ``check`` step
runs with ``MLX_ENABLE_TF32=0`` and checks float32 at 1e-4. Rows print as they arrive; a markdown
table closes the run and is also written to ``$OUT/gpu-results.md`` and ``$OUT/gpu-results.json``
when ``$OUT`` is set. Back on your machine, ``python3 benchmarks/gpu/run_gpu.py --record
PATH/gpu-results.json`` writes that run into ``benchmarks/RESULTS.md`` (between its GPU markers).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WINDOWS_PY = os.path.join(ROOT, "packages", "natten-mlx-core", "src", "natten_mlx", "windows.py")
TAG = "@@RESULT "
RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")
GPU_START, GPU_END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"

# name: (spatial, kernel_size, dilation, heads, head_dim, dtype, modes). C1-C4 mirror natten_mlx.cli.bench.CASES.
CASES = {
    "G1": ((32768,), (2048,), (1,), 1, 128, "float16", ("fwd",)),
    "G2": ((256, 256), (80, 80), (1, 1), 24, 128, "float16", ("fwd",)),
    "G3": ((30, 48, 80), (18, 24, 24), (1, 1, 1), 24, 128, "float16", ("fwd",)),
    "C1": ((4096,), (7,), (1,), 4, 32, "float32", ("fwd", "fwdbwd")),
    "C2": ((64, 64), (7, 7), (1, 1), 4, 32, "float32", ("fwd", "fwdbwd")),
    "C3": ((64, 64), (13, 13), (2, 2), 4, 32, "float32", ("fwd", "fwdbwd")),
    "C4": ((16, 32, 32), (3, 7, 7), (1, 1, 1), 4, 32, "float32", ("fwd", "fwdbwd")),
}
# README of ../shared/device (H100, 2026-11-26, fp16 forward, ms): cuDNN dense (torch), MLX dense SDPA,
# natten flex-fna compiled, NATTEN hopper-fna (published)
README_MS = {
    "G1": (0.862, 1.097, 7.75, 0.0948),
    "G2": (89.0, 90.0, 66.4, 16.2),
    "G3": (276.7, 274.2, 686.0, 79.0),
}
MLX_IMPLS = ("mlx-sdpa-dense", "natten-mlx", "mlx-sdpa-mask")  # natten-mlx expands to every backend
TORCH_IMPLS = ("torch-sdpa-dense", "torch-sdpa-mask", "natten-flex-compiled")
TIMING = dict(warmup=1, target_seconds=0.3, min_repeats=3, max_repeats=10)


def label(name: str) -> str:
    spatial, ks, dil, h, d, dtype, _ = CASES[name]
    text = f"na{len(spatial)}d {'x'.join(map(str, spatial))} K={'x'.join(map(str, ks))} H={h} D={d}"
    if any(x != 1 for x in dil):
        text += f" dil={'x'.join(map(str, dil))}"
    return f"{text} {dtype}"


def numpy_inputs(name: str, seed: int = 0):
    """q, k, v, cotangent as float32 NumPy arrays ``[1, *spatial, H, D]`` (as natten_mlx.cli.bench.make_inputs)."""
    import numpy as np

    spatial, _, _, h, d, _, _ = CASES[name]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, *spatial, h, d), dtype=np.float32) for _ in range(4)]


def sample_rows(n: int, count: int):
    import numpy as np

    rng = np.random.default_rng(1234)
    return np.unique(np.concatenate([np.arange(min(4, n)), np.arange(max(0, n - 4), n), rng.integers(0, n, count)]))


def neighbor_index(name: str, rows):
    """``[S, Kt]`` flat key indices of the flat query rows (stride 1, no causal: the clamp rule)."""
    import numpy as np

    spatial, ks, dil, *_ = CASES[name]
    coords = np.unravel_index(rows, spatial)
    flat = np.zeros((len(rows), 1), dtype=np.int64)
    for n, k, d, c in zip(spatial, ks, dil, coords, strict=True):
        g, cc = c % d, c // d
        group_len = (n - g + d - 1) // d
        start = np.clip(cc - k // 2, 0, group_len - k)
        nb = (start[:, None] + np.arange(k)[None, :]) * d + g[:, None]
        flat = (flat[:, :, None] * n + nb[:, None, :]).reshape(len(rows), -1)
    return flat


def sampled_error(name: str, out, q, k, v, take, rows) -> float:
    """Max abs error of ``out`` rows against float64 attention over each row's neighbourhood.

    ``take(x, index)`` returns ``x.reshape(1, N, H, D)[:, index]`` as a float64 NumPy array.
    Rows go in chunks so that the gathered keys stay small (the large cases have ~10^4 keys a query)."""
    import numpy as np

    spatial, ks, _, h, d, *_ = CASES[name]
    chunk = max(1, int(2e7 // (math.prod(ks) * h * d)))
    worst = 0.0
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        flat = neighbor_index(name, part)
        qs, ks_, vs = take(q, part), take(k, flat), take(v, flat)
        s = np.einsum("bshd,bskhd->bshk", qs, ks_) * d**-0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("bshk,bskhd->bshd", p, vs)
        worst = max(worst, float(np.max(np.abs(take(out, part) - ref))))
    return worst


def tolerance(dtype: str) -> float:
    """Forward tolerance against float64 in the timing steps. float32 allows for TF32: MLX runs float32
    matmuls (and SDPA) as TF32 on NVIDIA GPUs unless MLX_ENABLE_TF32=0 (the ``check`` step sets it)."""
    return 3e-3 if dtype == "float32" else 2e-2


def emit(**row) -> None:
    print(TAG + json.dumps(row), flush=True)


def timed(fn, sync):
    """Median / min ms over an adaptive number of calls after warm-up (natten_mlx.cli.bench's rule)."""
    import statistics

    for _ in range(TIMING["warmup"]):
        sync(fn())
    t = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t
    n = 1 if first >= TIMING["target_seconds"] else int(
        min(TIMING["max_repeats"], max(TIMING["min_repeats"], TIMING["target_seconds"] / max(first, 1e-6))))
    samples = [first]
    for _ in range(n - 1):
        t = time.perf_counter()
        sync(fn())
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3, min(samples) * 1e3, n


def _dense_fits(name: str, memory_bytes: float, elem_bytes: int, mode: str) -> str | None:
    spatial, _, _, h, *_ = CASES[name]
    n = math.prod(spatial)
    need = h * n * n * elem_bytes * (3 if mode == "fwd" else 7) + n * n
    if need > 0.5 * memory_bytes:
        return f"skipped: dense {h}x{n}^2 scores need ~{need / 2**30:.0f} GiB"
    return None


def _load_windows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nm_windows", WINDOWS_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ---- MLX child ---------------------------------------------------------------------------------------
def _registrar(known: set, distribution: str):
    """The ``register`` callback handed to a tier's hook: registers names not yet taken."""
    import natten_mlx

    def register(backend):
        if backend.name not in known:
            natten_mlx.register_backend(backend, plugin="run_gpu", distribution=distribution)
            known.add(backend.name)

    return register


def _register_source_tiers():
    """Register backends of tier packages that are on PYTHONPATH but not pip-installed (then their
    entry points do not exist): read each package's ``natten_mlx.backends`` entry point from its
    pyproject.toml and call the hook it names."""
    import glob
    import importlib

    import natten_mlx

    try:
        import tomllib
    except ImportError:
        return
    known = {b.name for b in natten_mlx.list_backends()}
    for pyproject in sorted(glob.glob(os.path.join(ROOT, "packages", "natten-mlx-*", "pyproject.toml"))):
        distribution = os.path.basename(os.path.dirname(pyproject))
        try:
            with open(pyproject, "rb") as fh:
                eps = tomllib.load(fh).get("project", {}).get("entry-points", {}).get("natten_mlx.backends", {})
            for target in eps.values():
                module, _, attr = target.partition(":")
                obj = importlib.import_module(module.strip())
                if attr:
                    obj = getattr(obj, attr.strip())
                hook = getattr(obj, "natten_mlx_register_backends", None)
                if hook is not None:
                    hook(register=_registrar(known, distribution))
        except Exception as exc:  # a tier that does not load is reported, not fatal
            print(f"note: could not register the backends of {distribution}: {type(exc).__name__}: {exc}", flush=True)


def _mlx_memory() -> float:
    import mlx.core as mx

    try:
        info = mx.device_info()
        for key in ("memory_size", "total_memory", "max_recommended_working_set_size"):
            if info.get(key):
                return float(info[key])
    except Exception:
        pass
    return 80 * 2**30


def mlx_check_child() -> None:
    """Small configs: every backend/strategy on the GPU vs a dense masked reference and vs CPU pure."""
    import mlx.core as mx
    import natten_mlx

    _register_source_tiers()
    print(f"mlx {mx.__version__} on {mx.default_device()}; backends: "
          f"{[(b.name, b.available()) for b in natten_mlx.list_backends()]}", flush=True)
    try:
        from natten_mlx.backends import pure
        strategies, env = pure.STRATEGIES, pure.STRATEGY_ENV
    except (ImportError, AttributeError):
        strategies, env = (), None
    configs = [  # (spatial, kernel, stride, dilation, causal, heads, kv_heads, dim, dtype)
        ((64,), 7, 1, 1, False, 4, 4, 32, "float32"),
        ((50,), 8, 3, 2, True, 4, 2, 16, "float32"),
        ((33,), 6, 6, 1, False, 2, 1, 64, "float16"),
        ((20, 24), (5, 7), (1, 2), (2, 1), (False, True), 4, 4, 32, "float32"),
        ((17, 19), 4, 2, 2, False, 4, 1, 32, "float16"),
        ((32, 32), 13, 1, 2, False, 2, 2, 128, "bfloat16"),
        ((6, 10, 12), (3, 5, 4), (1, 2, 3), (2, 1, 2), (True, False, False), 4, 2, 32, "float32"),
        ((8, 12, 12), (3, 7, 7), 1, 1, False, 2, 2, 64, "float16"),
    ]
    for i, config in enumerate(configs):
        _check_config(i, *config, strategies=strategies, env=env)


def _check_config(i, spatial, ks, st, dil, causal, h, hk, d, dt, strategies, env) -> None:
    """One correctness config: every backend (and pure strategy) vs the dense reference and CPU pure."""
    import mlx.core as mx
    import natten_mlx
    import numpy as np
    from natten_mlx.geometry import dense_mask

    dtypes = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
    n_dim = len(spatial)
    tup = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * n_dim  # noqa: E731
    ks, st, dil, causal = tup(ks), tup(st), tup(dil), tup(causal)
    name = f"check{i} na{n_dim}d {'x'.join(map(str, spatial))} K={ks} s={st} d={dil} causal={causal} H={h}/{hk} {dt}"
    rng = np.random.default_rng(i)
    q = mx.array(rng.standard_normal((1, *spatial, h, d), dtype=np.float32)).astype(dtypes[dt])
    k = mx.array(rng.standard_normal((1, *spatial, hk, d), dtype=np.float32)).astype(dtypes[dt])
    v = mx.array(rng.standard_normal((1, *spatial, hk, d), dtype=np.float32)).astype(dtypes[dt])
    cot = mx.array(rng.standard_normal((1, *spatial, h, d), dtype=np.float32)).astype(dtypes[dt])
    n = math.prod(spatial)
    mask = mx.array(dense_mask((spatial, ks, st, dil, causal)))

    def dense(q, k, v):
        qf = q.astype(mx.float32).reshape(1, n, hk, h // hk, d)
        kf, vf = k.astype(mx.float32).reshape(1, n, hk, d), v.astype(mx.float32).reshape(1, n, hk, d)
        s = mx.einsum("bnhgd,bmhd->bhgnm", qf, kf) * d**-0.5
        s = mx.where(mask, s, -mx.inf)
        o = mx.einsum("bhgnm,bmhd->bnhgd", mx.softmax(s, axis=-1), vf)
        return o.reshape(1, *spatial, h, d)

    (ref,), ref_grads = mx.vjp(dense, [q, k, v], [cot.astype(mx.float32)])
    op = getattr(natten_mlx, f"na{n_dim}d")
    with mx.stream(mx.cpu):
        cpu_out = op(q, k, v, ks, stride=st, dilation=dil, is_causal=causal, backend="pure")
        mx.eval(cpu_out)
    variants = [(b.name, None) for b in natten_mlx.list_backends()]
    if env:
        from natten_mlx.backends import pure

        variants += [("pure", s) for s in strategies if s != pure.default_strategy()]
    for backend, strategy in variants:
        impl = backend if strategy is None else f"{backend}[{strategy}]"
        t0 = time.perf_counter()
        try:
            if strategy is not None:
                os.environ[env] = strategy
            why = natten_mlx.explain(f"na{n_dim}d", q, k, v, kernel_size=ks, stride=st, dilation=dil,
                                     is_causal=causal, backend=backend).reasons.get(backend)
            if why is not None:
                emit(case=name, impl=impl, mode="check", note=f"not supported: {why}")
                continue
            f = functools.partial(op, kernel_size=ks, stride=st, dilation=dil, is_causal=causal, backend=backend)
            (out,), grads = mx.vjp(f, [q, k, v], [cot])
            mx.eval(out, grads)
            err = mx.abs(out.astype(mx.float32) - ref).max().item()
            err_cpu = mx.abs(out.astype(mx.float32) - cpu_out.astype(mx.float32)).max().item()
            gerr = max(mx.abs(g.astype(mx.float32) - r).max().item() / max(1.0, mx.abs(r).max().item())
                       for g, r in zip(grads, ref_grads, strict=True))
            ok = err <= tol[dt] and err_cpu <= tol[dt] and gerr <= 10 * tol[dt]
            emit(case=name, impl=impl, mode="check", check=ok, max_err=err,
                 note=f"vs CPU pure {err_cpu:.1e}; grads (rel) {gerr:.1e}; {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            emit(case=name, impl=impl, mode="check", check=False, note=f"error: {type(exc).__name__}: {exc}"[:300])
        finally:
            if strategy is not None:
                os.environ.pop(env, None)


def _mlx_call(f, mode, q, k, v, cot):
    import mlx.core as mx

    return (lambda: f(q, k, v)) if mode == "fwd" else (lambda: mx.vjp(f, [q, k, v], [cot]))


def _torch_call(f, mode, q, k, v, cot):
    import torch

    def fwd():
        with torch.no_grad():
            return f(q, k, v)

    def fwdbwd():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        return torch.autograd.grad(f(*leaves), leaves, cot)

    return fwd if mode == "fwd" else fwdbwd


def mlx_case_child(name: str, impls: list[str]) -> None:
    import mlx.core as mx
    import natten_mlx
    import numpy as np
    from natten_mlx.geometry import dense_mask

    _register_source_tiers()
    spatial, ks, dil, h, d, dt, modes = CASES[name]
    dtype = {"float32": mx.float32, "float16": mx.float16}[dt]
    elem = 4 if dt == "float32" else 2
    n = math.prod(spatial)
    q, k, v, cot = (mx.array(a).astype(dtype) for a in numpy_inputs(name))
    mx.eval(q, k, v, cot)
    memory = _mlx_memory()
    rows_idx = sample_rows(n, 64 if n * math.prod(ks) < 10**8 else 8)

    def take(x, index):
        flat = mx.array(np.asarray(index).reshape(-1).astype(np.int32))
        got = mx.take(x.reshape(1, n, h, -1), flat, axis=1).astype(mx.float32)
        return np.asarray(got, dtype=np.float64).reshape(1, *np.shape(index), h, -1)

    t = lambda x: x.reshape(1, n, h, -1).transpose(0, 2, 1, 3)  # noqa: E731
    back = lambda o: o.transpose(0, 2, 1, 3).reshape(1, *spatial, h, -1)  # noqa: E731
    try:
        from natten_mlx.backends import pure
        strategies, env, default = pure.STRATEGIES, pure.STRATEGY_ENV, pure.default_strategy()
    except (ImportError, AttributeError):
        strategies, env, default = (), None, None

    def sdpa(q, k, v, mask=None):
        return back(mx.fast.scaled_dot_product_attention(t(q), t(k), t(v), scale=d**-0.5, mask=mask))

    def sdpa_with_mask():
        mask = mx.array(dense_mask((spatial, ks, (1,) * len(spatial), dil, (False,) * len(spatial))))
        return functools.partial(sdpa, mask=mask)

    plan = []  # (impl name, build -> f, env vars, skip reason per mode)
    for impl in impls:
        if impl == "mlx-sdpa-dense":
            plan.append((impl, lambda: sdpa, {}, lambda m: None))
        elif impl == "mlx-sdpa-mask":
            plan.append((impl, sdpa_with_mask, {}, lambda m: _dense_fits(name, memory, elem, m)))
        elif impl.startswith("natten-mlx"):
            excluded = set(impl.split("~")[1:])  # variants already measured (or crashed) by an earlier child
            op = getattr(natten_mlx, f"na{len(spatial)}d")
            for b in natten_mlx.list_backends():
                variants = [(b.name, None)]
                if b.name == "pure" and env and not name.startswith("G"):
                    variants += [(f"pure[{s}]", s) for s in strategies if s != default]
                for vname, strategy in variants:
                    if vname in excluded:
                        continue
                    why = natten_mlx.explain(f"na{len(spatial)}d", q, k, v, kernel_size=ks, dilation=dil,
                                             backend=b.name).reasons.get(b.name)
                    plan.append((vname, functools.partial(functools.partial, op, kernel_size=ks, dilation=dil,
                                                          backend=b.name),
                                 {env: strategy} if strategy else {},
                                 lambda m, why=why: None if why is None else f"not supported: {why}"))
    for impl, build, env_vars, skip in plan:
        for mode in modes:
            print(f"@@START {name}:{impl} {mode}", flush=True)
            row = dict(case=name, impl=impl, mode=mode)
            try:
                why = skip(mode)
                if why:
                    row["note"] = why
                    emit(**row)
                    continue
                os.environ.update(env_vars)
                call = _mlx_call(build(), mode, q, k, v, cot)
                if mode == "fwd":
                    out = call()
                    mx.eval(out)
                    if impl != "mlx-sdpa-dense":  # dense attention is another function: nothing to check
                        row["max_err"] = sampled_error(name, out, q, k, v, take, rows_idx)
                        row["check"] = row["max_err"] <= tolerance(dt)
                    del out
                median, low, reps = timed(call, mx.eval)
                emit(**row, median_ms=median, min_ms=low, repeats=reps,
                     peak_gib=round(mx.get_peak_memory() / 2**30, 2))
            except Exception as exc:
                row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
                emit(**row)
            finally:
                for key in env_vars:
                    os.environ.pop(key, None)
                mx.clear_cache()
                mx.reset_peak_memory()


# ---- torch child -------------------------------------------------------------------------------------
def torch_case_child(name: str, impls: list[str]) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    spatial, ks, dil, h, d, dt, modes = CASES[name]
    dtype = {"float32": torch.float32, "float16": torch.float16}[dt]
    elem = 4 if dt == "float32" else 2
    n = math.prod(spatial)
    cuda = torch.cuda.is_available()  # the CPU fallback only serves trying the script without a GPU
    dev = torch.device("cuda" if cuda else "cpu")
    q, k, v, cot = (torch.from_numpy(a).to(dev, dtype) for a in numpy_inputs(name))
    memory = torch.cuda.get_device_properties(0).total_memory if cuda else 16 * 2**30
    rows_idx = sample_rows(n, 64 if n * math.prod(ks) < 10**8 else 8)

    def take(x, index):
        flat = torch.from_numpy(np.asarray(index).reshape(-1)).to(dev)
        got = x.reshape(1, n, h, -1).index_select(1, flat).float().cpu().numpy().astype(np.float64)
        return got.reshape(1, *np.shape(index), h, -1)

    t = lambda x: x.reshape(1, n, h, -1).transpose(1, 2)  # noqa: E731
    back = lambda o: o.transpose(1, 2).reshape(1, *spatial, h, -1)  # noqa: E731
    sync = lambda _: torch.cuda.synchronize() if cuda else None  # noqa: E731

    def sdpa(q, k, v, mask=None):
        return back(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=d**-0.5))

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if cuda else 'cpu'}", flush=True)
    for impl in impls:
        for mode in modes:
            print(f"@@START {name}:{impl} {mode}", flush=True)
            row = dict(case=name, impl=impl, mode=mode)
            try:
                if impl == "torch-sdpa-dense":
                    f = sdpa
                elif impl == "torch-sdpa-mask":
                    why = _dense_fits(name, memory, elem, mode)
                    if why:
                        row["note"] = why
                        emit(**row)
                        continue
                    w = _load_windows()
                    mask = torch.from_numpy(w.neighborhood_mask(spatial, ks, (1,) * len(spatial), dil,
                                                                (False,) * len(spatial))).to(dev)
                    f = functools.partial(sdpa, mask=mask)
                elif mode != "fwd":
                    row["note"] = "not timed: compiling FlexAttention's backward does not fit the time budget"
                    emit(**row)
                    continue
                else:
                    import natten

                    natten.allow_flex_compile(True)
                    op = getattr(natten, f"na{len(spatial)}d")
                    f = functools.partial(op, kernel_size=ks, dilation=dil, backend="flex-fna", torch_compile=True)
                    row["note"] = f"natten {natten.__version__} flex-fna, torch.compile"
                call = _torch_call(f, mode, q, k, v, cot)
                if mode == "fwd":
                    out = call()
                    sync(out)
                    if impl != "torch-sdpa-dense":
                        row["max_err"] = sampled_error(name, out, q, k, v, take, rows_idx)
                        row["check"] = row["max_err"] <= tolerance(dt)
                    del out
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                median, low, reps = timed(call, sync)
                emit(**row, median_ms=median, min_ms=low, repeats=reps,
                     peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
            except Exception as exc:
                row["note"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:240]
                emit(**row)
            finally:
                if cuda:
                    torch.cuda.empty_cache()


# ---- parent ------------------------------------------------------------------------------------------
def items_child(kind: str, items: list[str]) -> None:
    """Run ``CASE:IMPL`` items in order, one case's inputs at a time."""
    groups: list[tuple[str, list[str]]] = []
    for item in items:
        case, impl = item.split(":", 1)
        if groups and groups[-1][0] == case:
            groups[-1][1].append(impl)
        else:
            groups.append((case, [impl]))
    for case, impls in groups:
        (mlx_case_child if kind == "mlx" else torch_case_child)(case, impls)


def run_child(args: list[str], budget_end: float, item_cap, on_row, env: dict | None = None):
    """Run ``run_gpu.py --child ...`` and feed its result rows to ``on_row``.

    Each measurement (announced by an ``@@START CASE:IMPL MODE`` line) may take ``item_cap(item)``
    seconds, and everything must end by ``budget_end``. Returns (status, item in flight or None)."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                            env={**os.environ, **(env or {})})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    deadline = min(budget_end, time.monotonic() + item_cap(None))
    current, tail = None, []
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout", current
        if line is None:
            break
        if line.startswith(TAG):
            on_row(json.loads(line[len(TAG):]))
            current = None
        elif line.startswith("@@START "):
            current = line.split(" ", 1)[1].strip()
            deadline = min(budget_end, time.monotonic() + item_cap(current.split(" ")[0]))
        else:
            tail = (tail + [line.rstrip()])[-8:]
            if line.startswith(("note:", "mlx ", "torch ")):
                print("   ", line.rstrip(), flush=True)
    rc = proc.wait()
    if rc != 0:
        print("    child exited with", rc, "; last output:", *tail, sep="\n      ", flush=True)
        return f"exit {rc}", current
    return "ok", None


HEAD = ["case", "problem", "mode", "impl", "median ms", "min ms", "runs", "check", "peak GiB", "note"]


def fmt(row: dict) -> str:
    ms = lambda x: "-" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")  # noqa: E731
    check = {True: "ok", False: "FAIL", None: "-"}[row.get("check")]
    if row.get("max_err") is not None:
        check += f" ({row['max_err']:.1e})"
    problem = label(row["case"]) if row["case"] in CASES else ""
    case = row["case"].split(" ", 1)[0]
    if not problem and " " in row["case"]:
        problem = row["case"].split(" ", 1)[1]
    cells = [case, problem, row["mode"], row["impl"], ms(row.get("median_ms")), ms(row.get("min_ms")),
             str(row.get("repeats") or "-"), check, str(row.get("peak_gib") or "-"), row.get("note") or ""]
    return "| " + " | ".join(cells) + " |"


def summary(rows: list[dict]) -> str:
    """Per case and mode: natten-mlx's fastest backend against each baseline."""
    lines = ["| case | mode | natten-mlx best (ms) | mlx-sdpa-dense | mlx-sdpa-mask | torch-sdpa-dense | torch-sdpa-mask "
             "| natten-flex-compiled | README (cuDNN / MLX dense / flex / hopper-fna) |", "|" + "---|" * 9]
    for case in CASES:
        for mode in ("fwd", "fwdbwd"):
            got = {r["impl"]: r for r in rows if r["case"] == case and r["mode"] == mode and r.get("median_ms")}
            if not got:
                continue
            ours = {k: r for k, r in got.items() if not k.startswith(("mlx-sdpa", "torch-", "natten-flex"))}
            best = min(ours.items(), key=lambda kv: kv[1]["median_ms"]) if ours else None
            cell = f"{best[1]['median_ms']:.3g} ({best[0]})" if best else "-"
            others = []
            for impl in ("mlx-sdpa-dense", "mlx-sdpa-mask", "torch-sdpa-dense", "torch-sdpa-mask", "natten-flex-compiled"):
                r = got.get(impl)
                if r and best:
                    others.append(f"{r['median_ms']:.3g} ({r['median_ms'] / best[1]['median_ms']:.2f}x)")
                else:
                    others.append(f"{r['median_ms']:.3g}" if r else "-")
            readme = " / ".join(f"{x:g}" for x in README_MS[case]) if case in README_MS and mode == "fwd" else ""
            lines.append(f"| {case} | {mode} | {cell} | " + " | ".join(others) + f" | {readme} |")
    return "\n".join(lines)


def _item_cap(item: str | None) -> float:
    """Seconds one measurement may take (process start-up counts against the first)."""
    if item is None:
        return 90.0
    case, impl = item.split(":", 1)
    if impl == "natten-flex-compiled":  # torch.compile of FlexAttention
        return 150.0 if case.startswith("G") else 50.0
    return 90.0 if case.startswith("G") else 30.0


def plan_jobs(only: set | None, torch_too: bool) -> list[tuple[str, list[str]]]:
    """(kind, items) in the order they run: correctness, every MLX case, then torch, whose slow
    compiles go last (G3's compiled FlexAttention last of all)."""
    keep = lambda c: not only or c in only  # noqa: E731
    jobs = []
    if not only or "check" in only:
        jobs.append(("check", []))
    jobs.append(("mlx", [f"{c}:{i}" for c in CASES if keep(c) for i in MLX_IMPLS]))
    if torch_too:
        first = [f"{c}:{i}" for c in ("G1", "G2") if keep(c) for i in TORCH_IMPLS]
        # NATTEN refuses compiled FlexAttention for the float32 cases: no flex items for them
        small = [f"{c}:{i}" for c in CASES if c.startswith("C") and keep(c) for i in TORCH_IMPLS[:2]]
        last = [f"G3:{i}" for i in TORCH_IMPLS if keep("G3")]
        jobs.append(("torch", first + small + last))
    return [(k, items) for k, items in jobs if k == "check" or items]


def _remaining(pending: list[str], rows: list[dict], failed: str | None) -> list[str]:
    """Items still to run after a child died: those not reported and not the one that failed.
    ``CASE:natten-mlx`` (expanded by the child into every backend variant) is kept, excluding the
    variants already reported or failed, as ``CASE:natten-mlx~pure~pure[tiled]``."""
    reported = {f"{r['case']}:{r['impl']}" for r in rows} | ({failed} if failed else set())
    out = []
    for item in pending:
        case, impl = item.split(":", 1)
        if impl.startswith("natten-mlx"):
            done = set(impl.split("~")[1:]) | {
                x.split(":", 1)[1] for x in reported
                if x.startswith(case + ":") and not x.split(":", 1)[1].startswith(("mlx-sdpa", "torch-", "natten-flex"))}
            out.append(":".join([case, "~".join(["natten-mlx", *sorted(done)])]))
        elif item not in reported:
            out.append(item)
    return out


def machine_info() -> dict:
    """Date, GPU and package versions, without importing the frameworks into the parent."""
    import datetime
    from importlib import metadata

    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["gpu"] = out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = "unknown (no nvidia-smi)"
    versions = {}
    for dist in ("mlx", "mlx-cuda-13", "torch", "natten", "natten-mlx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def record(path: str, results_md: str) -> None:
    """Write a run's ``gpu-results.json`` into RESULTS.md between the GPU markers."""
    with open(path) as fh:
        data = json.load(fh)
    info = data.get("info", {})
    rows = data["rows"]
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()) or "not recorded"
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)] + [fmt(r) for r in rows])
    section = "\n".join([
        GPU_START,
        f"## GPU ({info.get('gpu', 'not recorded')})",
        "",
        f"- date: {info.get('date', 'not recorded')}; command: `source .device/setup.sh && python3 "
        f"benchmarks/gpu/run_gpu.py` ({data.get('elapsed_s', 0):.0f} s)",
        f"- versions: {versions}",
        "- G1-G3: the device README's large cases (float16, forward, batch 1, head dim 128); C1-C4: the CPU "
        "suite's cases (float32; MLX runs float32 matmuls as TF32 on NVIDIA GPUs by default, so their "
        "checks allow 3e-3). `check`: sampled queries against a float64 reference.",
        "- the last column repeats the device README's H100 figures (ms) for scale: cuDNN dense (torch) / "
        "MLX dense SDPA / natten flex-fna compiled / NATTEN hopper-fna (published)",
        "",
        "Summary (in brackets: baseline time / natten-mlx's best):",
        "",
        summary(rows),
        "",
        "<details><summary>All rows (the check rows: every backend on small configs against a dense masked "
        "reference with MLX_ENABLE_TF32=0)</summary>",
        "",
        table,
        "",
        "</details>",
        GPU_END,
    ])
    text = open(results_md).read() if os.path.exists(results_md) else "# natten-mlx benchmark results\n"
    if GPU_START in text and GPU_END in text:
        text = text[: text.index(GPU_START)] + section + text[text.index(GPU_END) + len(GPU_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(results_md, "w") as fh:
        fh.write(text)
    print(f"wrote the GPU section of {results_md}")


def parent(args) -> int:
    info = machine_info()
    print(f"{info}", flush=True)
    t_start = time.monotonic()
    budget_end = t_start + args.budget
    only = set(x.strip() for x in args.only.split(",")) if args.only else None
    rows: list[dict] = []
    print("| " + " | ".join(HEAD) + " |\n|" + "---|" * len(HEAD), flush=True)

    def on_row(row):
        rows.append(row)
        print(fmt(row), flush=True)

    for kind, items in plan_jobs(only, not args.no_torch):
        pending = items[:]
        for _attempt in range(6):
            if budget_end - time.monotonic() < 10:
                for item in pending or ["check:*"]:
                    case, impl = item.split(":", 1)
                    on_row(dict(case=case, impl=impl.split("~")[0], mode="-", note="skipped: out of the time budget"))
                break
            t_job, before = time.monotonic(), len(rows)
            # the correctness step runs float32 matmuls in full precision; the timings use MLX's default (TF32)
            env = {"MLX_ENABLE_TF32": "0"} if kind == "check" else None
            child_args = [kind] + ([",".join(pending)] if pending else [])
            status, current = run_child(child_args, budget_end, _item_cap if kind != "check" else lambda _: 90.0,
                                        on_row, env)
            print(f"    [{kind}: {status} after {time.monotonic() - t_job:.0f} s; "
                  f"{time.monotonic() - t_start:.0f} of {args.budget:.0f} s used]", flush=True)
            if status == "ok" or not pending:
                if status != "ok":
                    on_row(dict(case=kind, impl="*", mode="-", note=f"child {status}"))
                break
            item, _, mode = (current or "?:? -").partition(" ")
            case, impl = item.split(":", 1) if ":" in item else ("?", item)
            on_row(dict(case=case, impl=impl, mode=mode or "-", note=f"child {status} during this measurement"))
            pending = _remaining(pending, rows[before:], item)
            if not pending:
                break
    elapsed = time.monotonic() - t_start
    table = "\n".join(["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)] + [fmt(r) for r in rows])
    text = (f"## GPU results ({elapsed:.0f} s)\n\n### Summary (ratios: baseline time / natten-mlx best)\n\n"
            f"{summary(rows)}\n\n### All rows\n\n{table}\n")
    print("\n" + text, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir and os.path.isdir(out_dir):
        with open(os.path.join(out_dir, "gpu-results.md"), "w") as fh:
            fh.write(text)
        with open(os.path.join(out_dir, "gpu-results.json"), "w") as fh:
            json.dump(dict(info=info, elapsed_s=elapsed, rows=rows), fh, indent=1)
    return 1 if any(r.get("check") is False for r in rows) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=340.0, help="total seconds (default 340)")
    p.add_argument("--only", default=None, help="comma-separated subset of: check," + ",".join(CASES))
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--record", metavar="JSON", help="(on your machine) write a run's gpu-results.json into "
                   "benchmarks/RESULTS.md, then exit")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.record:
        record(args.record, RESULTS_MD)
        return 0
    if args.child:
        kind, *rest = args.child
        if kind == "check":
            mlx_check_child()
        else:
            items_child(kind, rest[0].split(","))
        return 0
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
