"""natten_mlx.distributed on the CPU: one process against N processes over the ring backend
(``mlx.launch --backend ring`` on 127.0.0.1), a medium case, forward and forward+backward.

    python benchmarks/distributed_cpu.py [--ranks 2] [--record]

Each rank times its own slab (median of ``--iters`` after a warm-up) in wall time and process CPU
time, and counts the bytes it sends; the step time of N ranks is the slowest rank's. ``--record``
writes the table into benchmarks/RESULTS.md between the ``distributed-cpu`` markers. These are CPU
ring numbers on a shared 2-core machine: they show the exchange's cost and correctness of the byte
count, not GPU scaling (benchmarks/gpu/distributed_g3.py is the multi-GPU run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "packages", "natten-mlx-core", "src")
CASE = dict(shape=(96, 96), heads=4, dim=32, kernel=7, dtype="float32", batch=1)


def worker(args):
    sys.path.insert(0, SRC)
    import mlx.core as mx
    import natten_mlx.distributed as nd
    import numpy as np

    group = mx.distributed.init(backend="ring") if args.launched else mx.distributed.init()
    n, rank = group.size(), group.rank()
    X, Y = CASE["shape"]
    sizes = [X // n + (r < X % n) for r in range(n)]
    a = sum(sizes[:rank])
    shape = (CASE["batch"], X, Y, CASE["heads"], CASE["dim"])
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i))[:, a : a + sizes[rank]] for i in range(3))
    mx.eval(q, k, v)

    def fwd():
        mx.eval(nd.na2d(q, k, v, CASE["kernel"], group=group))

    grad = mx.grad(lambda q, k, v: nd.na2d(q, k, v, CASE["kernel"], group=group).sum(), argnums=(0, 1, 2))

    def fwdbwd():
        mx.eval(grad(q, k, v))

    result = dict(rank=rank, size=n, slab=sizes[rank])
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        fn()
        walls, cpus = [], []
        for _ in range(args.iters):
            nd.reset_comm_stats()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        st = nd.comm_stats()
        result[name] = dict(wall_ms=1e3 * statistics.median(walls), cpu_ms=1e3 * statistics.median(cpus),
                            forward_bytes=st.forward_bytes, backward_bytes=st.backward_bytes)
    # the halo formula: interior halo K // 2 rows left, (K - 1) // 2 right (K = 7: 3 and 3)
    row = CASE["batch"] * Y * CASE["heads"] * (2 * CASE["dim"]) * np.dtype(np.float32).itemsize
    rows = (3 if rank > 0 else 0) + (3 if rank < n - 1 else 0)
    result["formula_bytes"] = rows * row
    result["slab_kv_bytes"] = sizes[rank] * row
    print("RESULT " + json.dumps(result), flush=True)


def free_port(n):
    while True:
        base = random.randint(20000, 60000)
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in range(base, base + n)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base


def run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    rows = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not rows:
        raise SystemExit(f"no results from {' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--launched", action="store_true")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()
    load = os.getloadavg()[0]
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--iters", str(args.iters)]
    one = run(me, env)
    many = run([shutil.which("mlx.launch"), "-n", str(args.ranks), "--backend", "ring", "--hosts", "127.0.0.1", "-p",
                str(free_port(args.ranks)), "--", *me, "--launched"], env)
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: "
        f"`python benchmarks/distributed_cpu.py --ranks {args.ranks}{' --record' if args.record else ''}` "
        f"({(time.time() - t0) / 60:.1f} min)",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared by every rank, "
        f"Linux {platform.release()}, Python {platform.python_version()}; load average at start {load:.1f}",
        f"- case: `na2d {CASE['shape'][0]}x{CASE['shape'][1]} H={CASE['heads']} D={CASE['dim']} K={CASE['kernel']}` "
        f"{CASE['dtype']}, batch {CASE['batch']}, sharded along axis 0; medians of {args.iters}; step time of N "
        "ranks = the slowest rank's; CPU = process CPU time summed over ranks",
        "",
        "| ranks | mode | step wall (ms) | CPU, all ranks (ms) | bytes sent per rank (fwd / bwd) | halo formula (bytes) | "
        "local K+V slab (bytes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows in (one, many):
        for mode in ("fwd", "fwdbwd"):
            wall = max(r[mode]["wall_ms"] for r in rows)
            cpu = sum(r[mode]["cpu_ms"] for r in rows)
            sent = ", ".join(f"r{r['rank']}: {r[mode]['forward_bytes']:,} / {r[mode]['backward_bytes']:,}" for r in rows)
            formula = ", ".join(f"r{r['rank']}: {r['formula_bytes']:,}" for r in rows) if len(rows) > 1 else "–"
            slab = ", ".join(f"r{r['rank']}: {r['slab_kv_bytes']:,}" for r in rows)
            lines.append(f"| {len(rows)} | {mode} | {wall:,.1f} | {cpu:,.1f} | {sent if len(rows) > 1 else '–'} | "
                         f"{formula} | {slab} |")
    lines += [
        "",
        f"- load average at the end: {os.getloadavg()[0]:.1f}. MLX's ring backend polls its non-blocking sockets while a "
        "transfer is pending (mlx/distributed/ring/ring.cpp), so a rank waiting for its neighbour burns CPU; with more "
        "busy processes than cores the N-rank step time measures the machine's load more than the exchange. The byte "
        "columns are exact: each rank sends K // 2 = 3 rows of K and V to its neighbour in the forward and returns the "
        "gradients of the 3 rows it received in the backward (the halo formula), a sixteenth of its K+V slab.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        path = os.path.join(HERE, "RESULTS.md")
        body = open(path).read()
        start, end = "<!-- distributed-cpu:start -->", "<!-- distributed-cpu:end -->"
        block = f"{start}\n## natten_mlx.distributed on the CPU (ring backend, one machine)\n\n{text}\n{end}"
        if start in body:
            body = body[: body.index(start)] + block + body[body.index(end) + len(end):]
        else:
            body = body.rstrip("\n") + "\n\n" + block + "\n"
        open(path, "w").write(body)


if __name__ == "__main__":
    main()
