#!/usr/bin/env python3
"""CPU benchmark of the nanobind tier against its peers, float32, cases C1-C4, forward and
forward+backward, in one process (children only for the sgemm rate and NATTEN 0.14.6).

    python benchmarks/nanobind/bench_cpu.py                 # all cases; appends to benchmarks/RESULTS.md
    python benchmarks/nanobind/bench_cpu.py --cases C2 --no-write

Implementations: ``nanobind`` (this tier, through natten_mlx with backend="nanobind"), ``pure``
(natten-mlx's pure tier, default strategy), ``mlx-sdpa-mask`` (mx.fast.scaled_dot_product_attention
with the dense neighborhood mask), ``torch-sdpa-mask`` (the same in PyTorch's CPU SDPA),
``natten-0.21.7`` (official NATTEN on the CPU: FlexAttention, forward only), ``natten-0.14.6``
(official NATTEN's C++ CPU kernels natten{1,2,3}dqkrpb + softmax + natten{1,2,3}dav, run from the
virtualenv ~/.cache/natten-mlx/natten014-py3.11 in a child process, when it exists).
The machine's limit: the op's forward FLOPs (2 * B * N * H * prod(K) * (D + Dv)) over the float32
GEMM rate numpy/OpenBLAS reaches here (2048^3 sgemm, in a child process with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset), as the best of its measurements during the run, against the op's median and
fastest call; and paired (paired_pct): windows of the op's forward calls alternating with single sgemm calls
in a child, each window's rate over its neighbour's, so that both sides see the same load on a shared machine.
Outputs are checked against the pure tier on the same inputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for sub in ("packages/natten-mlx-core/src", "packages/natten-mlx-nanobind/src"):
    try:
        __import__({"packages/natten-mlx-core/src": "natten_mlx", "packages/natten-mlx-nanobind/src": "natten_mlx_nanobind"}[sub])
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, sub))

import mlx.core as mx  # noqa: E402
import natten_mlx  # noqa: E402
import numpy as np  # noqa: E402
from natten_mlx.windows import neighborhood_mask  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
START, END = "<!-- nanobind-results:start -->", "<!-- nanobind-results:end -->"
NATTEN014 = os.path.expanduser("~/.cache/natten-mlx/natten014-py3.11/bin/python")

# the cases of benchmarks/RESULTS.md (natten_mlx.cli.bench): batch 1, H=4, D=32, stride 1
CASES = {
    "C1": dict(spatial=(4096,), kernel=(7,), dilation=(1,)),
    "C2": dict(spatial=(64, 64), kernel=(7, 7), dilation=(1, 1)),
    "C3": dict(spatial=(64, 64), kernel=(13, 13), dilation=(2, 2)),
    "C4": dict(spatial=(16, 32, 32), kernel=(3, 7, 7), dilation=(1, 1, 1)),
}
H, D = 4, 32
FNS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}


def label(name):
    c = CASES[name]
    dims = "x".join(map(str, c["spatial"]))
    k = "x".join(map(str, c["kernel"]))
    dil = "" if all(d == 1 for d in c["dilation"]) else " dil=" + "x".join(map(str, c["dilation"]))
    return f"na{len(c['spatial'])}d {dims} H={H} D={D} K={k}{dil}"


def flops(name):
    c = CASES[name]
    return 2.0 * int(np.prod(c["spatial"])) * H * int(np.prod(c["kernel"])) * (D + D)


def timeit(fn, budget=4.0, max_runs=200):
    """(median, samples, fastest): wall ms of fn() (which evaluates its result) after one warm-up,
    within ~budget s; an implementation slower than budget/2 per call gets its warm-up call only."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    if first > budget / 2:
        return first * 1e3, 1, first * 1e3
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < 3 or time.perf_counter() - start < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if times[-1] > budget:
            break
    return float(np.median(times)) * 1e3, len(times), float(np.min(times)) * 1e3


# ---- implementations: each returns {"fwd": callable, "fwdbwd": callable, "out": callable} or raises
def mlx_impl(name, backend, q, k, v):
    c = CASES[name]
    fn = FNS[len(c["spatial"])]
    kw = dict(kernel_size=c["kernel"], dilation=c["dilation"], backend=backend)
    cot = mx.ones_like(q)

    def fwd():
        out = fn(q, k, v, **kw)
        mx.eval(out)
        return out

    def fwdbwd():
        outs, grads = mx.vjp(lambda a, b, c_: fn(a, b, c_, **kw), [q, k, v], [cot])
        mx.eval(outs, grads)

    return fwd, fwdbwd


def mlx_sdpa_impl(name, q, k, v):
    c = CASES[name]
    n = int(np.prod(c["spatial"]))
    if n > 8192:
        raise RuntimeError(f"skipped: dense {n}x{n} scores per head (minutes per call here)")
    mask = mx.array(neighborhood_mask(c["spatial"], c["kernel"], (1,) * len(c["kernel"]), c["dilation"], (False,) * len(c["kernel"])))
    bias = mx.where(mask, 0.0, -mx.inf).astype(mx.float32)
    heads = lambda x: x.reshape(1, n, H, D).transpose(0, 2, 1, 3)
    cot = mx.ones((1, H, n, D))

    def attn(a, b, c_):
        return mx.fast.scaled_dot_product_attention(heads(a), heads(b), heads(c_), scale=D**-0.5, mask=bias)

    return (lambda: mx.eval(attn(q, k, v))), (lambda: mx.eval(mx.vjp(attn, [q, k, v], [cot])))


def torch_impls(name, qn, kn, vn):
    import torch

    c = CASES[name]
    n = int(np.prod(c["spatial"]))
    out = {}
    t = [torch.tensor(x) for x in (qn, kn, vn)]
    if n <= 8192:
        mask = torch.tensor(neighborhood_mask(c["spatial"], c["kernel"], (1,) * len(c["kernel"]), c["dilation"], (False,) * len(c["kernel"])))
        heads = lambda x: x.reshape(1, n, H, D).transpose(1, 2)

        def sdpa(grad):
            xs = [x.clone().requires_grad_(grad) for x in t]
            o = torch.nn.functional.scaled_dot_product_attention(*(heads(x) for x in xs), attn_mask=mask)
            if grad:
                o.sum().backward()

        out["torch-sdpa-mask"] = (lambda: sdpa(False), lambda: sdpa(True))
    else:
        out["torch-sdpa-mask"] = f"skipped: dense {n}x{n} scores per head"
    try:
        import natten

        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(c["spatial"])]

        def nat():
            with torch.no_grad():
                fn(*t, kernel_size=c["kernel"], dilation=c["dilation"])

        out["natten-0.21.7"] = (nat, "cannot run: FlexAttention (NATTEN's only CPU backend) has no CPU backward")
    except Exception as exc:  # noqa: BLE001 - recorded as a note
        out["natten-0.21.7"] = f"not importable: {exc}"
    return out


SGEMM_CHILD = textwrap.dedent("""
    import json, time, numpy as np
    a = np.random.rand(2048, 2048).astype(np.float32); b = np.random.rand(2048, 2048).astype(np.float32)
    a @ b
    best = 0.0
    for _ in range(7):
        t = time.perf_counter(); a @ b; best = max(best, 2 * 2048**3 / (time.perf_counter() - t))
    print(json.dumps(best / 1e9))
""")

NATTEN014_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    import natten
    from natten import functional as F
    cases = json.loads(sys.argv[1]); H, D = 4, 32
    res = {}
    for name, c in cases.items():
        nd = len(c["spatial"])
        qk = getattr(F, f"natten{nd}dqkrpb", None); av = getattr(F, f"natten{nd}dav", None)
        shape = (1, H, *c["spatial"], D)
        ks = c["kernel"]
        if qk is None or av is None:
            res[name] = {"note": f"NATTEN {natten.__version__} has no {nd}D ops in natten.functional"}
            continue
        if len(set(ks)) != 1 or len(set(c["dilation"])) != 1:
            res[name] = {"note": f"kernel {ks}: NATTEN 0.14.6 takes one kernel size and one dilation for all axes"}
            continue
        q, k, v = (torch.randn(shape) for _ in range(3))
        def run(grad):
            xs = [x.clone().requires_grad_(grad) for x in (q, k, v)]
            a = qk(xs[0] * D ** -0.5, xs[1], None, ks[0], c["dilation"][0]).softmax(-1)
            o = av(a, xs[2], ks[0], c["dilation"][0])
            if grad:
                o.sum().backward()
        row = {}
        for mode, grad in (("fwd", False), ("fwdbwd", True)):
            run(grad); ts = []
            t0 = time.perf_counter()
            while len(ts) < 20 and (len(ts) < 3 or time.perf_counter() - t0 < 4):
                t = time.perf_counter(); run(grad); ts.append(time.perf_counter() - t)
            ts.sort(); row[mode] = ts[len(ts) // 2] * 1e3
        res[name] = row
    print(json.dumps({"version": natten.__version__, "torch": torch.__version__, "rows": res}))
""")


def sgemm_rate():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    out = subprocess.run([sys.executable, "-c", SGEMM_CHILD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# the sgemm child of paired_pct: one 2048^3 sgemm per line read, its GFLOP/s written back
PAIRED_CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    a = np.random.rand(2048, 2048).astype(np.float32); b = np.random.rand(2048, 2048).astype(np.float32)
    a @ b
    print("ready", flush=True)
    for line in sys.stdin:
        t = time.perf_counter(); a @ b
        print(2 * 2048**3 / (time.perf_counter() - t) / 1e9, flush=True)
""")


def paired_pct(name, fn, pairs=16, window=0.15):
    """The op's forward rate as a percentage of the sgemm rate under the same load: `pairs` windows of
    the op (window seconds of calls, their median; the first quarter of each window's calls dropped, as
    the sgemm before it evicts the op's inputs from the caches) alternating (ABBA) with one sgemm in a
    child process (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset as in sgemm_rate, and its OpenBLAS threads
    set to sleep at once after a call: by default they spin on for ~70 ms, through the op's next window,
    which read C2 at 24% instead of 40%). Returns (median, 25th, 75th percentile) of the pairs' ratios."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OPENBLAS_THREAD_TIMEOUT"] = "4"
    child = subprocess.Popen(
        [sys.executable, "-c", PAIRED_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        child.stdout.readline()

        def op():
            ts = []
            start = time.perf_counter()
            while time.perf_counter() - start < window or len(ts) < 8:
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return float(np.median(ts[len(ts) // 4 :]))

        def gemm():
            child.stdin.write("go\n")
            child.stdin.flush()
            return float(child.stdout.readline())

        ratios = []
        for i in range(pairs):
            if i % 4 in (0, 3):
                sec = op()
                g = gemm()
            else:
                g = gemm()
                sec = op()
            ratios.append(100 * flops(name) / sec / (g * 1e9))
    finally:
        child.stdin.close()
        child.wait()
    return float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))


def natten014(cases):
    if not os.path.exists(NATTEN014):
        return None, f"NATTEN 0.14.6 not run: {NATTEN014} does not exist"
    sub = {n: dict(spatial=list(CASES[n]["spatial"]), kernel=list(CASES[n]["kernel"]), dilation=list(CASES[n]["dilation"])) for n in cases}
    try:
        out = subprocess.run([NATTEN014, "-c", NATTEN014_CHILD, json.dumps(sub)], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return None, "NATTEN 0.14.6 not run: its child process timed out"
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"NATTEN 0.14.6 not run: the child in {os.path.dirname(os.path.dirname(NATTEN014))} failed ({tail})"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="C1,C2,C3,C4")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    started = time.time()
    load0 = os.getloadavg()[0]
    import natten_mlx_nanobind as nb

    if nb.UNAVAILABLE:
        sys.exit(f"the nanobind tier is unavailable: {nb.UNAVAILABLE}")
    ext = nb.extension()
    # the machine is shared: the rate is measured before every case and at the end, and the best is
    # the limit (the op's own timings are medians over the same stretch of time)
    rates = [sgemm_rate()]
    print(f"sgemm (numpy/OpenBLAS, 2048^3 float32): {rates[-1]:.1f} GFLOP/s", flush=True)
    rows, notes = [], []
    for name in cases:
        if name != cases[0]:
            rates.append(sgemm_rate())
        c = CASES[name]
        rng = np.random.default_rng(0)
        qn, kn, vn = (rng.standard_normal((1, *c["spatial"], H, D)).astype(np.float32) for _ in range(3))
        q, k, v = (mx.array(x) for x in (qn, kn, vn))
        impls = {}
        impls["nanobind"] = mlx_impl(name, "nanobind", q, k, v)
        impls["pure"] = mlx_impl(name, "pure", q, k, v)
        try:
            impls["mlx-sdpa-mask"] = mlx_sdpa_impl(name, q, k, v)
        except RuntimeError as exc:
            impls["mlx-sdpa-mask"] = str(exc)
        impls.update(torch_impls(name, qn, kn, vn))
        ref = np.array(natten_mlx.__dict__[f"na{len(c['spatial'])}d"](q, k, v, c["kernel"], dilation=c["dilation"], backend="pure"))
        got = np.array(FNS[len(c["spatial"])](q, k, v, c["kernel"], dilation=c["dilation"], backend="nanobind"))
        err = float(np.abs(got - ref).max())
        notes.append(f"{name}: nanobind vs pure forward max |diff| = {err:.2e}")
        for impl, fns in impls.items():
            for mode, i in (("fwd", 0), ("fwdbwd", 1)):
                row = dict(case=name, mode=mode, impl=impl)
                fn = fns if isinstance(fns, str) else fns[i]
                if isinstance(fn, str):
                    row["note"] = fn
                else:
                    try:
                        row["ms"], row["runs"], row["min"] = timeit(fn)
                    except Exception as exc:  # noqa: BLE001 - recorded as a note
                        row["note"] = f"failed: {type(exc).__name__}: {exc}"
                if impl == "nanobind" and mode == "fwd" and "ms" in row:
                    row["paired"] = paired_pct(name, fn)
                rows.append(row)
                print(name, mode, impl, f"{row['ms']:.2f} ms" if "ms" in row else row["note"],
                      f"(paired {row['paired'][0]:.1f}% of sgemm)" if "paired" in row else "", flush=True)
    rates.append(sgemm_rate())
    gemm = max(rates)
    notes.append("sgemm GFLOP/s measured before each case and at the end: " + ", ".join(f"{r:.0f}" for r in rates))
    res014, note014 = natten014(cases)
    if note014:
        notes.append(note014)
    else:
        for name, r in res014["rows"].items():
            for mode in ("fwd", "fwdbwd"):
                row = dict(case=name, mode=mode, impl="natten-0.14.6")
                if mode in r:
                    row["ms"] = r[mode]
                else:
                    row["note"] = r.get("note", "-")
                rows.append(row)
        notes.append(f"natten-0.14.6: NATTEN {res014['version']} with torch {res014['torch']}, child process")
    report = render(rows, notes, gemm, cases, started, load0, ext)
    print(report)
    if not args.no_write:
        write(report)


def pct_of(name, ms, gemm):
    """The forward's rate at ms per call as a percentage of the sgemm rate gemm (GFLOP/s)."""
    return f"{100 * flops(name) / (ms * 1e-3) / (gemm * 1e9):.1f}%"


def render(rows, notes, gemm, cases, started, load0, ext):
    impls = ["nanobind", "pure", "mlx-sdpa-mask", "torch-sdpa-mask", "natten-0.21.7", "natten-0.14.6"]
    by = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    fmt = lambda r: "–" if r is None or "ms" not in r else (f"{r['ms']:,.0f}" if r["ms"] >= 100 else f"{r['ms']:.3g}")
    lines = [
        START,
        "## CPU: the nanobind tier (C++ MLX primitives) against its peers",
        "",
        f"- date: {dt.datetime.utcfromtimestamp(started).strftime('%Y-%m-%d %H:%M')} UTC; command: "
        f"`python benchmarks/nanobind/bench_cpu.py --cases {','.join(cases)}` ({(time.time() - started) / 60:.1f} min)",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: other jobs ran at the same time, absolute figures are noisy)",
        f"- nanobind tier: natten-mlx-nanobind {__import__('natten_mlx_nanobind').__version__}, kernels `{ext.simd()}`, "
        f"{ext.num_threads()} threads; mlx {mx.__version__}",
        f"- machine limit: numpy/OpenBLAS float32 sgemm at {gemm:.0f} GFLOP/s (2048^3, best of 7, best of the "
        "measurements during the run); "
        "`% sgemm` is the op's forward FLOPs 2*N*H*prod(K)*(D+Dv) per nanobind forward second over that rate, "
        "at the median call and (after the slash) at the fastest of the same calls, as the sgemm rate is a best "
        "of its runs; `paired`: the median over 16 pairs of a 0.15 s window of forward calls and one sgemm "
        "next to it (alternating, in a child), each pair's rates divided (both under the same load), with the "
        "pairs' interquartile range; `fwdbwd / fwd`: nanobind's fwdbwd median over its fwd median",
        "- medians in ms, float32, batch 1, H=4, D=32; fwdbwd: forward + all three gradients",
        "",
        "| case | problem | mode | " + " | ".join(impls) + " | nanobind % sgemm (median / fastest) | paired % sgemm (IQR) | nanobind fwdbwd / fwd | pure / nanobind |",
        "|---|---|---|" + "---|" * len(impls) + "---|---|---|---|",
    ]
    for name in cases:
        for mode in ("fwd", "fwdbwd"):
            cells = [fmt(by.get((name, mode, i))) for i in impls]
            nbr, pr = by.get((name, mode, "nanobind")), by.get((name, mode, "pure"))
            pct, fb, paired = "–", "–", "–"
            if nbr and "ms" in nbr and mode == "fwd":
                pct = pct_of(name, nbr["ms"], gemm) + (f" / {pct_of(name, nbr['min'], gemm)}" if "min" in nbr else "")
            if nbr and "paired" in nbr:
                paired = "{:.1f}% ({:.1f}-{:.1f})".format(*nbr["paired"])
            nbf = by.get((name, "fwd", "nanobind"))
            if mode == "fwdbwd" and nbr and nbf and "ms" in nbr and "ms" in nbf:
                fb = f"{nbr['ms'] / nbf['ms']:.2f}"
            ratio = f"{pr['ms'] / nbr['ms']:.1f}x" if nbr and pr and "ms" in nbr and "ms" in pr else "–"
            lines.append(f"| {name} | {label(name)} | {mode} | " + " | ".join(cells) + f" | {pct} | {paired} | {fb} | {ratio} |")
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in notes]
    for r in rows:
        if "note" in r:
            lines.append(f"- {r['case']} {r['mode']} {r['impl']}: {r['note']}")
    lines.append(END)
    return "\n".join(lines)


def write(report):
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# natten-mlx benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + report + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
