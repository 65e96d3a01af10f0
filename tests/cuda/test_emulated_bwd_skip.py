"""The backward kernels' per-warp skipping in the CPU emulator (emu.py). A block of fmha_bwd_dq (one
query tile) walks the key tiles that meet any of its 64 query rows; each warp (16 rows) skips the
tiles that lie outside the union of its own rows' windows. A block of fmha_bwd_dkdv (one key tile)
walks the query tiles that meet any of its 64 keys; each warp skips the query tiles that see none of
its 16 keys. These cases are shaped so that warps of one block skip different tiles (a model of the
walk from the float64 oracle's windows checks that, independently of the kernels' window code), and
compare the kernels' gradients with the oracle: a warp that skipped a tile it needs loses real
terms of dq, dk, dv or d_rpb. Only the backward runs in the emulator (out and lse come from the
oracle). Skipped without g++.

Run as a script (python3 tests/cuda/test_emulated_bwd_skip.py) the model prints the fraction of
warp-tile work skipped on the benchmark cases G2 and G3."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import oracle  # noqa: E402


def _pad(t, fill=1):
    return (fill,) * (3 - len(t)) + tuple(t)


def _warp_coords(tile):
    """Per warp (rows 16w .. 16w + 15 of a 64-row tile, axis 2 fastest): its tile coordinates per axis."""
    t = _pad(tile)
    out = []
    for w in range(4):
        sets = [set(), set(), set()]
        for r in range(16 * w, 16 * w + 16):
            u = (r // (t[1] * t[2]), (r // t[2]) % t[1], r % t[2])
            for a in range(3):
                sets[a].add(u[a])
        out.append([sorted(x) for x in sets])
    return out


def _axis(L, K, s, d, c, tq, tk, wq, wk):
    """One axis, summed over its dilation groups and tiles: for the dq walk (query tiles of tq, key
    tiles of tk from the tile's first key) and the dk/dv walk (key tiles of tk, query tiles of tq from
    the first query that sees the key tile), [tiles the block walks unskipped, tiles warp 0..3 meets]."""
    dq, kv = [0] * 5, [0] * 5
    for g in range(d):
        n = len(range(g, L, d))
        win = [oracle.axis_window(i, L, K, s, d, c)[1:] for i in range(g, L, d)]  # in-group [first, last]

        def meet(qs, ks):
            return any(win[q][0] <= k <= win[q][1] for q in qs for k in ks)

        for c0 in range(0, n, tq):
            rows = range(c0, min(c0 + tq, n))
            kb, ke = win[c0][0], win[rows[-1]][1] + 1
            for j in range(kb, ke, tk):
                ks = range(j, min(j + tk, ke))
                dq[0] += meet(rows, ks)
                for w in range(4):
                    dq[1 + w] += meet([c0 + u for u in wq[w] if c0 + u < n], ks)
        for k0 in range(0, n, tk):
            keys = range(k0, min(k0 + tk, n))
            seen = [q for q in range(n) if meet([q], keys)]
            if not seen:
                continue
            qb, qe = min(seen), max(seen) + 1
            for i in range(qb, qe, tq):
                qs = range(i, min(i + tq, qe))
                kv[0] += meet(qs, keys)
                for w in range(4):
                    kv[1 + w] += meet(qs, [k0 + u for u in wk[w] if k0 + u < n])
    return dq, kv


def warp_skip_model(shape, K, s, d, c, tile, key_tile):
    """Per pass (dq, dk/dv): (tiles the blocks walk, summed over blocks of one head; [tiles warp w's
    own rows meet, w = 0..3]). A box tile meets a box of rows iff it meets them along every axis, and
    blocks take every combination of axis tiles, so per-axis sums multiply. Whole-domain problems."""
    shape, K, s, d, tile, key_tile = (_pad(tuple(x)) for x in (shape, K, s, d, tile, key_tile))
    c = _pad(tuple(c), False)
    wq, wk = _warp_coords(tile), _warp_coords(key_tile)
    per = [_axis(shape[a], K[a], s[a], d[a], c[a], tile[a], key_tile[a], [x[a] for x in wq], [x[a] for x in wk])
           for a in range(3)]
    res = []
    for p in range(2):
        block = int(np.prod([per[a][p][0] for a in range(3)]))
        warps = [int(np.prod([per[a][p][1 + w] for a in range(3)])) for w in range(4)]
        res.append((block, warps))
    return tuple(res)


def skip_fraction(model_pass) -> float:
    """Share of the walk's warp-tile work (4 warps per walked tile) that the warps skip."""
    block, warps = model_pass
    return 1.0 - sum(warps) / (4 * block) if block else 0.0


# (config, query tile, key tile): small windows along an axis where a warp holds few coordinates of
# the tile, so that warps see different key (query) tiles; every feature of SEMANTICS.md once
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
]
IDS = ["3d-causal2-stride-gqa-dv", "3d-dil-rpb-even", "3d-causal0-dil-extra-tiles", "2d-dil-causal1-gqa-dv",
       "2d-rpb-stride3-tiles", "1d-rpb-dil-stride", "1d-causal-even"]


@pytest.mark.parametrize("cfg,tile,key_tile,dtype", CASES, ids=IDS)
def test_warps_skip_different_tiles(cfg, tile, key_tile, dtype):
    """The model: in both passes some warp skips tiles its block walks, and warps skip different numbers."""
    for name, (block, warps) in zip(("dq", "dkdv"), warp_skip_model(cfg["shape"], cfg["K"], cfg["s"], cfg["d"], cfg["c"], tile, key_tile)):
        assert min(warps) < block and len(set(warps)) > 1, (name, block, warps)


@pytest.mark.parametrize("cfg,tile,key_tile,dtype", CASES, ids=IDS)
def test_backward_with_warp_skips(cfg, tile, key_tile, dtype):
    __import__("cuda_cases").require_emulator()
    import emu
    from cuda_cases import TOL, make_problem, record, rel_err, to_mx, to_np
    from natten_mlx_cuda.backend import CudaBackend

    from configs import random_tensors

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


if __name__ == "__main__":
    for name, args in (("G2 2D 256x256, K 80x80, tiles 8x8", ((256, 256), (80, 80), (1, 1), (1, 1), (False,) * 2, (8, 8), (8, 8))),
                       ("G3 3D 30x48x80, K 18x24x24, tiles 4x4x4", ((30, 48, 80), (18, 24, 24), (1, 1, 1), (1, 1, 1), (False,) * 3, (4, 4, 4), (4, 4, 4)))):
        (dq, kv) = warp_skip_model(*args)
        print(f"{name}: dq walks {4 * dq[0]} warp-tiles, warps meet {sum(dq[1])} (skip {skip_fraction(dq):.1%}, per warp {dq[1]}); "
              f"dk/dv {4 * kv[0]}, meet {sum(kv[1])} (skip {skip_fraction(kv):.1%}, per warp {kv[1]})")
