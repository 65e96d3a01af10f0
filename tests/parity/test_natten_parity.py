"""Parity of natten_mlx with official NATTEN (0.21.x, PyTorch, CPU).

* Forward (out and lse): natten_mlx vs NATTEN's public ``na1d/na2d/na3d`` running its ``flex-fna``
  backend on CPU in float32 (extra KV goes through NATTEN's own attention + merge path).
  240 configurations: 1D 100, 2D 80, 3D 60.
* Backward: natten_mlx gradients (q, k, v, extra k/v; loss on out and lse) vs float64 torch autograd
  of dense attention under NATTEN's own mask predicate (``get_na_flex_mask(...).mask_mod``).
  The same 240 configurations plus 60 with D_v != D / odd head dims (which NATTEN's flex backend
  cannot run forward).
* Mask: SEMANTICS.md (tests/oracle.py) vs NATTEN's mask_mod, exhaustively in 1D for L <= 12 and on
  300 random 2D/3D configurations.

rpb is not covered here: NATTEN 0.21 no longer has relative positional biases.
The whole module is skipped when torch or natten is not installed.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # for --import-mode=importlib
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*flex_attention.*"),
    pytest.mark.filterwarnings("ignore:.*return_lse is deprecated.*"),
]

pytest.importorskip("torch")
pytest.importorskip("natten")
mx = pytest.importorskip("mlx.core")
natten_mlx = pytest.importorskip("natten_mlx")

import natten_ref  # noqa: E402  (tests/parity/natten_ref.py)
import oracle  # noqa: E402
from configs import cfg_id, random_config, random_tensors  # noqa: E402

NA = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
MAX_LEN = {1: 12, 2: 8, 3: 5}
COUNTS = {1: 100, 2: 80, 3: 60}
N_DENSE_ONLY = 60
FWD_TOL = dict(rtol=1e-4, atol=1e-4)
GRAD_TOL = dict(rtol=1e-3, atol=2e-4)


def _configs(counts, seed, flex_ok):
    out = []
    for n in (1, 2, 3):
        rng = np.random.default_rng(seed + n)
        for i in range(counts[n]):
            if flex_ok:  # NATTEN flex: D == Dv, power of two >= 8; no rpb in NATTEN 0.21
                cfg = random_config(rng, n, MAX_LEN[n], allow_rpb=False, allow_dv=False, head_dims=(8, 16))
            else:
                cfg = random_config(rng, n, MAX_LEN[n], allow_rpb=False, head_dims=(3, 5, 8))
                if cfg["Dv"] == cfg["D"]:
                    cfg["Dv"] = cfg["D"] + 1
            cfg["seed"] = seed * 10000 + 1000 * n + i
            out.append(cfg)
    return out


FLEX_CONFIGS = _configs(COUNTS, 500, flex_ok=True)
DENSE_ONLY = _configs({1: 25, 2: 20, 3: 15}, 600, flex_ok=False)


def _mx(x):
    return None if x is None else mx.array(np.asarray(x, dtype=np.float32))


def _np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def _win(cfg):
    return dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
                is_causal=cfg["is_causal"], scale=cfg["scale"])


def _nwin(cfg):
    return dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=cfg["scale"])


def _mlx_forward_and_grads(cfg, q, k, v, ak, av, W, U):
    names = ["q", "k", "v", "additional_keys", "additional_values"]
    np_in = dict(q=q, k=k, v=v, additional_keys=ak, additional_values=av)
    present = [n for n in names if np_in[n] is not None]
    xs = [_mx(np_in[n]) for n in present]
    W_mx, U_mx = _mx(W), _mx(U)

    def call(*arrays):
        kw = dict(zip(present, arrays))
        return NA[cfg["na_dim"]](kw["q"], kw["k"], kw["v"], additional_keys=kw.get("additional_keys"),
                                 additional_values=kw.get("additional_values"), return_lse=True, **_win(cfg))

    out, lse = call(*xs)

    def loss(*arrays):
        o, l = call(*arrays)
        return mx.sum(o * W_mx) + mx.sum(l * U_mx)

    grads = mx.grad(loss, argnums=list(range(len(xs))))(*xs)
    return _np(out), _np(lse), {n: _np(g) for n, g in zip(present, grads)}


def _check(cfg, with_flex_forward):
    rng = np.random.default_rng(cfg["seed"])
    q, k, v, ak, av, _ = random_tensors(rng, cfg)
    out_shape = (cfg["B"], *cfg["shape"], cfg["H"], cfg["Dv"])
    W = rng.standard_normal(out_shape)
    U = rng.standard_normal(out_shape[:-1])
    out, lse, grads = _mlx_forward_and_grads(cfg, q, k, v, ak, av, W, U)
    if with_flex_forward:
        n_out, n_lse = natten_ref.natten_forward(q, k, v, additional_keys=ak, additional_values=av, **_nwin(cfg))
        np.testing.assert_allclose(out, n_out, **FWD_TOL, err_msg="out vs NATTEN flex-fna")
        np.testing.assert_allclose(lse, n_lse, **FWD_TOL, err_msg="lse vs NATTEN flex-fna")
    d_out, d_lse, d_grads = natten_ref.natten_dense(q, k, v, additional_keys=ak, additional_values=av,
                                                     dout=W, dlse=U, **_nwin(cfg))
    np.testing.assert_allclose(out, d_out, **FWD_TOL, err_msg="out vs dense(NATTEN mask)")
    np.testing.assert_allclose(lse, d_lse, **FWD_TOL, err_msg="lse vs dense(NATTEN mask)")
    assert set(grads) == set(d_grads)
    for name in grads:
        np.testing.assert_allclose(grads[name], d_grads[name], **GRAD_TOL, err_msg=f"d{name} vs NATTEN-mask autograd")


@pytest.mark.parametrize("cfg", FLEX_CONFIGS, ids=[cfg_id(c) for c in FLEX_CONFIGS])
def test_parity_forward_and_backward(cfg):
    _check(cfg, with_flex_forward=True)


@pytest.mark.parametrize("cfg", DENSE_ONLY, ids=[cfg_id(c) for c in DENSE_ONLY])
def test_parity_backward_value_head_dim(cfg):
    _check(cfg, with_flex_forward=False)


def test_config_coverage():
    allc = FLEX_CONFIGS + DENSE_ONLY
    assert len(FLEX_CONFIGS) >= 200
    assert any(c["E"] for c in FLEX_CONFIGS) and any(c["H"] != c["Hkv"] for c in FLEX_CONFIGS)
    assert any(any(c["c"]) for c in FLEX_CONFIGS) and any(max(c["s"]) > 1 for c in FLEX_CONFIGS)
    assert any(max(c["d"]) > 1 for c in FLEX_CONFIGS)
    assert all(c["D"] != c["Dv"] for c in DENSE_ONLY) and len(allc) >= 260


@pytest.mark.parametrize("L", range(2, 13))
def test_semantics_mask_matches_natten_1d(L):
    """SEMANTICS.md (oracle) and NATTEN's mask_mod agree on every 1D (K, stride, dilation, causal)."""
    for K in range(2, L + 1):
        for d in range(1, L // K + 1):
            for s in range(1, K + 1):
                for c in (False, True):
                    a = oracle.na_mask((L,), K, s, d, c)
                    b = natten_ref.natten_mask((L,), (K,), (s,), (d,), (c,))
                    np.testing.assert_array_equal(a, b, err_msg=f"L={L} K={K} s={s} d={d} causal={c}")


def test_semantics_mask_matches_natten_nd():
    rng = np.random.default_rng(77)
    for _ in range(300):
        n = int(rng.integers(2, 4))
        cfg = random_config(rng, n, {2: 9, 3: 6}[n])
        a = oracle.na_mask(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
        b = natten_ref.natten_mask(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
        np.testing.assert_array_equal(a, b, err_msg=cfg_id(cfg))


def test_fast_natten_path_is_bitwise_the_default_path():
    """natten_ref skips torch's per-call dynamo trace of uncompiled flex_attention; same numbers."""
    for cfg in FLEX_CONFIGS[::40]:
        rng = np.random.default_rng(cfg["seed"])
        q, k, v, ak, av, _ = random_tensors(rng, cfg)
        a = natten_ref.natten_forward(q, k, v, additional_keys=ak, additional_values=av, dynamo=False, **_nwin(cfg))
        b = natten_ref.natten_forward(q, k, v, additional_keys=ak, additional_values=av, dynamo=True, **_nwin(cfg))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
