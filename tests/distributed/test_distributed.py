"""natten_mlx.distributed: the halo plan and schedule in one process, and the sweep under
``mlx.launch -n 2`` / ``-n 3`` (ring backend, 127.0.0.1) in subprocesses with a timeout, so that a
hang is a test failure, never a stuck run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import mlx.core as mx
import natten_mlx
import natten_mlx.distributed as nd
import numpy as np
import oracle
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
TIMEOUT = int(os.environ.get("NATTEN_DIST_TIMEOUT", "900"))


# ----------------------------------------------------------------------------------------------
# one process: the plan against the oracle's windows
# ----------------------------------------------------------------------------------------------


def oracle_need(L, K, s, d, c, a, b):
    lo, hi = L, 0
    for i in range(a, b):
        g, start, end = oracle.axis_window(i, L, K, s, d, c)
        lo, hi = min(lo, start * d + g), max(hi, end * d + g + 1)
    return lo, hi


def random_layout(rng, n):
    L = int(rng.integers(2 * n, 40))
    K = int(rng.integers(2, max(3, L // 2)))
    d = int(rng.integers(1, L // K + 1))
    s = int(rng.integers(1, K + 1))
    c = bool(rng.integers(0, 2))
    cuts = np.sort(rng.choice(np.arange(1, L), size=n - 1, replace=False))
    sizes = tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [L]])))
    return sizes, K, s, d, c


@pytest.mark.parametrize("n", [2, 3, 4])
def test_plan_matches_oracle_halos(n):
    rng = np.random.default_rng(100 + n)
    checked = rejected = 0
    for _ in range(150):
        sizes, K, s, d, c = random_layout(rng, n)
        L = sum(sizes)
        starts = np.cumsum((0,) + sizes[:-1])
        need = [oracle_need(L, K, s, d, c, a, a + m) for a, m in zip(starts, sizes)]
        ok = all(
            (r == 0 or need[r][0] >= starts[r - 1]) and (r == n - 1 or need[r][1] <= starts[r + 1] + sizes[r + 1])
            for r in range(n)
        )
        if not ok:
            with pytest.raises(ValueError, match="halo"):
                nd.halo_plan(sizes, K, s, d, c)
            rejected += 1
            continue
        plan = nd.halo_plan(sizes, K, s, d, c)
        assert plan.need == tuple(need), (sizes, K, s, d, c)
        for r in range(n):
            a = starts[r]
            assert plan.left(r) == max(a - need[r][0], 0)
            assert plan.right(r) == max(need[r][1] - (a + sizes[r]), 0)
            if c:  # causal along the sharded axis: only the left halo travels
                assert plan.right(r) == 0
            lo, hi = plan.slab[r]
            assert lo <= need[r][0] and hi >= need[r][1] and sum(plan.pad(r)) >= 0
        assert sum(plan.rows_sent(r) for r in range(n)) == sum(plan.left(r) + plan.right(r) for r in range(n))
        checked += 1
    assert checked > 20 and (rejected == 0 if n == 2 else rejected > 5)  # two ranks: the other holds every halo


def test_interior_halo_closed_form():
    # stride 1, dilation d, away from the borders: K // 2 * d rows on the left, (K - 1) // 2 * d on the right
    for K in range(2, 9):
        for d in (1, 2, 3):
            sizes = (40 * d, 40 * d, 40 * d)
            plan = nd.halo_plan(sizes, K, 1, d, False)
            assert (plan.left(1), plan.right(1)) == (K // 2 * d, (K - 1) // 2 * d)
            causal = nd.halo_plan(sizes, K, 1, d, True)
            assert (causal.left(1), causal.right(1)) == ((K - 1) * d, 0)


def test_empty_slab_is_an_error():
    with pytest.raises(ValueError, match="empty slab"):
        nd.halo_plan((4, 0, 4), 3, 1, 1, False)


def test_schedule_pairs_every_send_with_a_receive():
    for n in range(2, 7):
        rng = np.random.default_rng(n)
        right = [int(x) for x in rng.integers(0, 3, n)]
        left = [int(x) for x in rng.integers(0, 3, n)]
        right[-1] = left[0] = 0
        per_rank = [nd._schedule(n, r, right, left) for r in range(n)]
        # simulate blocking point-to-point: a send completes only together with its receive
        pos = [0] * n
        progress = True
        while progress:
            progress = False
            for r in range(n):
                if pos[r] < len(per_rank[r]):
                    op, peer, rows = per_rank[r][pos[r]]
                    if pos[peer] < len(per_rank[peer]):
                        op2, peer2, rows2 = per_rank[peer][pos[peer]]
                        if peer2 == r and {op, op2} == {"send", "recv"}:
                            assert rows == rows2
                            pos[r] += 1
                            pos[peer] += 1
                            progress = True
        assert pos == [len(ops) for ops in per_rank], (n, right, left, per_rank)


def test_single_process_group_is_the_plain_op():
    q = mx.random.normal((2, 9, 3, 4), key=mx.random.key(1))
    k = mx.random.normal((2, 9, 3, 4), key=mx.random.key(2))
    v = mx.random.normal((2, 9, 3, 5), key=mx.random.key(3))
    group = mx.distributed.init()
    assert group.size() == 1
    out = nd.na1d(q, k, v, 4, stride=2, return_lse=True, group=group)
    ref = natten_mlx.na1d(q, k, v, 4, stride=2, return_lse=True)
    np.testing.assert_array_equal(np.array(out[0]), np.array(ref[0]))
    with pytest.raises(ValueError, match="axis=1 is not a spatial axis"):
        nd.na1d(q, k, v, 4, axis=1, group=group)


# ----------------------------------------------------------------------------------------------
# mlx.launch: the sweep
# ----------------------------------------------------------------------------------------------


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports on 127.0.0.1 (the ring backend listens on them)."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(n: int, *worker_args, timeout: int = TIMEOUT):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not on PATH")
    env = dict(os.environ)
    # the workers import the natten_mlx this process imported (installed, or the source tree)
    here = os.path.dirname(os.path.dirname(os.path.abspath(natten_mlx.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.path.dirname(HERE), env.get("PYTHONPATH")) if p)
    cmd = [launcher, "-n", str(n), "--backend", "ring", "--hosts", "127.0.0.1", "-p", str(_free_ports(n)), "--",
           sys.executable, WORKER, *worker_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mlx.launch -n {n} timed out after {timeout}s (a hang); output:\n{out[-4000:]}")
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, results, out


@pytest.mark.parametrize(
    "n,args,min_cases",
    [
        (2, ["--seed", "11", "--cases", "18", "--max-len", "12", "--transport", "p2p"], 8),
        (3, ["--seed", "12", "--cases", "18", "--max-len", "14", "--transport", "p2p"], 8),
        (2, ["--seed", "13", "--cases", "8", "--max-len", "12", "--transport", "gather"], 4),
        (3, ["--seed", "14", "--cases", "8", "--max-len", "14", "--transport", "gather"], 4),
    ],
    ids=["ring-2-p2p", "ring-3-p2p", "ring-2-gather", "ring-3-gather"],
)
def test_launch_sweep(n, args, min_cases):
    rc, results, out = launch(n, *args)
    assert sorted(r["rank"] for r in results) == list(range(n)), out[-4000:]
    failures = [f"rank {r['rank']}: {f}" for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    assert rc == 0, out[-4000:]
    print(f"\nmlx.launch -n {n} {' '.join(args)}: " + "; ".join(
        f"rank {r['rank']}: {r['passed']} checks passed, cases {r['cases']}" for r in results))
    for r in results:
        assert r["cases"]["compared"] >= min_cases and r["passed"] >= 10 * min_cases, r
    if n >= 3 and min_cases >= 8:
        assert results[0]["cases"]["too_small"] >= 1, results[0]
