"""Wall-clock timing of MLX calls."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


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
