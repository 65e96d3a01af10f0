"""natten_mlx.geometry, the tables tier authors use: the dense reference mask against the float64
oracle's (whole domain) and against slices of it (sub-domains); the outer product; device tables
equal to the NumPy ones; tile plans whose masks and halos cover exactly the neighborhood."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import oracle
import pytest
from configs import random_config
from natten_mlx import geometry
from natten_mlx.problem import Problem


def _geom(cfg):
    return (cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_dense_mask_equals_the_oracle(na_dim):
    rng = np.random.default_rng(40 + na_dim)
    for _ in range(25):
        cfg = random_config(rng, na_dim, {1: 30, 2: 10, 3: 6}[na_dim])
        want = oracle.na_mask(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"])
        got = geometry.dense_mask(_geom(cfg))
        assert got.dtype == bool and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_subdomain_dense_mask_is_a_block_of_the_oracle(na_dim):
    rng = np.random.default_rng(50 + na_dim)
    for _ in range(25):
        cfg = random_config(rng, na_dim, {1: 30, 2: 10, 3: 6}[na_dim])
        shape = cfg["shape"]
        qo, ql, ko, kl = [], [], [], []
        for a, L in enumerate(shape):
            lo = int(rng.integers(0, L))
            n = int(rng.integers(1, L - lo + 1))
            klo, khi = geometry.key_extent(L, cfg["K"][a], cfg["s"][a], cfg["d"][a], cfg["c"][a], lo, n)
            qo.append(lo), ql.append(n), ko.append(klo), kl.append(khi - klo)
        full = oracle.na_mask(shape, cfg["K"], cfg["s"], cfg["d"], cfg["c"]).reshape(*shape, *shape)
        block = full[tuple(slice(o, o + n) for o, n in zip(qo, ql)) + tuple(slice(o, o + n) for o, n in zip(ko, kl))]
        got = geometry.dense_mask(_geom(cfg)[:0] + (tuple(ql), *_geom(cfg)[1:], shape, tuple(qo), tuple(kl), tuple(ko)))
        np.testing.assert_array_equal(got, block.reshape(int(np.prod(ql)), int(np.prod(kl))))
        # and no key outside the slab is ever needed: the block holds every key of those queries
        rows = full[tuple(slice(o, o + n) for o, n in zip(qo, ql))].reshape(int(np.prod(ql)), -1)
        assert rows.sum() == got.sum()


def test_outer_is_row_major():
    a = np.arange(6).reshape(3, 2)
    b = np.arange(8).reshape(2, 4) * 10
    got = geometry.outer([a, b], np.add, [2, 1])
    assert got.shape == (6, 8)
    for i1 in range(3):
        for i2 in range(2):
            for j1 in range(2):
                for j2 in range(4):
                    assert got[i1 * 2 + i2, j1 * 4 + j2] == a[i1, j1] * 2 + b[i2, j2]
    lead = geometry.outer([np.ones((5, 3, 2), bool), np.zeros((5, 2, 4), bool)], np.logical_or)
    assert lead.shape == (5, 6, 8) and lead.all()
    dev = geometry.outer([mx.array(a), mx.array(b)], mx.add, [2, 1], xp=mx)
    np.testing.assert_array_equal(np.array(dev), got)


def test_device_tables_equal_numpy_and_are_cached():
    g = ((9, 7), (3, 4), (2, 1), (1, 1), (True, False))
    t = geometry.slot_tables(g)
    d = geometry.device_slot_tables(g)
    assert d is geometry.device_slot_tables(g)
    np.testing.assert_array_equal(np.array(d["key_index"]), t.key_index)
    np.testing.assert_array_equal(np.array(d["valid"]), t.valid)
    for w, dw in zip(geometry.axis_tables(g), geometry.device_axis_tables(g)):
        np.testing.assert_array_equal(np.array(dw["key_index"]), w.key_index)
        np.testing.assert_array_equal(np.array(dw["start"]), w.start)
    p = Problem(op="fused", batch=1, spatial=(9, 7), heads=1, kv_heads=1, head_dim=4, value_head_dim=4,
                kernel_size=(3, 4), stride=(2, 1), dilation=(1, 1), is_causal=(True, False), scale=0.5,
                dtype=mx.float32)
    assert geometry.slot_tables(p) is t
    with pytest.raises(TypeError, match="geometry tuple"):
        geometry.slot_tables((9, 7))


def test_include_dir_and_header():
    assert os.path.isfile(os.path.join(geometry.include_dir(), "natten_mlx", "window.h"))
    assert geometry.window_header().startswith("// natten_mlx/window.h")


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_tile_plans_cover_exactly_the_neighborhood(na_dim):
    """Every (query, key) pair of the neighborhood appears in exactly one tile's masked pairs, and
    no other pair does; the per-pair rpb index is the dense one."""
    rng = np.random.default_rng(60 + na_dim)
    for trial in range(12):
        cfg = random_config(rng, na_dim, {1: 30, 2: 10, 3: 6}[na_dim], allow_causal=trial % 2 == 0)
        full = list(_geom(cfg))
        if trial % 3 == 0:  # a sub-domain
            qo, ql, ko, kl = [], [], [], []
            for a, L in enumerate(cfg["shape"]):
                lo = int(rng.integers(0, L))
                n = int(rng.integers(1, L - lo + 1))
                klo, khi = geometry.key_extent(L, cfg["K"][a], cfg["s"][a], cfg["d"][a], cfg["c"][a], lo, n)
                qo.append(lo), ql.append(n), ko.append(klo), kl.append(khi - klo)
            g = (tuple(ql), *full[1:], cfg["shape"], tuple(qo), tuple(kl), tuple(ko))
        else:
            g = tuple(full)
        tile = tuple(int(rng.integers(1, 5)) for _ in range(na_dim))
        plan = geometry.tile_plan(g, tile)
        mask = geometry.dense_mask(g)
        got = np.zeros(mask.shape, dtype=int)
        pairs = plan.pair_mask()
        real = plan.query_real
        for t in range(plan.query_index.shape[0]):
            qi = plan.query_index[t][real[t]]
            m = pairs[t][real[t]]
            rows = np.repeat(qi[:, None], m.shape[1], axis=1)[m]
            cols = np.broadcast_to(plan.key_index[t][None, :], m.shape)[m]
            np.add.at(got, (rows, cols), 1)
        np.testing.assert_array_equal(got, mask.astype(int))
        dev = geometry.device_tile_plan(g, tile)
        np.testing.assert_array_equal(np.array(dev["key_index"]), plan.key_index)
        np.testing.assert_array_equal(np.array(dev["output_index"]), plan.output_index)


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_padded3d_keeps_windows_and_token_order(na_dim):
    """geometry.padded3d: axes padded in front to three with trivial ones; the padded problem's
    dense mask (built from the padded tuples) equals the original's, token for token, and the
    sizes, offsets and counts carry over (sub-domain fields included)."""
    rng = np.random.default_rng(70 + na_dim)
    for _ in range(10):
        cfg = random_config(rng, na_dim, {1: 20, 2: 8, 3: 5}[na_dim])
        p = Problem("fused", cfg["B"], tuple(cfg["shape"]), cfg["H"], cfg["Hkv"], cfg["D"], cfg["Dv"], tuple(cfg["K"]),
                    tuple(cfg["s"]), tuple(cfg["d"]), tuple(cfg["c"]), 0.5, mx.float16, cfg["E"], bool(cfg["rpb"]),
                    True)
        g = geometry.padded3d(p)
        lead = 3 - na_dim
        assert g.rank == na_dim and (g.B, g.H, g.HKV, g.D, g.DV, g.E) == (p.batch, p.heads, p.kv_heads, p.head_dim,
                                                                           p.value_head_dim, p.num_extra)
        assert g.spatial == (1,) * lead + p.spatial and g.K == (1,) * lead + p.kernel_size
        assert g.causal == (False,) * lead + tuple(p.is_causal) and g.qoff == (0, 0, 0) and g.kvoff == (0, 0, 0)
        assert g.N == p.num_tokens and g.NK == p.kv_tokens and g.window_size == p.window_size
        assert g.rpb_size == int(np.prod([2 * k - 1 for k in p.kernel_size]))
        assert (g.has_rpb, g.scale, g.dtype) == (p.has_rpb, 0.5, mx.float16)
        padded = (g.spatial, g.K, g.s, g.d, g.causal, g.domain, g.qoff, g.kv_spatial, g.kvoff)
        np.testing.assert_array_equal(geometry.dense_mask(padded), geometry.dense_mask(p))
    sub = p.with_(spatial=(1,) * (na_dim - 1) + (1,), domain=p.spatial,
                  query_offset=(0,) * (na_dim - 1) + (p.spatial[-1] - 1,))
    g = geometry.padded3d(sub)
    assert g.domain == (1,) * (3 - na_dim) + p.spatial and g.qoff[-1] == p.spatial[-1] - 1
    with pytest.raises(ValueError, match="1 to 3"):
        geometry.pad3((1, 2, 3, 4), 1)
