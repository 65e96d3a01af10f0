"""The benchmark's problems and their inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

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


def make_inputs(case: Case, seed: int = 0):
    """``(q, k, v, cotangent)`` as MLX arrays of the case's dtype, from a seeded NumPy generator."""
    rng = np.random.default_rng(seed)
    shape = (case.batch, *case.spatial, case.heads, case.head_dim)
    arrays = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    dtype = DTYPES[case.dtype]
    return tuple(mx.array(a).astype(dtype) for a in arrays)
