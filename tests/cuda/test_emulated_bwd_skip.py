"""The backward kernels (fmha_bwd_dq, fmha_bwd_dkdv) in the CPU emulator (emu.py) on problems whose
windows are small against the tiles, so that most key (query) tiles a block walks are masked per
element or skipped, on every axis and tile shape: the per-axis column masks of a tile (a table of
prefix masks in shared memory, two loads per row and axis), the loads of partial tiles (rows outside
the tile read with 0 bytes), and the query tile taken in 2 or 4 parts at large head dims. Only the
backward runs in the emulator (out and lse come from the float64 oracle), against the oracle's
gradients. Skipped without g++."""

from __future__ import annotations

import numpy as np
import oracle
import pytest

__import__("cuda_cases").require_emulator()

import emu  # noqa: E402
from configs import random_tensors  # noqa: E402
from cuda_cases import TOL, make_problem, record, rel_err, to_mx, to_np  # noqa: E402
from natten_mlx_cuda.backend import CudaBackend  # noqa: E402

# (config, query tile, key tile, dtype): windows of 2-7 along an axis against tiles of 2-64, every
# feature of SEMANTICS.md once, unequal query and key tiles, head dims whose chunks per row do not
# divide the 128 threads (24), and D + Dv above 192 (the query tile in 4 parts)
CASES = [
    (dict(na_dim=3, shape=(8, 7, 6), B=1, H=2, Hkv=1, D=16, Dv=8, E=0, K=(3, 4, 3), s=(1, 2, 1), d=(1, 1, 1),
          c=(False, False, True), rpb=False, scale=None), (4, 4, 4), (4, 4, 4), "float16"),
    (dict(na_dim=3, shape=(10, 6, 5), B=1, H=1, Hkv=1, D=8, Dv=16, E=0, K=(2, 3, 3), s=(1, 1, 2), d=(2, 1, 1),
          c=(False, False, False), rpb=True, scale=0.5), (4, 4, 4), (4, 4, 4), "bfloat16"),
    (dict(na_dim=3, shape=(9, 5, 8), B=1, H=2, Hkv=2, D=16, Dv=16, E=1, K=(4, 2, 5), s=(2, 1, 1), d=(1, 2, 1),
          c=(True, False, False), rpb=False, scale=None), (4, 2, 8), (2, 4, 8), "float16"),
    (dict(na_dim=2, shape=(21, 10), B=1, H=3, Hkv=1, D=16, Dv=24, E=0, K=(3, 5), s=(1, 2), d=(2, 1),
          c=(False, True), rpb=False, scale=None), (8, 8), (8, 8), "bfloat16"),
    (dict(na_dim=2, shape=(14, 9), B=1, H=2, Hkv=2, D=8, Dv=8, E=0, K=(4, 3), s=(3, 1), d=(1, 1),
          c=(False, False), rpb=True, scale=None), (16, 4), (4, 16), "float16"),
    (dict(na_dim=1, shape=(150,), B=1, H=2, Hkv=1, D=16, Dv=8, E=0, K=(7,), s=(2,), d=(2,),
          c=(False,), rpb=True, scale=None), (64,), (64,), "float16"),
    (dict(na_dim=1, shape=(140,), B=1, H=1, Hkv=1, D=24, Dv=16, E=0, K=(6,), s=(1,), d=(1,),
          c=(True,), rpb=False, scale=None), (64,), (64,), "bfloat16"),
    (dict(na_dim=2, shape=(9, 10), B=1, H=2, Hkv=1, D=128, Dv=80, E=0, K=(3, 4), s=(1, 1), d=(1, 2),
          c=(False, False), rpb=False, scale=None), (8, 8), (4, 16), "float16"),
]
IDS = ["3d-causal2-stride-gqa-dv", "3d-dil-rpb-even", "3d-causal0-dil-extra-tiles", "2d-dil-causal1-gqa-dv",
       "2d-rpb-stride3-tiles", "1d-rpb-dil-stride", "1d-causal-even", "2d-d128-dv80-quarters"]


@pytest.mark.parametrize("cfg,tile,key_tile,dtype", CASES, ids=IDS)
def test_backward_small_windows(cfg, tile, key_tile, dtype):
    backend = CudaBackend(runner=emu.mlx_runner, require_device=False).configure(tile=tile, key_tile=key_tile)
    rng = np.random.default_rng(sum(cfg["shape"]) + len(dtype))
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    names = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
    arrays = {n: to_mx(x, dtype) for n, x in zip(names, (q, k, v, ak, av, rpb))}
    q, k, v, ak, av, rpb = (to_np(arrays[n]) for n in names)  # the oracle sees the rounded inputs
    p = make_problem(cfg, dtype)
    kw = dict(kernel_size=cfg["K"], stride=cfg["s"], dilation=cfg["d"], is_causal=cfg["c"], scale=p.scale,
              additional_keys=ak, additional_values=av, rpb=rpb)
    ref_o, ref_l = oracle.na_forward(q, k, v, **kw)
    dout = rng.standard_normal(ref_o.shape)
    dlse = rng.standard_normal(ref_l.shape)
    d_out = to_mx(dout, dtype)
    ref_g = oracle.na_backward(q, k, v, dout=to_np(d_out), dlse=dlse, **kw)
    rec = record(p, arrays, to_mx(ref_o, dtype), to_mx(ref_l, "float32"), d_out, to_mx(dlse, "float32"))
    grads = backend.fused_backward(rec)
    errs = {}
    for rk, name in (("q", "query"), ("k", "key"), ("v", "value"), ("additional_keys", "additional_keys"),
                     ("additional_values", "additional_values"), ("rpb", "rpb")):
        if rk in ref_g:
            errs[name] = rel_err(to_np(grads[name]), ref_g[rk])
    assert errs and max(errs.values()) < TOL[dtype], errs
