"""``natten-mlx check``: every available backend against the pure backend on a seeded sweep."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import functional as F
from .dispatch import _reason, list_backends
from .problem import fused_problem

_FUSED = {1: F.na1d, 2: F.na2d, 3: F.na3d}


def random_case(rng: np.random.Generator) -> dict:
    """A random valid fused call (tiny shapes): every parameter of SEMANTICS.md varies."""
    n = int(rng.integers(1, 4))
    spatial, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(n):
        length = int(rng.integers(3, {1: 24, 2: 10, 3: 6}[n]))
        k = int(rng.integers(2, length + 1))
        spatial.append(length)
        ks.append(k)
        ss.append(int(rng.integers(1, k + 1)))
        ds.append(int(rng.integers(1, length // k + 1)))
        cs.append(bool(rng.integers(0, 2)))
    kv = int(rng.integers(1, 3))
    heads = kv * int(rng.integers(1, 3))
    d, dv = int(rng.choice([8, 16])), int(rng.choice([8, 12]))
    b = int(rng.integers(1, 3))
    case = dict(na_dim=n, kernel_size=tuple(ks), stride=tuple(ss), dilation=tuple(ds), is_causal=tuple(cs))
    case["query"] = mx.array(rng.standard_normal((b, *spatial, heads, d)).astype(np.float32))
    case["key"] = mx.array(rng.standard_normal((b, *spatial, kv, d)).astype(np.float32))
    case["value"] = mx.array(rng.standard_normal((b, *spatial, kv, dv)).astype(np.float32))
    if rng.random() < 0.3:
        m = int(rng.integers(1, 5))
        case["additional_keys"] = mx.array(rng.standard_normal((b, m, kv, d)).astype(np.float32))
        case["additional_values"] = mx.array(rng.standard_normal((b, m, kv, dv)).astype(np.float32))
    if not any(cs) and rng.random() < 0.3:
        case["rpb"] = mx.array(rng.standard_normal((heads, *[2 * k - 1 for k in ks])).astype(np.float32))
    return case


def _run(case: dict, backend: str):
    case = dict(case)
    op = _FUSED[case.pop("na_dim")]
    arrays = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
    present = [a for a in arrays if a in case]

    def loss(*xs):
        kw = {**case, **dict(zip(present, xs))}
        out, lse = op(**kw, return_lse=True, backend=backend)
        return (out * out).sum() + lse.sum(), (out, lse)

    (_, (out, lse)), grads = mx.value_and_grad(loss, argnums=list(range(len(present))))(*(case[a] for a in present))
    return [out, lse, *grads]


def run(cases: int = 50, seed: int = 0, atol: float = 1e-4, out=print) -> int:
    """Number of mismatches (0 means every available backend agrees with pure)."""
    rng = np.random.default_rng(seed)
    sweep = [random_case(rng) for _ in range(cases)]
    failures = 0
    for backend in list_backends():
        if backend.name == "pure":
            continue
        checked = skipped = bad = 0
        for case in sweep:
            c = dict(case)
            problem = fused_problem(
                c["na_dim"], c["query"], c["key"], c["value"], c["kernel_size"], c["stride"], c["dilation"],
                c["is_causal"], None, c.get("additional_keys"), c.get("additional_values"), c.get("rpb"), True,
            )
            if _reason(backend, problem) is not None:
                skipped += 1
                continue
            checked += 1
            try:
                got, want = _run(case, backend.name), _run(case, "pure")
                err = max(float(mx.abs(g - w).max()) for g, w in zip(got, want))
            except Exception as exc:  # a backend that raises has failed this case; check the rest
                bad += 1
                out(f"  ERROR {backend.name}: {type(exc).__name__}: {exc} on {problem}")
                continue
            if not err <= atol:
                bad += 1
                out(f"  MISMATCH {backend.name}: max abs error {err:.3g} on {problem}")
        failures += bad
        out(f"{backend.name}: {checked} checked, {bad} mismatched, {skipped} not supported (see `natten-mlx info`)")
    failures += _check_pure_strategies(sweep, atol, out)
    return failures


def _check_pure_strategies(sweep, atol, out) -> int:
    """The pure backend's two strategies (gather, tiled) compute the same function: compare them."""
    import os

    from .backends.pure import STRATEGY_ENV

    saved = os.environ.get(STRATEGY_ENV)
    try:
        results = {}
        for strategy in ("gather", "tiled"):
            os.environ[STRATEGY_ENV] = strategy
            results[strategy] = [_run(case, "pure") for case in sweep]
    finally:
        if saved is None:
            os.environ.pop(STRATEGY_ENV, None)
        else:
            os.environ[STRATEGY_ENV] = saved
    bad = 0
    for i, (got, want) in enumerate(zip(results["tiled"], results["gather"])):
        err = max(float(mx.abs(g - w).max()) for g, w in zip(got, want))
        if not err <= atol:
            bad += 1
            out(f"  MISMATCH pure tiled vs gather: max abs error {err:.3g} on case {i}")
    out(f"pure (tiled strategy vs gather strategy): {len(sweep)} checked, {bad} mismatched")
    return bad
