"""Random valid configurations for the sweeps (pure NumPy; shared by tests/core and tests/parity)."""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------
# Random configuration helpers (pure NumPy; shared by the sweep and parity tests)
# --------------------------------------------------------------------------------------


def random_axis(rng: np.random.Generator, max_len: int, causal_ok: bool = True):
    """One axis: (L, K, stride, dilation, causal) with K in [2, L], s in [1, K], d in [1, L//K]."""
    L = int(rng.integers(2, max_len + 1))
    K = int(rng.integers(2, L + 1))
    d = int(rng.integers(1, L // K + 1))
    s = int(rng.integers(1, K + 1))
    c = bool(rng.integers(0, 2)) if causal_ok else False
    return L, K, s, d, c


def random_config(
    rng: np.random.Generator,
    na_dim: int,
    max_len: int,
    *,
    allow_causal: bool = True,
    allow_rpb: bool = True,
    allow_extra: bool = True,
    allow_gqa: bool = True,
    allow_dv: bool = True,
    head_dims=(2, 3, 4, 8),
):
    """Draw a random valid configuration as a dict of plain Python values."""
    axes = [random_axis(rng, max_len, causal_ok=allow_causal) for _ in range(na_dim)]
    shape = tuple(a[0] for a in axes)
    K = tuple(a[1] for a in axes)
    s = tuple(a[2] for a in axes)
    d = tuple(a[3] for a in axes)
    c = tuple(a[4] for a in axes)
    Hkv = int(rng.integers(1, 3))
    H = Hkv * (int(rng.integers(1, 4)) if allow_gqa else 1)
    D = int(rng.choice(head_dims))
    Dv = int(rng.choice(head_dims)) if (allow_dv and rng.random() < 0.5) else D
    B = int(rng.integers(1, 3))
    E = int(rng.integers(1, 5)) if (allow_extra and rng.random() < 0.3) else 0
    use_rpb = allow_rpb and not any(c) and rng.random() < 0.35
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.2, 1.2))
    # exercise the int-vs-tuple argument forms
    def maybe_int(t):
        return t[0] if (len(set(t)) == 1 and rng.random() < 0.5) else t

    return dict(
        na_dim=na_dim, shape=shape, B=B, H=H, Hkv=Hkv, D=D, Dv=Dv, E=E,
        kernel_size=maybe_int(K), stride=maybe_int(s), dilation=maybe_int(d),
        is_causal=maybe_int(c), K=K, s=s, d=d, c=c, rpb=use_rpb, scale=scale,
    )


def random_tensors(rng: np.random.Generator, cfg: dict):
    """float64 NumPy inputs for a config: q, k, v, ak, av, rpb (None where absent)."""
    B, shape, H, Hkv, D, Dv, E = (cfg[x] for x in ("B", "shape", "H", "Hkv", "D", "Dv", "E"))
    q = rng.standard_normal((B, *shape, H, D))
    k = rng.standard_normal((B, *shape, Hkv, D))
    v = rng.standard_normal((B, *shape, Hkv, Dv))
    ak = rng.standard_normal((B, E, Hkv, D)) if E else None
    av = rng.standard_normal((B, E, Hkv, Dv)) if E else None
    rpb = rng.standard_normal((H, *[2 * k_ - 1 for k_ in cfg["K"]])) if cfg["rpb"] else None
    return q, k, v, ak, av, rpb


def cfg_id(cfg: dict) -> str:
    parts = [
        f"{cfg['na_dim']}d", "x".join(map(str, cfg["shape"])), f"k{cfg['K']}", f"s{cfg['s']}",
        f"d{cfg['d']}", f"c{tuple(int(x) for x in cfg['c'])}", f"H{cfg['H']}/{cfg['Hkv']}",
        f"D{cfg['D']}/{cfg['Dv']}", f"E{cfg['E']}", "rpb" if cfg["rpb"] else "",
        f"sc{cfg['scale']:.3f}" if cfg["scale"] is not None else "",
    ]
    return "-".join(p for p in parts if p).replace(" ", "")


def pure_strategies():
    """(env variable, strategies) of natten_mlx's pure backend, or (None, ()) when not exposed."""
    try:
        from natten_mlx.backends import pure

        return pure.STRATEGY_ENV, tuple(pure.STRATEGIES)
    except (ImportError, AttributeError):
        return None, ()
