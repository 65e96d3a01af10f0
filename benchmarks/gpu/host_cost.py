#!/usr/bin/env python3
"""Host time per call (building the lazy graph, no evaluation) of the cuda tier on G1's shapes: the
backend's fused_forward on a core Problem, natten_mlx.na1d through the dispatcher (the backend object
passed: the device's checkout does not install the tier's entry point), the same under
mx.compile, and MLX's dense SDPA; each the median of 5 rounds of 200 calls, in microseconds. A call
whose host time exceeds its kernel's leaves the GPU waiting (MLX builds a graph before evaluating it).

    source .device/setup.sh && python3 benchmarks/gpu/host_cost.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cuda import case_inputs  # noqa: E402


def per_call_us(fn, n=200, rounds=5) -> float:
    import mlx.core as mx

    for _ in range(20):
        fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        keep = [fn() for _ in range(n)]
        out.append((time.perf_counter() - t) / n * 1e6)
        del keep
        mx.synchronize()
    return statistics.median(out)


def main() -> None:
    import mlx.core as mx
    import natten_mlx
    from natten_mlx_cuda.backend import CudaBackend

    p, q, k, v, _ = case_inputs(1, (32768,), (2048,), 1, 128)
    be = CudaBackend()
    fwd_c = mx.compile(lambda a, b, c: be.fused_forward(p, a, b, c))
    na_c = mx.compile(lambda a, b, c: natten_mlx.na1d(a, b, c, 2048, backend=be))
    rows = {
        "fused_forward": per_call_us(lambda: be.fused_forward(p, q, k, v)),
        "na1d(backend=the cuda backend)": per_call_us(lambda: natten_mlx.na1d(q, k, v, 2048, backend=be)),
        "compiled fused_forward": per_call_us(lambda: fwd_c(q, k, v)),
        "compiled na1d": per_call_us(lambda: na_c(q, k, v)),
        "mlx sdpa": per_call_us(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)),
    }
    # the floor of an evaluated call: a one-thread kernel through the same cuda_kernel path, timed as the tier
    from bench_cuda import timed

    tiny = mx.fast.cuda_kernel(name="natten_host_cost_tiny", input_names=["x"], output_names=["y"],
                               source="y[0] = x[0] + 1.0f;")
    one = mx.zeros((1,), dtype=mx.float32)
    ms, _ = timed(lambda: tiny(inputs=[one], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                               output_dtypes=[mx.float32])[0], mx.eval)
    rows["evaluated one-thread cuda_kernel (bench_cuda.timed)"] = ms * 1e3
    ms, _ = timed(lambda: be.fused_forward(p, q, k, v)[0], mx.eval)
    rows["evaluated G1 forward (bench_cuda.timed)"] = ms * 1e3
    for name, us in rows.items():
        print(json.dumps(dict(kind="host_us", call=name, us=round(us, 2))), flush=True)


if __name__ == "__main__":
    main()
