"""natten_mlx.compat.v020 and v021 against NATTEN 0.20.1's and 0.21.7's definitions (float64
oracle): every public name with upstream's positional order, GQA, return_lse, attention,
merge_attentions, context switches, backend configuration queries, modules."""

from __future__ import annotations

import inspect

import mlx.core as mx
import natten_mlx.compat.v020 as n020
import natten_mlx.compat.v021 as n021
import numpy as np
import oracle
import pytest
from compat_support import assert_close, dense_attention, modern_module_forward, to_mx, to_np
from mlx.utils import tree_flatten
from natten_mlx.compat import load_torch_state_dict

CONTEXT = [
    "are_deterministic_algorithms_enabled", "use_deterministic_algorithms", "use_kv_parallelism_in_fused_na",
    "is_kv_parallelism_in_fused_na_enabled", "set_memory_usage_preference", "get_memory_usage_preference",
    "is_memory_usage_default", "is_memory_usage_strict", "is_memory_usage_unrestricted", "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed", "allow_flex_compile", "allow_flex_compile_backprop", "disable_flex_compile",
    "disable_flex_compile_backprop",
]
CONFIGS_020 = [
    "get_bwd_configs_for_cutlass_fmha", "get_bwd_configs_for_cutlass_fna", "get_configs_for_cutlass_fmha",
    "get_configs_for_cutlass_fna", "get_configs_for_cutlass_hopper_fmha", "get_configs_for_cutlass_hopper_fna",
    "get_configs_for_cutlass_blackwell_fmha", "get_configs_for_cutlass_blackwell_fna", "get_configs_for_flex_fmha",
    "get_configs_for_flex_fna",
]
CONFIGS_021 = CONFIGS_020 + [
    "get_bwd_configs_for_cutlass_hopper_fmha", "get_bwd_configs_for_cutlass_hopper_fna",
    "get_bwd_configs_for_cutlass_blackwell_fmha", "get_bwd_configs_for_cutlass_blackwell_fna",
]
COMMON = ["__version__", "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
          "HAS_LIBNATTEN", "na1d", "na2d", "na3d", "attention", "merge_attentions"]
ERAS = {"v020": (n020, CONFIGS_020, "0.20.1"), "v021": (n021, CONFIGS_021, "0.21.7")}
PERF_ARGS = dict(attention_kwargs=None, backend="flex-fna", q_tile_shape=None, kv_tile_shape=None,
                 backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
                 backward_use_pt_reduction=True, run_persistent_kernel=False, kernel_schedule="coop",
                 torch_compile=True)


@pytest.fixture(autouse=True)
def fresh_context():
    n021.context.NattenContext.reset()
    yield
    n021.context.NattenContext.reset()


@pytest.mark.parametrize("era", ERAS)
def test_public_names(era):
    natten, configs, version = ERAS[era]
    assert natten.__version__ == version and natten.HAS_LIBNATTEN is False
    assert sorted(natten.__all__) == sorted(COMMON + CONTEXT + configs)
    q = to_mx(np.zeros((1, 8, 2, 8)))
    for name in configs:
        assert getattr(natten, name)(q, q, q) == []
    assert natten.get_configs_for_flex_fna(q, q, q, True) == []
    fused = list(inspect.signature(natten.na2d).parameters)
    assert fused[:10] == ["query", "key", "value", "kernel_size", "stride", "dilation", "is_causal", "scale",
                          "additional_keys", "additional_values"]
    assert ("return_lse" in fused) == (era == "v021") and ("try_fuse_additional_kv" in fused) == (era == "v020")


def test_context_switches():
    ctx = n021  # v020 and v021 share one context module, as upstream's are identical
    assert n020.is_kv_parallelism_in_fused_na_enabled is n021.is_kv_parallelism_in_fused_na_enabled
    assert ctx.is_kv_parallelism_in_fused_na_enabled() and ctx.is_memory_usage_default()
    ctx.use_kv_parallelism_in_fused_na(False)
    assert not ctx.is_kv_parallelism_in_fused_na_enabled()
    ctx.use_deterministic_algorithms()
    assert ctx.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError):
        ctx.use_kv_parallelism_in_fused_na()
    ctx.set_memory_usage_preference("unrestricted")
    assert ctx.is_memory_usage_unrestricted() and ctx.get_memory_usage_preference().name == "Unrestricted"
    with pytest.raises(ValueError):
        ctx.set_memory_usage_preference("all")
    ctx.allow_flex_compile(True, True)
    assert ctx.is_flex_compile_allowed() and ctx.is_flex_compile_backprop_allowed()
    ctx.disable_flex_compile_backprop()
    assert ctx.is_flex_compile_allowed() and not ctx.is_flex_compile_backprop_allowed()
    ctx.allow_flex_compile_backprop()
    assert ctx.is_flex_compile_backprop_allowed()
    ctx.disable_flex_compile()
    assert not ctx.is_flex_compile_allowed() and not ctx.is_flex_compile_backprop_allowed()


CASES = [
    # spatial, kernel_size, stride, dilation, is_causal, heads, kv_heads, extra, scale
    ((12,), 5, 2, 2, False, 2, 2, 0, None),
    ((11,), 4, 3, 1, True, 4, 2, 2, 0.4),
    ((7, 6), (3, 5), (1, 2), (2, 1), (False, True), 2, 1, 0, None),
    ((6, 6), 3, 3, 1, False, 2, 2, 3, None),
    ((4, 5, 6), (2, 3, 3), (1, 2, 1), (1, 1, 2), (True, False, False), 2, 2, 1, 0.9),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("era", ERAS)
def test_fused_ops(rng, era, case):
    natten = ERAS[era][0]
    spatial, ks, stride, dil, causal, heads, kv_heads, extra, scale = case
    n = len(spatial)
    if era == "v020":
        kv_heads = heads
    q = rng.standard_normal((2, *spatial, heads, 8))
    k, v = (rng.standard_normal((2, *spatial, kv_heads, 8)) for _ in range(2))
    ak, av = (rng.standard_normal((2, extra, kv_heads, 8)) if extra else None for _ in range(2))
    want, want_lse = oracle.na_forward(q, k, v, ks, stride, dil, causal, scale, ak, av)
    na = getattr(natten, f"na{n}d")
    out = na(to_mx(q), to_mx(k), to_mx(v), ks, stride, dil, causal, scale, to_mx(ak), to_mx(av), **PERF_ARGS)
    assert_close(out, want)
    if era == "v021":
        out, lse = na(to_mx(q), to_mx(k), to_mx(v), ks, stride, dil, causal, scale, to_mx(ak), to_mx(av), return_lse=True)
        assert lse.dtype == mx.float32
        assert_close(out, want)
        assert_close(lse, want_lse)
        generic = n021.functional.neighborhood_attention_generic
        assert_close(generic(to_mx(q), to_mx(k), to_mx(v), ks, stride, dil, causal, scale, to_mx(ak), to_mx(av)), want)


def test_v020_rejects_gqa_and_unknown_backends(rng):
    q, kv = to_mx(rng.standard_normal((1, 8, 4, 8))), to_mx(rng.standard_normal((1, 8, 2, 8)))
    with pytest.raises(ValueError, match="GQA"):
        n020.na1d(q, kv, kv, 3)
    with pytest.raises(ValueError, match="GQA"):
        n020.attention(q, kv, kv)
    assert n021.na1d(q, kv, kv, 3).shape == (1, 8, 4, 8)
    for era in (n020, n021):
        with pytest.raises(NotImplementedError, match="backend"):
            era.na1d(q, q, q, 3, backend="triton-fna")
        with pytest.raises(NotImplementedError, match="backend"):
            era.attention(q, q, q, backend="flex-fna")


@pytest.mark.parametrize("heads, kv_heads, s_q, s_kv", [(2, 2, 6, 9), (4, 2, 7, 7), (3, 1, 5, 5)])
def test_attention(rng, heads, kv_heads, s_q, s_kv):
    q = rng.standard_normal((2, s_q, heads, 8))
    k, v = (rng.standard_normal((2, s_kv, kv_heads, 8)) for _ in range(2))
    want, want_lse = dense_attention(q, k, v, scale=0.3)
    # v021: (query, key, value, is_causal, scale, ...)
    out, lse = n021.attention(to_mx(q), to_mx(k), to_mx(v), False, 0.3, return_lse=True, backend="flex-fmha")
    assert_close(out, want)
    assert_close(lse, want_lse)
    if s_q == s_kv:
        want_c, want_c_lse = dense_attention(q, k, v, causal=True)
        out, lse = n021.attention(to_mx(q), to_mx(k), to_mx(v), is_causal=True, return_lse=True)
        assert_close(out, want_c)
        assert_close(lse, want_c_lse)
    else:
        with pytest.raises(ValueError, match="Causal"):
            n021.attention(to_mx(q), to_mx(k), to_mx(v), is_causal=True)
    if heads == kv_heads:
        # v020: (query, key, value, scale, backend, ...)
        assert_close(n020.attention(to_mx(q), to_mx(k), to_mx(v), 0.3, "cutlass-fmha"), want)


def test_attention_varlen(rng):
    seqlens_q, seqlens_kv = [3, 5, 2], [4, 2, 6]
    q = rng.standard_normal((1, 11, 2, 8))  # one query token past the last sequence
    k, v = (rng.standard_normal((1, 12, 2, 8)) for _ in range(2))
    seg_q = np.repeat(np.arange(3), seqlens_q)
    seg_kv = np.repeat(np.arange(3), seqlens_kv)
    want, want_lse = dense_attention(q[:, :10], k, v, segments_q=seg_q, segments_kv=seg_kv)
    out, lse = n021.attention(to_mx(q), to_mx(k), to_mx(v), seqlens_Q=mx.array(seqlens_q),
                              seqlens_KV=mx.array(seqlens_kv), return_lse=True)
    assert_close(out[:, :10], want)
    assert_close(lse[:, :10], want_lse)
    assert float(mx.abs(out[:, 10:]).max()) == 0.0
    cu_q, cu_kv = mx.array([0, 3, 8, 10]), mx.array([0, 4, 6, 12])
    out2 = n021.attention(to_mx(q), to_mx(k), to_mx(v), cumulative_seqlen_Q=cu_q, cumulative_seqlen_KV=cu_kv,
                          max_seqlen_Q=5, max_seqlen_KV=6)
    assert_close(out2, to_np(out))
    # causal varlen: equal lengths per sequence
    lens = [4, 3, 5]
    seg = np.repeat(np.arange(3), lens)
    qc, kc, vc = (rng.standard_normal((1, 12, 2, 8)) for _ in range(3))
    want_c, _ = dense_attention(qc, kc, vc, causal=True, segments_q=seg, segments_kv=seg)
    assert_close(n021.attention(to_mx(qc), to_mx(kc), to_mx(vc), True, seqlens_Q=mx.array(lens), seqlens_KV=mx.array(lens)), want_c)
    with pytest.raises(ValueError, match="batch size 1"):
        n021.attention(to_mx(np.zeros((2, 4, 1, 8))), to_mx(np.zeros((2, 4, 1, 8))), to_mx(np.zeros((2, 4, 1, 8))),
                       seqlens_Q=mx.array([4]), seqlens_KV=mx.array([4]))
    with pytest.raises(ValueError):
        n021.attention(to_mx(q), to_mx(k), to_mx(v), seqlens_Q=mx.array(seqlens_q))


def test_merge_attentions(rng):
    outs = [rng.standard_normal((2, 5, 2, 8)) for _ in range(3)]
    lses = [rng.standard_normal((2, 5, 2)) for _ in range(3)]
    want, want_lse = oracle.merge_attentions(outs, lses)
    merged = n020.merge_attentions([to_mx(o) for o in outs], [to_mx(lse_i) for lse_i in lses], False)
    assert_close(merged, want)
    out, lse = n021.merge_attentions([to_mx(o) for o in outs], [to_mx(lse_i) for lse_i in lses], False, False)
    assert_close(out, want)
    assert_close(lse, want_lse)
    with pytest.raises(ValueError, match="at least two"):
        n021.merge_attentions([to_mx(outs[0])], [to_mx(lses[0])])
    with pytest.raises(ValueError, match="rank-4"):
        n021.merge_attentions([to_mx(outs[0][:, None])] * 2, [to_mx(lses[0][:, None])] * 2)


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize(
    "n, spatial, ks, stride, dil, causal",
    [(1, (12,), 5, 2, 2, True), (2, (6, 7), (3, 5), (3, 1), 1, (False, True)), (3, (4, 6, 4), 3, 1, (1, 2, 1), False)],
    ids=str,
)
def test_modules(rng, era, n, spatial, ks, stride, dil, causal):
    natten = ERAS[era][0]
    dim, heads = 16, 2
    cls = getattr(natten, f"NeighborhoodAttention{n}D")
    # (embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias, qk_scale, proj_drop)
    m = cls(dim, heads, ks, stride, dil, causal, True, None, 0.0)
    assert m.kernel_size == oracle.as_tuple(ks, n) and m.stride == oracle.as_tuple(stride, n)
    params = {k: v.shape for k, v in tree_flatten(m.parameters())}
    assert params == {"qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16), "proj.bias": (16,)}
    sd = {k: rng.standard_normal(s).astype(np.float32) * 0.3 for k, s in params.items()}
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((2, *spatial, dim))
    assert_close(m(to_mx(x)), modern_module_forward(x, sd, heads, ks, stride, dil, causal))
    with pytest.raises(ValueError, match="embedding dimension"):
        m(to_mx(rng.standard_normal((2, *spatial, dim + 1))))
    with pytest.raises(ValueError, match="rank"):
        m(to_mx(rng.standard_normal((2, *spatial))))
    with pytest.raises(ValueError, match="evenly divide"):
        cls(10, 3, ks)
