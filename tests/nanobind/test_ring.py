"""NATTEN_MLX_RING: the streamed exact path's transposed keys and values, and the 2D/3D exact
backward's key-side sums, in rings of row slots (1, the default) or every row in its own place (0).

The choice is read once per process, so this runs both in child processes with two kernel threads (the
streamed path needs at least two slices per thread) on problems whose rows wrap around the ring many
times: dilation along either axis (a window's rows interleave with other groups'), causal and even
kernels (windows that do not centre), GQA, D != Dv, long rows and short ones (border blocks read past
the last row into slots a late-starting part never wrote), each after a call with inf values. It asks for the same
bits from both (out, lse and the three gradients) and for the path counters to show that the rings ran
(the forward's keys and values in 2D and 3D, the backward's in 2D, its sums in 2D and 3D) with 1 and
never with 0. The default path itself is checked against the oracle and
NATTEN by the other tests.
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
import hashlib
import mlx.core as mx, numpy as np
import natten_mlx_nanobind as nb
ext = nb.extension()
vw = 16 if ext.simd() == "avx512" else 8
for spatial, kern, dil, causal, h, hkv, d, dv in [
    ((64, 40), (7, 7), (1, 1), (False, False), 4, 4, 32, 32),
    ((60, 48), (9, 7), (2, 3), (False, False), 8, 4, 16, 24),
    ((70, 33), (4, 6), (3, 1), (True, False), 4, 4, 20, 12),
    ((45, 52), (5, 8), (1, 2), (False, True), 6, 6, 32, 16),
    ((81, 17), (11, 5), (1, 1), (True, True), 8, 8, 8, 8),
    ((20, 12), (9, 3), (1, 1), (False, False), 8, 4, 8, 12),
    ((20, 16), (9, 5), (1, 1), (False, False), 8, 4, 8, 12),
    ((12, 16, 20), (3, 5, 5), (1, 1, 1), (False, False, False), 4, 4, 16, 16),
    ((10, 12, 40), (3, 3, 7), (2, 1, 1), (True, False, False), 8, 4, 8, 12),
]:
    if len(spatial) == 2 and spatial[1] < 30:  # short rows, as long in vectors as with 8 queries per vector
        spatial = (spatial[0], spatial[1] * vw // 8)
    rng = np.random.default_rng(sum(spatial))
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    q, k, v = arr(1, *spatial, h, d), arr(1, *spatial, hkv, d), arr(1, *spatial, hkv, dv)
    cot, clse = arr(1, *spatial, h, dv), arr(1, *spatial, h)
    kw = dict(kernel_size=kern, stride=(1,) * len(kern), dilation=dil, is_causal=causal)
    # calls with inf values (two batches, then one) leave inf in the reused buffers, in other places than
    # this call's ring: the call after them must read only slots it wrote (or zeros)
    for b in (2, 1):
        mx.eval(ext.fused_forward(mx.concatenate([q] * b), mx.concatenate([k] * b),
                                  mx.full((b, *v.shape[1:]), float("inf")), **kw)[0])
    ext.path_counts(True)
    outs, grads = mx.vjp(lambda a, b, c: ext.fused_forward(a, b, c, **kw), [q, k, v], [cot, clse])
    mx.eval(outs, grads)
    counts = ext.path_counts(True)
    hs = hashlib.sha256()
    for x in (*outs, *grads):
        x = np.array(x)
        assert np.isfinite(x).all()
        hs.update(x.tobytes())
    print(hs.hexdigest(), len(spatial), counts[6], counts[7], counts[8])
"""


def run(flag, simd):
    env = dict(os.environ, NATTEN_MLX_RING=flag, NATTEN_MLX_NUM_THREADS="2")
    if simd:
        env["NATTEN_MLX_SIMD"] = simd
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


# the default table, and the AVX2 one on an AVX-512 machine (its 8-lane blocks read past the last row into
# slots a late-starting part never wrote on the short-row problems; the 16-lane ones reach less far)
SIMDS = [None] + (["avx2"] if nb.extension().simd() == "avx512" else [])


@pytest.mark.parametrize("simd", SIMDS)
def test_ring_on_and_off_give_the_same_bits(simd):
    on, off = run("1", simd), run("0", simd)
    assert len(on) == len(off) == 9
    for i, (a, b) in enumerate(zip(on, off)):
        assert a[0] == b[0], f"problem {i}: the rings changed the results"
        # 2D: keys and values forward and backward, and the sums; 3D: the forward's keys and values (the
        # backward does not stream them in 3D) and the sums
        want = ["1", "1", "1"] if a[1] == "2" else ["1", "0", "1"]
        assert a[2:] == want, f"problem {i}: the rings that ran: {a[2:]}, not {want}"
        assert b[2:] == ["0", "0", "0"], f"problem {i}: NATTEN_MLX_RING=0 still ran on a ring ({b[2:]})"
