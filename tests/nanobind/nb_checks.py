"""Checks shared by the nanobind tier's tests (importable from this folder: pytest puts it on sys.path)."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np


def assert_close(got, want, tol, what):
    """got is finite and within tol times max(1, max |want|) of want everywhere."""
    got = np.asarray(got, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 1.0)
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def run_in_two_threads(same, reps):
    """Calls same(i) reps times in each of two Python threads at once (i = 0, 1); same(i) says whether its
    results equal thread i's expected ones. Returns what went wrong (empty: nothing)."""
    errors = []

    def worker(i):
        try:
            for _ in range(reps):
                if not same(i):
                    errors.append(f"thread {i}: results differ")
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            errors.append(repr(exc))
        finally:
            mx.clear_streams()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def fused_vjp(ext, shape, K, s, d, c, Hkv, G, D, Dv, B, seed, dtype=mx.float32):
    """One call of ext.fused_forward and its vjp with an output and an lse cotangent, on seeded normal inputs of
    these shapes (heads-last, H = Hkv * G). Returns out, lse, dq, dk, dv (float64 numpy), the inputs and
    cotangents as float64 (rounded to dtype, so an oracle sees what the op saw), kw, and the path counters
    of the call."""
    rng = np.random.default_rng(seed)
    arrs = [
        rng.standard_normal((B, *shape, Hkv * G, D)),
        rng.standard_normal((B, *shape, Hkv, D)),
        rng.standard_normal((B, *shape, Hkv, Dv)),
        rng.standard_normal((B, *shape, Hkv * G, Dv)),
        rng.standard_normal((B, *shape, Hkv * G)),
    ]
    xs = [mx.array(x.astype(np.float32)).astype(dtype) for x in arrs[:4]] + [mx.array(arrs[4].astype(np.float32))]
    q, k, v, cot, clse = xs
    kw = dict(kernel_size=list(K), stride=list(s), dilation=list(d), is_causal=list(c))
    ext.path_counts(True)
    outs, grads = mx.vjp(lambda a, b, cc: ext.fused_forward(a, b, cc, **kw), [q, k, v], [cot, clse])
    mx.eval(outs, grads)
    counts = ext.path_counts(True)
    got = [np.array(x.astype(mx.float32), np.float64) for x in (*outs, *grads)]
    return got, [np.array(x.astype(mx.float32), np.float64) for x in xs], kw, counts


def geo_id(g):
    """A test id for a geometry tuple (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, E, rpb, env)."""
    shape, K, s, d, c, Hkv, G, D, Dv, E, rpb, env = g
    return (
        f"L{'x'.join(map(str, shape))}-K{'x'.join(map(str, K))}-s{''.join(map(str, s))}-d{''.join(map(str, d))}"
        f"-c{''.join(str(int(x)) for x in c)}-kv{Hkv}G{G}D{D}v{Dv}-E{E}"
        + ("-rpb" if rpb else "")
        + "".join(f"-{k[11:]}{v}" for k, v in env.items())
    )
