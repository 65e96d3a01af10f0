#!/usr/bin/env python3
"""One forward and one backward of the cuda backend on a G case, for Nsight Compute (ncu).

On the GPU machine (ncu is installed there), from the repository root:

    source .device/setup.sh && ncu --target-processes all -k regex:natten_fmha -c 3 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        python3 benchmarks/gpu/ncu_cuda.py --case G2

The three launches are the forward (fmha_fwd), then the backward's dq and dk/dv passes. ``--heads``
shrinks the case (ncu replays each kernel once per metric pass). Options as bench_cuda.py's:
``--opt tile=16x8 --opt key_tile=8x8``. ``--scan 16384:256,32768:2048`` instead runs forwards alone of 1D
problems (tokens:window, one head, head dim 128, float16), one launch each, to separate a block's fixed
in-kernel cost from its walk (``-k`` without a filter also lists any other kernel a call launches).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cuda import CASES, case_inputs  # noqa: E402


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--case", default="G2", choices=sorted(CASES))
    a.add_argument("--heads", type=int, default=None, help="override the case's heads")
    a.add_argument("--opt", action="append", default=[], help="backend option name=AxB or name=int (wgmma=0/1)")
    a.add_argument("--fwd-only", action="store_true", help="the forward alone (one launch)")
    a.add_argument("--scan", default=None, help="tokens:window,... 1D forwards (one head, D 128, float16)")
    args = a.parse_args()

    import mlx.core as mx
    from natten_mlx_cuda.backend import CudaBackend

    b, spatial, ks, h, d = CASES[args.case]
    h = args.heads or h
    opts = {}
    from natten_mlx_cuda import backend as cuda_backend

    for kv in args.opt:
        name, val = kv.split("=")
        if name == "hostpad":  # 1: the scale in MLX's managed small-size pool (as before session 12)
            cuda_backend.HOST_PAD = int(val)
            continue
        if name in ("tile", "key_tile"):
            opts[name] = tuple(int(x) for x in val.split("x"))
        elif name in ("wgmma", "ldmatrix"):
            opts[name] = val != "0"
        else:
            opts[name] = int(val)
    be = CudaBackend().configure(**opts)
    if args.scan:
        for item in args.scan.split(","):
            n, w = map(int, item.split(":"))
            p, q, k, v, _ = case_inputs(1, (n,), (w,), 1, 128)
            out, lse = be.fused_forward(p, q, k, v)
            mx.eval(out, lse)
            print("done", n, w, flush=True)
        return
    p, q, k, v, do = case_inputs(b, spatial, ks, h, d)
    out, lse = be.fused_forward(p, q, k, v)
    mx.eval(out, lse)
    if args.fwd_only:
        print("done", args.case, h, opts)
        return
    rec = types.SimpleNamespace(problem=p, inputs={"query": q, "key": k, "value": v}, out=out, lse=lse, d_out=do,
                                d_lse=None)
    g = be.fused_backward(rec)
    mx.eval(g["query"], g["key"], g["value"])
    print("done", args.case, h, opts)


if __name__ == "__main__":
    main()
