"""The warpgroup-MMA forward (fmha_fwd's WG: wgmma products, 128-byte-swizzled shared tiles) in the CPU
emulator, against the float64 oracle: head dims 64/128 (the dims it serves), float16/bfloat16, 1D/2D/3D
with stride, dilation, causal axes, GQA, Dv != D, rpb, extra keys, a split walk and a caller's 64-query
tile (one warpgroup). Every test checks that the plan really took WG, so a silent fall-back to mma.sync
fails. The emulator computes wgmma from the descriptors' layout (emu_prelude.h: the swizzle as the
hardware applies it to shared addresses); benchmarks/gpu/wgmma_attn.py checked that layout on the H200.
Skipped without g++."""

from __future__ import annotations

import numpy as np
import pytest

__import__("cuda_cases").require_emulator()

import emu  # noqa: E402
from cuda_cases import TOL, make_problem, run_and_compare  # noqa: E402
from natten_mlx_cuda import plan  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402

BACKEND = CudaBackend(runner=emu.mlx_runner, require_device=False)

CASES = [
    # (cfg, dtype, backward checked)
    (dict(na_dim=1, shape=(150,), B=1, H=2, Hkv=1, D=64, Dv=64, E=0, K=(13,), s=(1,), d=(1,), c=(False,),
          rpb=False, scale=None), "float16", True),
    (dict(na_dim=1, shape=(97,), B=2, H=1, Hkv=1, D=64, Dv=128, E=0, K=(8,), s=(3,), d=(2,), c=(True,),
          rpb=False, scale=0.4), "bfloat16", False),
    (dict(na_dim=2, shape=(11, 13), B=1, H=3, Hkv=3, D=128, Dv=64, E=0, K=(5, 4), s=(2, 1), d=(1, 2),
          c=(False, True), rpb=False, scale=None), "float16", False),
    (dict(na_dim=2, shape=(12, 9), B=1, H=2, Hkv=2, D=64, Dv=64, E=0, K=(3, 5), s=(1, 1), d=(2, 1),
          c=(False, False), rpb=True, scale=None), "bfloat16", True),
    (dict(na_dim=3, shape=(4, 6, 7), B=1, H=4, Hkv=2, D=64, Dv=64, E=2, K=(2, 3, 3), s=(1, 2, 1), d=(1, 1, 2),
          c=(True, False, False), rpb=False, scale=None), "float16", False),
    (dict(na_dim=3, shape=(5, 5, 6), B=1, H=1, Hkv=1, D=128, Dv=128, E=0, K=(3, 3, 3), s=(1, 1, 1), d=(1, 1, 1),
          c=(False, False, False), rpb=True, scale=None), "bfloat16", False),
    # windows wider than the query tile: key tiles that are FULL for one warpgroup's rows and PARTIAL or
    # unseen for the other's, in 1D and on a 2D tile whose warpgroups are sub-boxes along axis 0
    (dict(na_dim=1, shape=(300,), B=1, H=1, Hkv=1, D=64, Dv=64, E=0, K=(201,), s=(1,), d=(1,), c=(False,),
          rpb=False, scale=None), "float16", True),
    (dict(na_dim=2, shape=(20, 40), B=1, H=1, Hkv=1, D=64, Dv=64, E=0, K=(9, 31), s=(1, 1), d=(1, 1),
          c=(False, False), rpb=False, scale=None), "bfloat16", False),
]


def _wg_variant(backend, cfg, dtype):
    """The template of the forward variant the backend launches for cfg (its own launch plan)."""
    geo = plan.geometry(make_problem(cfg, dtype))
    return dict(backend._forward_launch(geo, dtype, "float32" if cfg["E"] else dtype, cfg["rpb"]).variant.template)


@pytest.mark.parametrize("cfg,dtype,bwd", CASES, ids=[f"{c['na_dim']}d-D{c['D']}-Dv{c['Dv']}-{d}" for c, d, _ in CASES])
def test_wgmma_forward_against_oracle(cfg, dtype, bwd):
    tmpl = _wg_variant(BACKEND, cfg, dtype)
    assert tmpl["WG"] and tmpl["NW"] == 8 and tmpl["MT"] == 1, tmpl
    errs = run_and_compare(BACKEND, cfg, dtype, np.random.default_rng(cfg["D"] + cfg["na_dim"]), check_backward=bwd)
    assert max(errs.values()) < TOL[dtype], errs


def test_wgmma_one_warpgroup_and_split_walk():
    """A caller's 64-query tile (one warpgroup of 4 warps) and a walk split over 3 blocks (float32 parts
    merged by their lse) both stay on WG and match the oracle."""
    cfg = dict(na_dim=2, shape=(10, 16), B=1, H=2, Hkv=1, D=64, Dv=64, E=0, K=(7, 9), s=(1, 2), d=(1, 1),
               c=(False, False), rpb=False, scale=None)
    for be in (BACKEND.configure(tile=(4, 16)), BACKEND.configure(splits=3)):
        tmpl = _wg_variant(be, cfg, "float16")
        assert tmpl["WG"], tmpl
        errs = run_and_compare(be, cfg, "float16", np.random.default_rng(3), check_backward=False)
        assert max(errs.values()) < TOL["float16"], errs
    assert _wg_variant(BACKEND.configure(tile=(4, 16)), cfg, "float16")["NW"] == 4
    assert _wg_variant(BACKEND.configure(splits=3), cfg, "float16")["SPLIT"] == 3


def test_wgmma_off_and_refusals():
    """wgmma=False (or plan.WGMMA False) keeps mma.sync; head dims other than 64/128 never take WG, and
    wgmma=True refuses them with the reason; m_tiles=2 is refused with wgmma=True."""
    cfg = dict(na_dim=1, shape=(70,), B=1, H=1, Hkv=1, D=64, Dv=64, E=0, K=(9,), s=(1,), d=(1,), c=(False,),
               rpb=False, scale=None)
    assert not _wg_variant(BACKEND.configure(wgmma=False), cfg, "float16")["WG"]
    odd = dict(cfg, D=32, Dv=32)
    assert not _wg_variant(BACKEND, odd, "float16")["WG"]
    why = BACKEND.configure(wgmma=True).supports(make_problem(odd, "float16"))
    assert why is not None and "wgmma=True" in why and "D=32" in why, why
    assert BACKEND.configure(wgmma=True).supports(make_problem(cfg, "float16")) is None
    why = BACKEND.configure(wgmma=True, m_tiles=2).supports(make_problem(cfg, "float16"))
    assert why is not None and "m_tiles=2" in why
    with pytest.raises(TypeError, match="wgmma"):
        BACKEND.configure(wgmma="yes")


def test_wgmma_default_off_by_constant(monkeypatch):
    cfg = dict(na_dim=1, shape=(70,), B=1, H=1, Hkv=1, D=128, Dv=128, E=0, K=(9,), s=(1,), d=(1,), c=(False,),
               rpb=False, scale=None)
    assert _wg_variant(BACKEND, cfg, "bfloat16")["WG"]
    monkeypatch.setattr(plan, "WGMMA", False)
    assert not _wg_variant(BACKEND, cfg, "bfloat16")["WG"]


def test_prepared_forward_cache_follows_problem_and_plan_constants(monkeypatch):
    """The backend caches a core Problem's forward plan and bound kernel (fused_forward's host time):
    the same Problem gets the same entry, another Problem or a changed plan constant plans afresh, and an
    unhashable stand-in is planned without the cache."""
    from natten_mlx.problem import Problem

    cfg = dict(na_dim=1, shape=(70,), B=1, H=1, Hkv=1, D=128, Dv=128, E=0, K=(9,), s=(1,), d=(1,), c=(False,),
               rpb=False, scale=None)
    ns = make_problem(cfg, "bfloat16")
    p = Problem(**vars(ns))
    be = CudaBackend(runner=emu.mlx_runner, require_device=False)
    first = be._prepared_forward(p, False, False)
    assert be._prepared_forward(Problem(**vars(ns)), False, False) is first
    assert dict(first[1].variant.template)["WG"]
    assert be._prepared_forward(p, True, False) is not first
    other = Problem(**dict(vars(ns), kernel_size=(11,)))
    assert be._prepared_forward(other, False, False)[1].prm != first[1].prm
    monkeypatch.setattr(plan, "WGMMA", False)
    assert not dict(be._prepared_forward(p, False, False)[1].variant.template)["WG"]
    assert be._prepared_forward(ns, False, False) is not be._prepared_forward(ns, False, False)
    # supports() is cached per Problem, whose device is part of it
    dev = CudaBackend()
    cpu = Problem(**dict(vars(ns), device="cpu"))
    assert dev.supports(p) is None and "GPU streams only" in dev.supports(cpu)
    assert dev.supports(p) is None and "GPU streams only" in dev.supports(cpu)
