"""One rank of the distributed sweep; run under ``mlx.launch -n N --backend ring -- python worker.py``.

Every rank draws the same seeded global configurations and tensors, cuts its slab out, runs
``natten_mlx.distributed`` (forward, and gradients of a global loss) and compares its slab with the
single-process op on the whole tensor (and, for small cases, with the float64 oracle). Slab sizes
are random, sometimes cut to the smallest size the halo allows (found with the oracle's window
rule, not the package's), and then once more one row smaller, which must raise on every rank.
The bytes each rank sends are compared with the halo formula computed from the oracle's windows.
Prints one ``RESULT {json}`` line per rank; exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_HERE)
sys.path.insert(0, _TESTS)
try:
    import natten_mlx  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(_TESTS), "packages", "natten-mlx-core", "src"))

import mlx.core as mx  # noqa: E402
import natten_mlx  # noqa: E402
import natten_mlx.distributed as nd  # noqa: E402
import oracle  # noqa: E402
from configs import random_config, random_tensors  # noqa: E402

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": (3e-5, 3e-4), "float16": (3e-2, 3e-2), "bfloat16": (1.5e-1, 1e-1)}


# ----------------------------------------------------------------------------------------------
# the halo by the oracle's window rule (independent of natten_mlx.windows)
# ----------------------------------------------------------------------------------------------


def oracle_need(L, K, s, d, c, a, b):
    """[lo, hi): the keys the queries a..b-1 interact with along one axis (oracle.axis_window)."""
    lo, hi = L, 0
    for i in range(a, b):
        g, start, end = oracle.axis_window(i, L, K, s, d, c)
        lo = min(lo, start * d + g)
        hi = max(hi, end * d + g + 1)
    return lo, hi


def oracle_halos(sizes, K, s, d, c):
    """Per rank (left rows from r-1, right rows from r+1, ok): ok False when a halo passes a neighbour."""
    L = sum(sizes)
    starts = np.cumsum([0] + list(sizes[:-1]))
    out, ok = [], True
    for r, (a, n) in enumerate(zip(starts, sizes)):
        lo, hi = oracle_need(L, K, s, d, c, a, a + n)
        left, right = max(a - lo, 0), max(hi - (a + n), 0)
        if (r > 0 and left > sizes[r - 1]) or (r + 1 < len(sizes) and right > sizes[r + 1]):
            ok = False
        out.append((left, right))
    return out, ok


def random_sizes(rng, L, n):
    cuts = np.sort(rng.choice(np.arange(1, L), size=n - 1, replace=False))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [L]]))]


def tighten(sizes, r, K, s, d, c):
    """Shrink rank r's slab to the smallest size (rows moved to a neighbour) the oracle accepts."""
    n = len(sizes)
    nb = r + 1 if r + 1 < n else r - 1
    total = sizes[r] + sizes[nb]
    for m in range(1, total):
        trial = list(sizes)
        trial[r], trial[nb] = m, total - m
        if oracle_halos(trial, K, s, d, c)[1]:
            return trial, m
    return None, None


# ----------------------------------------------------------------------------------------------


class Checker:
    def __init__(self, rank):
        self.rank, self.passed, self.failures = rank, 0, []
        self.kinds = {"compared": 0, "too_small": 0, "one_row_below": 0, "skipped": 0}

    def close(self, name, got, want, dtype):
        atol, rtol = TOL[dtype]
        got = np.array(got.astype(mx.float32)) if isinstance(got, mx.array) else np.asarray(got)
        want = np.array(want.astype(mx.float32)) if isinstance(want, mx.array) else np.asarray(want)
        if got.shape != want.shape:
            self.failures.append(f"{name}: shape {got.shape} != {want.shape}")
            return
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        err = float(np.abs(got - want).max(initial=0.0))
        if not np.isfinite(got).all() or err > atol * scale + rtol * float(np.abs(want).max(initial=0.0)):
            self.failures.append(f"{name}: max error {err:.3g} (scale {scale:.3g})")
        else:
            self.passed += 1

    def true(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{name}: {detail}")


def take(x, dim, a, b):
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(a, b)
    return x[tuple(idx)]


def run_case(chk, group, rng, case, na_dim, args):
    n, rank = group.size(), group.rank()
    cfg = None
    for _ in range(200):
        cand = random_config(rng, na_dim, args.max_len)
        axis = int(rng.integers(0, na_dim))
        if cand["shape"][axis] >= 2 * n:
            cfg = cand
            break
    if cfg is None:
        chk.kinds["skipped"] += 1
        return
    dtype = str(rng.choice(["float32", "float32", "float32", "float16", "bfloat16"]))
    L = cfg["shape"][axis]
    K, s, d, c = cfg["K"][axis], cfg["s"][axis], cfg["d"][axis], cfg["c"][axis]
    sizes = random_sizes(rng, L, n)
    if rng.random() < 0.75:  # mostly layouts that work; the rest test the error
        for _ in range(30):
            if oracle_halos(sizes, K, s, d, c)[1]:
                break
            sizes = random_sizes(rng, L, n)
    tight = None
    if rng.random() < 0.5:
        r = int(rng.integers(0, n))
        t, m = tighten(sizes, r, K, s, d, c)
        if t is not None:
            sizes, tight = t, (r, m)
    halos, ok = oracle_halos(sizes, K, s, d, c)
    name = f"case{case} {na_dim}d shape={cfg['shape']} axis={axis} sizes={sizes} K={cfg['K']} s={cfg['s']} " \
           f"d={cfg['d']} c={cfg['c']} H={cfg['H']}/{cfg['Hkv']} D={cfg['D']}/{cfg['Dv']} E={cfg['E']} " \
           f"rpb={cfg['rpb']} {dtype}"
    q, k, v, ak, av, rpb = random_tensors(rng, cfg)
    return_lse = bool(rng.random() < 0.5)
    mxd = DTYPES[dtype]
    Q, Kt, V = (mx.array(x.astype(np.float32)).astype(mxd) for x in (q, k, v))
    AK = mx.array(ak.astype(np.float32)).astype(mxd) if ak is not None else None
    AV = mx.array(av.astype(np.float32)).astype(mxd) if av is not None else None
    RPB = mx.array(rpb.astype(np.float32)).astype(mxd) if rpb is not None else None
    kw = dict(kernel_size=cfg["kernel_size"], stride=cfg["stride"], dilation=cfg["dilation"],
              is_causal=cfg["is_causal"], scale=cfg["scale"])
    dkw = dict(transport=args.transport)
    dim = 1 + axis
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    ql, kl, vl = (take(x, dim, mine.start, mine.stop) for x in (Q, Kt, V))
    dist = getattr(nd, f"na{na_dim}d")
    full = getattr(natten_mlx, f"na{na_dim}d")

    if not ok:  # the halo passes a neighbour's slab: every rank must raise ValueError
        chk.kinds["too_small"] += 1
        try:
            out = dist(ql, kl, vl, **kw, additional_keys=AK, additional_values=AV, rpb=RPB, group=group, axis=axis, **dkw)
            mx.eval(out)
            chk.true(name + " [too small]", False, "no error for a slab smaller than the halo")
        except ValueError as exc:
            chk.true(name + " [too small]", "halo" in str(exc), f"message lacks 'halo': {exc}")
        return

    # ---- forward ----
    chk.kinds["compared"] += 1
    nd.reset_comm_stats()
    res = dist(ql, kl, vl, **kw, additional_keys=AK, additional_values=AV, rpb=RPB, return_lse=return_lse,
               group=group, axis=axis, **dkw)
    ref = full(Q, Kt, V, **kw, additional_keys=AK, additional_values=AV, rpb=RPB, return_lse=True)
    out, lse = (res if return_lse else (res, None))
    chk.close(name + " out", out, take(ref[0], dim, mine.start, mine.stop), dtype)
    if return_lse:
        chk.close(name + " lse", lse, take(ref[1], dim, mine.start, mine.stop), "float32" if dtype == "float32" else dtype)
    if dtype == "float32" and np.prod(cfg["shape"]) <= 400:
        o_out, _ = oracle.na_forward(q, k, v, cfg["K"], cfg["s"], cfg["d"], cfg["c"], cfg["scale"], ak, av, rpb)
        chk.close(name + " out vs oracle", out, np.take(o_out, range(mine.start, mine.stop), axis=dim), dtype)

    # ---- bytes: the halo formula (oracle windows) ----
    other = int(np.prod([x for a, x in enumerate(cfg["shape"]) if a != axis]))
    row = cfg["B"] * other * cfg["Hkv"] * (cfg["D"] + cfg["Dv"]) * Q.itemsize
    sent = [(halos[r - 1][1] if r > 0 else 0) + (halos[r + 1][0] if r + 1 < n else 0) for r in range(n)]
    got = [halos[r][0] + halos[r][1] for r in range(n)]
    if args.transport == "gather":  # every rank contributes the largest block; a ring all_gather moves n - 1 of them
        fwd_rows, bwd_rows = (n - 1) * max(sent), (n - 1) * max(got)
    else:  # exactly the halo rows, and their gradients back
        fwd_rows, bwd_rows = sent[rank], got[rank]
    st = nd.comm_stats()
    chk.true(name + " forward bytes", st.forward_bytes == fwd_rows * row,
             f"sent {st.forward_bytes}, formula {fwd_rows} rows x {row} = {fwd_rows * row}; log {st.log}")
    if args.transport != "gather":
        chk.true(name + " at most its slab per neighbour", st.forward_bytes <= 2 * sizes[rank] * row,
                 f"{st.forward_bytes}")

    # ---- gradients of a global loss: sum over ranks of each rank's share ----
    W = mx.array(rng.standard_normal(ref[0].shape).astype(np.float32))
    WL = mx.array(rng.standard_normal(ref[1].shape).astype(np.float32))
    names = ["q", "k", "v"] + (["ak", "av"] if AK is not None else []) + (["rpb"] if RPB is not None else [])

    def pack(*xs):
        return dict(zip(names, xs))

    def local_loss(*xs):
        p = pack(*xs)
        r = dist(p["q"], p["k"], p["v"], **kw, additional_keys=p.get("ak"), additional_values=p.get("av"),
                 rpb=p.get("rpb"), return_lse=return_lse, group=group, axis=axis, **dkw)
        o, l_ = (r if return_lse else (r, None))
        loss = (o.astype(mx.float32) * take(W, dim, mine.start, mine.stop)).sum()
        if return_lse:
            loss = loss + (l_ * take(WL, dim, mine.start, mine.stop)).sum()
        return loss

    def full_loss(*xs):
        p = pack(*xs)
        o, l_ = full(p["q"], p["k"], p["v"], **kw, additional_keys=p.get("ak"), additional_values=p.get("av"),
                     rpb=p.get("rpb"), return_lse=True)
        loss = (o.astype(mx.float32) * W).sum()
        return loss + (l_ * WL).sum() if return_lse else loss

    extras = [x for x in (AK, AV, RPB) if x is not None]
    nd.reset_comm_stats()
    grads = mx.grad(local_loss, argnums=list(range(len(names))))(ql, kl, vl, *extras)
    mx.eval(grads)
    ref_grads = mx.grad(full_loss, argnums=list(range(len(names))))(Q, Kt, V, *extras)
    for nm, g, gr in zip(names, grads, ref_grads):
        if nm in ("q", "k", "v"):
            chk.close(f"{name} d{nm}", g, take(gr, dim, mine.start, mine.stop), dtype)
        else:  # replicated input: the ranks' partial gradients sum to the full one
            total = mx.distributed.all_sum(g.astype(mx.float32), group=group)
            chk.close(f"{name} d{nm} (sum over ranks)", total, gr, dtype)
    st = nd.comm_stats()
    chk.true(name + " backward bytes", st.backward_bytes == bwd_rows * row,
             f"sent back {st.backward_bytes}, formula {bwd_rows} rows x {row} = {bwd_rows * row}; log {st.log}")
    if tight is not None and tight[1] > 1:
        # one row below the smallest slab the oracle accepts: every rank raises, none hangs
        r, m = tight
        smaller = list(sizes)
        nb = r + 1 if r + 1 < n else r - 1
        smaller[r], smaller[nb] = m - 1, sizes[nb] + 1
        if not oracle_halos(smaller, K, s, d, c)[1]:
            a = sum(smaller[:rank])
            chk.kinds["one_row_below"] += 1
            qs, ks, vs = (take(x, dim, a, a + smaller[rank]) for x in (Q, Kt, V))
            try:
                mx.eval(dist(qs, ks, vs, **kw, group=group, axis=axis, **dkw))
                chk.true(name + " [one row below the halo]", False, "no error")
            except ValueError as exc:
                chk.true(name + " [one row below the halo]", "halo" in str(exc), str(exc))


def halo_not_tensor(chk, group, transport):
    """A medium case: 32 rows per rank, K = 5 along the sharded axis: each rank sends 2 rows to each
    neighbour (the interior halo K // 2 = (K - 1) // 2 = 2), a sixteenth of its slab, and gets the
    same back as gradients."""
    n, rank = group.size(), group.rank()
    q = mx.random.normal((1, 32, 16, 4, 8), key=mx.random.key(7 + rank))
    nd.reset_comm_stats()
    out = nd.na2d(q, q, q, 5, group=group, transport=transport)
    mx.eval(mx.grad(lambda x: nd.na2d(x, x, x, 5, group=group, transport=transport).sum())(q), out)
    row = 16 * 4 * (8 + 8) * 4
    rows = 2 * ((rank > 0) + (rank < n - 1))
    if transport == "gather":
        rows = (n - 1) * 2 * min(n - 1, 2)
    st = nd.comm_stats()
    chk.true("medium case forward bytes", st.forward_bytes == 2 * rows * row, f"{st.forward_bytes} != 2 x {rows * row}")
    chk.true("medium case backward bytes", st.backward_bytes == rows * row, f"{st.backward_bytes} != {rows * row}")
    if transport != "gather":
        chk.true("medium case: a sixteenth of the slab", rows * row * 16 <= 2 * 32 * row, f"{rows} rows")


def module_case(chk, group, na_dim):
    """The nD module with group=: its slab of the output and, summed over ranks, its parameter
    gradients equal the unsharded module's on the whole input (same weights on every rank)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    n, rank = group.size(), group.rank()
    spatial = (6 * n, 5, 4)[:na_dim]
    axis = na_dim - 1
    cls = getattr(natten_mlx, f"NeighborhoodAttention{na_dim}D")
    kw = dict(embed_dim=16, num_heads=4, kernel_size=3, stride=(1, 2, 1)[:na_dim], num_kv_heads=2,
              rel_pos_bias=True)
    spatial = tuple(reversed(spatial)) if axis else spatial
    mx.random.seed(42)
    sharded = cls(**kw, group=group, shard_axis=axis)
    mx.random.seed(42)
    whole = cls(**kw)
    x = mx.random.normal((2, *spatial, 16), key=mx.random.key(3))
    L = spatial[axis]
    sizes = [L // n + (r < L % n) for r in range(n)]
    a = sum(sizes[:rank])
    xl = take(x, 1 + axis, a, a + sizes[rank])
    name = f"module {na_dim}d shard_axis={axis} sizes={sizes}"
    chk.close(name + " out", sharded(xl), take(whole(x), 1 + axis, a, a + sizes[rank]), "float32")
    g_s = nn.value_and_grad(sharded, lambda m, x: (m(x) ** 2).sum())(sharded, xl)[1]
    g_w = nn.value_and_grad(whole, lambda m, x: (m(x) ** 2).sum())(whole, x)[1]
    for (k, gs), (_, gw) in zip(tree_flatten(g_s), tree_flatten(g_w)):
        chk.close(f"{name} d{k} (sum over ranks)", mx.distributed.all_sum(gs, group=group), gw, "float32")


def bad_arguments(chk, group):
    """Each must raise ValueError/TypeError on every rank; the group stays usable afterwards."""
    n, rank = group.size(), group.rank()
    q = mx.random.normal((1, 8, 2, 4), key=mx.random.key(rank))
    cases = {
        "non-spatial axis": lambda: nd.na1d(q, q, q, 3, group=group, axis=1),
        "kernel_size differs by rank": lambda: nd.na1d(q, q, q, 3 + 2 * (rank == n - 1), group=group),
        "heads differ by rank": lambda: nd.na1d(q[:, :, : 1 + (rank == 0)], q[:, :, : 1 + (rank == 0)],
                                                 q[:, :, : 1 + (rank == 0)], 3, group=group),
        "one rank passes a 2D tensor to na1d": lambda: nd.na1d(q if rank else q[0], q, q, 3, group=group),
        "dtype differs by rank": lambda: nd.na1d(*(q.astype(mx.float16 if rank == 1 else mx.float32),) * 3, 3,
                                                  group=group),
        "backend differs by rank": lambda: nd.na1d(q, q, q, 3, group=group, backend="pure" if rank else None),
        "transport differs by rank": lambda: nd.na1d(q, q, q, 3, group=group, transport="gather" if rank else "p2p"),
        "key slab length differs from query's": lambda: nd.na1d(q, q[:, :7], q[:, :7], 3, group=group),
        "kernel larger than the global axis": lambda: nd.na1d(q, q, q, 8 * n + 1, group=group),
        "empty slab on one rank": lambda: nd.na1d(*(q[:, : 0 if rank == 1 else 8],) * 3, 3, group=group),
    }
    if n >= 3:  # with two ranks every halo lies in the other rank's slab
        cases["slab smaller than the halo"] = lambda: nd.na1d(*(q[:, : 1 if rank == 1 else 8],) * 3, 7, group=group)
    for what, call in cases.items():
        try:
            mx.eval(call())
            chk.true(f"bad arguments: {what}", False, "no error")
        except (ValueError, TypeError) as exc:
            chk.true(f"bad arguments: {what}", len(str(exc)) > 20, str(exc))
    out = nd.na1d(q, q, q, 3, group=group)
    chk.true("group usable after errors", out.shape == q.shape, str(out.shape))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=10)
    ap.add_argument("--dims", default="1,2,3")
    ap.add_argument("--backend", default="ring")
    ap.add_argument("--transport", default=None, choices=["p2p", "gather"])
    args = ap.parse_args()
    group = mx.distributed.init(backend=args.backend, strict=True)
    mx.random.seed(args.seed)
    chk = Checker(group.rank())
    dims = [int(x) for x in args.dims.split(",")]
    for case in range(args.cases):
        rng = np.random.default_rng(args.seed * 1000 + case)
        try:
            run_case(chk, group, rng, case, dims[case % len(dims)], args)
        except Exception:  # noqa: BLE001 (a crash is a failure of this case, reported)
            chk.failures.append(f"case{case}: {traceback.format_exc()}")
    for na_dim in (1, 2, 3):
        try:
            module_case(chk, group, na_dim)
        except Exception:  # noqa: BLE001
            chk.failures.append(f"module {na_dim}d: {traceback.format_exc()}")
    try:
        halo_not_tensor(chk, group, args.transport)
    except Exception:  # noqa: BLE001
        chk.failures.append(f"medium case: {traceback.format_exc()}")
    try:
        bad_arguments(chk, group)
    except Exception:  # noqa: BLE001
        chk.failures.append(f"bad arguments: {traceback.format_exc()}")
    print("RESULT " + json.dumps({"rank": group.rank(), "size": group.size(), "passed": chk.passed, "cases": chk.kinds,
                                  "failures": chk.failures}), flush=True)
    sys.exit(1 if chk.failures else 0)


if __name__ == "__main__":
    main()
