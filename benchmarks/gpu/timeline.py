#!/usr/bin/env python3
"""The GPU timeline of back-to-back calls: kernel durations and the gaps between them, from CUPTI through
torch.profiler (which records every kernel of the process, MLX's included). It separates a call's kernel time
from what the stream spends between kernels, which Nsight Compute (one kernel at a time) cannot show.

    source .device/setup.sh && python3 benchmarks/gpu/timeline.py --case G1 [--compiled] [--calls 50]
        [--opt hostpad=1] [--mode fwd|fwdbwd|mlx-dense] [--chain]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cuda import CASES, case_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="G1", choices=sorted(CASES))
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--mode", default="fwd", choices=("fwd", "fwdbwd", "mlx-dense"))
    ap.add_argument("--chain", action="store_true", help="each call's output is the next one's query (no overlap)")
    ap.add_argument("--opt", action="append", default=[], help="name=int backend options (hostpad=1: old scale)")
    args = ap.parse_args()

    import mlx.core as mx
    import torch
    from natten_mlx_cuda import backend as cuda_backend
    from natten_mlx_cuda.backend import CudaBackend
    from torch.profiler import ProfilerActivity, profile

    torch.zeros(1, device="cuda")  # CUPTI needs torch's CUDA context up
    opts = {}
    for kv in args.opt:
        name, val = kv.split("=")
        if name == "hostpad":
            cuda_backend.HOST_PAD = int(val)
        else:
            opts[name] = int(val)
    b, spatial, ks, h, d = CASES[args.case]
    p, q, k, v, do = case_inputs(b, spatial, ks, h, d)
    be = CudaBackend().configure(**opts)

    if args.mode == "mlx-dense":
        def one(q_, k_, v_):
            qq, kk, vv = (x.reshape(b, -1, h, d).transpose(0, 2, 1, 3) for x in (q_, k_, v_))
            return [mx.fast.scaled_dot_product_attention(qq, kk, vv, scale=d**-0.5)]
    elif args.mode == "fwd":
        def one(q_, k_, v_):
            return list(be.fused_forward(p, q_, k_, v_))
    else:
        from types import SimpleNamespace

        def one(q_, k_, v_):
            out, lse = be.fused_forward(p, q_, k_, v_)
            rec = SimpleNamespace(problem=p, inputs={"query": q_, "key": k_, "value": v_}, out=out, lse=lse, d_out=do,
                                  d_lse=None)
            g = be.fused_backward(rec)
            return [g["query"], g["key"], g["value"]]

    fn = mx.compile(one) if args.compiled else one
    for _ in range(3):
        mx.eval(fn(q, k, v))
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        if args.chain:  # dependent calls: the GPU runs them one after another, as a model's layers
            x = q
            for _ in range(args.calls):
                x = fn(x, k, v)[0].reshape(q.shape)
            outs = [x]
        else:
            outs = [fn(q, k, v) for _ in range(args.calls)]
        mx.eval(outs)
        mx.synchronize()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    ev.sort(key=lambda e: e.time_range.start)
    names = {}
    for e in ev:
        s = names.setdefault(e.name[:90], [])
        s.append(e.time_range.end - e.time_range.start)
    print(f"{args.case} {args.mode} compiled={args.compiled} chain={args.chain} opts={args.opt}: {len(ev)} GPU events in {args.calls} calls")
    for nm, ds in sorted(names.items(), key=lambda x: -sum(x[1])):
        print(f"  {len(ds):4d} x {statistics.median(ds):9.2f} us median (min {min(ds):.2f})  {nm}")
    gaps = [ev[i + 1].time_range.start - ev[i].time_range.end for i in range(len(ev) - 1)]
    span = ev[-1].time_range.end - ev[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in ev)
    if gaps:
        print(f"  span {span:.1f} us = {span / args.calls:.2f} us per call; busy {busy / args.calls:.2f} us per call; "
              f"gaps median {statistics.median(gaps):.2f} us, max {max(gaps):.2f}")


if __name__ == "__main__":
    main()
