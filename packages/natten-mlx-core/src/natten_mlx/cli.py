"""The ``natten-mlx`` command (also ``python -m natten_mlx``): info, check, bench, demo."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info(out=print) -> None:
    import mlx.core as mx

    import natten_mlx
    from natten_mlx.plugins import registry
    from natten_mlx.support import FEATURES, get_support_matrix

    out(f"natten-mlx {natten_mlx.__version__}  (distribution: {_version('natten-mlx')})")
    out(f"mlx {mx.__version__}  default device: {mx.default_device()}  python {platform.python_version()} {platform.platform()}")
    out("plugins (entry-point group natten_mlx.backends):")
    for row in registry().plugins:
        out(f"  {row['name']:<24} {row['distribution']} {row['version']}  {row['status']}")
    rows = get_support_matrix()
    out("backends (highest priority first):")
    for r in rows:
        state = "available" if r["available"] is None else f"UNAVAILABLE: {r['available']}"
        out(f"  {r['name']} (priority {r['priority']}, {r['distribution']} {r['version']}): {state}")
        if r["description"]:
            out(f"    {r['description']}")
        out(f"    backward: {r['backward']}")
    width = max(len(f) for f in FEATURES)
    names = [r["name"] for r in rows]
    cols = [max(len(n), 8) for n in names]
    out("support matrix (yes, or the backend's reason below):")
    out("  " + "feature".ljust(width) + "  " + "  ".join(n.ljust(c) for n, c in zip(names, cols)))
    reasons = []
    for f in FEATURES:
        cells = []
        for r, width_ in zip(rows, cols):
            why = r["features"][f]
            if why is None:
                cells.append("yes".ljust(width_))
            else:
                reasons.append(f"  [{len(reasons) + 1}] {r['name']} / {f}: {why}")
                cells.append(f"no [{len(reasons)}]".ljust(width_))
        out("  " + f.ljust(width) + "  " + "  ".join(cells))
    for line in reasons:
        out(line)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="natten-mlx", description="Neighborhood attention for MLX")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, plugins, the support matrix and every reason")
    p_check = sub.add_parser("check", help="each available backend against pure on a seeded sweep")
    p_check.add_argument("--cases", type=int, default=50)
    p_check.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench", help="benchmark cases across the installed backends", add_help=False)
    p_demo = sub.add_parser("demo", help="train a small NAT-style classifier on scikit-learn digits")
    p_demo.add_argument("--seconds", type=float, default=30.0)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--backend", default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from natten_mlx import bench

        return bench.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from natten_mlx import check

        return 1 if check.run(cases=args.cases, seed=args.seed) else 0
    if args.command == "demo":
        from natten_mlx import demo

        result = demo.run(seconds=args.seconds, seed=args.seed, backend=args.backend)
        print()
        info()
        return 0 if result["test_accuracy"] > 0.9 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
