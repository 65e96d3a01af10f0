"""``natten-mlx bench``: the installed backends against dense attention under a neighborhood mask.

The cases (float32, batch 1, 4 heads of dim 32, stride 1, no causal masking):

    C1  na1d  L=4096            K=7
    C2  na2d  64x64             K=7
    C3  na2d  64x64             K=13  dilation 2
    C4  na3d  16x32x32          K=(3, 7, 7)

Every available backend that supports a case runs it, forced with ``backend=``, forward
(``fwd``) and forward+backward (``fwdbwd``: ``mx.vjp`` with a random cotangent, all three
gradients). The baseline ``mlx-sdpa-mask`` is what a user would write without this package:
``mx.fast.scaled_dot_product_attention`` on ``[B, H, N, D]`` with the dense ``[N, N]`` boolean
neighborhood mask. It is skipped where its ``H * N^2`` score matrices would not fit in memory, and
by ``--quick`` beyond small problems (each such row takes seconds on a CPU); ``--quick`` also runs
only C1 and C2 unless told otherwise (C3 and C4 take tens of seconds on a 2-core CPU).

Each row's ``pass`` says whether the forward output matches a float64 NumPy reference on a sample
of queries, and for ``fwdbwd`` whether the gradients match those of the dense baseline; where that
did not run, the first backend's gradients are the reference and the others are checked against
them. Timings: a warm-up call, then the median of an adaptive number of calls, each closed by
``mx.eval``.

The package is split by concern: :mod:`.cases` (problems, inputs), :mod:`.reference` (the float64
oracle and the dense mask), :mod:`.impls` (what is timed), :mod:`.memory` (the baseline's memory
rule), :mod:`.timing`, :mod:`.progress` (terminal-only bar), :mod:`.harness` (the run) and
:mod:`.report` (table, plot).

    natten-mlx bench [--cases C1,C2] [--modes fwd,fwdbwd] [--json out.json] [--plot out.png] [--quick]
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx

import natten_mlx

from .. import strategies
from .cases import CASES, DTYPES, TOLERANCES, Case, make_inputs
from .harness import MODES, QUICK_CASES, Row, run, run_case
from .impls import BASELINE, QUICK_DENSE_TOKENS, Impl, backend_impls, baseline_impl, natten_fn, sdpa_mask_fn
from .memory import available_bytes, dense_bytes, too_big
from .progress import Progress
from .reference import max_err, neighborhood_mask, reference_rows, sample_rows
from .report import format_table, plot
from .timing import Timing, time_callable

__all__ = [
    "BASELINE", "CASES", "DTYPES", "MODES", "QUICK_CASES", "QUICK_DENSE_TOKENS", "TOLERANCES", "Case", "Impl", "Progress", "Row",
    "Timing", "available_bytes", "backend_impls", "baseline_impl", "dense_bytes", "format_table", "main",
    "make_inputs", "max_err", "natten_fn", "neighborhood_mask", "plot", "reference_rows", "run", "run_case",
    "sample_rows", "sdpa_mask_fn", "time_callable", "too_big",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``natten-mlx bench`` and :func:`main`."""
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(CASES)} (default: all; "
                   f"with --quick {','.join(QUICK_CASES)})")
    p.add_argument("--modes", default=",".join(MODES), help="fwd, fwdbwd or both (default both)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart (needs matplotlib, the [bench] extra)")
    p.add_argument("--quick", action="store_true",
                   help=f"cases {','.join(QUICK_CASES)} unless --cases is given, fewer timed calls, each "
                        f"backend's default strategy only, the dense baseline only up to {QUICK_DENSE_TOKENS} "
                        "tokens: seconds instead of minutes on a CPU")
    p.add_argument("--no-baseline", action="store_true", help=f"skip {BASELINE}")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless stderr is a "
                   "terminal)")


def command(args, parser: argparse.ArgumentParser) -> int:
    """Run the benchmark from parsed arguments; 1 if any check failed."""
    chosen = args.cases if args.cases is not None else ",".join(QUICK_CASES if args.quick else CASES)
    names = [c.strip().upper() for c in chosen.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case(s) {unknown}; choose from {list(CASES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes={args.modes!r}: choose from {list(MODES)}")
    print(f"natten-mlx {natten_mlx.__version__}, mlx {mx.__version__}, device {mx.default_device()}, "
          f"pure strategy here: {strategies.here()}", flush=True)
    rows = run(names, modes, quick=args.quick, progress=not args.no_progress, check=not args.no_check,
               baseline=not args.no_baseline)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(mlx=mx.__version__, natten_mlx=natten_mlx.__version__, device=str(mx.default_device()),
                           rows=rows), fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}" if plot(rows, args.plot) else "matplotlib is not installed (the [bench] extra: "
              "pip install matplotlib); no plot written")
    failed = [r for r in rows if r["pass"] is False]
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="natten-mlx bench", description="Benchmark the installed backends "
                                "against dense SDPA with a neighborhood mask (cases C1-C4, float32).")
    add_arguments(p)
    return command(p.parse_args(argv), p)


if __name__ == "__main__":
    raise SystemExit(main())
