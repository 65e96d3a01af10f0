"""Paired A/B of two builds of the nanobind extension on NAT / DiNAT attention shapes, in one process.

ab_pair.py does this for the cases C1-C4; this one takes bench_shapes.py's shapes (NAT's four stages and
DiNAT's dilated layers at 224 x 224 input, batch 4, head dim 32, kernel 7) or any ``B:side:H:dilation``
given with --shapes. Per shape and mode (fwd, fwd+bwd) the two builds' calls alternate, in both orders, for
--seconds; it prints each build's median time in ms and the median (and geometric mean) of the per-pair
ratios new/old, which a shared machine's load moves much less than the times.

    # an old build next to the one to compare, e.g. from a commit:
    git archive <commit> packages/natten-mlx-nanobind packages/natten-mlx-core/src/natten_mlx/include \\
        | tar -x -C /tmp/old
    pip install --no-deps --no-build-isolation --target /tmp/old_site /tmp/old/packages/natten-mlx-nanobind
    python benchmarks/nanobind/ab_shapes.py /tmp/old_site/natten_mlx_nanobind [NEW] [--shapes 4:14:8:1,...]

NEW defaults to the installed natten_mlx_nanobind. Both builds must be built against the MLX that runs them.
Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_pair import load_ext  # noqa: E402
from bench_shapes import SHAPES, make  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="folder of the old build's natten_mlx_nanobind package")
    ap.add_argument("new", nargs="?", help="folder of the new build's package (default: the installed one)")
    ap.add_argument("--shapes", default="", help="B:side:H:dilation,... instead of bench_shapes' list")
    ap.add_argument("--kernel", type=int, default=7, help="kernel size along both axes")
    ap.add_argument("--seconds", type=float, default=3.0, help="per shape and mode")
    ap.add_argument("--rpb", action="store_true", help="with a relative positional bias")
    args = ap.parse_args()
    if args.new is None:
        import natten_mlx_nanobind

        args.new = os.path.dirname(natten_mlx_nanobind.__file__)
    old, new = load_ext("ab_old", args.old), load_ext("ab_new", args.new)
    if args.shapes:
        shapes = []
        for spec in args.shapes.split(","):
            B, side, H, dil = (int(x) for x in spec.split(":"))
            shapes.append((spec, B, side, H, dil))
    else:
        shapes = SHAPES
    print(f"old {args.old}\nnew {args.new}\nK={args.kernel}, D=32, float32{', rpb' if args.rpb else ''}")
    print("| shape | mode | old ms (median) | new ms (median) | paired new / old (geo) | n |")
    print("|---|---|---|---|---|---|")
    for name, B, side, H, dil in shapes:
        for mode in ("fwd", "fwdbwd"):
            fo = make(old, B, side, H, dil, args.kernel, mode, args.rpb)
            fn = make(new, B, side, H, dil, args.kernel, mode, args.rpb)
            fo()  # (first calls: plans, pools)
            fn()
            to, tn, ratios = [], [], []
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds or len(ratios) < 3:
                if len(ratios) % 2:
                    a, b = fo(), fn()
                else:
                    b, a = fn(), fo()
                to.append(a)
                tn.append(b)
                ratios.append(b / a)
            geo = math.exp(float(np.mean(np.log(ratios))))
            label = f"{name} ({B}x{side}x{side}, H={H}, dil {dil})" if args.shapes == "" else name
            print(
                f"| {label} | {mode} | {np.median(to) * 1e3:.3f} | {np.median(tn) * 1e3:.3f} | "
                f"{np.median(ratios):.3f} ({geo:.3f}) | {len(ratios)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
