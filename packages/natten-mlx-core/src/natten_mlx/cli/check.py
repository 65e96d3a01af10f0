"""``natten-mlx check``: every available backend against the pure backend on a seeded sweep, and
the pure backend's three strategies (slices, gather, tiled) against each other.

Each case is a random valid fused call (every parameter of SEMANTICS.md varies, tiny shapes); the
output, the lse and every input's gradient are compared.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import natten_mlx

from . import strategies

_FUSED = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
_ARRAYS = ("query", "key", "value", "additional_keys", "additional_values", "rpb")


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


def _run(case: dict, backend) -> list:
    """``[out, lse, *gradients]`` of ``case`` on ``backend`` (a name or a backend object)."""
    case = dict(case)
    op = _FUSED[case.pop("na_dim")]
    present = [a for a in _ARRAYS if a in case]

    def loss(*xs):
        kw = {**case, **dict(zip(present, xs))}
        out, lse = op(**kw, return_lse=True, backend=backend)
        return (out * out).sum() + lse.sum(), (out, lse)

    (_, (out, lse)), grads = mx.value_and_grad(loss, argnums=list(range(len(present))))(*(case[a] for a in present))
    return [out, lse, *grads]


def _reason(backend_name: str, case: dict) -> str | None:
    """Why ``backend_name`` cannot serve ``case`` (None: it can), as the dispatcher says."""
    c = dict(case)
    op = f"na{c.pop('na_dim')}d"
    arrays = [c.pop(a) for a in ("query", "key", "value")]
    return natten_mlx.explain(op, *arrays, **c, return_lse=True, backend=backend_name).reasons.get(backend_name)


def _describe(case: dict) -> str:
    shape = tuple(case["query"].shape)
    extras = [a for a in ("additional_keys", "rpb") if a in case]
    return (f"na{case['na_dim']}d q{shape} kernel_size={case['kernel_size']} stride={case['stride']} "
            f"dilation={case['dilation']} is_causal={case['is_causal']}" + (f" with {', '.join(extras)}" if extras else ""))


def _err(got: list, want: list) -> float:
    return max(float(mx.abs(g - w).max()) for g, w in zip(got, want, strict=True))


def run(cases: int = 50, seed: int = 0, atol: float = 1e-4, out=print) -> int:
    """Number of mismatches (0 means every available backend and strategy agrees with pure)."""
    rng = np.random.default_rng(seed)
    sweep = [random_case(rng) for _ in range(cases)]
    out(f"{cases} random cases (seed {seed}); the pure backend runs the {strategies.here()!r} strategy here")
    failures = 0
    for backend in natten_mlx.list_backends():
        if backend.name == "pure":
            continue
        checked = skipped = bad = 0
        for case in sweep:
            if _reason(backend.name, case) is not None:
                skipped += 1
                continue
            checked += 1
            try:
                err = _err(_run(case, backend.name), _run(case, "pure"))
            except Exception as exc:  # a backend that raises has failed this case; check the rest
                bad += 1
                out(f"  ERROR {backend.name}: {type(exc).__name__}: {exc} on {_describe(case)}")
                continue
            if not err <= atol:
                bad += 1
                out(f"  MISMATCH {backend.name}: max abs error {err:.3g} on {_describe(case)}")
        failures += bad
        out(f"{backend.name}: {checked} checked, {bad} mismatched, {skipped} not supported (see `natten-mlx info`)")
    failures += _check_pure_strategies(sweep, atol, out)
    return failures


def _check_pure_strategies(sweep, atol, out) -> int:
    """The pure backend's strategies compute the same function: each against ``gather`` (the
    most direct one: one gather of every window's keys)."""
    results = {}
    for strategy in strategies.names():
        backend = strategies.configured(strategy)
        results[strategy] = [_run(case, backend) for case in sweep]
    bad = 0
    reference = "gather"
    for strategy in strategies.names():
        if strategy == reference:
            continue
        mismatched = 0
        for case, got, want in zip(sweep, results[strategy], results[reference], strict=True):
            err = _err(got, want)
            if not err <= atol:
                mismatched += 1
                out(f"  MISMATCH pure {strategy} vs {reference}: max abs error {err:.3g} on {_describe(case)}")
        out(f"pure ({strategy} strategy vs {reference} strategy): {len(sweep)} checked, {mismatched} mismatched")
        bad += mismatched
    return bad
