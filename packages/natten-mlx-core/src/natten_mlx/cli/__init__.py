"""The ``natten-mlx`` command (also ``python -m natten_mlx``): info, check, bench, demo.

The tools live here, apart from the runtime layer: :mod:`.info`, :mod:`.check`, :mod:`.bench`
(a package split by concern), :mod:`.demo`, and :mod:`.strategies` (the pure backend's strategies
as the tools see them).
"""

from __future__ import annotations

import argparse
import sys

from .info import info

__all__ = ["info", "main"]


def _parser() -> argparse.ArgumentParser:
    from . import bench, check, demo

    parser = argparse.ArgumentParser(prog="natten-mlx", description="Neighborhood attention for MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,check,bench,demo}")
    sub.add_parser("info", help="versions, device, plugins, the support matrix and every reason",
                   description="Versions, device, the pure strategy used here, plugins, each backend, the support "
                               "matrix and every backend's reason for what it does not serve.")
    p_check = sub.add_parser("check", help="each available backend against pure, and pure's strategies against "
                             "each other, on a seeded sweep", description=check.__doc__.split("\n\n")[0])
    p_check.add_argument("--cases", type=int, default=50, help="number of random cases (default 50)")
    p_check.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    p_bench = sub.add_parser("bench", help="benchmark cases across the installed backends",
                             description="Benchmark the installed backends against dense SDPA with a neighborhood "
                                         "mask (cases C1-C4, float32).")
    bench.add_arguments(p_bench)
    p_demo = sub.add_parser("demo", help="train a small NAT-style classifier on scikit-learn digits (the [demo] "
                            "extra)", description=demo.__doc__.split("\n\n")[0])
    demo.add_arguments(p_demo)
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from . import check

        if args.cases < 1:
            parser.error(f"check --cases={args.cases}: must be at least 1")
        return 1 if check.run(cases=args.cases, seed=args.seed) else 0
    if args.command == "bench":
        from . import bench

        return bench.command(args, parser)
    from . import demo

    return demo.command(args, before_verdict=_info_after_demo)


def _info_after_demo() -> None:
    print()
    info()
    print()


if __name__ == "__main__":
    sys.exit(main())
