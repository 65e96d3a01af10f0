"""Shared helpers of the cuda tier's tests: problems without the core's validation layer (so the
sub-domain fields of protocol v2 can be set), oracle references, error measures."""

from __future__ import annotations

import types

import numpy as np
import oracle

TOL = {"float32": 2e-5, "float16": 6e-3, "bfloat16": 4e-2}  # relative Frobenius error vs float64

CPU_CHECKS_ENV = "NATTEN_MLX_CUDA_CPU_CHECKS"


def skip_cpu_check_on_gpu() -> str | None:
    """The emulator and nvcc checks stand in for a GPU where there is none; on a machine with MLX's
    CUDA backend test_gpu.py runs the kernels themselves, and these would only spend (scarce)
    device-machine time. Set NATTEN_MLX_CUDA_CPU_CHECKS=1 to run them there anyway."""
    import os

    if os.environ.get(CPU_CHECKS_ENV) == "1":
        return None
    try:
        import mlx.core as mx

        if hasattr(mx, "cuda") and mx.cuda.is_available():
            return f"a CUDA GPU is present: test_gpu.py runs the kernels (set {CPU_CHECKS_ENV}=1 to run this CPU check)"
    except ImportError:
        pass
    return None


def require_emulator() -> None:
    """Skip the calling test module (at import) unless the CPU emulator can run here: MLX importable,
    g++ on PATH, and no CUDA GPU (there test_gpu.py runs the kernels themselves)."""
    import shutil

    import pytest

    pytest.importorskip("mlx.core")
    if shutil.which("g++") is None:
        pytest.skip("no g++ for the CUDA emulator", allow_module_level=True)
    why = skip_cpu_check_on_gpu()
    if why:
        pytest.skip(why, allow_module_level=True)


def make_problem(cfg, dtype, *, domain=None, query_offset=None, kv_spatial=None, kv_offset=None, device="gpu"):
    import mlx.core as mx

    n = cfg["na_dim"]
    shape = tuple(cfg["shape"])
    return types.SimpleNamespace(
        op="fused", batch=cfg["B"], spatial=shape, heads=cfg["H"], kv_heads=cfg["Hkv"], head_dim=cfg["D"],
        value_head_dim=cfg["Dv"], kernel_size=tuple(cfg["K"]), stride=tuple(cfg["s"]), dilation=tuple(cfg["d"]),
        is_causal=tuple(bool(c) for c in cfg["c"]), scale=cfg["scale"] if cfg["scale"] is not None else cfg["D"] ** -0.5,
        dtype=getattr(mx, dtype), num_extra=cfg["E"], has_rpb=bool(cfg["rpb"]), return_lse=True, device=device,
        domain=domain or shape, query_offset=query_offset or (0,) * n, kv_spatial=kv_spatial or shape,
        kv_offset=kv_offset or (0,) * n,
    )


def record(problem, inputs, out, lse, d_out, d_lse):
    try:
        from natten_mlx.protocol import BackwardRecord

        return BackwardRecord(problem=problem, inputs=inputs, out=out, lse=lse, d_out=d_out, d_lse=d_lse)
    except (ImportError, TypeError):
        return types.SimpleNamespace(problem=problem, inputs=inputs, out=out, lse=lse, d_out=d_out, d_lse=d_lse)


def rel_err(x, ref) -> float:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))


def to_mx(x, dtype):
    import mlx.core as mx

    return None if x is None else mx.array(np.asarray(x, dtype=np.float32)).astype(getattr(mx, dtype))


def to_np(x):
    import mlx.core as mx

    return None if x is None else np.array(x.astype(mx.float32)).astype(np.float64)


def run_and_compare(backend, cfg, dtype, rng, *, check_backward=True):
    """Forward (+ backward) of ``backend`` on cfg against the float64 oracle; returns {name: rel err}."""
    from configs import random_tensors

    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    arrays = {n: to_mx(x, dtype) for n, x in zip(("query", "key", "value", "additional_keys", "additional_values", "rpb"), (q, k, v, ak, av, rpb))}
    # the oracle sees exactly the rounded inputs
    q, k, v, ak, av, rpb = (to_np(arrays[n]) for n in ("query", "key", "value", "additional_keys", "additional_values", "rpb"))
    p = make_problem(cfg, dtype)
    kw = dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=p.scale,
              additional_keys=ak, additional_values=av, rpb=rpb)
    ref_o, ref_l = oracle.na_forward(q, k, v, **kw)
    out, lse = backend.fused_forward(p, arrays["query"], arrays["key"], arrays["value"], arrays["additional_keys"],
                                     arrays["additional_values"], arrays["rpb"])
    errs = {"out": rel_err(to_np(out), ref_o), "lse": rel_err(to_np(lse), ref_l)}
    assert out.dtype == p.dtype and tuple(out.shape) == ref_o.shape
    if not check_backward:
        return errs
    dout = rng.standard_normal(ref_o.shape)
    dlse = rng.standard_normal(ref_l.shape) if rng.random() < 0.5 else None
    d_out = to_mx(dout, dtype)
    dout = to_np(d_out)
    ref_g = oracle.na_backward(q, k, v, dout=dout, dlse=dlse, **kw)
    rec = record(p, arrays, out, lse, d_out, to_mx(dlse, "float32"))
    grads = backend.fused_backward(rec)
    names = {"q": "query", "k": "key", "v": "value", "additional_keys": "additional_keys",
             "additional_values": "additional_values", "rpb": "rpb"}
    for rk, name in names.items():
        if rk in ref_g:
            g = grads[name]
            assert g.dtype == arrays[name].dtype and tuple(g.shape) == tuple(arrays[name].shape), name
            errs["d_" + name] = rel_err(to_np(g), ref_g[rk])
    return errs
