"""natten_mlx.compat.v017 against NATTEN 0.17.5's definitions: unfused heads-first ops with
``is_causal``/``rpb``, fused heads-last ops, the context switches, modules with ``rel_pos_bias``."""

from __future__ import annotations

import inspect

import mlx.core as mx
import natten_mlx.compat.v017 as natten
import numpy as np
import oracle
import pytest
from compat_support import (
    assert_close,
    heads_first,
    heads_last,
    legacy_module_forward,
    legacy_state_dict,
    to_mx,
    to_np,
)
from natten_mlx.compat import load_torch_state_dict
from natten_mlx.compat.v017 import context
from natten_mlx.compat.v017 import functional as F

UPSTREAM_ALL = [
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "are_deterministic_algorithms_enabled", "use_deterministic_algorithms", "use_kv_parallelism_in_fused_na",
    "is_kv_parallelism_in_fused_na_enabled", "use_fna", "is_fna_enabled", "use_fused_na", "is_fused_na_enabled",
    "use_autotuner", "force_flex_attention", "disable_autotuner", "is_autotuner_enabled",
    "is_autotuner_enabled_for_forward", "is_autotuner_enabled_for_backward", "is_autotuner_thorough_for_forward",
    "is_autotuner_thorough_for_backward", "has_cuda", "has_half", "has_bfloat", "has_gemm", "has_fna",
    "has_fused_na", "has_tf32_gemm", "has_fp32_gemm", "has_fp64_gemm", "use_tf32_in_gemm_na", "use_tiled_na",
    "use_gemm_na", "use_flex_attention", "is_tf32_in_gemm_na_enabled", "is_tiled_na_enabled", "is_gemm_na_enabled",
    "set_memory_usage_preference", "get_memory_usage_preference", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "enable_tf32", "disable_tf32", "enable_gemm_na",
    "disable_gemm_na", "enable_tiled_na", "disable_tiled_na",
]


@pytest.fixture(autouse=True)
def fresh_context():
    context.NattenContext.reset()
    context.AutotunerContext.reset()
    yield
    context.NattenContext.reset()
    context.AutotunerContext.reset()
    natten.use_gemm_na(True)
    natten.use_tiled_na(True)


def test_public_names():
    assert natten.__version__ == "0.17.5"
    assert sorted(natten.__all__) == sorted(UPSTREAM_ALL)
    assert all(callable(getattr(natten, n)) for n in UPSTREAM_ALL)
    assert [p for p in inspect.signature(F.na3d_av).parameters.values() if p.default is inspect.Parameter.empty][-1].name == "dilation"


def test_context_switches_are_recorded():
    assert not natten.is_fused_na_enabled()
    natten.use_fused_na(True, kv_parallel=False)
    assert natten.is_fused_na_enabled() and natten.is_fna_enabled() and not natten.is_kv_parallelism_in_fused_na_enabled()
    natten.use_fna(False)
    assert not natten.is_fused_na_enabled()
    natten.force_flex_attention()
    assert natten.is_fused_na_enabled() and context.should_force_flex_attention()
    natten.use_flex_attention()
    assert context.should_use_flex_attention() and not context.should_force_flex_attention()

    natten.use_autotuner(True, False, True, None, 3, None, 7, None)
    assert natten.is_autotuner_enabled() and natten.is_autotuner_enabled_for_forward()
    assert not natten.is_autotuner_enabled_for_backward() and natten.is_autotuner_thorough_for_forward()
    assert context.AutotunerContext.warmup_steps_forward == 3 and context.AutotunerContext.steps_forward == 7
    with pytest.raises(ValueError):
        natten.use_autotuner(forward_pass="yes")
    natten.disable_autotuner()
    assert not natten.is_autotuner_enabled() and not natten.is_autotuner_thorough_for_forward()

    natten.set_memory_usage_preference("strict")
    assert natten.is_memory_usage_strict() and natten.get_memory_usage_preference() is context.MemoryUsagePreference.Strict
    natten.set_memory_usage_preference()
    assert natten.is_memory_usage_default() and not natten.is_memory_usage_unrestricted()
    with pytest.raises(ValueError):
        natten.set_memory_usage_preference("lavish")

    natten.use_deterministic_algorithms()
    assert natten.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError):
        natten.use_kv_parallelism_in_fused_na(True)
    with pytest.raises(RuntimeError):
        natten.use_autotuner(forward_pass=True)
    natten.use_deterministic_algorithms(False)

    assert natten.is_gemm_na_enabled() and natten.is_tiled_na_enabled()  # libnatten's defaults
    assert natten.disable_gemm_na() is False and natten.disable_tiled_na() is False
    assert natten.enable_gemm_na() is True and natten.enable_tiled_na() is True
    natten.use_tf32_in_gemm_na(True)
    assert natten.is_tf32_in_gemm_na_enabled() is False and natten.enable_tf32() is False and natten.disable_tf32() is False
    assert natten.has_cuda() is False and natten.has_fna() is False and natten.has_fused_na() is False
    assert natten.has_half() and natten.has_bfloat() and not natten.has_gemm()


def _extra_hf(a):
    return None if a is None else to_mx(a.transpose(0, 2, 1, 3))


@pytest.mark.parametrize(
    "spatial, ks, dil, causal, extra, bias",
    [
        ((10,), 3, 2, True, 0, False),
        ((9,), 4, 1, False, 2, True),
        ((6, 7), (3, 5), (2, 1), (True, False), 1, False),
        ((5, 6), 3, 1, False, 0, True),
        ((4, 5, 6), (2, 3, 3), (1, 1, 2), (False, True, False), 2, False),
        ((5, 4, 6), 3, 1, False, 0, True),
    ],
    ids=str,
)
def test_unfused_ops(rng, spatial, ks, dil, causal, extra, bias):
    n = len(spatial)
    K = oracle.as_tuple(ks, n)
    q, k, v = (rng.standard_normal((2, *spatial, 2, 4)) for _ in range(3))
    ak = rng.standard_normal((2, extra, 2, 4)) if extra else None
    av = rng.standard_normal((2, extra, 2, 4)) if extra else None
    rpb = rng.standard_normal((2, *(2 * x - 1 for x in K))) if bias else None
    qk, av_op = getattr(F, f"na{n}d_qk"), getattr(F, f"na{n}d_av")
    # (query, key, kernel_size, dilation, additional_keys, is_causal, rpb)
    attn = qk(to_mx(heads_first(q, n)), to_mx(heads_first(k, n)), ks, dil, _extra_hf(ak), causal, to_mx(rpb))
    assert_close(attn, heads_first(oracle.na_qk(q, k, ks, 1, dil, causal, rpb, 1.0, ak), n))
    weights = mx.softmax(attn, axis=-1)
    # (attn, value, kernel_size, dilation, additional_values, is_causal)
    out = av_op(weights, to_mx(heads_first(v, n)), ks, dil, _extra_hf(av), causal)
    assert_close(out, heads_first(oracle.na_av(heads_last(to_np(weights), n), v, ks, 1, dil, causal, av), n))


@pytest.mark.parametrize(
    "spatial, ks, dil, causal, extra, bias, scale",
    [
        ((12,), 5, 2, False, 0, True, None),
        ((11,), 3, 1, True, 3, False, 0.3),
        ((7, 6), (3, 3), (2, 1), False, 2, True, None),
        ((6, 6), 4, 1, (False, True), 0, False, 0.7),
        ((4, 5, 6), 3, 1, False, 1, True, None),
    ],
    ids=str,
)
def test_fused_ops(rng, spatial, ks, dil, causal, extra, bias, scale):
    n = len(spatial)
    K = oracle.as_tuple(ks, n)
    q, k, v = (rng.standard_normal((2, *spatial, 2, 4)) for _ in range(3))
    ak = rng.standard_normal((2, extra, 2, 4)) if extra else None
    av = rng.standard_normal((2, extra, 2, 4)) if extra else None
    rpb = rng.standard_normal((2, *(2 * x - 1 for x in K))) if bias else None
    na = getattr(F, f"na{n}d")
    # (query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys, additional_values, xformers_kwargs)
    out = na(to_mx(q), to_mx(k), to_mx(v), ks, dil, causal, to_mx(rpb), scale, to_mx(ak), to_mx(av), {"op": None})
    want, _ = oracle.na_forward(q, k, v, ks, 1, dil, causal, scale, ak, av, rpb)
    assert_close(out, want)


@pytest.mark.parametrize(
    "n, spatial, ks, dil, causal, bias",
    [(1, (10,), 3, 2, False, True), (2, (6, 7), (3, 5), 1, (True, False), False), (3, (4, 5, 5), 3, (1, 1, 1), False, True)],
    ids=str,
)
def test_modules(rng, n, spatial, ks, dil, causal, bias):
    dim, heads = 8, 2
    cls = getattr(natten, f"NeighborhoodAttention{n}D")
    # (dim, num_heads, kernel_size, dilation, is_causal, rel_pos_bias)
    m = cls(dim, heads, ks, dil, causal, bias)
    K = oracle.as_tuple(ks, n)
    assert m.kernel_size == K and m.dilation == oracle.as_tuple(dil, n) and m.is_causal == oracle.as_tuple(causal, n)
    sd = legacy_state_dict(rng, dim, heads, rpb_shape=tuple(2 * x - 1 for x in K) if bias else None)
    load_torch_state_dict(m, sd)
    x = rng.standard_normal((2, *spatial, dim))
    want = legacy_module_forward(x, sd, heads, ks, dil, causal)
    assert_close(m(to_mx(x)), want)
    natten.use_fused_na()  # upstream's fused path: same numbers
    assert_close(m(to_mx(x)), want)


def test_module_errors_and_fused_dropout(rng):
    with pytest.raises(NotImplementedError):
        natten.NeighborhoodAttention1D(8, 2, 3, is_causal=True, rel_pos_bias=True)
    with pytest.raises(ValueError, match="kernel_size"):
        natten.NeighborhoodAttention2D(8, 2, (3, 3, 3))
    m = natten.NeighborhoodAttention1D(8, 2, 3, attn_drop=0.5, use_experimental_ops=True)
    x = to_mx(rng.standard_normal((1, 9, 8)))
    m.eval()
    y_eval = m(x)
    m.train()
    natten.use_fused_na()  # upstream's fused kernels apply no attention dropout
    assert_close(m(x), to_np(y_eval))
    natten.use_fused_na(False)
    assert not np.allclose(to_np(m(x)), to_np(y_eval))
