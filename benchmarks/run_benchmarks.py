#!/usr/bin/env python3
"""The CPU benchmark of record: natten-mlx against the baselines, in one process.

Runs the cases C1-C4 of :mod:`natten_mlx.cli.bench` (float32, forward and forward+backward) for
  * every installed natten-mlx backend (and each non-default strategy of the pure backend),
  * ``mlx-sdpa-mask``: ``mx.fast.scaled_dot_product_attention`` with the dense neighborhood mask,
  * ``torch-sdpa-mask-cpu``: the same dense masked attention in PyTorch (for scale: PyTorch's CPU
    matmuls use an optimised BLAS, MLX's CPU backend on Linux a reference one),
  * official NATTEN 0.21.7 on the CPU through PyTorch (its only CPU backend, ``flex-fna``:
    FlexAttention without ``torch.compile``; NATTEN refuses compiled Flex on the CPU, and
    FlexAttention has no CPU backward, so NATTEN gets forward rows only),
and writes the figures, the machine and the versions into ``benchmarks/RESULTS.md`` (between
its CPU markers; the rest of the file is kept) and ``benchmarks/results-cpu.json``.

    python benchmarks/run_benchmarks.py                  # all cases, ~15 minutes on 2 cores
    python benchmarks/run_benchmarks.py --cases C1,C2 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "packages", "natten-mlx-core", "src")
try:
    import natten_mlx  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC)

import mlx.core as mx  # noqa: E402
import natten_mlx  # noqa: E402
import numpy as np  # noqa: E402
from natten_mlx.cli import bench  # noqa: E402

NATTEN_IMPL = "natten-0.21.7-cpu"
RESULTS = os.path.join(HERE, "RESULTS.md")
JSON_OUT = os.path.join(HERE, "results-cpu.json")
START, END = "<!-- cpu-results:start -->", "<!-- cpu-results:end -->"
FOR_SCALE = [
    "natten-mlx 0.3.3's pure tier, measured earlier on this kind of machine: C1 forward 23 ms, C2 forward 209 ms.",
    "NATTEN 0.21.7 on the CPU, measured earlier on this kind of machine: C1 forward 1.9 s, C2 forward 2.3 s.",
]


# ---- official NATTEN through torch -------------------------------------------------------------
def natten_rows(case: bench.Case, modes, timing: dict, seed: int = 0) -> list[dict]:
    """Rows of official NATTEN for one case; a note instead of figures where it cannot run."""
    rows = []
    try:
        import natten
        import torch
    except ImportError as exc:
        return [bench.Row(case.name, case.label, NATTEN_IMPL, m, note=f"not importable: {exc}").as_dict() for m in modes]
    import warnings

    warnings.filterwarnings("ignore", module="torch.nn.attention.flex_attention")
    q, k, v, cot = bench.make_inputs(case, seed)
    rows_idx = bench.sample_rows(case)
    expected = bench.reference_rows(case, q, k, v, rows_idx)
    tq, tk, tv, tcot = (torch.from_numpy(np.array(x.astype(mx.float32))) for x in (q, k, v, cot))
    op = getattr(natten, case.op)
    impl = f"{NATTEN_IMPL}" if natten.__version__ == "0.21.7" else f"natten-{natten.__version__}-cpu"

    def fwd():
        with torch.no_grad():
            return op(tq, tk, tv, case.kernel_size, dilation=case.dilation, backend="flex-fna")

    def fwdbwd():
        leaves = [x.detach().requires_grad_(True) for x in (tq, tk, tv)]
        out = op(*leaves, case.kernel_size, dilation=case.dilation, backend="flex-fna")
        return torch.autograd.grad(out, leaves, tcot)

    for mode in modes:
        row = bench.Row(case.name, case.label, impl, mode, note="backend flex-fna (FlexAttention, not compiled)")
        rows.append(row)
        try:
            if mode == "fwd":
                got = fwd().numpy().reshape(case.batch, case.tokens, case.heads, -1)
                row.max_err = bench.max_err(got[:, rows_idx], expected)
                row.pass_ = row.max_err <= bench.TOLERANCES[case.dtype][0]
                t = bench.time_callable(fwd, sync=lambda _: None, **{"warmup": 0, **timing})
            else:
                fwdbwd()
                t = bench.time_callable(fwdbwd, sync=lambda _: None, **{"warmup": 0, **timing})
            row.median_ms, row.min_ms, row.repeats = t.median_ms, t.min_ms, t.repeats
        except NotImplementedError as exc:
            row.note = f"cannot run: {str(exc).splitlines()[0]}"
        except Exception as exc:
            row.pass_ = False
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return [r.as_dict() for r in rows]


def torch_mask_rows(case: bench.Case, modes, timing: dict, seed: int = 0) -> list[dict]:
    """``torch-sdpa-mask-cpu``: what a PyTorch user would write without NATTEN, for comparison with
    ``mlx-sdpa-mask`` (same dense boolean mask; PyTorch's CPU matmuls use an optimised BLAS)."""
    name = "torch-sdpa-mask-cpu"
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return [bench.Row(case.name, case.label, name, m, note=f"not importable: {exc}").as_dict() for m in modes]
    q, k, v, cot = bench.make_inputs(case, seed)
    rows_idx = bench.sample_rows(case)
    expected = bench.reference_rows(case, q, k, v, rows_idx)
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    tq, tk, tv, tcot = (torch.from_numpy(np.array(x.astype(mx.float32))) for x in (q, k, v, cot))
    mask = torch.from_numpy(bench.neighborhood_mask(case))
    t = lambda x: x.reshape(b, n, h, d).transpose(1, 2)  # noqa: E731

    def f(q, k, v):
        return F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=d**-0.5).transpose(1, 2)

    def fwd():
        with torch.no_grad():
            return f(tq, tk, tv)

    def fwdbwd():
        leaves = [x.detach().requires_grad_(True) for x in (tq, tk, tv)]
        return torch.autograd.grad(f(*leaves), leaves, tcot.reshape(b, n, h, d))

    rows = []
    for mode in modes:
        row = bench.Row(case.name, case.label, name, mode)
        rows.append(row)
        try:
            need = bench.dense_bytes(case, mode)
            avail = bench.available_bytes()
            if avail is not None and need > 0.6 * avail:
                row.note = f"skipped: needs ~{need / 2**30:.1f} GiB for dense scores"
                continue
            if mode == "fwd":
                got = fwd().numpy().reshape(b, n, h, -1)
                row.max_err = bench.max_err(got[:, rows_idx], expected)
                row.pass_ = row.max_err <= bench.TOLERANCES[case.dtype][0]
            else:
                fwdbwd()
            t_ = bench.time_callable(fwd if mode == "fwd" else fwdbwd, sync=lambda _: None, **{"warmup": 0, **timing})
            row.median_ms, row.min_ms, row.repeats = t_.median_ms, t_.min_ms, t_.repeats
        except Exception as exc:
            row.pass_ = False
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return [r.as_dict() for r in rows]


# ---- the machine ---------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=mem, load_at_start=load,
                os=f"{platform.system()} {platform.release()}", python=platform.python_version())


def versions() -> dict:
    out = {"mlx": mx.__version__, "natten-mlx": natten_mlx.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch threads"] = torch.get_num_threads()
    except ImportError:
        out["torch"] = "not installed"
    try:
        import natten

        out["natten"] = natten.__version__
    except ImportError:
        out["natten"] = "not installed"
    return out


# ---- the report ----------------------------------------------------------------------------------
def _ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def summary_table(rows: list[dict]) -> str:
    """One line per (case, mode): each impl's median, then how many times slower each baseline is
    than the pure backend's default strategy."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ours = ["pure"] + [i for i in impls if i.startswith("pure[")]
    ours += [i for i in impls if i not in ours and not _is_baseline(i)]
    baselines = [i for i in impls if _is_baseline(i)]
    order = [i for i in ours + baselines if i in impls]
    by = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    head = ["case", "mode"] + [f"{i} (ms)" for i in order] + [f"{b} / pure" for b in baselines] + ["checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, mode in dict.fromkeys((r["case"], r["mode"]) for r in rows):
        cells = [case, mode]
        for i in order:
            r = by.get((case, mode, i))
            cells.append(_ms(r["median_ms"]) if r and r["median_ms"] else ("n/a" if r is None else "–"))
        pure = by.get((case, mode, "pure"), {}).get("median_ms")
        for name in baselines:
            other = by.get((case, mode, name), {}).get("median_ms")
            cells.append(f"{other / pure:.1f}x" if other and pure else "–")
        checked = [r for r in rows if r["case"] == case and r["mode"] == mode and r["pass"] is not None]
        bad = [r["impl"] for r in checked if not r["pass"]]
        cells.append(("FAIL: " + ", ".join(bad)) if bad else (f"{len(checked)} pass" if checked else "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_baseline(impl: str) -> bool:
    return impl == bench.BASELINE or impl.startswith(("natten-", "torch-"))


def notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["note"] and r["note"] != "gradient reference" and not r["note"].startswith("backend flex-fna"):
            out.append(f"- {r['case']} {r['mode']} {r['impl']}: {r['note']}")
    return out


def report(rows, info, command, elapsed) -> str:
    m, v = info["machine"], info["versions"]
    labels = dict.fromkeys((r["case"], r["label"]) for r in rows)
    lines = [
        START,
        f"## CPU ({m['cpu']}, {m['cores']} cores)",
        "",
        f"- date: {info['date']}; command: `{command}` ({elapsed / 60:.1f} min)",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['os']}, Python {m['python']}; "
        f"load average at start {m['load_at_start']:.1f} (shared machine: absolute figures are noisy, ratios less so)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- cases (float32, batch 1, stride 1): " + "; ".join(f"{c} `{lab}`" for c, lab in labels),
        "- medians in ms (forward: `fwd`; forward+backward with all three gradients: `fwdbwd`); "
        "`X / pure` is how many times slower baseline X is than natten-mlx's pure backend in its default "
        "strategy (`pure[...]` columns are its other strategies, forced one at a time)",
        "- checks: forward outputs against a float64 NumPy reference on ~300 sampled queries; "
        f"gradients against the dense {bench.BASELINE} gradients where that ran, else the pure "
        "strategies against each other",
        "",
        summary_table(rows),
        "",
        "For scale (figures recorded before this suite existed):",
        "",
        *[f"- {s}" for s in FOR_SCALE],
        "",
    ]
    extra = notes(rows)
    if extra:
        lines += ["Notes:", "", *extra, ""]
    lines += [
        "Why NATTEN has no `fwdbwd` figures: its only CPU backend is `flex-fna`, i.e. PyTorch FlexAttention, "
        "which raises `NotImplementedError` for backward on the CPU; NATTEN also refuses `torch_compile=True` "
        "on the CPU, so its forward runs FlexAttention's unfused path (a full score matrix per head).",
        "",
        "<details><summary>All rows</summary>",
        "",
        bench.format_table(rows),
        "",
        "</details>",
        END,
    ]
    return "\n".join(lines)


def write_results(section: str) -> None:
    header = (
        "# natten-mlx benchmark results\n\n"
        "Recorded by `benchmarks/run_benchmarks.py` (CPU) and `benchmarks/gpu/run_gpu.py` (lent NVIDIA GPU). "
        "Tests never assert a timing; these figures are a record, with the machine and date.\n\n"
    )
    text = open(RESULTS).read() if os.path.exists(RESULTS) else header
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(RESULTS, "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(bench.CASES))
    p.add_argument("--modes", default=",".join(bench.MODES))
    p.add_argument("--no-natten", action="store_true", help="skip official NATTEN")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch SDPA-with-mask baseline")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--target-seconds", type=float, default=2.0, help="timing budget per row (default 2)")
    args = p.parse_args(argv)
    names = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    command = "python benchmarks/run_benchmarks.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    info = dict(date=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
                versions=versions())
    print(f"{info['machine']}\n{info['versions']}", flush=True)
    timing = dict(target_seconds=args.target_seconds, max_repeats=30, min_repeats=3)
    t0 = time.perf_counter()
    rows = []
    for name in names:
        case = bench.CASES[name]
        case_rows = bench.run([case], modes, progress=sys.stderr.isatty(), timing=timing)
        if not args.no_torch:
            case_rows += torch_mask_rows(case, modes, timing)
        if not args.no_natten:
            case_rows += natten_rows(case, modes, timing)
        rows += case_rows
        print(bench.format_table(case_rows), flush=True)
    elapsed = time.perf_counter() - t0
    section = report(rows, info, command, elapsed)
    print(section)
    if not args.no_write:
        write_results(section)
        with open(JSON_OUT, "w") as fh:
            json.dump(dict(info, command=command, rows=rows), fh, indent=1)
        print(f"wrote {RESULTS} and {JSON_OUT}")
    return 1 if any(r["pass"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
