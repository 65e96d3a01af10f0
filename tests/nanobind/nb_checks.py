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
