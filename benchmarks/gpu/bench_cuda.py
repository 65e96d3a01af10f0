#!/usr/bin/env python3
# ruff: noqa: B023  (the timed closures are called within the loop iteration that defines them)
"""natten-mlx's cuda backend against dense attention and NATTEN on the lent GPU (float16).

Run from the repository root on the GPU machine:

    source .device/setup.sh && python3 benchmarks/gpu/bench_cuda.py [--cases G1,G2,G3,G4] [--modes fwd,fwdbwd]
        [--impls cuda,mlx-dense,torch-dense,natten-flex] [--flex-bwd] [--rpb]

Impls: ``cuda`` (options as ``cuda:ldmatrix=0``, ``cuda:tile=2x4x8`` or ``cuda:size=128``: the default
forward tile of that many queries, ``cuda:mt=2``: m-tiles per warp, ``cuda:minb=3``: resident blocks per SM, ``cuda:splits=3``: blocks per query tile's walk,
``cuda:wgmma=0``: the forward's products by mma.sync instead of warpgroup MMA, ``cuda:compiled=1``: the forward
inside ``mx.compile``, which replays the kernel launches without the backend's Python; forward rows only), ``cuda-parts`` (the backward's
dq and dk/dv kernels timed alone; TFLOP/s of their GEMMs: 3 and 4 of the forward's 2), ``mlx-dense``,
``torch-dense``, ``natten-flex``. ``--rpb``: the cuda rows with a relative positional bias (random, float16;
the G cases have none; rows tagged ``+rpb``, the forward's check adds the bias).

Cases (batch, spatial, window, heads, head dim): G1 1D 32768 window 2048, 1 head, D=128; G2 2D 256x256
window 80x80, 24 heads, D=128; G3 3D 30x48x80 window 18x24x24, 24 heads, D=128; G4 2D 56x56 window
7x7, 4 heads, D=32, batch 64; S1 (1D 8192 window 2048, one head: the forward splits its walks) and D1
(1D 32768 window 32768: dense attention on these kernels) are not the issue's. One child process per (case, library) so that an out-of-memory or a
crash loses only that child's rows. Times are per call: median over 5 groups of calls, each group
queued back to back and synchronised once (so launch gaps are hidden as in a model), after warm-up.
TFLOP/s counts useful neighborhood FLOPs (4 B N H K D forward; 3.5x that forward+backward) for
every row, dense ones included. The natten-mlx forward is checked on sampled rows against float64.
Writes $OUT/bench-cuda.json and $OUT/bench-cuda.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TAG = "@@ROW "
CASES = {
    "G1": (1, (32768,), (2048,), 1, 128),
    "G2": (1, (256, 256), (80, 80), 24, 128),
    "G3": (1, (30, 48, 80), (18, 24, 24), 24, 128),
    "G4": (64, (56, 56), (7, 7), 4, 32),
    # not the issue's: S1 a grid that fills a quarter of the H200's block slots (the forward splits its walks),
    # D1 G1's sequence with a window of all of it (dense attention on this tier's kernels, against MLX's SDPA)
    "S1": (1, (8192,), (2048,), 1, 128),
    "D1": (1, (32768,), (32768,), 1, 128),
    # W2: a 1D stand-in of G2's per-query work (6400 keys, 24 heads) for the warpgroup probe (wgmma_attn.py)
    "W2": (1, (65536,), (6400,), 24, 128),
}


def flops(case: str, mode: str) -> float:
    b, spatial, ks, h, d = CASES[case]
    f = 4.0 * b * math.prod(spatial) * h * math.prod(ks) * d
    return f if mode == "fwd" else 3.5 * f


def emit(**row):
    print(TAG + json.dumps(row), flush=True)


def timed(fn, sync, target=0.4):
    """ms per call: median of 5 groups of back-to-back calls (group size from one timed call)."""
    sync(fn())
    sync(fn())
    t = time.perf_counter()
    sync(fn())
    one = time.perf_counter() - t
    group = max(1, min(50, int(target / 5 / max(one, 1e-6))))
    samples = []
    for _ in range(5 if one < 2 else 1):
        t = time.perf_counter()
        outs = [fn() for _ in range(group)]
        sync(outs)
        samples.append((time.perf_counter() - t) / group)
        del outs
    return statistics.median(samples) * 1e3, group


# ---- MLX child -----------------------------------------------------------------------------------
def case_inputs(b, spatial, ks, h, d):
    """A G case as the core's fused Problem (what a call through natten_mlx gives the backend) and
    evaluated float16 inputs: (problem, q, k, v, d_out)."""
    import mlx.core as mx
    from natten_mlx.problem import Problem

    r = len(spatial)
    keys = mx.random.split(mx.random.key(1), 4)
    q, k, v, do = (mx.random.normal((b, *spatial, h, d), key=x).astype(mx.float16) for x in keys)
    mx.eval(q, k, v, do)
    p = Problem(
        op="fused", batch=b, spatial=spatial, heads=h, kv_heads=h, head_dim=d, value_head_dim=d, kernel_size=ks,
        stride=(1,) * r, dilation=(1,) * r, is_causal=(False,) * r, scale=d**-0.5, dtype=mx.float16, num_extra=0,
        has_rpb=False, return_lse=False, device="gpu", domain=spatial, query_offset=(0,) * r, kv_spatial=spatial,
        kv_offset=(0,) * r,
    )
    return p, q, k, v, do


def mlx_child(case: str, impls: list, modes: list, with_rpb: bool = False) -> None:
    import mlx.core as mx
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "packages", "natten-mlx-cuda", "src"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle
    from natten_mlx_cuda.backend import CudaBackend

    b, spatial, ks, h, d = CASES[case]
    n = math.prod(spatial)
    p, q, k, v, do = case_inputs(b, spatial, ks, h, d)
    rpb = None
    if with_rpb:
        p.has_rpb = True
        rpb = (0.5 * mx.random.normal((h, *(2 * x - 1 for x in ks)), key=mx.random.key(7))).astype(mx.float16)
        mx.eval(rpb)
    sync = mx.eval
    print(f"mlx {mx.__version__} {mx.cuda.is_available()}", flush=True)
    for impl in impls:
        for mode in modes:
            row = dict(case=case, impl=impl + ("+rpb" if with_rpb and impl.startswith("cuda") else ""), mode=mode)
            try:
                if impl == "cuda" or impl.startswith("cuda:"):
                    # cuda[:option=value[:...]], e.g. cuda:ldmatrix=0 or cuda:tile=2x4x8
                    opts = {}
                    compiled = False
                    from natten_mlx_cuda import backend as cuda_backend
                    from natten_mlx_cuda import source as cuda_source

                    cuda_backend.HOST_PAD = 4  # hostpad=1: the scale in MLX's managed small-size pool, as before
                    cuda_source.COMPACT = True  # compact=0: the sources with their comments, as before
                    for kv in impl.split(":")[1:]:
                        name, val = kv.split("=")
                        if name == "hostpad":
                            cuda_backend.HOST_PAD = int(val)
                            continue
                        if name == "compact":
                            cuda_source.COMPACT = val != "0"
                            continue
                        if name == "size":  # the default forward tile of this many queries (64 or 128)
                            from natten_mlx_cuda import plan

                            opts["tile"] = plan.default_tile(plan.geometry(p), int(val))[3 - len(spatial):]
                        elif name == "mt":
                            opts["m_tiles"] = int(val)
                        elif name == "stages":
                            opts["stages"] = int(val)
                        elif name == "minb":
                            opts["min_blocks"] = int(val)
                        elif name == "splits":
                            opts["splits"] = int(val)
                        elif name == "wgmma":
                            opts["wgmma"] = val != "0"
                        elif name == "compiled":  # the forward inside mx.compile: replays without Python
                            compiled = val != "0"
                        else:
                            opts[name] = (val != "0") if name == "ldmatrix" else tuple(int(x) for x in val.split("x"))
                    for cached in (cuda_backend._scale, cuda_backend._kernel, cuda_source.header, cuda_source.header_for,
                                   cuda_source.body):
                        cached.cache_clear()
                    be = CudaBackend().configure(**opts)
                    if mode == "fwd":
                        def fn():
                            return be.fused_forward(p, q, k, v, rpb=rpb)
                        if compiled:
                            fwd = mx.compile(lambda q_, k_, v_: be.fused_forward(p, q_, k_, v_, rpb=rpb))

                            def fn():
                                return fwd(q, k, v)
                        out, lse = fn()
                        mx.eval(out, lse)
                        rng = np.random.default_rng(0)
                        rows = sorted(set(rng.integers(0, n, 24).tolist()) | {0, n - 1})
                        err = 0.0
                        for i in rows:
                            coords = np.unravel_index(i, spatial)
                            sl, bias = [], [slice(None)]
                            for a, c in enumerate(coords):
                                _, st, en = oracle.axis_window(int(c), spatial[a], ks[a], 1, 1, False)
                                sl.append(slice(st, en + 1))
                                bias.append(slice(st - int(c) + ks[a] - 1, en - int(c) + ks[a]))
                            bi = 0
                            kk = np.array(k[(bi, *sl)].astype(mx.float32)).reshape(-1, h, d).astype(np.float64)
                            vv = np.array(v[(bi, *sl)].astype(mx.float32)).reshape(-1, h, d).astype(np.float64)
                            qq = np.array(q[(bi, *coords)].astype(mx.float32)).astype(np.float64)
                            s = np.einsum("hd,khd->hk", qq, kk) * d**-0.5
                            if rpb is not None:
                                s = s + np.array(rpb[tuple(bias)].astype(mx.float32)).reshape(h, -1)
                            pr = np.exp(s - s.max(-1, keepdims=True))
                            pr /= pr.sum(-1, keepdims=True)
                            ref = np.einsum("hk,khd->hd", pr, vv)
                            got = np.array(out[(bi, *coords)].astype(mx.float32))
                            err = max(err, float(np.abs(got - ref).max()))
                        row["max_err"] = err
                        row["check"] = err < 2e-2
                    else:
                        from types import SimpleNamespace

                        def fn():
                            out, lse = be.fused_forward(p, q, k, v, rpb=rpb)
                            rec = SimpleNamespace(problem=p, inputs={"query": q, "key": k, "value": v, "rpb": rpb}, out=out, lse=lse,
                                                  d_out=do, d_lse=None)
                            g = be.fused_backward(rec)
                            return [g["query"], g["key"], g["value"]]
                elif impl == "cuda-parts":  # each kernel of the forward and backward alone
                    if mode != "fwdbwd":
                        continue
                    from natten_mlx_cuda import plan
                    from natten_mlx_cuda.backend import _int_block, _scale, mlx_runner

                    geo = plan.geometry(p)
                    be = CudaBackend()
                    out, lse = be.fused_forward(p, q, k, v)
                    delta = (do.astype(mx.float32) * out.astype(mx.float32)).sum(-1)
                    mx.eval(out, lse, delta)
                    flat = [x.reshape(b, n, h, d) for x in (q, k, v, do)]
                    common = flat + [lse.reshape(b, n, h), delta.reshape(b, n, h), mx.zeros((1,), dtype=mx.float16)]
                    for part, launch in (("dq", plan.backward_dq(geo, "float16", False, True)),
                                         ("dkdv", plan.backward_dkdv(geo, "float16", False, True))):
                        args = common + [_int_block(launch.prm), _scale(geo.scale)]
                        ms, group = timed(lambda: mlx_runner(launch, args), sync)
                        emit(case=case, impl=f"cuda {part} kernel", mode="bwd part", ms=ms, group=group,
                             tflops=flops(case, "fwd") * (1.5 if part == "dq" else 2.0) / ms / 1e9)
                    continue
                else:  # mlx-dense: SDPA over every token, [B, H, N, D]
                    qt, kt, vt, dot = (x.reshape(b, n, h, d).transpose(0, 2, 1, 3) for x in (q, k, v, do))
                    qt, kt, vt, dot = (mx.contiguous(x) for x in (qt, kt, vt, dot))
                    mx.eval(qt, kt, vt, dot)

                    def sdpa(q_, k_, v_):
                        return mx.fast.scaled_dot_product_attention(q_, k_, v_, scale=d**-0.5)

                    if mode == "fwd":
                        def fn():
                            return sdpa(qt, kt, vt)
                    else:
                        if b * h * n * n * 2 > 60 * 2**30:
                            row["note"] = "not run: an unfused backward's [B, H, N, N] scores exceed 60 GiB"
                            emit(**row)
                            continue

                        def fn():
                            return mx.vjp(sdpa, [qt, kt, vt], [dot])[1]
                ms, group = timed(fn, sync)
                emit(**row, ms=ms, group=group, tflops=flops(case, mode) / ms / 1e9)
            except Exception as exc:  # one failing row must not lose the others
                emit(**row, note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])


# ---- torch child ---------------------------------------------------------------------------------
def torch_child(case: str, impls: list, modes: list, flex_bwd: bool) -> None:
    import torch
    import torch.nn.functional as F

    b, spatial, ks, h, d = CASES[case]
    n = math.prod(spatial)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v, do = (torch.randn((b, *spatial, h, d), generator=g, device=dev, dtype=torch.float16) for _ in range(4))
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)

    def sync(_):
        torch.cuda.synchronize()

    for impl in impls:
        for mode in modes:
            row = dict(case=case, impl=impl, mode=mode)
            try:
                if impl == "torch-dense":
                    qt, kt, vt, dot = (x.reshape(b, n, h, d).transpose(1, 2).contiguous() for x in (q, k, v, do))

                    def f(q_, k_, v_):
                        return F.scaled_dot_product_attention(q_, k_, v_, scale=d**-0.5)
                else:
                    if mode != "fwd" and not flex_bwd:
                        emit(**row, note="not run (--flex-bwd: compiling FlexAttention's backward takes minutes)")
                        continue
                    import natten

                    natten.allow_flex_compile(True)
                    op = getattr(natten, f"na{len(spatial)}d")
                    qt, kt, vt, dot = q, k, v, do

                    def f(q_, k_, v_):
                        return op(q_, k_, v_, kernel_size=ks, backend="flex-fna", torch_compile=True)

                    row["note"] = f"natten {natten.__version__} flex-fna, torch.compile"
                if mode == "fwd":
                    def fn():
                        with torch.no_grad():
                            return f(qt, kt, vt)
                else:
                    qg, kg, vg = (x.detach().requires_grad_(True) for x in (qt, kt, vt))

                    def fn():
                        o = f(qg, kg, vg)
                        return torch.autograd.grad(o, (qg, kg, vg), dot)
                t0 = time.perf_counter()
                sync(fn())
                row["first_s"] = round(time.perf_counter() - t0, 1)
                ms, group = timed(fn, sync)
                emit(**row, ms=ms, group=group, tflops=flops(case, mode) / ms / 1e9)
            except Exception as exc:
                emit(**row, note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
            finally:
                torch.cuda.empty_cache()


# ---- parent --------------------------------------------------------------------------------------
def run_child(argv, timeout):
    rows = []
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
        text = proc.stdout
        if proc.returncode != 0:
            print(f"child {argv} exited {proc.returncode}: {proc.stderr[-800:]}", flush=True)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(f"child {argv} timed out after {timeout} s", flush=True)
    for line in text.splitlines():
        if line.startswith(TAG):
            rows.append(json.loads(line[len(TAG):]))
            print(line, flush=True)
        else:
            print("  " + line, flush=True)
    return rows


def table(rows) -> str:
    out = ["| case | mode | impl | ms | TFLOP/s | vs MLX dense | vs torch dense | note |", "|---|---|---|---|---|---|---|---|"]
    ref = {(r["case"], r["mode"], r["impl"]): r.get("ms") for r in rows}
    for r in rows:
        ms = r.get("ms")
        md = ref.get((r["case"], r["mode"], "mlx-dense"))
        td = ref.get((r["case"], r["mode"], "torch-dense"))
        note = r.get("note", "")
        if "max_err" in r:
            note = (note + f" max err {r['max_err']:.1e}" + ("" if r.get("check") else " FAILED CHECK")).strip()
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["case"], r["mode"], r["impl"], f"{ms:.3f}" if ms else "-", f"{r['tflops']:.1f}" if ms else "-",
            f"{md / ms:.2f}x" if ms and md else "-", f"{td / ms:.2f}x" if ms and td else "-", note))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["mlx", "torch"])
    ap.add_argument("--cases", default="G1,G2,G3,G4")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--impls", default="cuda,mlx-dense,torch-dense,natten-flex")
    ap.add_argument("--flex-bwd", action="store_true")
    ap.add_argument("--rpb", action="store_true")
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    cases, modes, impls = a.cases.split(","), a.modes.split(","), a.impls.split(",")
    if a.child == "mlx":
        mlx_child(cases[0], impls, modes, a.rpb)
        return 0
    if a.child == "torch":
        torch_child(cases[0], impls, modes, a.flex_bwd)
        return 0
    rows = []
    mlx_impls = [i for i in impls if i.startswith("cuda") or i == "mlx-dense"]  # cuda, cuda:opt=..., cuda-parts
    torch_impls = [i for i in impls if i in ("torch-dense", "natten-flex")]
    for case in cases:
        common = ["--modes", a.modes, "--cases", case]
        if mlx_impls:
            rows += run_child(["--child", "mlx", "--impls", ",".join(mlx_impls), *common] + (["--rpb"] if a.rpb else []), a.timeout)
        if torch_impls:
            rows += run_child(["--child", "torch", "--impls", ",".join(torch_impls), *common] + (["--flex-bwd"] if a.flex_bwd else []), a.timeout)
    md = table(rows)
    print(md)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench-cuda.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "bench-cuda.md"), "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
