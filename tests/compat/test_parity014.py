"""Numerical parity of natten_mlx.compat.v014 / v015 (and v017's unfused ops) with official NATTEN
0.14.6 (PyTorch, its CPU kernels): the split ops with and without relative positional bias, with
dilation, and the 1D/2D modules loaded from the official modules' ``state_dict()``, including the
padding of inputs smaller than ``kernel_size * dilation``.

Runs where NATTEN 0.14 is importable: it builds against torch 2.3.1, not against the torch of the
main environment, so this file runs under the ``parity014`` nox session (its own virtualenv) and
is skipped everywhere else.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
from compat_support import assert_close, to_mx

try:  # decide before importing torch, which is slow to import
    _FOUND = metadata.version("natten")
except metadata.PackageNotFoundError:
    _FOUND = None
if _FOUND is None or not _FOUND.startswith("0.14."):
    pytest.skip(f"official NATTEN 0.14 needed, found {_FOUND}", allow_module_level=True)

torch = pytest.importorskip("torch")
natten = pytest.importorskip("natten")

import natten.functional as upstream  # noqa: E402
import natten_mlx.compat.v014 as v014  # noqa: E402
import natten_mlx.compat.v015 as v015  # noqa: E402
import natten_mlx.compat.v017 as v017  # noqa: E402
from natten_mlx.compat import load_torch_state_dict  # noqa: E402

ATOL = 2e-5

CASES = [
    # spatial, kernel_size, dilation
    ((9,), 3, 1), ((16,), 5, 2), ((7,), 7, 1), ((20,), 3, 5), ((13,), 5, 2), ((23,), 7, 3),
    ((9, 10), 3, 2), ((7, 7), 7, 1), ((11, 9), 3, 3), ((12, 13), 5, 2), ((6, 9), 5, 1),
]


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _n(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("spatial, ks, dil", CASES, ids=str)
def test_split_ops_match_natten_014(rng, spatial, ks, dil):
    n = len(spatial)
    q, k, v = (rng.standard_normal((2, 3, *spatial, 8)).astype(np.float32) for _ in range(3))
    rpb = rng.standard_normal((3, *([2 * ks - 1] * n))).astype(np.float32)
    qkrpb, qk, av = (getattr(upstream, f"natten{n}d{op}") for op in ("qkrpb", "qk", "av"))
    with torch.no_grad():
        want_attn = qkrpb(_t(q), _t(k), _t(rpb), ks, dil)
        want_plain = qk(_t(q), _t(k), ks, dil)
        weights = want_attn.softmax(dim=-1)
        want_out = av(weights, _t(v), ks, dil)

    mq, mk, mv, mrpb, mw = to_mx(q), to_mx(k), to_mx(v), to_mx(rpb), to_mx(_n(weights))
    for ours in (getattr(v014.functional, f"natten{n}dqkrpb"), getattr(v015.functional, f"natten{n}dqkrpb")):
        assert_close(ours(mq, mk, mrpb, ks, dil), _n(want_attn), atol=ATOL)
    assert_close(getattr(v015.functional, f"na{n}d_qk_with_bias")(mq, mk, mrpb, ks, dil), _n(want_attn), atol=ATOL)
    assert_close(getattr(v017.functional, f"na{n}d_qk")(mq, mk, ks, dil, None, False, mrpb), _n(want_attn), atol=ATOL)

    for ours in (getattr(v014.functional, f"natten{n}dqk"), getattr(v015.functional, f"na{n}d_qk")):
        assert_close(ours(mq, mk, ks, dil), _n(want_plain), atol=ATOL)

    for ours in (getattr(v014.functional, f"natten{n}dav"), getattr(v015.functional, f"na{n}d_av"),
                 getattr(v017.functional, f"na{n}d_av")):
        assert_close(ours(mw, mv, ks, dil), _n(want_out), atol=ATOL)


@pytest.mark.parametrize(
    "n, spatial, ks, dil, bias",
    [
        (1, (15,), 5, 2, True), (1, (4,), 5, 1, True), (1, (9,), 3, 4, False),
        (2, (9, 8), 3, 2, True), (2, (3, 10), 5, 1, True), (2, (4, 5), 3, 2, False),
    ],
    ids=str,
)
def test_modules_match_natten_014(rng, n, spatial, ks, dil, bias):
    dim, heads = 16, 2
    torch.manual_seed(0)
    official = getattr(natten, f"NeighborhoodAttention{n}D")(dim, heads, ks, dil, bias).eval()
    with torch.no_grad():
        if official.rpb is not None:
            official.rpb.normal_(0.0, 0.5)  # well away from upstream's near-zero init
    x = rng.standard_normal((2, *spatial, dim)).astype(np.float32)
    with torch.no_grad():
        want = official(_t(x))
    for era in (v014, v015):
        ours = getattr(era, f"NeighborhoodAttention{n}D")(dim, heads, ks, dil, bias)
        load_torch_state_dict(ours, official.state_dict())
        assert_close(ours(to_mx(x)), _n(want), atol=ATOL)


def _random_cases(count, n, seed):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        ks = int(rng.choice([3, 5, 7, 9]))
        dil = int(rng.integers(1, 4))
        spatial = tuple(int(ks * dil + rng.integers(0, 8)) for _ in range(n))
        cases.append((spatial, ks, dil))
    return cases


@pytest.mark.parametrize("spatial, ks, dil", _random_cases(30, 1, 1) + _random_cases(15, 2, 2), ids=str)
def test_random_geometries_match_natten_014(spatial, ks, dil):
    """A seeded sweep of window geometries (sizes from ``kernel_size * dilation`` up), rpb included."""
    rng = np.random.default_rng(hash((spatial, ks, dil)) % 2**32)
    n = len(spatial)
    q, k, v = (rng.standard_normal((1, 2, *spatial, 4)).astype(np.float32) for _ in range(3))
    rpb = rng.standard_normal((2, *([2 * ks - 1] * n))).astype(np.float32)
    with torch.no_grad():
        want_attn = getattr(upstream, f"natten{n}dqkrpb")(_t(q), _t(k), _t(rpb), ks, dil)
        weights = want_attn.softmax(dim=-1)
        want_out = getattr(upstream, f"natten{n}dav")(weights, _t(v), ks, dil)
    attn = getattr(v014.functional, f"natten{n}dqkrpb")(to_mx(q), to_mx(k), to_mx(rpb), ks, dil)
    assert_close(attn, _n(want_attn), atol=ATOL)
    assert_close(getattr(v014.functional, f"natten{n}dav")(to_mx(_n(weights)), to_mx(v), ks, dil), _n(want_out), atol=ATOL)
