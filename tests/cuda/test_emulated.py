"""The cuda backend end to end on the CPU: every kernel runs in the emulator (emu.py: the exact
source mx.fast.cuda_kernel compiles, built with g++), the backend's MLX glue (extra keys/values,
lse merge, backward assembly) runs on MLX's CPU. Forward and backward against the float64 oracle,
float32/float16/bfloat16, 1D/2D/3D, stride, dilation, causal, GQA, Dv != D, extra keys, rpb,
sub-domains, tile overrides. Skipped without g++."""

from __future__ import annotations

import numpy as np
import pytest

__import__("cuda_cases").require_emulator()

import emu  # noqa: E402
import oracle  # noqa: E402
from configs import cfg_id, random_config, random_tensors  # noqa: E402
from cuda_cases import TOL, make_problem, record, rel_err, run_and_compare, to_mx, to_np  # noqa: E402
from natten_mlx_cuda import plan, source  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402

BACKEND = CudaBackend(runner=emu.mlx_runner, require_device=False)
MAX_LEN = {1: 40, 2: 11, 3: 6}


def _configs():
    rng = np.random.default_rng(2026)
    out = []
    for i in range(12):
        na_dim = 1 + i % 3
        # head dims 8/16 take the tensor-core forward in half precision, 3 the simple kernel
        cfg = random_config(rng, na_dim, MAX_LEN[na_dim], head_dims=(8, 16) if i % 4 else (3,))
        dtype = ("float16", "bfloat16", "float32")[(i // 3) % 3]
        out.append(pytest.param(cfg, dtype, i, id=f"{dtype}-{cfg_id(cfg)}"))
    # the tensor-core forward with rpb and dilation, and with dilation, GQA and extra keys
    fixed = [
        (dict(na_dim=2, shape=(11, 9), B=1, H=2, Hkv=2, D=16, Dv=16, E=0, K=(3, 4), s=(1, 2), d=(2, 2),
              c=(False, False), rpb=True, scale=None), "float16"),
        (dict(na_dim=3, shape=(5, 6, 7), B=2, H=4, Hkv=2, D=8, Dv=16, E=2, K=(2, 3, 3), s=(1, 1, 2), d=(2, 1, 2),
              c=(False, True, False), rpb=False, scale=0.3), "bfloat16"),
    ]
    for j, (cfg, dtype) in enumerate(fixed):
        out.append(pytest.param(cfg, dtype, 100 + j, id=f"{dtype}-{cfg_id(cfg)}"))
    return out


@pytest.mark.parametrize("cfg,dtype,seed", _configs())
def test_backend_against_oracle(cfg, dtype, seed):
    errs = run_and_compare(BACKEND, cfg, dtype, np.random.default_rng(seed))
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, (errs, TOL[dtype])


@pytest.mark.parametrize("limit", [0, 1024])
def test_rpb_grad_summed_in_shared_memory_or_not(monkeypatch, limit):
    """The dq pass sums d_rpb per block in shared memory for small tables (plan.BWD_SRPB entries) and
    adds it once per entry, else adds every element's share to the output directly: both give the
    oracle's gradients (2D, even kernel, stride, dilation, GQA; rpb excludes causal)."""
    cfg = dict(na_dim=2, shape=(11, 10), B=1, H=2, Hkv=1, D=16, Dv=16, E=0, K=(4, 3), s=(1, 2), d=(2, 1),
               c=(False, False), rpb=True, scale=None)
    monkeypatch.setattr(plan, "BWD_SRPB", limit)
    geo = plan.geometry(make_problem(cfg, "float16"))
    assert dict(plan.backward_dq(geo, "float16", True, True).variant.template)["SRPB"] == (limit > 0)
    errs = run_and_compare(BACKEND, cfg, "float16", np.random.default_rng(8))
    assert "d_rpb" in errs and max(errs.values()) < TOL["float16"], errs


def test_tile_override_same_result():
    rng = np.random.default_rng(7)
    cfg = random_config(rng, 2, 12, head_dims=(16,), allow_extra=False)
    cfg.update(shape=(12, 10), K=(5, 3), s=(2, 1), d=(2, 3), c=(False, True), rpb=False)
    a = run_and_compare(BACKEND, cfg, "float16", np.random.default_rng(1), check_backward=False)
    b = run_and_compare(BACKEND.configure(tile=(2, 32), key_tile=(16, 4)), cfg, "float16", np.random.default_rng(1), check_backward=False)
    assert a["out"] < TOL["float16"] and b["out"] < TOL["float16"], (a, b)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_subdomain(dtype):
    """A slab of queries with the key slab its windows need (protocol v2 sub-domain fields): the
    local results are the global ones' rows; key gradients are those of the slab's queries."""
    rng = np.random.default_rng(11)
    shape, K, s, d, c = (14, 12), (5, 4), (1, 2), (2, 1), (False, True)
    cfg = dict(na_dim=2, shape=shape, B=1, H=2, Hkv=1, D=16, Dv=8, E=0, K=K, s=s, d=d, c=c, rpb=False, scale=None)
    q, k, v, _, _, _ = random_tensors(rng, cfg)
    qlo, qhi = (3, 5), (10, 12)  # local queries [qlo, qhi) per axis
    klo, khi = [], []
    for a in range(2):
        firsts, lasts = [], []
        for i in range(qlo[a], qhi[a]):
            g, st, en = oracle.axis_window(i, shape[a], K[a], s[a], d[a], c[a])
            firsts.append(st * d[a] + g)
            lasts.append(en * d[a] + g)
        klo.append(min(firsts))
        khi.append(max(lasts) + 1)
    qs = tuple(slice(lo, hi) for lo, hi in zip(qlo, qhi))
    ks = tuple(slice(lo, hi) for lo, hi in zip(klo, khi))
    local = dict(cfg, shape=tuple(h - lo for lo, h in zip(qlo, qhi)))
    p = make_problem(local, dtype, domain=shape, query_offset=qlo, kv_spatial=tuple(h - lo for lo, h in zip(klo, khi)), kv_offset=tuple(klo))
    mq, mk, mv = (to_mx(x, dtype) for x in (q[(slice(None),) + qs], k[(slice(None),) + ks], v[(slice(None),) + ks]))
    q, k, v = to_np(to_mx(q, dtype)), to_np(to_mx(k, dtype)), to_np(to_mx(v, dtype))
    ref_o, ref_l = oracle.na_forward(q, k, v, K, s, d, c)
    out, lse = BACKEND.fused_forward(p, mq, mk, mv)
    assert rel_err(to_np(out), ref_o[(slice(None),) + qs]) < TOL[dtype]
    assert rel_err(to_np(lse), ref_l[(slice(None),) + qs]) < TOL[dtype]
    dout = np.zeros(ref_o.shape)
    dout[(slice(None),) + qs] = rng.standard_normal(dout[(slice(None),) + qs].shape)
    d_out = to_mx(dout[(slice(None),) + qs], dtype)
    ref_g = oracle.na_backward(q, k, v, K, s, d, c, dout=to_np(to_mx(dout, dtype)))
    grads = BACKEND.fused_backward(record(p, {"query": mq, "key": mk, "value": mv}, out, lse, d_out, None))
    assert rel_err(to_np(grads["query"]), ref_g["q"][(slice(None),) + qs]) < TOL[dtype]
    assert rel_err(to_np(grads["key"]), ref_g["k"][(slice(None),) + ks]) < TOL[dtype]
    assert rel_err(to_np(grads["value"]), ref_g["v"][(slice(None),) + ks]) < TOL[dtype]


def test_plain_shared_loads_same_result():
    """ldmatrix=False (B fragments through plain shared loads) computes the same, forward and backward."""
    cfg = dict(na_dim=2, shape=(9, 10), B=1, H=2, Hkv=1, D=16, Dv=16, E=0, K=(4, 3), s=(1, 2), d=(2, 1),
               c=(False, True), rpb=False, scale=None)
    errs = run_and_compare(BACKEND.configure(ldmatrix=False), cfg, "float16", np.random.default_rng(5))
    assert max(errs.values()) < TOL["float16"], errs


@pytest.mark.parametrize("m_tiles,stages", [(1, 2), (2, 2), (1, 3)])
@pytest.mark.parametrize("na_dim,tile", [(1, (128,)), (2, (16, 8)), (3, (8, 4, 4))])
def test_128_query_forward(na_dim, tile, m_tiles, stages):
    """The forward with 128-query tiles (8 warps of 16 rows, or 4 warps of 32 rows), partial tiles on
    every axis, stride, dilation, rpb (1D, 2D) or causal (3D); the backward takes its default 64-tiles."""
    shape = {1: (150,), 2: (19, 13), 3: (9, 7, 6)}[na_dim]
    K = {1: (9,), 2: (5, 4), 3: (3, 4, 3)}[na_dim]
    cfg = dict(na_dim=na_dim, shape=shape, B=1, H=2, Hkv=1, D=16, Dv=8, E=0, K=K, s=(1,) * (na_dim - 1) + (2,),
               d=(2,) + (1,) * (na_dim - 1), c=(False,) * (na_dim - 1) + (na_dim == 3,), rpb=na_dim != 3, scale=None)
    errs = run_and_compare(BACKEND.configure(tile=tile, m_tiles=m_tiles, stages=stages), cfg, "float16", np.random.default_rng(na_dim),
                           check_backward=na_dim == 2 and m_tiles == 1)
    assert max(errs.values()) < TOL["float16"], errs


@pytest.mark.parametrize("na_dim,tile", [(1, (64,)), (2, (8, 8)), (3, (4, 4, 4))])
def test_q_in_ring_slot(monkeypatch, na_dim, tile):
    """min_blocks=3: Q lives in the ring's second K slot (read into registers before the first load
    into that slot) and the key tiles are listed in shorter chunks (here 2 per chunk, so the walk
    restarts its ring mid-way); partial tiles on every axis, stride, dilation, rpb or causal."""
    shape = {1: (150,), 2: (19, 13), 3: (9, 7, 6)}[na_dim]
    K = {1: (9,), 2: (5, 4), 3: (3, 4, 3)}[na_dim]
    cfg = dict(na_dim=na_dim, shape=shape, B=1, H=2, Hkv=1, D=32, Dv=32, E=0, K=K, s=(1,) * (na_dim - 1) + (2,),
               d=(2,) + (1,) * (na_dim - 1), c=(False,) * (na_dim - 1) + (na_dim == 3,), rpb=na_dim != 3, scale=None)
    monkeypatch.setattr(plan, "FWD_MAXT_SMALL", 2)
    v = plan.forward(plan.geometry(make_problem(cfg, "float16")), "float16", "float16", cfg["rpb"], True,
                     (1,) * (3 - na_dim) + tile, min_blocks=3).variant
    assert dict(v.template)["QALIAS"] and v.min_blocks == 3 and "__launch_bounds__" in source.full_source(v)
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=tile, min_blocks=3), cfg, "float16",
                           np.random.default_rng(na_dim), check_backward=False)
    assert max(errs.values()) < TOL["float16"], errs


@pytest.mark.parametrize("na_dim,tile", [(2, (16, 8)), (3, (2, 8, 8))])
def test_two_blocks_of_32_row_warps(monkeypatch, na_dim, tile):
    """The default layout of large problems (plan.forward_tiles): 128-query tiles of 4 warps x 32 rows,
    two blocks per SM; at D 128 the key tiles are listed in the short chunks (here 2 per chunk) so that
    two blocks fit. Partial tiles on every axis, stride, dilation, rpb (2D) or causal (3D)."""
    shape = {2: (19, 13), 3: (6, 9, 10)}[na_dim]
    K = {2: (5, 4), 3: (3, 4, 3)}[na_dim]
    cfg = dict(na_dim=na_dim, shape=shape, B=1, H=2, Hkv=1, D=128, Dv=128, E=0, K=K, s=(1,) * (na_dim - 1) + (2,),
               d=(2,) + (1,) * (na_dim - 1), c=(False,) * (na_dim - 1) + (na_dim == 3,), rpb=na_dim == 2, scale=None)
    monkeypatch.setattr(plan, "FWD_MAXT_SMALL", 2)
    v = plan.forward(plan.geometry(make_problem(cfg, "float16")), "float16", "float16", cfg["rpb"], True,
                     (1,) * (3 - na_dim) + tile, m_tiles=2).variant
    t = dict(v.template)
    assert t["MT"] == 2 and t["NW"] == 4 and t["MAXT"] == 2 and v.min_blocks == 2 and not t["QALIAS"]
    errs = run_and_compare(BACKEND.configure(tile=tile, m_tiles=2), cfg, "float16", np.random.default_rng(na_dim),
                           check_backward=False)
    assert max(errs.values()) < TOL["float16"], errs


@pytest.mark.parametrize("stages", [2, 3])
def test_key_tile_list_in_chunks(monkeypatch, stages):
    """The forward lists its key tiles in shared memory in chunks of plan.FWD_MAXT; a walk longer
    than one chunk (here 3 tiles per chunk) gives the same result, with 2 or 3 key-tile slots."""
    from natten_mlx_cuda import plan

    cfg = dict(na_dim=2, shape=(12, 16), B=1, H=1, Hkv=1, D=16, Dv=16, E=0, K=(7, 7), s=(1, 1), d=(1, 2),
               c=(False, False), rpb=True, scale=None)
    monkeypatch.setattr(plan, "FWD_MAXT", 3)
    errs = run_and_compare(BACKEND.configure(key_tile=(4, 16), m_tiles=2, stages=stages), cfg, "bfloat16", np.random.default_rng(3),
                           check_backward=False)
    assert max(errs.values()) < TOL["bfloat16"], errs


@pytest.mark.parametrize("na_dim,splits", [(1, 3), (2, 2), (3, 4)])
def test_split_walk(na_dim, splits):
    """splits: each query tile's walk of key tiles is shared by several blocks whose float32 parts the
    backend merges by their lse. With causal axes, dilation and stride some parts miss a row's whole
    window (they write 0 and lse -inf) and, with more parts than a tile has key tiles, some parts are
    empty; extra keys merge after the parts; rpb (2D); float16 and bfloat16."""
    cfg = {
        1: dict(na_dim=1, shape=(150,), B=1, H=2, Hkv=1, D=16, Dv=8, E=0, K=(33,), s=(2,), d=(2,), c=(True,),
                rpb=False, scale=None),
        2: dict(na_dim=2, shape=(11, 10), B=1, H=2, Hkv=2, D=16, Dv=16, E=3, K=(5, 4), s=(1, 2), d=(2, 1),
                c=(False, False), rpb=True, scale=None),
        3: dict(na_dim=3, shape=(6, 5, 6), B=1, H=1, Hkv=1, D=8, Dv=8, E=0, K=(3, 2, 3), s=(1, 1, 2), d=(2, 1, 1),
                c=(True, False, False), rpb=False, scale=0.4),
    }[na_dim]
    dtype = "bfloat16" if na_dim == 3 else "float16"
    tile = kt = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}[na_dim]
    launch = plan.forward(plan.geometry(make_problem(cfg, dtype)), dtype, dtype, cfg["rpb"], True,
                          (1,) * (3 - na_dim) + tile, (1,) * (3 - na_dim) + kt, splits=splits)
    assert launch.splits == splits and dict(launch.variant.template)["SPLIT"] == splits
    assert launch.output_shapes[0][0] == splits and dict(launch.variant.template)["OT"] == "float32"
    # the backward reads only the merged out and lse, which the forward's check covers
    errs = run_and_compare(BACKEND.configure(tile=tile, key_tile=kt, splits=splits), cfg, dtype,
                           np.random.default_rng(10 + na_dim), check_backward=False)
    assert max(errs.values()) < TOL[dtype], errs
