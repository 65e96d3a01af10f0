"""Running the benchmark: every impl on every case and mode, checked and timed, one row each."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from .cases import CASES, DTYPES, TOLERANCES, Case, make_inputs
from .impls import BASELINE, QUICK_DENSE_TOKENS, Impl, backend_impls, baseline_impl
from .progress import Progress
from .reference import max_err, reference_rows, sample_rows
from .timing import time_callable

MODES = ("fwd", "fwdbwd")
# what --quick runs unless told otherwise: the cases that take well under a second per row on a CPU
QUICK_CASES = ("C1", "C2")


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


def _caller(f, mode: str, q, k, v, cot) -> Callable[[], object]:
    """The timed call of one mode: ``f(q, k, v)``, or ``mx.vjp`` of it with cotangent ``cot``."""
    return (lambda: f(q, k, v)) if mode == "fwd" else (lambda: mx.vjp(f, [q, k, v], [cot]))


def run_case(case: Case, impls: list[Impl], modes=MODES, timing: dict | None = None, check: bool = True,
             progress: Progress | None = None, seed: int = 0) -> list[Row]:
    """All ``impls`` on one case, for each mode; one Row each (errors become notes, never raise).

    ``fwd`` rows are checked against the float64 oracle on sampled queries; ``fwdbwd`` rows
    against the dense baseline's gradients, or where it did not run, the pure backend's.
    """
    timing = timing or {}
    q, k, v, cot = make_inputs(case, seed)
    mx.eval(q, k, v, cot)
    fwd_tol, grad_tol = TOLERANCES[case.dtype]
    rows_idx = sample_rows(case) if check else None
    expected = reference_rows(case, q, k, v, rows_idx) if check else None
    ref_grads = None
    out: list[Row] = []
    # the dense baseline first: its gradients are the reference of the others; without it the pure
    # backend's (the reference backend), never a compiled tier's
    ordered = sorted(impls, key=lambda i: (i.name != BASELINE, i.name != "pure"))
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
                call = _caller(impl.build(case), mode, q, k, v, cot)
                if check and mode == "fwd":
                    o = call()
                    mx.eval(o)
                    got = np.asarray(o.astype(mx.float32)).reshape(case.batch, case.tokens, case.heads, -1)
                    row.max_err = max_err(got[:, rows_idx], expected)
                    row.pass_ = row.max_err <= fwd_tol
                elif check:
                    _, grads = call()
                    mx.eval(grads)
                    grads = [np.asarray(g.astype(mx.float32)) for g in grads]
                    if impl.name == BASELINE or ref_grads is None:
                        ref_grads = grads
                        row.note = "gradient reference" if impl.name == BASELINE else "gradient reference (no dense baseline)"
                    else:
                        row.max_err = max(max_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
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
    backend's other strategies), and runs the dense baseline only where it is cheap (at most
    :data:`QUICK_DENSE_TOKENS` tokens). ``progress`` draws a bar when stderr is a terminal.
    """
    cases = [CASES[c] if isinstance(c, str) else c for c in (cases or list(CASES))]
    if timing is None:
        timing = dict(target_seconds=0.3, max_repeats=5, min_repeats=1) if quick else {}
    plan = []
    for case in cases:
        q = mx.zeros((case.batch, *case.spatial, case.heads, case.head_dim), dtype=DTYPES[case.dtype])
        impls, skipped = backend_impls(case, q, q, q, strategies_too=not quick)
        if baseline:
            impls.append(baseline_impl(max_tokens=QUICK_DENSE_TOKENS if quick else None))
        impls.extend(extra_impls or [])
        plan.append((case, impls, skipped))
    bar = Progress(sum(len(i) * len(modes) for _, i, _ in plan), enabled=progress)
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
