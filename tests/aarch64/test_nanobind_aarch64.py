"""The nanobind tier's aarch64 (NEON) build, run under qemu-user, against the float64 oracle.

The wheel for aarch64 (Apple silicon, ARM Linux servers) compiles kernels.cpp once, as its NEON
baseline table, and MLX's own CPU code around it. On this x86-64 machine the tier's tests only ever run
the AVX-512, AVX2 and x86 baseline tables. Here the drivers and kernels (driver.cpp, kernels.cpp: they use
no MLX) are cross-compiled with aarch64-linux-gnu-g++ as CMakeLists.txt compiles them on aarch64 (kernels
-O3 with NA_VARIANT=base, no -m flags: NEON is the baseline there), linked statically with a small harness
(harness.cpp here) and run under qemu-aarch64 on seeded problems: fused forward (out, lse), fused backward
(dq, dk, dv, extra keys/values, rpb, with an lse cotangent) and the split ops (qk, av and their backwards),
compared with tests/oracle.py. That table (kernels_base, named "neon" there) works on vectors of 8 floats
(two NEON registers each), so the exact-window path runs blocks of 8 queries, as AVX2's, with none of the
AVX-512 kernels. The path counters the harness prints show that both the exact path and the tiles ran.

Every test runs twice, on objects compiled by GCC and by clang (--target=aarch64-linux-gnu; macOS builds
with Apple's clang, which this approximates: same vector extensions, pragmas and warnings), both linked by the
cross GCC. Needs aarch64-linux-gnu-g++ and qemu-aarch64 (the clang runs also clang++) (Debian: crossbuild-essential-arm64, qemu-user; .ci/run
installs them where apt-get can); without them the tests skip, saying so. `nox -s nanobind_aarch64` runs
this folder; the built harness is cached by its sources' hash in $NATTEN_MLX_CROSS_CACHE (default
~/.cache/natten-mlx/cross).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess

import numpy as np
import oracle
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "packages", "natten-mlx-nanobind", "csrc")
INCLUDE = os.path.join(ROOT, "packages", "natten-mlx-core", "src", "natten_mlx", "include")
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SOURCES = [
    os.path.join(CSRC, "kernels.cpp"),
    os.path.join(CSRC, "driver.cpp"),
    os.path.join(HERE, "harness.cpp"),
]


def assert_close(got, want, tol, what):
    """got is finite and within tol times max(1, max |want|) of want everywhere."""
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


COMPILERS = {"gcc": [CXX], "clang": ["clang++", "--target=aarch64-linux-gnu"]}


def _missing(compiler):
    gone = [t for t in (CXX, QEMU, COMPILERS[compiler][0]) if shutil.which(t) is None]
    if not gone:
        return None
    pytest.skip(
        f"{' and '.join(sorted(set(gone)))} not found (Debian: apt-get install crossbuild-essential-arm64 qemu-user clang)"
    )


@pytest.fixture(scope="module", params=sorted(COMPILERS))
def harness(request, tmp_path_factory):
    """The harness built for aarch64 by one compiler, cached by its sources' hash."""
    compiler = request.param
    _missing(compiler)
    cc = COMPILERS[compiler]
    digest = hashlib.sha256(compiler.encode())
    for path in SOURCES + [os.path.join(CSRC, f) for f in sorted(os.listdir(CSRC)) if f.endswith(".h")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    headers = os.path.join(INCLUDE, "natten_mlx")
    for f in sorted(os.listdir(headers)):
        with open(os.path.join(headers, f), "rb") as fh:
            digest.update(fh.read())
    cache = os.environ.get("NATTEN_MLX_CROSS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "natten-mlx", "cross"
    )
    exe = os.path.join(cache, f"harness-{compiler}-{digest.hexdigest()[:16]}")
    if os.path.exists(exe):
        return exe
    os.makedirs(cache, exist_ok=True)
    build = tmp_path_factory.mktemp("cross")
    common = ["-std=c++20", "-Wall", "-Wno-psabi", f"-I{CSRC}", f"-I{INCLUDE}"]
    jobs = [
        # as CMakeLists.txt builds the one kernel table of aarch64
        [*cc, *common, "-O3", "-DNA_VARIANT=base", "-DNA_VARIANT_base=1", "-c", SOURCES[0], "-o", str(build / "k.o")],
        [*cc, *common, "-O3", "-DNA_HAVE_base=1", "-c", SOURCES[1], "-o", str(build / "d.o")],
        [*cc, *common, "-O2", "-DNA_HAVE_base=1", "-c", SOURCES[2], "-o", str(build / "h.o")],
    ]
    procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs]
    for j, p in zip(jobs, procs):
        out = p.communicate()[0]
        assert p.returncode == 0, f"{' '.join(j)} failed:\n{out}"
        assert "warning" not in out, f"{' '.join(j)} warned:\n{out}"
    tmp = str(build / "harness")
    link = [CXX, "-static", "-pthread", str(build / "k.o"), str(build / "d.o"), str(build / "h.o"), "-o", tmp]
    p = subprocess.run(link, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    shutil.move(tmp, exe)
    return exe


# (shape, kernel, stride, dilation, causal, Hkv, G, D, Dv, E, rpb, B)
GEOS = [
    ((40,), (7,), (1,), (1,), (False,), 2, 1, 16, 16, 0, False, 1),  # 1D runs (row kernels)
    ((37,), (5,), (1,), (2,), (True,), 1, 2, 8, 12, 0, False, 2),  # 1D causal, dilated, GQA, D != Dv
    ((33,), (4,), (2,), (1,), (False,), 2, 1, 8, 8, 2, False, 1),  # 1D even kernel, strided, extra KV
    ((29,), (7,), (1,), (1,), (False,), 1, 1, 8, 8, 0, True, 1),  # 1D rpb (transposed copies)
    ((12, 20), (5, 5), (1, 1), (1, 1), (False, False), 2, 1, 16, 16, 0, False, 1),  # 2D runs + border blocks
    ((12, 13), (3, 7), (1, 1), (2, 1), (True, False), 1, 2, 16, 8, 0, False, 1),  # causal rows, GQA, D != Dv
    ((9, 14), (5, 3), (1, 1), (1, 2), (False, False), 2, 1, 8, 8, 3, True, 1),  # extra KV and rpb, dilation
    ((10, 18), (5, 7), (1, 1), (1, 1), (False, False), 1, 1, 8, 8, 0, True, 2),  # rpb on the exact path, B 2
    ((11, 17), (6, 6), (2, 3), (1, 1), (False, False), 1, 1, 8, 8, 0, False, 1),  # even kernels, strided
    ((7, 6), (3, 3), (1, 1), (1, 1), (False, True), 1, 1, 8, 8, 0, False, 1),  # short rows: the tiles
    ((4, 6, 9), (3, 3, 5), (1, 1, 2), (1, 1, 1), (False, False, False), 1, 2, 8, 8, 0, False, 1),  # 3D
    ((5, 6, 8), (2, 4, 4), (1, 1, 1), (1, 1, 1), (False, True, False), 2, 1, 8, 12, 0, False, 1),  # 3D causal
    ((4, 5, 12), (3, 3, 5), (1, 1, 1), (1, 1, 2), (False, False, False), 1, 1, 8, 8, 2, True, 1),  # 3D E, rpb
    ((7, 7), (7, 7), (1, 1), (1, 1), (False, False), 1, 2, 8, 12, 2, True, 1),  # whole-box tiles: E, rpb, GQA
]


def _random_geos(n, seed):
    """Seeded geometries beyond the list: any rank, kernel parity, stride, dilation, causal axes, GQA,
    D != Dv, extra KV, rpb (not with causal axes, as NATTEN)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        nd = int(rng.integers(1, 4))
        K = tuple(int(rng.integers(2, 8)) for _ in range(nd))
        dil = tuple(int(rng.integers(1, 3)) for _ in range(nd))
        shape = tuple(int(K[a] * dil[a] + rng.integers(0, 12 if nd < 3 else 5)) for a in range(nd))
        s = tuple(int(rng.integers(1, K[a] + 1)) if rng.random() < 0.3 else 1 for a in range(nd))
        c = tuple(bool(rng.random() < 0.25) for _ in range(nd))
        rpb = bool(not any(c) and rng.random() < 0.3)
        Hkv, G = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        D = int(rng.choice([4, 8, 16]))
        Dv = int(rng.choice([D, 8, 12]))
        E = int(rng.integers(0, 3)) if rng.random() < 0.3 else 0
        if int(np.prod(shape)) * Hkv * G * int(np.prod(K)) > 60000:
            continue
        out.append((shape, K, s, dil, c, Hkv, G, D, Dv, E, rpb, 1))
    return out


ALL = GEOS + _random_geos(14, 2026)


def _run(exe, tmp_path, g, seed):
    shape, K, s, d, c, Hkv, G, D, Dv, E, rpb, B = g
    nd, H = len(shape), Hkv * G
    pad = (1,) * (3 - nd)
    N, Kt = int(np.prod(shape)), int(np.prod(K))
    W = Kt + E
    rng = np.random.default_rng(seed)

    def r(*sh):
        return rng.standard_normal(sh).astype(np.float32).astype(np.float64)

    q, k, v = r(B, *shape, H, D), r(B, *shape, Hkv, D), r(B, *shape, Hkv, Dv)
    ek, ev = (r(B, E, Hkv, D), r(B, E, Hkv, Dv)) if E else (None, None)
    bias = r(H, *(2 * x - 1 for x in K)) if rpb else None
    dout, dlse = r(B, *shape, H, Dv), r(B, *shape, H)
    attn, dsc = r(B, H, N, W), r(B, H, N, W)
    scale = D**-0.5
    # the leading (padded) axes: length 1, kernel 1, stride 1, dilation 1, not causal
    head = [*pad, *shape, *pad, *K, *pad, *s, *pad, *d, *(0,) * (3 - nd), *map(int, c), B, H, Hkv, D, Dv, E, int(rpb)]
    arrays = [q, k, v] + ([ek, ev] if E else []) + ([bias] if rpb else []) + [dout, dlse, attn, dsc]
    fin, fout = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(fin, "wb") as f:
        f.write(struct.pack("<22q", *head))
        f.write(struct.pack("<d", scale))
        for a in arrays:
            f.write(np.ascontiguousarray(a, np.float32).tobytes())
    env = dict(os.environ, NATTEN_MLX_NUM_THREADS="2")
    p = subprocess.run([QEMU, exe, str(fin), str(fout)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    info = p.stdout.split()
    got = np.fromfile(fout, np.float32).astype(np.float64)

    sizes = dict(
        out=B * N * H * Dv, lse=B * N * H, dq=q.size, dk=k.size, dv=v.size,
        dek=ek.size if E else 0, dev=ev.size if E else 0, drpb=bias.size if rpb else 0,
        scores=B * H * N * W, sdq=q.size, sdk=k.size, sdek=ek.size if E else 0, sdrpb=bias.size if rpb else 0,
        av=B * H * N * Dv, da=B * H * N * W, sdv=v.size, sdev=ev.size if E else 0,
    )  # fmt: skip
    parts, at = {}, 0
    for name, n in sizes.items():
        parts[name] = got[at : at + n]
        at += n
    assert at == got.size, (at, got.size)

    win = dict(kernel_size=K, stride=s, dilation=d, is_causal=c)
    extra = dict(additional_keys=ek, additional_values=ev) if E else {}
    out, lse = oracle.na_forward(q, k, v, scale=scale, rpb=bias, **win, **extra)
    grads = oracle.na_backward(q, k, v, scale=scale, rpb=bias, dout=dout, dlse=dlse, **win, **extra)
    want = dict(out=out, lse=lse, dq=grads["q"], dk=grads["k"], dv=grads["v"])
    if E:
        # the driver's extras are [B][E][Hkv][.] as the oracle's
        want.update(dek=grads["additional_keys"], dev=grads["additional_values"])
    if rpb:
        want.update(drpb=grads["rpb"])

    def heads_first(x):  # [B, *spatial, H, W] -> [B, H, N, W]
        return np.moveaxis(x.reshape(B, N, x.shape[-2], x.shape[-1]), 2, 1)

    # the split ops, on the harness's head-major copies
    sq = oracle.na_qk(q, k, scale=scale, rpb=bias, additional_keys=ek, **win)
    att_hl = np.moveaxis(attn, 1, 2).reshape(B, *shape, H, W)
    dsc_hl = np.moveaxis(dsc, 1, 2).reshape(B, *shape, H, W)
    qkg = oracle.na_qk_backward(q, k, scale=scale, rpb=bias, additional_keys=ek, dscores=dsc_hl, **win)
    ao = oracle.na_av(att_hl, v, additional_values=ev, **win)
    avg = oracle.na_av_backward(att_hl, v, additional_values=ev, dout=dout, **win)
    want.update(
        scores=heads_first(sq), sdq=heads_first(qkg["q"]), sdk=heads_first(qkg["k"]),
        av=heads_first(ao), da=heads_first(avg["attn"]), sdv=heads_first(avg["value"]),
    )  # fmt: skip
    if E:
        want.update(sdek=np.moveaxis(qkg["additional_keys"], 1, 2), sdev=np.moveaxis(avg["additional_values"], 1, 2))
    if rpb:
        want.update(sdrpb=qkg["rpb"])
    return info, parts, want


@pytest.mark.parametrize("i", range(len(ALL)), ids=[f"g{i}" for i in range(len(ALL))])
def test_aarch64_against_oracle(harness, tmp_path, i):
    g = ALL[i]
    info, parts, want = _run(harness, tmp_path, g, seed=1000 + i)
    assert info[0] == "neon" and info[1] == "2", info
    for name, w in want.items():
        w = np.asarray(w, np.float64).reshape(-1)
        got = parts[name]
        if name == "scores":
            # invalid (causal) slots are -inf in both
            inf = np.isneginf(w)
            assert np.array_equal(inf, np.isneginf(got)), f"{name}: -inf slots differ ({g})"
            got, w = got[~inf], w[~inf]
        assert_close(got, w, 2e-4, f"{name} ({g})")


def test_aarch64_paths(harness, tmp_path):
    """The sweep's problems take the exact-window path (runs and border blocks) and the tiles, forward and
    backward (path_counts: forward runs, border blocks, tiles, then the backward's three), and the
    whole-box tile kernels (full_softmax, full_p_ds) ran."""
    total = np.zeros(6, np.int64)
    whole = np.zeros(2, np.int64)  # path_counts 12 / 13: tile rows whose windows are the whole box
    for i, g in enumerate(GEOS):
        info, _, _ = _run(harness, tmp_path, g, seed=i)
        total += np.array(info[2:8], np.int64)
        whole += np.array(info[14:16], np.int64)
    assert np.all(total > 0), total
    assert np.all(whole > 0), whole
