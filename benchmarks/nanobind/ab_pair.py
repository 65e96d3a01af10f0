"""Paired A/B of two builds of the nanobind extension in one process, float32, cases C1-C4.

On a shared machine a run's median moves by 2x from minute to minute, so two builds timed one after
the other compare the machine's load more than the code. This loads both ``_ext`` modules side by
side (each under its own package name), calls them alternately, and reports per build the min and
median in ms and the median of the per-pair ratios new/old, which the load moves much less.

    # an old build next to the installed one, e.g. from a commit:
    git archive <commit> packages/natten-mlx-nanobind packages/natten-mlx-core/src/natten_mlx/include \\
        | tar -x -C /tmp/old
    pip install --no-deps --no-build-isolation --target /tmp/old_site /tmp/old/packages/natten-mlx-nanobind
    python benchmarks/nanobind/ab_pair.py /tmp/old_site/natten_mlx_nanobind --cases C2,C4 --seconds 6

Both builds must be built against the MLX that runs them. NATTEN_MLX_NUM_THREADS applies to both.
``--dtype float16|bfloat16`` runs the cases in that dtype; ``--layout qkv`` passes q, k, v as slices of
one fused [B, *spatial, 3, H, D] projection (as NAT-style modules make them), ``--layout heads-first`` as
transposed views of [B, H, *spatial, D] arrays; ``--cot broadcast`` makes the output gradient one value
broadcast (what mx.grad of mx.sum(out) passes) instead of a contiguous array of ones. ``--batch B`` runs
the cases at batch B (default 1). ``--env NAME=OLD:NEW`` compares two settings of a variable the extension
reads on every call instead of two builds: one build (the positional folder, default the installed one)
is called alternately with NAME=OLD and NAME=NEW, e.g. ``--env NATTEN_MLX_POOL_MB=0:1024``.
"""

import argparse
import glob
import importlib.util
import os
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import CASES, D, H  # noqa: E402  (the cases of the benchmark this one compares builds on)


def load_ext(name, folder):
    """The ``_ext`` module in folder, imported as ``<name>._ext`` (its init function is PyInit__ext)."""
    paths = glob.glob(os.path.join(folder, "_ext*.so"))
    if not paths:
        raise SystemExit(f"no _ext*.so in {folder!r}")
    spec = importlib.util.spec_from_file_location(name + "._ext", paths[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_call(ext, mode, q, k, v, kw, cot):
    """fn() -> seconds: ext's forward (mode "fwd"), forward and all three gradients ("fwdbwd"), or
    the backward alone ("bwd": the forward's outputs evaluated first, untimed)."""
    if mode == "fwd":

        def fwd():
            t = time.perf_counter()
            mx.eval(ext.fused_forward(q, k, v, **kw)[0])
            return time.perf_counter() - t

        return fwd

    def fwdbwd():
        t = time.perf_counter()
        outs, grads = mx.vjp(lambda a, b, c: ext.fused_forward(a, b, c, **kw)[0], [q, k, v], [cot])
        if mode == "bwd":
            mx.eval(outs)
            t = time.perf_counter()
        mx.eval(grads)
        return time.perf_counter() - t

    return fwdbwd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="folder of the old build's natten_mlx_nanobind package (with --env: the build)")
    ap.add_argument("new", nargs="?", help="folder of the new build's package (default: the installed one)")
    ap.add_argument("--cases", default="C1,C2,C3,C4")
    ap.add_argument("--modes", default="fwd,fwdbwd", help="of fwd, fwdbwd, bwd (the backward alone)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per case and mode")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--layout", default="contiguous", choices=("contiguous", "qkv", "heads-first"))
    ap.add_argument("--cot", default="ones", choices=("ones", "broadcast"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--env", help="NAME=OLD:NEW: one build, called with NAME=OLD and NAME=NEW alternately")
    args = ap.parse_args()
    if args.env:
        var, _, vals = args.env.partition("=")
        settings = vals.split(":")
        if not var or len(settings) != 2:
            raise SystemExit(f"--env={args.env!r}: expected NAME=OLD:NEW")
        one = load_ext("ab_one", args.old)
        exts = (one, one)
    else:
        var, settings = None, None
        if args.new is None:
            import natten_mlx_nanobind

            args.new = os.path.dirname(natten_mlx_nanobind.__file__)
        exts = (load_ext("ab_old", args.old), load_ext("ab_new", args.new))

    def under(i, f):
        """f with the i-th setting of --env in the environment while it runs"""
        if var is None:
            return f

        def g():
            os.environ[var] = settings[i]
            return f()

        return g

    for name in args.cases.split(","):
        c = CASES[name]
        nd = len(c["spatial"])
        rng = np.random.default_rng(0)
        dt = getattr(mx, args.dtype)
        arr = lambda *s, rng=rng, dt=dt: mx.array(rng.standard_normal(s).astype(np.float32)).astype(dt)  # noqa: E731
        if args.layout == "qkv":
            qkv = arr(args.batch, *c["spatial"], 3, H, D)
            q, k, v = (qkv[..., i, :, :] for i in range(3))
        elif args.layout == "heads-first":
            q, k, v = (
                arr(args.batch, H, *c["spatial"], D).transpose(0, *range(2, nd + 2), 1, nd + 2) for _ in range(3)
            )
        else:
            q, k, v = (arr(args.batch, *c["spatial"], H, D) for _ in range(3))
        kw = dict(kernel_size=c["kernel"], stride=(1,) * nd, dilation=c["dilation"], is_causal=(False,) * nd)
        cot = mx.ones(q.shape, dt) if args.cot == "ones" else mx.broadcast_to(mx.array(1.0, dt), q.shape)
        mx.eval(q, k, v, cot)
        outs = [ext.fused_forward(q, k, v, **kw)[0] for ext in exts]
        diff = float(mx.abs(outs[0].astype(mx.float32) - outs[1].astype(mx.float32)).max())
        for mode in args.modes.split(","):
            fns = [under(i, make_call(ext, mode, q, k, v, kw, cot)) for i, ext in enumerate(exts)]
            for f in fns:
                f()
            ts = [[], []]
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds or len(ts[0]) < 3:
                for i, f in enumerate(fns):
                    ts[i].append(f())
            old, new = np.array(ts[0]) * 1e3, np.array(ts[1]) * 1e3
            print(
                f"{name} {mode}: old min {old.min():.2f} med {np.median(old):.2f} | new min {new.min():.2f} "
                f"med {np.median(new):.2f} | new/old paired median {np.median(new / old):.3f} (n={len(old)}) "
                f"| fwd max |diff| {diff:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
