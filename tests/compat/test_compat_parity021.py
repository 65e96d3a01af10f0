"""Numerical parity of natten_mlx.compat.v020 / v021 with official NATTEN 0.21.7 (PyTorch, CPU,
``flex-fna`` / ``flex-fmha`` backends, forward), and weight compatibility with its modules: an
upstream module's ``state_dict()`` loads into the compat module and gives the same output.

Skipped where torch or NATTEN 0.21 is not importable. NATTEN's Flex backend on CPU needs
``head_dim == head_dim_v``, a power of two >= 8: these cases use 8.
"""

from __future__ import annotations

import natten_mlx.compat.v020 as n020
import natten_mlx.compat.v021 as n021
import numpy as np
import pytest
from compat_support import assert_close, to_mx
from natten_mlx.compat import load_torch_state_dict

torch = pytest.importorskip("torch")
natten = pytest.importorskip("natten")
if not natten.__version__.startswith("0.21."):
    pytest.skip(f"official NATTEN 0.21 needed, found {natten.__version__}", allow_module_level=True)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*return_lse is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*flex_attention.*"),
]

ATOL = 2e-5


def _t(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float32))


def _n(t):
    return t.detach().double().numpy()


CASES = [
    # spatial, kernel_size, stride, dilation, is_causal, heads, kv_heads, extra
    ((16,), 5, 2, 2, False, 2, 2, 0),
    ((13,), 4, 3, 1, True, 4, 2, 3),
    ((7, 9), (3, 5), (2, 1), (2, 1), (False, True), 2, 1, 0),
    ((6, 6), 3, 3, 1, False, 2, 2, 2),
    ((4, 6, 5), (2, 3, 3), (1, 2, 1), (2, 1, 1), (True, False, False), 2, 2, 0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_ops_match_natten(rng, case):
    spatial, ks, stride, dil, causal, heads, kv_heads, extra = case
    n = len(spatial)
    q = rng.standard_normal((2, *spatial, heads, 8))
    k, v = (rng.standard_normal((2, *spatial, kv_heads, 8)) for _ in range(2))
    ak, av = (rng.standard_normal((2, extra, kv_heads, 8)) if extra else None for _ in range(2))
    upstream = getattr(natten, f"na{n}d")
    with torch.no_grad():
        want, want_lse = upstream(_t(q), _t(k), _t(v), ks, stride, dil, causal, None, _t(ak), _t(av),
                                  backend="flex-fna", return_lse=True)
    out, lse = getattr(n021, f"na{n}d")(to_mx(q), to_mx(k), to_mx(v), ks, stride, dil, causal, None, to_mx(ak),
                                        to_mx(av), backend="flex-fna", return_lse=True)
    assert_close(out, _n(want), atol=ATOL)
    assert_close(lse, _n(want_lse), atol=ATOL)
    if heads == kv_heads:
        out20 = getattr(n020, f"na{n}d")(to_mx(q), to_mx(k), to_mx(v), ks, stride, dil, causal, None, to_mx(ak),
                                         to_mx(av), backend="flex-fna")
        assert_close(out20, _n(want), atol=ATOL)


@pytest.mark.parametrize("heads, kv_heads, s_q, s_kv", [(2, 2, 6, 9), (4, 2, 8, 8)])
def test_attention_and_merge_match_natten(rng, heads, kv_heads, s_q, s_kv):
    q = rng.standard_normal((1, s_q, heads, 8))
    k, v = (rng.standard_normal((1, s_kv, kv_heads, 8)) for _ in range(2))
    with torch.no_grad():
        want, want_lse = natten.attention(_t(q), _t(k), _t(v), scale=0.5, backend="flex-fmha", return_lse=True)
    out, lse = n021.attention(to_mx(q), to_mx(k), to_mx(v), False, 0.5, return_lse=True)
    assert_close(out, _n(want), atol=ATOL)
    assert_close(lse, _n(want_lse), atol=ATOL)

    outs = [rng.standard_normal((1, s_q, heads, 8)) for _ in range(2)]
    lses = [rng.standard_normal((1, s_q, heads)) for _ in range(2)]
    with torch.no_grad():
        m_out, m_lse = natten.merge_attentions([_t(o) for o in outs], [_t(lse_i) for lse_i in lses], torch_compile=False,
                                               use_autograd_fix=False)
    got, got_lse = n021.merge_attentions([to_mx(o) for o in outs], [to_mx(lse_i) for lse_i in lses])
    assert_close(got, _n(m_out), atol=ATOL)
    assert_close(got_lse, _n(m_lse), atol=ATOL)
    assert_close(n020.merge_attentions([to_mx(o) for o in outs], [to_mx(lse_i) for lse_i in lses]), _n(m_out), atol=ATOL)


@pytest.mark.parametrize("era", [n020, n021], ids=["v020", "v021"])
@pytest.mark.parametrize(
    "n, spatial, kwargs",
    [
        (1, (14,), dict(kernel_size=5, stride=2, dilation=2, is_causal=True)),
        (2, (7, 8), dict(kernel_size=(3, 5), stride=(1, 2), dilation=(2, 1), qkv_bias=False, qk_scale=0.3)),
        (3, (4, 5, 6), dict(kernel_size=3, dilation=(1, 1, 2), is_causal=(False, True, False))),
    ],
    ids=["1d", "2d", "3d"],
)
def test_module_state_dict_matches_natten(rng, era, n, spatial, kwargs):
    dim, heads = 16, 2
    torch.manual_seed(0)
    upstream = getattr(natten, f"NeighborhoodAttention{n}D")(dim, heads, **kwargs).eval()
    ours = getattr(era, f"NeighborhoodAttention{n}D")(dim, heads, **kwargs)
    load_torch_state_dict(ours, upstream.state_dict())
    x = rng.standard_normal((2, *spatial, dim))
    with torch.no_grad():
        want = upstream(_t(x))
    assert_close(ours(to_mx(x)), _n(want), atol=ATOL)
