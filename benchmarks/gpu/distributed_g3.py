#!/usr/bin/env python3
"""G3 sharded over two NVIDIA GPUs (NCCL) against one GPU, in one call of the device tool.

Run from the repository root on ``nvidia-h200-x2`` (see ../shared/device/README.md):

    source .device/setup.sh && python3 benchmarks/gpu/distributed_g3.py [--iters 5] [--backend NAME]

G3: 3D 30x48x80, window 18x24x24, 24 heads, head dim 128, float16, batch 1, forward and
forward+backward (gradients of query, key and value). Three steps, each a child process with a
time limit:

1. ``single``: G3 on GPU 0 with ``natten_mlx.na3d`` (timings, and reference samples: per-slab
   float32 sums of the output and of dq, and the output rows around the slab border for 2 heads).
2. ``ranks``: two processes (``MLX_RANK`` / ``MLX_WORLD_SIZE`` / ``NCCL_HOST_IP`` / ``NCCL_PORT`` /
   ``CUDA_VISIBLE_DEVICES``, what ``mlx.launch --backend nccl -n 2`` sets), each holding 15 of the
   30 frames, ``natten_mlx.distributed.na3d`` with the NCCL group (transport ``gather``: MLX's NCCL
   backend has no send/recv). First a small correctness check of every rank against the unsharded
   op on its own GPU (forward and gradients), then G3 timed with a barrier (``all_sum``) before
   every step; a step's time is the slower rank's.
3. the parent compares the ranks' samples with the single GPU's and prints the table: speedup =
   one-GPU step time / two-GPU step time (target: 1.8x or more).

Results go to ``$OUT/distributed-g3.json`` and ``$OUT/distributed-g3.md`` when ``$OUT`` is set; back
here, ``python3 benchmarks/gpu/distributed_g3.py --record PATH/distributed-g3.json`` writes them into
benchmarks/RESULTS.md between the ``distributed-gpu`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(ROOT, "packages", "natten-mlx-core", "src")
RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")
START, END = "<!-- distributed-gpu:start -->", "<!-- distributed-gpu:end -->"
TAG = "@@RESULT "

G3 = dict(spatial=(30, 48, 80), kernel=(18, 24, 24), heads=24, dim=128, dtype="float16")
# --smoke: the same program on a tiny case, two CPU processes over the ring backend (checks the script here)
SMOKE = dict(spatial=(8, 6, 10), kernel=(3, 4, 4), heads=2, dim=16, dtype="float16")
BORDER = 2  # output rows on each side of the slab border kept as samples (2 heads)


def _emit(obj, args):
    """Results go to a file of their own: two ranks' long lines would interleave on one pipe."""
    name = "single.json" if obj["step"] == "single" else f"rank{obj['rank']}.json"
    with open(os.path.join(args.result_dir, name), "w") as f:
        json.dump(obj, f)
    print(f"{TAG}{name}", flush=True)


def _inputs(mx, seed_offset=0):
    shape = (1, *G3["spatial"], G3["heads"], G3["dim"])
    dtype = getattr(mx, G3["dtype"])
    return [(mx.random.normal(shape, key=mx.random.key(i + seed_offset)) * 0.5).astype(dtype) for i in range(3)]


def _time(mx, fn, iters, barrier=None):
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), [round(1e3 * t, 2) for t in times]


def _slab_sums(np, x, bounds):
    return [float(np.asarray(x[:, a:b].astype(np.float32)).astype(np.float64).sum()) for a, b in bounds]


def single(args):
    sys.path.insert(0, SRC)
    import mlx.core as mx
    import natten_mlx
    import numpy as np

    q, k, v = _inputs(mx)
    mx.eval(q, k, v)
    half = G3["spatial"][0] // 2
    bounds = [(0, half), (half, G3["spatial"][0])]

    def fwd():
        out = natten_mlx.na3d(q, k, v, G3["kernel"], backend=args.backend)
        mx.eval(out)
        return out

    grad = mx.grad(lambda q, k, v: (natten_mlx.na3d(q, k, v, G3["kernel"], backend=args.backend)
                                    .astype(mx.float32) ** 2).sum(), argnums=(0, 1, 2))

    def fwdbwd():
        g = grad(q, k, v)
        mx.eval(g)
        return g

    res = dict(step="single", device=str(mx.default_device()))
    res["fwd_ms"], res["fwd_all"] = _time(mx, fwd, args.iters)
    res["fwdbwd_ms"], res["fwdbwd_all"] = _time(mx, fwdbwd, args.iters)
    out = np.array(fwd().astype(mx.float32))
    dq = np.array(fwdbwd()[0].astype(mx.float32))
    res["out_sums"] = [float(out[:, a:b].astype(np.float64).sum()) for a, b in bounds]
    res["dq_sums"] = [float(dq[:, a:b].astype(np.float64).sum()) for a, b in bounds]
    res["border"] = out[:, half - BORDER : half + BORDER, ..., :2, :].tolist()
    res["dq_border"] = dq[:, half - BORDER : half + BORDER, ..., :2, :].tolist()
    res["peak_gib"] = mx.get_peak_memory() / 2**30
    _emit(res, args)


def rank_worker(args):
    sys.path.insert(0, SRC)
    import mlx.core as mx
    import natten_mlx
    import natten_mlx.distributed as nd
    import numpy as np

    group = mx.distributed.init(backend="ring" if args.smoke else "nccl", strict=True)
    n, rank = group.size(), group.rank()

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.ones((1,)), group=group))

    # correctness first: a small 3D case with stride, dilation and causal, forward and gradients
    small = (1, 10, 9, 8, 4, 32)
    xs = [mx.random.normal(small, key=mx.random.key(10 + i)).astype(mx.float16) for i in range(3)]
    kw = dict(kernel_size=(4, 3, 5), stride=(2, 1, 2), dilation=(1, 2, 1), is_causal=(True, False, False))
    a, b = 5 * rank, 5 * rank + 5
    loc = [x[:, a:b] for x in xs]
    w = mx.random.normal(small[:-1] + (32,), key=mx.random.key(3)).astype(mx.float32)
    d_loc = mx.grad(lambda q, k, v: (nd.na3d(q, k, v, **kw, group=group, backend=args.backend,
                                             transport=args.transport).astype(mx.float32)
                                     * w[:, a:b]).sum(), argnums=(0, 1, 2))(*loc)
    d_ref = mx.grad(lambda q, k, v: (natten_mlx.na3d(q, k, v, **kw, backend=args.backend).astype(mx.float32)
                                     * w).sum(), argnums=(0, 1, 2))(*xs)
    o_loc = nd.na3d(*loc, **kw, group=group, backend=args.backend, transport=args.transport)
    o_ref = natten_mlx.na3d(*xs, **kw, backend=args.backend)[:, a:b]
    errs = [float(mx.abs(x.astype(mx.float32) - y[:, a:b].astype(mx.float32)).max()) for x, y in zip(d_loc, d_ref)]
    errs.insert(0, float(mx.abs(o_loc.astype(mx.float32) - o_ref.astype(mx.float32)).max()))
    check = dict(max_errors=errs, ok=all(e < 2e-2 for e in errs))

    q, k, v = _inputs(mx)
    half = G3["spatial"][0] // n
    a, b = half * rank, half * (rank + 1)
    q, k, v = (x[:, a:b] for x in (q, k, v))
    mx.eval(q, k, v)

    def fwd():
        out = nd.na3d(q, k, v, G3["kernel"], group=group, backend=args.backend, transport=args.transport)
        mx.eval(out)
        return out

    grad = mx.grad(lambda q, k, v: (nd.na3d(q, k, v, G3["kernel"], group=group, backend=args.backend,
                                            transport=args.transport).astype(mx.float32) ** 2).sum(),
                   argnums=(0, 1, 2))

    def fwdbwd():
        g = grad(q, k, v)
        mx.eval(g)
        return g

    res = dict(step="rank", rank=rank, size=n, device=str(mx.default_device()), check=check)
    res["fwd_ms"], res["fwd_all"] = _time(mx, fwd, args.iters, barrier)
    nd.reset_comm_stats()
    res["fwdbwd_ms"], res["fwdbwd_all"] = _time(mx, fwdbwd, args.iters, barrier)
    st = nd.comm_stats()
    res["bytes_per_step"] = dict(forward=st.forward_bytes // (args.iters + 1),
                                 backward=st.backward_bytes // (args.iters + 1))
    out = np.array(fwd().astype(mx.float32))
    dq = np.array(fwdbwd()[0].astype(mx.float32))
    res["out_sum"] = float(out.astype(np.float64).sum())
    res["dq_sum"] = float(dq.astype(np.float64).sum())
    res["border"] = (out[:, -BORDER:] if rank == 0 else out[:, :BORDER])[..., :2, :].tolist()
    res["dq_border"] = (dq[:, -BORDER:] if rank == 0 else dq[:, :BORDER])[..., :2, :].tolist()
    res["peak_gib"] = mx.get_peak_memory() / 2**30
    _emit(res, args)


def _child(cmd, env, timeout, result_dir):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
    names = sorted({line[len(TAG):].strip() for line in out.splitlines() if line.startswith(TAG)})
    rows = [json.load(open(os.path.join(result_dir, n))) for n in names]
    return rows, rc, out[-3000:], time.time() - t0


def _passed(args) -> list:
    return (["--iters", str(args.iters), "--result-dir", args.result_dir] + (["--backend", args.backend] if args.backend else [])
            + (["--transport", args.transport] if args.transport else []) + (["--smoke"] if args.smoke else []))


def _ranks(args, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.smoke:  # the ring backend through mlx.launch (ports port, port + 1)
        cmd = ["mlx.launch", "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1", "-p", str(random.randint(20000, 60000)),
               "--", sys.executable, __file__, "--step", "rank", *_passed(args)]
        rows, rc, log, _ = _child(cmd, env, args.timeout, args.result_dir)
        return rows, [log]
    procs = []
    for r in range(2):
        e = dict(env, MLX_RANK=str(r), MLX_WORLD_SIZE="2", NCCL_HOST_IP="127.0.0.1", NCCL_PORT=str(port),
                 CUDA_VISIBLE_DEVICES=str(r))
        procs.append(subprocess.Popen([sys.executable, __file__, "--step", "rank", *_passed(args)],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows, logs = [], []
    deadline = time.time() + args.timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            logs.append("timeout")
        logs.append(out[-2000:])
        rows += [json.load(open(os.path.join(args.result_dir, line[len(TAG):].strip())))
                 for line in out.splitlines() if line.startswith(TAG)]
    return rows, logs


def report(res) -> str:
    s, ranks = res.get("single"), sorted(res.get("ranks", []), key=lambda r: r["rank"])
    lines = [
        f"- date: {res['date']}; command: `python3 benchmarks/gpu/distributed_g3.py --iters {res['iters']}`"
        + (f" --backend {res['backend']}" if res.get("backend") else ""),
        f"- machine: {res.get('machine', '?')}; case {res['case']}, batch 1; two ranks hold half the frames each "
        f"({res['transport']}); medians; a two-process step = the slower rank"
        + (" (SMOKE TEST on the CPU: not a measurement)" if res.get("smoke") else ""),
    ]
    if not s or len(ranks) != 2:
        lines.append(f"- incomplete run: {json.dumps(res.get('errors', []))[:1500]}")
        return "\n".join(lines)
    lines += ["", "| mode | 1 GPU (ms) | 2 GPUs (ms) | speedup | check |", "|---|---|---|---|---|"]
    for mode in ("fwd", "fwdbwd"):
        two = max(r[f"{mode}_ms"] for r in ranks)
        lines.append(f"| {mode} | {s[f'{mode}_ms']:,.1f} | {two:,.1f} | {s[f'{mode}_ms'] / two:.2f}x | "
                     f"{res['checks'][mode]} |")
    lines.append("")
    lines.append("- small-case check per rank (max abs errors out/dq/dk/dv vs unsharded): "
                 + "; ".join(f"r{r['rank']}: {['%.2g' % e for e in r['check']['max_errors']]}" for r in ranks))
    lines.append("- bytes per step and rank (forward / backward): "
                 + "; ".join(f"r{r['rank']}: {r['bytes_per_step']['forward']:,} / {r['bytes_per_step']['backward']:,}"
                             for r in ranks)
                 + f" (formula: {res['formula']})")
    lines.append(f"- peak memory (GiB): 1 GPU {s['peak_gib']:.1f}; ranks "
                 + ", ".join(f"{r['peak_gib']:.1f}" for r in ranks))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", choices=["single", "rank"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--record", metavar="JSON")
    ap.add_argument("--result-dir", default=None, help="where the children write their results (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny case, two CPU processes over ring (a test of the script)")
    ap.add_argument("--transport", default=None, choices=["p2p", "gather"],
                    help="halo transport (default: gather on GPUs, where NCCL has no send/recv)")
    args = ap.parse_args()
    if args.smoke:
        G3.update(SMOKE)
        args.transport = args.transport or "gather"
    if args.step == "single":
        return single(args)
    if args.step == "rank":
        return rank_worker(args)
    if args.record:
        res = json.load(open(args.record))
        body = open(RESULTS_MD).read()
        block = f"{START}\n## natten_mlx.distributed on two GPUs (G3, NCCL)\n\n{report(res)}\n{END}"
        if START in body:
            body = body[: body.index(START)] + block + body[body.index(END) + len(END):]
        else:
            body = body.rstrip("\n") + "\n\n" + block + "\n"
        open(RESULTS_MD, "w").write(body)
        print(block)
        return
    import tempfile

    import numpy as np

    args.result_dir = args.result_dir or tempfile.mkdtemp(prefix="distributed-g3-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    res = dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", iters=args.iters,
               backend=args.backend, errors=[], smoke=args.smoke,
               case="{} {}, window {}, {} heads, dim {}, {}".format(
                   "3D" if not args.smoke else "smoke 3D", "x".join(map(str, G3["spatial"])),
                   "x".join(map(str, G3["kernel"])), G3["heads"], G3["dim"], G3["dtype"]),
               transport=("NCCL" if not args.smoke else "ring") + f", transport {args.transport or 'gather'}")
    # the halo plan (checked against the oracle's windows by tests/distributed); gather moves the larger side
    sys.path.insert(0, SRC)
    from natten_mlx.distributed import halo_plan

    X, Y, Z = G3["spatial"]
    plan = halo_plan((X // 2, X - X // 2), G3["kernel"][0], 1, 1, False)
    right_of_0, left_of_1 = plan.right(0), plan.left(1)
    row = Y * Z * G3["heads"] * 2 * G3["dim"] * 2
    res["formula"] = (f"rows {right_of_0} (r0 -> r1) and {left_of_1} (r1 -> r0); gather moves max = "
                      f"{max(left_of_1, right_of_0)} rows x {row:,} bytes = {max(left_of_1, right_of_0) * row:,} bytes "
                      "per rank and direction of the step")
    try:
        res["machine"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip().replace("\n", " + ")
    except OSError:
        res["machine"] = "?"
    one = dict(env, CUDA_VISIBLE_DEVICES="0")
    rows, rc, log, secs = _child([sys.executable, __file__, "--step", "single", *_passed(args)], one, args.timeout,
                                 args.result_dir)
    print(f"single: rc={rc} {secs:.0f}s", flush=True)
    if rows:
        res["single"] = rows[0]
    else:
        res["errors"].append(["single", rc, log])
    ranks, logs = _ranks(args, env)
    res["ranks"] = ranks
    if len(ranks) != 2:
        res["errors"].append(["ranks", logs])
    if res.get("single") and len(ranks) == 2:
        s = res["single"]
        r0, r1 = sorted(ranks, key=lambda r: r["rank"])
        border = np.concatenate([np.array(r0["border"]), np.array(r1["border"])], axis=1)
        ref = np.array(s["border"])
        out_ok = np.allclose(border, ref, atol=2e-2, rtol=2e-2) and np.allclose(
            [r0["out_sum"], r1["out_sum"]], s["out_sums"], rtol=1e-3, atol=1.0)
        dq_border = np.concatenate([np.array(r0["dq_border"]), np.array(r1["dq_border"])], axis=1)
        dq_ref = np.array(s["dq_border"])
        dq_ok = np.allclose(dq_border, dq_ref, atol=3e-2 * max(1.0, float(np.abs(dq_ref).max())), rtol=3e-2)
        res["max_abs_error"] = dict(out_border=float(np.abs(border - ref).max()),
                                    dq_border=float(np.abs(dq_border - dq_ref).max()),
                                    out_sums=[r0["out_sum"] - s["out_sums"][0], r1["out_sum"] - s["out_sums"][1]],
                                    dq_sums=[r0["dq_sum"] - s["dq_sums"][0], r1["dq_sum"] - s["dq_sums"][1]])
        small_ok = r0["check"]["ok"] and r1["check"]["ok"]
        res["checks"] = dict(fwd="pass" if out_ok and small_ok else "FAIL",
                             fwdbwd="pass" if dq_ok and small_ok else "FAIL")
    text = report(res)
    print(text)
    out = os.environ.get("OUT")
    if out:
        json.dump(res, open(os.path.join(out, "distributed-g3.json"), "w"), indent=1)
        open(os.path.join(out, "distributed-g3.md"), "w").write(text + "\n")


if __name__ == "__main__":
    main()
