"""NATTEN_MLX_PERM_AL: the AVX-512 border blocks' scores by valignd + vpermps (1) or vpermt2ps (0).

The choice is read once per process (the CPU vendor picks the default), so CI on one vendor would
only ever run one of the two; this runs both in child processes on border-heavy problems (every 3D
block here is a border block; the 2D ones have both kinds) and asks for the same bits from both:
out, lse and the three gradients, forward and the backward's S / dP. The default path itself is
checked against the oracle and NATTEN by the other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

nb = pytest.importorskip("natten_mlx_nanobind")
if nb.UNAVAILABLE:
    pytest.skip(nb.UNAVAILABLE, allow_module_level=True)

CHILD = r"""
import hashlib, sys
import mlx.core as mx, numpy as np
import natten_mlx_nanobind as nb
ext = nb.extension()
print(ext.simd())
for spatial, kern, dil, causal, h, hkv, d, dv in [
    ((8, 12, 14), (3, 5, 5), (2, 1, 1), (True, False, False), 2, 2, 24, 24),
    ((6, 32, 32), (3, 7, 7), (1, 1, 1), (False, False, False), 2, 1, 32, 32),
    ((33, 47), (7, 7), (1, 1), (False, False), 4, 2, 20, 36),
    ((30, 30), (5, 5), (3, 2), (False, True), 2, 2, 32, 24),
]:
    rng = np.random.default_rng(0)
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    q, k, v = arr(1, *spatial, h, d), arr(1, *spatial, hkv, d), arr(1, *spatial, hkv, dv)
    cot, clse = arr(1, *spatial, h, dv), arr(1, *spatial, h)
    kw = dict(kernel_size=kern, stride=(1,) * len(kern), dilation=dil, is_causal=causal)
    outs, grads = mx.vjp(lambda a, b, c: ext.fused_forward(a, b, c, **kw), [q, k, v], [cot, clse])
    mx.eval(outs, grads)
    hs = hashlib.sha256()
    for x in (*outs, *grads):
        x = np.array(x)
        assert np.isfinite(x).all()
        hs.update(x.tobytes())
    print(hs.hexdigest())
"""


def run(flag):
    env = dict(os.environ, NATTEN_MLX_PERM_AL=flag, NATTEN_MLX_SIMD="avx512")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_perm_al_on_and_off_give_the_same_bits():
    on, off = run("1"), run("0")
    if on[0] != "avx512":
        pytest.skip(f"no AVX-512 table on this CPU ({on[0]}): NATTEN_MLX_PERM_AL has nothing to choose")
    assert len(on) == 5 and on == off
