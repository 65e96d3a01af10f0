"""Benchmark of the Metal backend against the pure backend (and MLX's SDPA) on an Apple GPU.

NEVER RUN: this script was written where no Apple GPU was available; it has not been run even
once, so treat its first run as a test of the script too. The kernels it times were verified
only by the CPU emulator of tests/metal. Run it on a Mac with Apple silicon:

    pip install packages/natten-mlx-core packages/natten-mlx-metal
    python benchmarks/metal/bench_metal.py [--quick] [--dtype float16] [--backward] [--split]

It prints one line per (problem, backend): median milliseconds of forward (or forward+backward)
over repeated runs after warm-up, and the speed-up of "metal" over "pure". Record results in
benchmarks/RESULTS.md with the machine (chip, memory, macOS, MLX version), date and command.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

NEVER_RUN = "NOTE: bench_metal.py has never been run before on Apple hardware; check its numbers with care."

PROBLEMS = [
    # (name, spatial, heads, head_dim, kernel_size, dilation, causal)
    ("1d-4096-k13", (4096,), 8, 64, 13, 1, False),
    ("1d-8192-k63-causal", (8192,), 8, 64, 63, 1, True),
    ("2d-56x56-k7", (56, 56), 4, 32, 7, 1, False),
    ("2d-64x64-k13-d2", (64, 64), 8, 64, 13, 2, False),
    ("2d-128x128-k7", (128, 128), 4, 64, 7, 1, False),
    ("3d-16x32x32-k5", (16, 32, 32), 4, 64, 5, 1, False),
]


def _time(fn, warmup: int, reps: int) -> float:
    import mlx.core as mx

    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _split_op(qk, av):
    """av(softmax(qk(q, k)), v): the split ops in the composition the fused op replaces."""
    import mlx.core as mx

    def op(q, k, v, **options):
        s = qk(q, k, **options)
        return av(mx.softmax(s.astype(mx.float32), axis=-1).astype(s.dtype), v, **options)

    return op


def _bench_one(op, inputs, options, backward: bool, warmup: int, reps: int) -> float:
    import mlx.core as mx

    def fwd(q, k, v):
        return op(q, k, v, **options)

    if backward:
        grad = mx.grad(lambda q, k, v: fwd(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))
        return _time(lambda: grad(*inputs), warmup, reps)
    return _time(lambda: fwd(*inputs), warmup, reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the first three problems, fewer repetitions")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backward", action="store_true", help="time forward + backward (gradients of all inputs)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--split", action="store_true", help="time av(softmax(qk(q, k)), v) (the split ops) instead")
    args = ap.parse_args(argv)
    print(NEVER_RUN)

    import mlx.core as mx
    import natten_mlx

    if not mx.metal.is_available():
        print("no Metal device here (mx.metal.is_available() is False): nothing to benchmark")
        return 1
    names = [b.name for b in natten_mlx.list_backends()]
    if "metal" not in names:
        print(f"the metal backend is not registered (backends: {names}); pip install packages/natten-mlx-metal")
        return 1
    ops = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
    if args.split:
        ops = {n: _split_op(getattr(natten_mlx, f"na{n}d_qk"), getattr(natten_mlx, f"na{n}d_av")) for n in (1, 2, 3)}
    dtype = getattr(mx, args.dtype)
    problems = PROBLEMS[:3] if args.quick else PROBLEMS
    warmup, reps = (2, 5) if args.quick else (3, 20)
    print(f"machine: {platform.platform()} {platform.processor()}; mlx {mx.__version__}; dtype {args.dtype}; "
          f"batch {args.batch}; {'forward+backward' if args.backward else 'forward'}; "
          f"{'split qk/av ops' if args.split else 'fused op'}")
    print(f"{'problem':24s} {'backend':8s} {'ms':>10s} {'speed-up':>9s}")
    for name, spatial, heads, dim, k, dil, causal in problems:
        key = mx.random.key(0)
        kq, kk, kv = mx.random.split(key, 3)
        shape = (args.batch, *spatial, heads, dim)
        q = mx.random.normal(shape, key=kq).astype(dtype)
        kx = mx.random.normal(shape, key=kk).astype(dtype)
        v = mx.random.normal(shape, key=kv).astype(dtype)
        op = ops[len(spatial)]
        base = None
        for backend in ("pure", "metal"):
            try:
                ms = _bench_one(op, (q, kx, v), dict(kernel_size=k, dilation=dil, is_causal=causal, backend=backend),
                                args.backward, warmup, reps)
            except Exception as e:  # report and go on: the first run on hardware is a test too
                print(f"{name:24s} {backend:8s} FAILED: {type(e).__name__}: {e}")
                continue
            base = ms if backend == "pure" else base
            speed = f"{base / ms:8.2f}x" if base and backend != "pure" else ""
            print(f"{name:24s} {backend:8s} {ms:10.3f} {speed:>9s}")
    print(NEVER_RUN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
