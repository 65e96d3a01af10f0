"""The Metal backend on a real Apple GPU against the pure backend: forward and gradients, both
kernel variants, the split qk/av ops, three dtypes, 1D/2D/3D with every parameter. Skipped where
``mx.metal.is_available()`` is False (every machine this project has run on so far: this file has
never been run; the emulator tests in this folder are what verified the kernels).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
try:  # an installed natten-mlx-metal is what is tested; else the source tree
    import natten_mlx_metal  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "packages/natten-mlx-metal/src"))

mx = pytest.importorskip("mlx.core")
if not mx.metal.is_available():
    pytest.skip("no Metal device (mx.metal.is_available() is False)", allow_module_level=True)

import natten_mlx  # noqa: E402
from configs import cfg_id, random_config  # noqa: E402
from natten_mlx_metal.backend import MetalBackend  # noqa: E402

OPS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": 2e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _cases():
    rng = np.random.default_rng(2024)
    out = []
    for dim, max_len in ((1, 40), (2, 12), (3, 7)):
        for dtype in DTYPES:
            for _ in range(4):
                out.append((random_config(rng, dim, max_len, head_dims=(8, 16, 24, 64, 128)), dtype))
    return out


CASES = _cases()


def _inputs(cfg, dtype, seed):
    """Random inputs of ``cfg`` (query, key, value, the extra keys/values and rpb when it has them):
    their names and MLX arrays in ``dtype``."""
    rng = np.random.default_rng(seed)
    B, shape, H, Hkv, D, Dv, E = (cfg[x] for x in ("B", "shape", "H", "Hkv", "D", "Dv", "E"))
    arrays = {
        "query": rng.standard_normal((B, *shape, H, D)), "key": rng.standard_normal((B, *shape, Hkv, D)),
        "value": rng.standard_normal((B, *shape, Hkv, Dv)),
    }
    if E:
        arrays["additional_keys"] = rng.standard_normal((B, E, Hkv, D))
        arrays["additional_values"] = rng.standard_normal((B, E, Hkv, Dv))
    if cfg["rpb"]:
        arrays["rpb"] = rng.standard_normal((H, *[2 * k - 1 for k in cfg["K"]]))
    names = list(arrays)
    return names, [mx.array(arrays[n].astype(np.float32)).astype(DTYPES[dtype]) for n in names]


def _run(cfg, dtype, backend, seed):
    names, xs = _inputs(cfg, dtype, seed)
    op = OPS[cfg["na_dim"]]

    def loss(*a):
        out, lse = op(**dict(zip(names, a)), kernel_size=cfg["kernel_size"], stride=cfg["stride"],
                      dilation=cfg["dilation"], is_causal=cfg["is_causal"], scale=cfg["scale"], return_lse=True,
                      backend=backend)
        return (out.astype(mx.float32) ** 2).sum() + lse.sum(), (out, lse)

    (_, (out, lse)), grads = mx.value_and_grad(loss, argnums=list(range(len(names))))(*xs)
    return [out, lse, *grads]


def _compare(cfg, dtype, backend, run=_run, seed=1):
    """``run`` (outputs then gradients) with ``backend`` against the pure backend, on the same inputs."""
    got = run(cfg, dtype, backend, seed=seed)
    want = run(cfg, dtype, "pure", seed=seed)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32))
        scale = max(1.0, float(np.abs(w).max()))
        assert np.abs(g - w).max() <= TOL[dtype] * scale, (i, float(np.abs(g - w).max()))


@pytest.mark.parametrize("cfg,dtype", CASES, ids=[f"{d}-{cfg_id(c)}" for c, d in CASES])
def test_metal_matches_pure(cfg, dtype):
    _compare(cfg, dtype, "metal")


@pytest.mark.parametrize("cfg,dtype", CASES[::3], ids=[f"{d}-{cfg_id(c)}" for c, d in CASES[::3]])
def test_simple_variant_matches_pure(cfg, dtype):
    _compare(cfg, dtype, MetalBackend().configure(variant="simple"))


def test_metal_is_registered_and_available():
    assert MetalBackend().available() is None
    assert "metal" in [b.name for b in natten_mlx.list_backends()], "install packages/natten-mlx-metal (entry point)"


QK = {1: natten_mlx.na1d_qk, 2: natten_mlx.na2d_qk, 3: natten_mlx.na3d_qk}
AV = {1: natten_mlx.na1d_av, 2: natten_mlx.na2d_av, 3: natten_mlx.na3d_av}


def _run_split(cfg, dtype, backend, seed):
    """qk -> softmax -> av, with gradients of every input: the split ops and both backwards."""
    names, xs = _inputs(cfg, dtype, seed)
    win = dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
               is_causal=cfg["is_causal"])
    n = cfg["na_dim"]

    def loss(*a):
        x = dict(zip(names, a))
        s = QK[n](x["query"], x["key"], rpb=x.get("rpb"), additional_keys=x.get("additional_keys"),
                  scale=cfg["scale"], backend=backend, **win)
        out = AV[n](mx.softmax(s.astype(mx.float32), axis=-1).astype(s.dtype), x["value"],
                    additional_values=x.get("additional_values"), backend=backend, **win)
        finite = mx.where(mx.isinf(s), 0.0, s.astype(mx.float32))
        return (out.astype(mx.float32) ** 2).sum() + 1e-2 * (finite ** 2).sum(), (out, finite)

    (_, (out, s)), grads = mx.value_and_grad(loss, argnums=list(range(len(names))))(*xs)
    return [out, s, *grads]


@pytest.mark.parametrize("cfg,dtype", CASES[::2], ids=[f"{d}-{cfg_id(c)}" for c, d in CASES[::2]])
def test_split_ops_match_pure(cfg, dtype):
    _compare(cfg, dtype, "metal", run=_run_split, seed=2)
