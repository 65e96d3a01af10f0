"""Benchmark of the installed backends against dense attention under a neighborhood mask.

The cases (float32, batch 1, 4 heads of dim 32, stride 1, no causal masking):

    C1  na1d  L=4096            K=7
    C2  na2d  64x64             K=7
    C3  na2d  64x64             K=13  dilation 2
    C4  na3d  16x32x32          K=(3, 7, 7)

Every available backend that supports a case runs it, forced with ``backend=``, forward
(``fwd``) and forward+backward (``fwdbwd``: ``mx.vjp`` with a random cotangent, all three
gradients). The baseline ``mlx-sdpa-mask`` is what a user would write without this package:
``mx.fast.scaled_dot_product_attention`` on ``[B, H, N, D]`` with the dense ``[N, N]`` boolean
neighborhood mask (built once per case, outside the timing; the transposes from and to the
heads-last layout are inside it). It is skipped where its ``H * N^2`` score matrices would not fit
in memory.

Each row's ``pass`` says whether the forward output matches a float64 NumPy reference on a sample
of queries (the reference builds its windows from the stride-1 clamp rule of SEMANTICS.md, on its
own), and for ``fwdbwd`` whether the gradients match those of the dense baseline; where that did
not run, the first backend's gradients are the reference and the others are checked against them. Timings: a warm-up call, then the median of an adaptive number of calls, each
closed by ``mx.eval``.

    natten-mlx bench [--cases C1,C2] [--modes fwd,fwdbwd] [--json out.json] [--plot out.png] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

import natten_mlx

BASELINE = "mlx-sdpa-mask"
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# tolerances of the checks, by dtype: (forward vs float64, gradients vs the dense baseline)
TOLERANCES = {"float32": (2e-4, 2e-3), "float16": (2e-2, 5e-2), "bfloat16": (5e-2, 1e-1)}


@dataclass(frozen=True)
class Case:
    """One benchmark problem: ``q, k, v`` of shape ``[batch, *spatial, heads, head_dim]``."""

    name: str
    spatial: tuple[int, ...]
    kernel_size: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    heads: int = 4
    head_dim: int = 32
    batch: int = 1
    dtype: str = "float32"

    @property
    def op(self) -> str:
        return f"na{len(self.spatial)}d"

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def per_axis(self, value) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.spatial)

    @property
    def label(self) -> str:
        ks = self.per_axis(self.kernel_size)
        text = f"{self.op} {'x'.join(map(str, self.spatial))} H={self.heads} D={self.head_dim} K={'x'.join(map(str, ks))}"
        if any(d != 1 for d in self.per_axis(self.dilation)):
            text += f" dil={'x'.join(map(str, self.per_axis(self.dilation)))}"
        return text


CASES = {
    "C1": Case("C1", (4096,), 7),
    "C2": Case("C2", (64, 64), 7),
    "C3": Case("C3", (64, 64), 13, dilation=2),
    "C4": Case("C4", (16, 32, 32), (3, 7, 7)),
}


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


@dataclass
class Row:
    """One (case, impl, mode) measurement. ``pass_`` is serialised as ``pass``."""

    case: str
    label: str
    impl: str
    mode: str
    pass_: bool | None = None
    max_err: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    repeats: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d.update(d.pop("extra"))
        return d


# ---- timing ------------------------------------------------------------------------------------
def time_callable(fn: Callable[[], object], *, sync: Callable[[object], None] = mx.eval, warmup: int = 1,
                  min_repeats: int = 3, max_repeats: int = 50, target_seconds: float = 1.0) -> Timing:
    """Median wall time of ``sync(fn())`` in milliseconds.

    ``warmup`` untimed calls first (compilation, caches; 0 when the caller has already made one,
    then the first call is timed and kept); then as many calls as fit in about
    ``target_seconds``, at least ``min_repeats`` (but only one when a single call already takes
    longer than ``target_seconds``) and at most ``max_repeats``.
    """
    first = None
    for _ in range(max(1, warmup)):
        t = time.perf_counter()
        sync(fn())
        first = time.perf_counter() - t
    samples = [first] if warmup == 0 else []  # after the caller's own warm-up the probe counts
    if first >= target_seconds:
        repeats = 1
    else:
        repeats = int(min(max_repeats, max(min_repeats, target_seconds / max(first, 1e-6))))
    for _ in range(repeats - len(samples)):
        t = time.perf_counter()
        sync(fn())
        samples.append(time.perf_counter() - t)
    return Timing(statistics.median(samples) * 1e3, min(samples) * 1e3, repeats)


# ---- inputs, reference and implementations -------------------------------------------------------
def make_inputs(case: Case, seed: int = 0):
    """``(q, k, v, cotangent)`` as MLX arrays of the case's dtype, from a seeded NumPy generator."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    dtype = DTYPES[case.dtype]
    return tuple(mx.array(a).astype(dtype) for a in arrays)


def _axis_neighbors(length: int, kernel: int, dilation: int, positions: np.ndarray) -> np.ndarray:
    """``[S, K]`` key positions of queries ``positions`` along one axis (stride 1, not causal):
    the classic clamp ``start = clamp(c - K // 2, 0, Lg - K)`` in dilation-group coordinates."""
    g, c = positions % dilation, positions // dilation
    group_len = (length - g + dilation - 1) // dilation
    start = np.clip(c - kernel // 2, 0, group_len - kernel)
    return (start[:, None] + np.arange(kernel)[None, :]) * dilation + g[:, None]


def reference_rows(case: Case, q, k, v, rows: np.ndarray) -> np.ndarray:
    """Float64 outputs ``[B, S, H, D]`` of the flat query indices ``rows`` (an independent oracle)."""
    ks, ds = case.per_axis(case.kernel_size), case.per_axis(case.dilation)
    coords = np.unravel_index(rows, case.spatial)
    per_axis = [_axis_neighbors(n, kk, d, c) for n, kk, d, c in zip(case.spatial, ks, ds, coords, strict=True)]
    # row-major product of the per-axis neighbours -> flat key indices [S, Kt]
    flat = np.zeros((len(rows), 1), dtype=np.int64)
    for n, nb in zip(case.spatial, per_axis, strict=True):
        flat = (flat[:, :, None] * n + nb[:, None, :]).reshape(len(rows), -1)
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    qf = np.asarray(q.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, rows]  # [B, S, H, D]
    kf = np.asarray(k.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, flat]  # [B, S, Kt, H, D]
    vf = np.asarray(v.astype(mx.float32), dtype=np.float64).reshape(b, n, h, d)[:, flat]
    s = np.einsum("bshd,bskhd->bshk", qf, kf) * d**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bshk,bskhd->bshd", p, vf)


def _sample_rows(case: Case, count: int = 256) -> np.ndarray:
    """Query rows to check: the first and last few tokens (borders) and a seeded random sample."""
    n = case.tokens
    rng = np.random.default_rng(1234)
    picks = np.concatenate([np.arange(min(16, n)), np.arange(max(0, n - 16), n), rng.integers(0, n, count)])
    return np.unique(picks)


def neighborhood_mask(case: Case) -> np.ndarray:
    """Dense ``[N, N]`` boolean (query, key) mask of the case, from the core's window module."""
    from natten_mlx.windows import neighborhood_mask as build

    n = len(case.spatial)
    return build(case.spatial, case.per_axis(case.kernel_size), (1,) * n, case.per_axis(case.dilation),
                 (False,) * n)


def _natten_fn(case: Case, backend: str):
    op = getattr(natten_mlx, case.op)
    ks, ds = case.kernel_size, case.dilation
    return lambda q, k, v: op(q, k, v, ks, dilation=ds, backend=backend)


def _sdpa_mask_fn(case: Case):
    mask = mx.array(neighborhood_mask(case))
    mx.eval(mask)
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    scale = d**-0.5

    def f(q, k, v):
        t = lambda x: x.reshape(b, n, h, -1).transpose(0, 2, 1, 3)  # noqa: E731
        o = mx.fast.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale, mask=mask)
        return o.transpose(0, 2, 1, 3).reshape(q.shape)

    return f


def _memory_bytes() -> int | None:
    """Memory the dense baseline may use: the GPU's, or the CPU's available memory."""
    try:
        if mx.default_device() == mx.gpu:
            info = mx.device_info()
            return int(info.get("memory_size", 0)) or None
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dense_bytes(case: Case, mode: str) -> int:
    """Rough peak of the dense baseline: score-sized float32 buffers plus the boolean mask."""
    n = case.tokens
    buffers = 3 if mode == "fwd" else 7
    return case.batch * case.heads * n * n * 4 * buffers + n * n


@dataclass
class Impl:
    """A way to compute a case: ``build(case)`` returns ``f(q, k, v) -> out`` (called per mode).

    ``skip(case, mode)`` returns a reason to leave a row out (e.g. memory), or None.
    """

    name: str
    build: Callable[[Case], Callable]
    skip: Callable[[Case, str], str | None] = lambda case, mode: None
    env: dict = field(default_factory=dict)  # environment variables set around every call


def backend_impls(case: Case, q, k, v, strategies: bool = True) -> tuple[list[Impl], dict[str, str]]:
    """One Impl per available backend that supports the case; and the reason of every other.

    With ``strategies``, each of the pure backend's strategies that is not the default gets its own
    row (``pure[tiled]`` on the CPU), since the default is picked per device.
    """
    impls, skipped = [], {}
    for backend in natten_mlx.list_backends():
        why = natten_mlx.explain(case.op, q, k, v, kernel_size=case.kernel_size, dilation=case.dilation,
                                 backend=backend.name).reasons.get(backend.name)
        if why is not None:
            skipped[backend.name] = why
            continue
        impls.append(Impl(backend.name, lambda c, name=backend.name: _natten_fn(c, name)))
        if backend.name == "pure" and strategies:
            impls.extend(_pure_strategy_impls())
    return impls, skipped


def _pure_strategy_impls() -> list[Impl]:
    try:
        from natten_mlx.backends import pure
    except ImportError:
        return []
    strategies = getattr(pure, "STRATEGIES", ())
    env = getattr(pure, "STRATEGY_ENV", None)
    if not strategies or env is None or os.environ.get(env):
        return []
    default = pure.default_strategy()
    return [Impl(f"pure[{s}]", lambda c: _natten_fn(c, "pure"), env={env: s}) for s in strategies if s != default]


@contextmanager
def _environ(values: dict):
    """Set environment variables for the duration of a call (forward and backward tracing)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def baseline_impl(max_bytes: int | None = None) -> Impl:
    def skip(case: Case, mode: str) -> str | None:
        limit = max_bytes if max_bytes is not None else _memory_bytes()
        need = dense_bytes(case, mode)
        if limit is not None and need > 0.6 * limit:
            return f"skipped: needs ~{need / 2**30:.1f} GiB for dense {case.heads}x{case.tokens}^2 scores"
        return None

    return Impl(BASELINE, _sdpa_mask_fn, skip)


# ---- running -----------------------------------------------------------------------------------
class _Progress:
    """tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, leave=False)
            except ImportError:
                self.bar = None

    def describe(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text:<48}")
            sys.stderr.flush()

    def step(self) -> None:
        self.done += 1
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _caller(f, env: dict, mode: str, q, k, v, cot) -> Callable[[], object]:
    """The timed call of one mode: ``f(q, k, v)``, or ``mx.vjp`` of it with cotangent ``cot``."""

    def call():
        with _environ(env):
            return f(q, k, v) if mode == "fwd" else mx.vjp(f, [q, k, v], [cot])

    return call


def run_case(case: Case, impls: list[Impl], modes=MODES, timing: dict | None = None, check: bool = True,
             progress: _Progress | None = None, seed: int = 0) -> list[Row]:
    """All ``impls`` on one case, for each mode; one Row each (errors become notes, never raise)."""
    timing = timing or {}
    q, k, v, cot = make_inputs(case, seed)
    mx.eval(q, k, v, cot)
    fwd_tol, grad_tol = TOLERANCES[case.dtype]
    rows_idx = _sample_rows(case) if check else None
    expected = reference_rows(case, q, k, v, rows_idx) if check else None
    ref_grads = None
    out: list[Row] = []
    # the dense baseline first: its gradients are the reference of the others
    ordered = sorted(impls, key=lambda i: i.name != BASELINE)
    for impl in ordered:
        for mode in modes:
            row = Row(case.name, case.label, impl.name, mode)
            out.append(row)
            if progress is not None:
                progress.describe(f"{case.name} {impl.name} {mode}")
            try:
                why = impl.skip(case, mode)
                if why:
                    row.note = why
                    continue
                call = _caller(impl.build(case), impl.env, mode, q, k, v, cot)
                if check and mode == "fwd":
                    o = call()
                    mx.eval(o)
                    got = np.asarray(o.astype(mx.float32)).reshape(case.batch, case.tokens, case.heads, -1)
                    row.max_err = _max_err(got[:, rows_idx], expected)
                    row.pass_ = row.max_err <= fwd_tol
                elif check:
                    _, grads = call()
                    mx.eval(grads)
                    grads = [np.asarray(g.astype(mx.float32)) for g in grads]
                    if impl.name == BASELINE or ref_grads is None:
                        # without the dense baseline (memory) the first backend's gradients are the
                        # reference: the other backends and strategies are then checked for agreement
                        ref_grads = grads
                        row.note = "gradient reference" if impl.name == BASELINE else "gradient reference (no dense baseline)"
                    else:
                        row.max_err = max(_max_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
                        scale = max(1.0, max(float(np.max(np.abs(r))) for r in ref_grads))
                        row.pass_ = row.max_err <= grad_tol * scale
                    del grads
                # the checking call above was the warm-up
                t = time_callable(call, **{"warmup": 0 if check else 1, **timing})
                row.median_ms, row.min_ms, row.repeats = t.median_ms, t.min_ms, t.repeats
            except Exception as exc:  # one failure must not lose the other rows
                if "memory" not in str(exc).lower():
                    row.pass_ = False
                row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            finally:
                if progress is not None:
                    progress.step()
                mx.clear_cache()
    return out


def run(cases=None, modes=MODES, quick: bool = False, progress: bool = True, check: bool = True,
        extra_impls: list[Impl] | None = None, baseline: bool = True, timing: dict | None = None,
        seed: int = 0) -> list[dict]:
    """Benchmark ``cases`` (names of :data:`CASES` or :class:`Case` objects; default all).

    Returns one dict per (case, impl, mode): ``case, label, impl, mode, pass, max_err, median_ms,
    min_ms, repeats, note``. ``quick`` times fewer calls, only each backend's default (not the pure
    backend's other strategies), and runs the dense baseline only where it is cheap (at most 4096
    tokens).
    """
    cases = [CASES[c] if isinstance(c, str) else c for c in (cases or list(CASES))]
    if timing is None:
        timing = dict(target_seconds=0.3, max_repeats=5, min_repeats=1) if quick else {}
    plan = []
    for case in cases:
        q = mx.zeros((case.batch, *case.spatial, case.heads, case.head_dim), dtype=DTYPES[case.dtype])
        impls, skipped = backend_impls(case, q, q, q, strategies=not quick)
        if baseline:
            base = baseline_impl()
            if quick:
                inner = base.skip
                base.skip = lambda c, m, inner=inner: (
                    "skipped in --quick (more than 4096 tokens)" if c.tokens > 4096 else inner(c, m))
            impls.append(base)
        impls.extend(extra_impls or [])
        plan.append((case, impls, skipped))
    bar = _Progress(sum(len(i) * len(modes) for _, i, _ in plan), enabled=progress)
    rows = []
    try:
        for case, impls, skipped in plan:
            rows.extend(r.as_dict() for r in run_case(case, impls, modes, timing, check, bar, seed))
            for name, why in skipped.items():
                for mode in modes:
                    rows.append(Row(case.name, case.label, name, mode, note=f"not supported: {why}").as_dict())
    finally:
        bar.close()
    return rows


# ---- reporting ---------------------------------------------------------------------------------
def _fmt_ms(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_table(rows: list[dict], reference: str = "pure") -> str:
    """A markdown table, one line per row, with the time of each impl over ``reference``'s."""
    ref = {(r["case"], r["mode"]): r["median_ms"] for r in rows if r["impl"] == reference and r["median_ms"]}
    head = ["case", "problem", "mode", "impl", "pass", "median ms", "runs", f"x {reference}", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        base = ref.get((r["case"], r["mode"]))
        ratio = f"{r['median_ms'] / base:.2f}" if base and r["median_ms"] else "-"
        ok = {True: "yes", False: "NO", None: "-"}[r["pass"]]
        if r["max_err"] is not None:
            ok += f" ({r['max_err']:.1e})"
        lines.append("| " + " | ".join([r["case"], r["label"], r["mode"], r["impl"], ok, _fmt_ms(r["median_ms"]),
                                        str(r["repeats"] or "-"), ratio, r["note"]]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    """Grouped bar chart of median times (log scale) per case and mode; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r["median_ms"]]
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    value = {(r["case"], r["mode"], r["impl"]): r["median_ms"] for r in timed}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ys = [value.get((c, m, impl), 0) for c, m in groups]
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups])
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"natten-mlx benchmark ({mx.default_device()}, mlx {mx.__version__})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="natten-mlx bench", description="Benchmark the installed backends "
                                "against dense SDPA with a neighborhood mask (cases C1-C4, float32).")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--modes", default=",".join(MODES), help="fwd, fwdbwd or both (default both)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart (needs matplotlib)")
    p.add_argument("--quick", action="store_true",
                   help="fewer timed calls, default strategies only, dense baseline only up to 4096 tokens")
    p.add_argument("--no-baseline", action="store_true", help=f"skip {BASELINE}")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown case(s) {unknown}; choose from {list(CASES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes={args.modes!r}: choose from {list(MODES)}")
    print(f"natten-mlx {natten_mlx.__version__}, mlx {mx.__version__}, device {mx.default_device()}")
    rows = run(names, modes, quick=args.quick, progress=not args.no_progress, check=not args.no_check,
               baseline=not args.no_baseline)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(mlx=mx.__version__, natten_mlx=natten_mlx.__version__, device=str(mx.default_device()),
                           rows=rows), fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}" if plot(rows, args.plot) else "matplotlib is not installed; no plot written")
    failed = [r for r in rows if r["pass"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
