#!/usr/bin/env python3
"""One forward and one backward of the cuda backend on a G case, for Nsight Compute (ncu).

On the GPU machine (ncu is installed there), from the repository root:

    source .device/setup.sh && ncu --target-processes all -k regex:natten_fmha -c 3 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        python3 benchmarks/gpu/ncu_cuda.py --case G2

The three launches are the forward (fmha_fwd), then the backward's dq and dk/dv passes. ``--heads``
shrinks the case (ncu replays each kernel once per metric pass). Options as bench_cuda.py's:
``--opt tile=16x8 --opt key_tile=8x8``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_cuda import CASES  # noqa: E402


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--case", default="G2", choices=sorted(CASES))
    a.add_argument("--heads", type=int, default=None, help="override the case's heads")
    a.add_argument("--opt", action="append", default=[], help="backend option name=AxB or name=int")
    args = a.parse_args()

    import mlx.core as mx
    from natten_mlx_cuda.backend import CudaBackend

    b, spatial, ks, h, d = CASES[args.case]
    h = args.heads or h
    opts = {}
    for kv in args.opt:
        name, val = kv.split("=")
        opts[name] = tuple(int(x) for x in val.split("x")) if "tile" in name else int(val)
    keys = mx.random.split(mx.random.key(1), 4)
    q, k, v, do = (mx.random.normal((b, *spatial, h, d), key=x).astype(mx.float16) for x in keys)
    mx.eval(q, k, v, do)
    r = len(spatial)
    p = types.SimpleNamespace(
        op="fused", batch=b, spatial=spatial, heads=h, kv_heads=h, head_dim=d, value_head_dim=d, kernel_size=ks,
        stride=(1,) * r, dilation=(1,) * r, is_causal=(False,) * r, scale=d**-0.5, dtype=mx.float16, num_extra=0,
        has_rpb=False, return_lse=False, device="gpu", domain=spatial, query_offset=(0,) * r, kv_spatial=spatial,
        kv_offset=(0,) * r,
    )
    be = CudaBackend().configure(**opts)
    out, lse = be.fused_forward(p, q, k, v)
    mx.eval(out, lse)
    rec = types.SimpleNamespace(problem=p, inputs={"query": q, "key": k, "value": v}, out=out, lse=lse, d_out=do,
                                d_lse=None)
    g = be.fused_backward(rec)
    mx.eval(g["query"], g["key"], g["value"])
    print("done", args.case, h, opts)


if __name__ == "__main__":
    main()
