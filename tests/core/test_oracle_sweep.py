"""Seeded randomised sweeps of natten_mlx's fused ops against the float64 oracle (tests/oracle.py).

Per run: 1D 300 + 2D 260 + 3D 160 = 720 forward configurations (each also checks gradients in
q, k, v, rpb and additional keys/values) plus 90 configurations whose loss also differentiates the
logsumexp.  Every configuration is drawn from a fixed-seed numpy Generator:
K in [2, L], stride in [1, K], dilation in [1, L // K], per-axis causal, GQA (H = r * H_kv),
D_v != D, extra KV, rpb (non-causal only), explicit scale, return_lse.

The first section checks the oracle itself (finite differences, slot layout, classic special
cases); it needs only NumPy.
"""

from __future__ import annotations

import numpy as np
import oracle
import pytest
from configs import cfg_id, random_config, random_tensors

MAX_LEN = {1: 12, 2: 10, 3: 6}
N_CONFIGS = {1: 300, 2: 260, 3: 160}
N_LSE_GRAD = 90
FWD_TOL = dict(rtol=1e-4, atol=1e-4)
GRAD_TOL = dict(rtol=1e-3, atol=2e-4)


def _configs(na_dim: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        cfg = random_config(rng, na_dim, MAX_LEN[na_dim])
        cfg["return_lse"] = bool(rng.random() < 0.5)
        cfg["seed"] = seed * 100000 + i
        out.append(cfg)
    return out


SWEEP = [c for n in (1, 2, 3) for c in _configs(n, N_CONFIGS[n], seed=1000 + n)]
LSE_GRAD = [c for n in (1, 2, 3) for c in _configs(n, N_LSE_GRAD // 3, seed=2000 + n)]

# Larger inputs, so that implementations that tile queries (e.g. ~64 queries a tile in 1D, 8x8 in
# 2D, 4x4x4 in 3D) or switch code paths on problem size see several (and ragged) tiles.
MEDIUM_LEN = {1: (40, 150), 2: (12, 20), 3: (6, 9)}
N_MEDIUM = {1: 12, 2: 10, 3: 6}


def _medium_configs():
    out = []
    for n in (1, 2, 3):
        rng = np.random.default_rng(4000 + n)
        lo, hi = MEDIUM_LEN[n]
        for i in range(N_MEDIUM[n]):
            cfg = random_config(rng, n, hi)
            # redraw the spatial shape in [lo, hi] keeping the window valid
            shape = tuple(int(rng.integers(lo, hi + 1)) for _ in range(n))
            K = tuple(int(rng.integers(2, min(L, 13) + 1)) for L in shape)
            d = tuple(int(rng.integers(1, min(L // k, 4) + 1)) for L, k in zip(shape, K))
            s = tuple(int(rng.integers(1, k + 1)) for k in K)
            cfg.update(shape=shape, K=K, d=d, s=s, kernel_size=K, dilation=d, stride=s, is_causal=cfg["c"],
                       B=1, return_lse=True, seed=4000000 + 1000 * n + i)
            if cfg["rpb"] and any(cfg["c"]):
                cfg["rpb"] = False
            out.append(cfg)
    return out


MEDIUM = _medium_configs()


# ======================================================================================
# Oracle self-checks (NumPy only)
# ======================================================================================


def test_sweep_is_large_enough():
    assert len(SWEEP) >= 500
    # every feature shows up
    assert any(c["E"] for c in SWEEP) and any(c["rpb"] for c in SWEEP)
    assert any(c["H"] != c["Hkv"] for c in SWEEP) and any(c["D"] != c["Dv"] for c in SWEEP)
    assert any(any(c["c"]) and not all(c["c"]) for c in SWEEP if c["na_dim"] > 1)
    assert any(max(c["d"]) > 1 for c in SWEEP) and any(max(c["s"]) > 1 for c in SWEEP)
    assert any(any(k % 2 == 0 for k in c["K"]) for c in SWEEP)


@pytest.mark.parametrize("L", range(2, 13))
def test_oracle_classic_clamp(L):
    """s == 1, odd K, d == 1, non-causal: start = clamp(i - K//2, 0, L - K)."""
    for K in range(3, L + 1, 2):
        m = oracle.axis_mask(L, K, 1, 1, False)
        for i in range(L):
            start = min(max(i - K // 2, 0), L - K)
            expect = np.zeros(L, bool)
            expect[start : start + K] = True
            np.testing.assert_array_equal(m[i], expect)


@pytest.mark.parametrize("L", range(2, 13))
def test_oracle_blocked_and_causal_basics(L):
    for K in range(2, L + 1):
        for d in range(1, L // K + 1):
            for c in (False, True):
                for s in range(1, K + 1):
                    m = oracle.axis_mask(L, K, s, d, c)
                    for i in range(L):
                        assert m[i, i], "every query sees itself"
                        assert all(j % d == i % d for j in np.nonzero(m[i])[0])
                        if not c:
                            assert m[i].sum() == K
                        else:
                            assert 1 <= m[i].sum() <= K and not m[i, i + 1 :].any()
        if L % K == 0:  # s == K, d == 1, non-causal: blocked attention
            m = oracle.axis_mask(L, K, K, 1, False)
            blocks = np.arange(L) // K
            np.testing.assert_array_equal(m, blocks[:, None] == blocks[None, :])


def test_oracle_slot_layout_matches_mask():
    rng = np.random.default_rng(7)
    for _ in range(150):
        n = int(rng.integers(1, 4))
        cfg = random_config(rng, n, MAX_LEN[n])
        key_idx, valid = oracle.slot_keys(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
        mask = oracle.na_mask(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
        for qi in range(mask.shape[0]):
            ks = key_idx[qi][valid[qi]]
            assert len(set(ks.tolist())) == len(ks), "a key appears in two slots"
            assert set(ks.tolist()) == set(np.nonzero(mask[qi])[0].tolist())
            if not any(cfg["c"]):
                assert valid[qi].all()


@pytest.mark.parametrize("seed", range(6))
def test_oracle_backward_vs_finite_differences(seed):
    rng = np.random.default_rng(seed)
    n = 1 + seed % 3
    while True:
        cfg = random_config(rng, n, {1: 7, 2: 4, 3: 3}[n], allow_causal=seed % 2 == 1)
        cfg["B"] = 1
        if seed % 2 == 0:
            cfg["rpb"], cfg["E"] = True, 2
        if np.prod(cfg["shape"]) <= 27:
            break
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    args = dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=cfg["scale"])
    out, lse = oracle.na_forward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb, **args)
    W = rng.standard_normal(out.shape)
    U = rng.standard_normal(lse.shape)
    grads = oracle.na_backward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb, dout=W, dlse=U, **args)
    inputs = dict(q=q, k=k, v=v, additional_keys=ak, additional_values=av, rpb=rpb)
    for name, x in inputs.items():
        if x is None:
            continue

        def f(xx, name=name):
            kw = dict(inputs)
            kw[name] = xx
            o, l = oracle.na_forward(kw["q"], kw["k"], kw["v"], additional_keys=kw["additional_keys"],
                                     additional_values=kw["additional_values"], rpb=kw["rpb"], **args)
            return float(np.sum(W * o) + np.sum(U * l))

        np.testing.assert_allclose(grads[name], oracle.numeric_grad(f, x), rtol=1e-5, atol=1e-7, err_msg=name)


def test_oracle_extra_kv_equals_merge():
    """Extra KV in the same softmax == merge of NA and plain attention over the extra tokens."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 7, 4, 3))
    k = rng.standard_normal((2, 7, 2, 3))
    v = rng.standard_normal((2, 7, 2, 5))
    ak = rng.standard_normal((2, 3, 2, 3))
    av = rng.standard_normal((2, 3, 2, 5))
    o1, l1 = oracle.na_forward(q, k, v, 3, 2, 2, False)
    # plain attention over extra tokens
    S = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(ak, 2, axis=2)) * 3 ** -0.5
    l2 = np.log(np.exp(S).sum(-1))
    P = np.exp(S - l2[..., None])
    o2 = np.einsum("bhqk,bkhd->bqhd", P, np.repeat(av, 2, axis=2))
    om, lm = oracle.merge_attentions([o1, o2], [l1, np.transpose(l2, (0, 2, 1))])
    o3, l3 = oracle.na_forward(q, k, v, 3, 2, 2, False, additional_keys=ak, additional_values=av)
    np.testing.assert_allclose(o3, om, atol=1e-12)
    np.testing.assert_allclose(l3, lm, atol=1e-12)


# ======================================================================================
# natten_mlx vs oracle
# ======================================================================================

try:
    import mlx.core as mx
    import natten_mlx

    FNS = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}
    _HAVE_MLX = True
    try:  # the pure backend's strategies (slices / gather / tiled), selected by an env variable
        from natten_mlx.backends import pure as _pure

        STRATEGY_ENV = _pure.STRATEGY_ENV
        STRATEGIES = tuple(_pure.STRATEGIES)
    except (ImportError, AttributeError):  # pragma: no cover
        STRATEGY_ENV, STRATEGIES = None, ()
except ImportError:  # pragma: no cover - the oracle self-checks above still run
    _HAVE_MLX = False
    STRATEGY_ENV, STRATEGIES = None, ()

needs_natten_mlx = pytest.mark.skipif(not _HAVE_MLX, reason="mlx / natten_mlx not importable")


def _mx(x, dtype=None):
    if x is None:
        return None
    return mx.array(np.asarray(x, dtype=np.float32), dtype=dtype or mx.float32)


def _np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def _call_kwargs(cfg):
    return dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
                is_causal=cfg["is_causal"], scale=cfg["scale"])


def _oracle_kwargs(cfg):
    return dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=cfg["scale"])


def _run_case(cfg, with_lse_grad: bool):
    rng = np.random.default_rng(cfg["seed"])
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    exp_out, exp_lse = oracle.na_forward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb,
                                         **_oracle_kwargs(cfg))
    fn = FNS[cfg["na_dim"]]
    names = ["q", "k", "v", "additional_keys", "additional_values", "rpb"]
    np_inputs = dict(zip(names, (q, k, v, ak, av, rpb)))
    present = [n for n in names if np_inputs[n] is not None]
    mx_inputs = {n: _mx(np_inputs[n]) for n in present}
    return_lse = cfg["return_lse"] or with_lse_grad

    def call(*arrays):
        kw = dict(zip(present, arrays))
        return fn(kw["q"], kw["k"], kw["v"], additional_keys=kw.get("additional_keys"),
                  additional_values=kw.get("additional_values"), rpb=kw.get("rpb"),
                  return_lse=return_lse, **_call_kwargs(cfg))

    # forward
    res = call(*(mx_inputs[n] for n in present))
    if return_lse:
        assert isinstance(res, tuple) and len(res) == 2
        out, lse = res
        assert lse.dtype == mx.float32
        assert tuple(lse.shape) == exp_lse.shape
        np.testing.assert_allclose(_np(lse), exp_lse, **FWD_TOL, err_msg="lse")
    else:
        assert isinstance(res, mx.array), "return_lse=False must return a single array"
        out = res
    assert out.dtype == mx.float32
    assert tuple(out.shape) == exp_out.shape
    np.testing.assert_allclose(_np(out), exp_out, **FWD_TOL, err_msg="out")

    # gradients
    W = rng.standard_normal(exp_out.shape)
    U = rng.standard_normal(exp_lse.shape) if with_lse_grad else None
    W_mx = _mx(W)
    U_mx = _mx(U)

    def loss(*arrays):
        r = call(*arrays)
        if return_lse:
            o, l = r
            total = mx.sum(o * W_mx)
            if U_mx is not None:
                total = total + mx.sum(l * U_mx)
            return total
        return mx.sum(r * W_mx)

    grads = mx.grad(loss, argnums=list(range(len(present))))(*(mx_inputs[n] for n in present))
    exp = oracle.na_backward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb, dout=W, dlse=U,
                             **_oracle_kwargs(cfg))
    for name, g in zip(present, grads):
        assert tuple(g.shape) == np_inputs[name].shape, name
        np.testing.assert_allclose(_np(g), exp[name], **GRAD_TOL, err_msg=f"d{name}")


@needs_natten_mlx
@pytest.mark.parametrize("cfg", SWEEP, ids=[cfg_id(c) for c in SWEEP])
def test_fused_vs_oracle(cfg):
    _run_case(cfg, with_lse_grad=False)


@needs_natten_mlx
@pytest.mark.parametrize("cfg", LSE_GRAD, ids=[cfg_id(c) for c in LSE_GRAD])
def test_fused_lse_gradient_vs_oracle(cfg):
    """The logsumexp output is differentiable too (loss = sum(W*out) + sum(U*lse))."""
    _run_case(cfg, with_lse_grad=True)


def _strategy_cases(configs):
    strategies = STRATEGIES or ("<default>",)
    return [pytest.param(st, c, id=f"{st}-{cfg_id(c)}") for st in strategies for c in configs]


@needs_natten_mlx
@pytest.mark.parametrize("strategy, cfg", _strategy_cases(SWEEP[::5]))
def test_fused_vs_oracle_each_strategy(strategy, cfg, monkeypatch):
    """Every 5th sweep configuration under each strategy of the pure backend."""
    if STRATEGY_ENV:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    _run_case(cfg, with_lse_grad=False)


@needs_natten_mlx
@pytest.mark.parametrize("strategy, cfg", _strategy_cases(MEDIUM))
def test_medium_inputs_vs_oracle_each_strategy(strategy, cfg, monkeypatch):
    if STRATEGY_ENV:
        monkeypatch.setenv(STRATEGY_ENV, strategy)
    _run_case(cfg, with_lse_grad=True)


def _other_backends():
    if not _HAVE_MLX:
        return []
    try:
        names = [b.name for b in natten_mlx.list_backends()]
    except Exception:  # pragma: no cover
        return []
    return names if len(names) > 1 else []


@needs_natten_mlx
@pytest.mark.parametrize("backend", _other_backends() or ["<only-one-backend>"])
def test_every_registered_backend_on_a_subset(backend):
    """Each registered backend, named explicitly, on every 6th sweep configuration it can serve."""
    if backend == "<only-one-backend>":
        pytest.skip("only one backend registered; the sweep above already covers it")
    served = 0
    for cfg in SWEEP[::6]:
        rng = np.random.default_rng(cfg["seed"])
        q, k, v, ak, av, rpb = random_tensors(rng, cfg)
        try:
            out = FNS[cfg["na_dim"]](_mx(q), _mx(k), _mx(v), additional_keys=_mx(ak), additional_values=_mx(av),
                                     rpb=_mx(rpb), backend=backend, **_call_kwargs(cfg))
        except ValueError as e:
            if "cannot serve" in str(e):
                continue
            raise
        served += 1
        exp_out, _ = oracle.na_forward(q, k, v, additional_keys=ak, additional_values=av, rpb=rpb,
                                       **_oracle_kwargs(cfg))
        np.testing.assert_allclose(_np(out), exp_out, **FWD_TOL, err_msg=cfg_id(cfg))
    if served == 0:
        pytest.skip(f"backend {backend!r} served none of the configurations")


@needs_natten_mlx
def test_scale_zero_is_not_the_default():
    """SEMANTICS: scale defaults to D**-0.5 only when None; scale=0.0 means uniform weights.
    (NATTEN itself treats a falsy scale as None; see BUGS.md.)"""
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((1, 9, 2, 4)) for _ in range(3))
    exp, lse = oracle.na_forward(q, k, v, 3, 2, 2, False, scale=0.0)
    out, l = natten_mlx.na1d(_mx(q), _mx(k), _mx(v), 3, stride=2, dilation=2, scale=0.0, return_lse=True)
    np.testing.assert_allclose(_np(out), exp, **FWD_TOL)
    np.testing.assert_allclose(_np(l), np.log(3.0) * np.ones_like(lse), **FWD_TOL)
