"""The Metal tier's split ops (qk, av and their backwards: split_*.metal), exactly as shipped, run
through the CPU emulator against the float64 oracle (tests/oracle.py's na_qk/na_av and their
backwards) over a seeded sweep of 1D/2D/3D problems (even/odd kernel sizes, stride, dilation,
per-axis causal, GQA, Dv != D, additional keys/values, rpb, scale) in float32, float16 and
bfloat16; sub-domain problems against the pure backend; the core's dispatch (mx.custom_function
and the BackwardRecord) against pure's gradients.

Invalid (causal) slots are checked exactly: scores -inf there, av ignores whatever weight sits
there (the tests put +inf in them), and the attn gradient is 0 there.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
for p in ("packages/natten-mlx-metal/emulator", "tests", "tests/metal"):
    if str(ROOT / p) not in sys.path:
        sys.path.insert(0, str(ROOT / p))
try:
    import natten_mlx_metal  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "packages/natten-mlx-metal/src"))

mx = pytest.importorskip("mlx.core")
if shutil.which("g++") is None:
    pytest.skip("the Metal emulator needs g++", allow_module_level=True)

import oracle  # noqa: E402
from configs import cfg_id, random_config  # noqa: E402
from natten_mlx.problem import Problem  # noqa: E402
from natten_mlx_metal.backend import MetalBackend  # noqa: E402
from test_backend_emulated import DTYPES, TOL, _EmulatedGPU, _fixed, emulator_launcher  # noqa: E402

BACKEND = MetalBackend(emulator_launcher())


def _problems(cfg, dtype):
    D = cfg["D"]
    scale = float(cfg["scale"] if cfg["scale"] is not None else D ** -0.5)
    common = dict(batch=cfg["B"], spatial=tuple(cfg["shape"]), heads=cfg["H"], kv_heads=cfg["Hkv"],
                  kernel_size=tuple(cfg["K"]), stride=tuple(cfg["s"]), dilation=tuple(cfg["d"]),
                  is_causal=tuple(bool(x) for x in cfg["c"]), dtype=dtype, num_extra=cfg["E"], return_lse=False,
                  device="gpu")
    qk = Problem(op="qk", head_dim=D, value_head_dim=0, scale=scale, has_rpb=bool(cfg["rpb"]), **common)
    av = Problem(op="av", head_dim=0, value_head_dim=cfg["Dv"], scale=1.0, has_rpb=False, **common)
    return qk, av


def _mlx(a, dtype):
    x = mx.array(a.astype(np.float32)).astype(dtype)
    return x, np.array(x.astype(mx.float32)).astype(np.float64)


def _close(got, ref, dtype_name, what, finite=None):
    got = np.array(got.astype(mx.float32)).astype(np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if finite is not None:
        got, ref = got[finite], ref[finite]
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    err = float(np.abs(got - ref).max()) if ref.size else 0.0
    assert err <= TOL[dtype_name] * scale, f"{what}: max error {err:.3g} > {TOL[dtype_name] * scale:.3g}"


def check_split(cfg, dtype_name, seed, backend=BACKEND):
    dtype = DTYPES[dtype_name]
    p_qk, p_av = _problems(cfg, dtype)
    assert backend.supports(p_qk) is None and backend.supports(p_av) is None
    rng = np.random.default_rng(seed)
    B, shape, H, Hkv, D, Dv, E = (cfg[x] for x in ("B", "shape", "H", "Hkv", "D", "Dv", "E"))
    K, s, d, c = cfg["K"], cfg["s"], cfg["d"], cfg["c"]
    kt = int(np.prod(K))
    q, q64 = _mlx(rng.standard_normal((B, *shape, H, D)), dtype)
    k, k64 = _mlx(rng.standard_normal((B, *shape, Hkv, D)), dtype)
    v, v64 = _mlx(rng.standard_normal((B, *shape, Hkv, Dv)), dtype)
    ak, ak64 = _mlx(rng.standard_normal((B, E, Hkv, D)), dtype) if E else (None, None)
    av, av64 = _mlx(rng.standard_normal((B, E, Hkv, Dv)), dtype) if E else (None, None)
    rpb, rpb64 = _mlx(rng.standard_normal((H, *[2 * x - 1 for x in K])), dtype) if cfg["rpb"] else (None, None)
    _, valid = oracle.slot_keys(shape, K, s, d, c)  # [N, kt]
    valid_all = np.concatenate([valid, np.ones((valid.shape[0], E), bool)], 1)
    vmask = np.broadcast_to(valid_all.reshape(1, *shape, 1, kt + E), (B, *shape, H, kt + E))

    # qk forward: -inf exactly in the invalid slots, close elsewhere
    scores = backend.qk_forward(p_qk, q, k, ak, rpb)
    assert scores.dtype == dtype
    ref = oracle.na_qk(q64, k64, K, s, d, c, rpb64, p_qk.scale, ak64)
    got = np.array(scores.astype(mx.float32))
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)) and np.array_equal(np.isneginf(ref), ~vmask)
    _close(scores, ref, dtype_name, "scores", finite=vmask)

    # qk backward from random dScores (random also in the invalid slots: they carry no gradient)
    ds, ds64 = _mlx(rng.standard_normal(ref.shape), dtype)
    rec = SimpleNamespace(problem=p_qk, inputs=dict(query=q, key=k, additional_keys=ak, rpb=rpb), out=scores,
                          lse=None, d_out=ds, d_lse=None)
    grads = backend.qk_backward(rec)
    want = oracle.na_qk_backward(q64, k64, K, s, d, c, rpb64, p_qk.scale, ak64, dscores=ds64)
    names = dict(query="q", key="k", additional_keys="additional_keys", rpb="rpb")
    assert set(grads) == {n for n, x in rec.inputs.items() if x is not None}
    for n, g in grads.items():
        assert g.dtype == rec.inputs[n].dtype and g.shape == rec.inputs[n].shape, n
        _close(g, want[names[n]], dtype_name, f"qk d{n}")

    # av forward: softmax-like weights, +inf planted in the invalid slots (must be ignored)
    a = rng.random((B, *shape, H, kt + E))
    a = np.where(vmask, a, np.inf)
    attn, a64 = _mlx(a, dtype)
    out = backend.av_forward(p_av, attn, v, av)
    assert out.dtype == dtype
    _close(out, oracle.na_av(np.where(vmask, a64, 0.0), v64, K, s, d, c, av64), dtype_name, "av out")

    # av backward: the attn gradient is exactly 0 in the invalid slots
    do, do64 = _mlx(rng.standard_normal((B, *shape, H, Dv)), dtype)
    rec = SimpleNamespace(problem=p_av, inputs=dict(attn=attn, value=v, additional_values=av), out=out, lse=None,
                          d_out=do, d_lse=None)
    grads = backend.av_backward(rec)
    want = oracle.na_av_backward(np.where(vmask, a64, 0.0), v64, K, s, d, c, av64, dout=do64)
    assert set(grads) == {n for n, x in rec.inputs.items() if x is not None}
    for n, g in grads.items():
        assert g.dtype == rec.inputs[n].dtype and g.shape == rec.inputs[n].shape, n
    assert np.all(np.array(grads["attn"].astype(mx.float32))[~vmask] == 0.0)
    _close(grads["attn"], want["attn"], dtype_name, "av dattn")
    _close(grads["value"], want["value"], dtype_name, "av dvalue")
    if E:
        _close(grads["additional_values"], want["additional_values"], dtype_name, "av dadditional_values")


def _sweep(na_dim, count, seed, max_len):
    rng = np.random.default_rng(seed)
    return [random_config(rng, na_dim, max_len) for _ in range(count)]


SWEEP = (
    [(c, "float32") for c in _sweep(1, 8, 1101, 24)]
    + [(c, "float32") for c in _sweep(2, 7, 1202, 9)]
    + [(c, "float32") for c in _sweep(3, 5, 1303, 6)]
    + [(c, "float16") for c in _sweep(1, 2, 1111, 20) + _sweep(2, 2, 1212, 8) + _sweep(3, 1, 1313, 5)]
    + [(c, "bfloat16") for c in _sweep(1, 2, 1121, 20) + _sweep(2, 2, 1222, 8) + _sweep(3, 1, 1323, 5)]
)
# geometries the random draw may miss: rpb with GQA, Dv != D and extras together; causal on every
# axis with dilation; a long axis with several stride groups
FIXED = [
    _fixed((9, 8), (3, 4), (2, 1), (2, 1), (False, False), 4, 8, H=4, Hkv=2, E=2, rpb=True, B=2),
    _fixed((7, 6, 5), (3, 2, 3), (1, 2, 1), (2, 1, 1), (True, True, True), 8, 4, H=3, Hkv=1, E=1),
    _fixed((40,), (7,), (3,), (2,), (False,), 3, 5, H=2, Hkv=1, rpb=True),
    _fixed((33,), (6,), (4,), (1,), (True,), 8, 8, H=2, Hkv=2, E=3),
]
# the low-precision draws above hold no rpb and (float16) no dilation: two fixed cases add them
CASES = SWEEP + [(c, "float32") for c in FIXED] + [(FIXED[0], "float16"), (FIXED[2], "bfloat16")]


@pytest.mark.parametrize("cfg,dtype", CASES, ids=[f"{d}-{cfg_id(c)}" for c, d in CASES])
def test_split_ops_against_the_oracle(cfg, dtype):
    check_split(cfg, dtype, seed=hash(cfg_id(cfg)) % 1000)


# every register-array size of the split kernels (8..256: the contraction length, D for qk and
# its backward, Dv for av and its backward), each dtype at least once
SPLIT_HEAD_DIMS = [("float32", 16, 32), ("float32", 64, 128), ("float32", 256, 20), ("float16", 40, 256),
                   ("bfloat16", 100, 12)]


@pytest.mark.parametrize("dtype,D,Dv", SPLIT_HEAD_DIMS, ids=[f"{t}-D{a}-Dv{b}" for t, a, b in SPLIT_HEAD_DIMS])
def test_split_head_dims(dtype, D, Dv):
    check_split(_fixed((7, 6), (3, 4), (1, 2), (2, 1), (False, True), D, Dv, H=2, Hkv=1, E=1), dtype, seed=D + Dv)


def test_split_subdomain_matches_pure():
    """A sub-domain qk/av problem (local queries, a key slab, global windows) against the pure
    backend's split ops on the same Problem, forward and backward."""
    from natten_mlx.backends.pure import PureBackend

    pure = PureBackend(strategy="gather")
    rng = np.random.default_rng(3)
    full, K, s, d, c = (15, 14), (3, 4), (1, 2), (2, 1), (False, True)
    qoff, n, kvoff, nk = (5, 3), (6, 7), (1, 0), (13, 10)
    B, H, Hkv, D, Dv = 1, 2, 1, 8, 8
    common = dict(batch=B, spatial=n, heads=H, kv_heads=Hkv, kernel_size=K, stride=s, dilation=d, is_causal=c,
                  dtype=mx.float32, num_extra=0, return_lse=False, device="gpu", domain=full, query_offset=qoff,
                  kv_spatial=nk, kv_offset=kvoff)
    p_qk = Problem(op="qk", head_dim=D, value_head_dim=0, scale=0.4, has_rpb=False, **common)
    p_av = Problem(op="av", head_dim=0, value_head_dim=Dv, scale=1.0, has_rpb=False, **common)
    assert p_qk.is_subdomain and BACKEND.supports(p_qk) is None
    f32 = lambda *sh: mx.array(rng.standard_normal(sh).astype(np.float32))  # noqa: E731
    q, k, v = f32(B, *n, H, D), f32(B, *nk, Hkv, D), f32(B, *nk, Hkv, Dv)
    kt = int(np.prod(K))
    got, want = BACKEND.qk_forward(p_qk, q, k), pure.qk_forward(p_qk, q, k)
    assert np.array_equal(np.isneginf(np.array(got)), np.isneginf(np.array(want)))
    fin = np.isfinite(np.array(want))
    assert np.abs(np.array(got)[fin] - np.array(want)[fin]).max() < 1e-5
    ds = f32(B, *n, H, kt)
    rec = SimpleNamespace(problem=p_qk, inputs=dict(query=q, key=k, additional_keys=None, rpb=None), out=got,
                          lse=None, d_out=ds, d_lse=None)
    g, w = BACKEND.qk_backward(rec), pure.qk_backward(rec)
    for name in ("query", "key"):
        assert np.abs(np.array(g[name]) - np.array(w[name])).max() < 1e-5, name
    attn = mx.softmax(mx.where(mx.isinf(got), -1e9, got), axis=-1)
    out, want = BACKEND.av_forward(p_av, attn, v), pure.av_forward(p_av, attn, v)
    assert np.abs(np.array(out) - np.array(want)).max() < 1e-5
    rec = SimpleNamespace(problem=p_av, inputs=dict(attn=attn, value=v, additional_values=None), out=out, lse=None,
                          d_out=f32(B, *n, H, Dv), d_lse=None)
    g, w = BACKEND.av_backward(rec), pure.av_backward(rec)
    for name in ("attn", "value"):
        assert np.abs(np.array(g[name]) - np.array(w[name])).max() < 1e-5, name


def test_split_ops_through_the_core_dispatch():
    """na2d_qk -> softmax -> na2d_av with backend=<the Metal backend>: the core picks its
    qk_backward/av_backward through mx.custom_function; gradients match pure's."""
    import natten_mlx

    be = _EmulatedGPU(emulator_launcher())
    rng = np.random.default_rng(8)
    f32 = lambda *sh: mx.array(rng.standard_normal(sh).astype(np.float32))  # noqa: E731
    q, k, v = f32(2, 7, 8, 4, 8), f32(2, 7, 8, 2, 8), f32(2, 7, 8, 2, 4)
    ak, av, rpb = f32(2, 2, 2, 8), f32(2, 2, 2, 4), f32(4, 5, 5)
    kw = dict(kernel_size=(3, 3), dilation=(2, 1))

    def loss(q, k, v, ak, av, rpb, backend):
        s = natten_mlx.na2d_qk(q, k, rpb=rpb, additional_keys=ak, backend=backend, **kw)
        out = natten_mlx.na2d_av(mx.softmax(s, axis=-1), v, additional_values=av, backend=backend, **kw)
        return (out * out).sum() + (s * s).sum() * 1e-3

    args = (q, k, v, ak, av, rpb)
    got = mx.grad(lambda *a: loss(*a, backend=be), argnums=list(range(6)))(*args)
    want = mx.grad(lambda *a: loss(*a, backend="pure"), argnums=list(range(6)))(*args)
    for i, (g, w) in enumerate(zip(got, want)):
        w = np.array(w)
        assert np.abs(np.array(g) - w).max() <= 2e-5 * max(1.0, np.abs(w).max()), i


def test_split_supports():
    qk, av = _problems(_fixed((12,), (5,), (1,), (1,), (False,), 8, 8), mx.float32)
    assert BACKEND.supports(qk) is None and BACKEND.supports(av) is None
    assert "at most 256" in BACKEND.supports(qk.with_(head_dim=300))
    assert "GPU streams only" in BACKEND.supports(av.with_(device="cpu"))
    # a tile configured for the fused kernels does not concern the split ops
    assert BACKEND.configure(tile=(8, 8)).supports(qk) is None
