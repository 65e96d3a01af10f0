"""The cuda tier's tile choice (plan.axis_walk, plan.fitted_tiles) on the CPU.

axis_walk counts what a launch computes along one axis; it is checked against a brute-force walk
built from the float64 oracle's windows (oracle.axis_window), for random axes with stride,
dilation, causal masking and sub-domain slabs."""

from __future__ import annotations

import types

import numpy as np
import oracle
import pytest

plan = pytest.importorskip("natten_mlx_cuda.plan")


def _geo(spatial, K, s=None, d=None, causal=None, domain=None, qoff=None, B=1, H=1):
    r = len(spatial)
    return plan.geometry(types.SimpleNamespace(
        spatial=tuple(spatial), kernel_size=tuple(K), stride=tuple(s or (1,) * r), dilation=tuple(d or (1,) * r),
        is_causal=tuple(causal or (False,) * r), batch=B, heads=H, kv_heads=H, head_dim=32, value_head_dim=32,
        scale=1.0, domain=tuple(domain or spatial), query_offset=tuple(qoff or (0,) * r)))


def _brute_walk(L, K, s, d, causal, off, n, qt, kt):
    """Query tiles of qt in-group coordinates per dilation group (local queries off .. off + n - 1),
    each walking ceil(span / kt) key tiles of its windows' union, every row counted."""
    walked = useful = 0
    for g in range(d):
        coords = sorted({i // d for i in range(off, off + n) if i % d == g})
        for c in coords:
            _, st, en = oracle.axis_window(c * d + g, L, K, s, d, causal)
            useful += en - st + 1
        for t0 in range(0, len(coords), qt):
            wins = [oracle.axis_window(c * d + g, L, K, s, d, causal)[1:] for c in coords[t0:t0 + qt]]
            span = max(e for _, e in wins) + 1 - min(b for b, _ in wins)
            walked += -(-span // kt) * kt * qt
    return walked, useful


def test_axis_walk_against_oracle():
    rng = np.random.default_rng(11)
    checked = 0
    while checked < 60:
        L = int(rng.integers(2, 60))
        K = int(rng.integers(2, L + 1))
        d = int(rng.integers(1, L // K + 1))
        s = int(rng.integers(1, K + 1))
        causal = bool(rng.integers(0, 2))
        off, n = (0, L) if rng.random() < 0.5 else (int(rng.integers(0, L)), 0)
        if n == 0:
            n = int(rng.integers(1, L - off + 1))
        geo = _geo((n,), (K,), (s,), (d,), (causal,), domain=(L,), qoff=(off,))
        for qt in (1, 2, 8, 64):
            for kt in (1, 4, 16, 64):
                assert plan.axis_walk(geo, 2, qt, kt) == _brute_walk(L, K, s, d, causal, off, n, qt, kt), (L, K, s, d, causal, off, n, qt, kt)
        checked += 1


def test_fitted_tiles():
    # the benchmark's G cases (measured on the H200: G3 89.7 ms with a fitted pair, 93.0 with 4x4x4 boxes)
    assert plan.fitted_tiles(_geo((256, 256), (80, 80), H=24)) == ((1, 8, 8), (1, 8, 8))
    qt, kt = plan.fitted_tiles(_geo((30, 48, 80), (18, 24, 24), H=24))
    assert qt != (4, 4, 4) and qt[0] * qt[1] * qt[2] == 64 and kt[0] * kt[1] * kt[2] == 64
    g3 = _geo((30, 48, 80), (18, 24, 24), H=24)
    walked = lambda q, k: np.prod([plan.axis_walk(g3, a, q[a], k[a])[0] for a in range(3)])  # noqa: E731
    assert walked(qt, kt) < walked((4, 4, 4), (4, 4, 4))
    # small problems keep the rank's box (one NVRTC compilation per tile shape)
    assert plan.fitted_tiles(_geo((20, 20), (80 // 8, 80 // 8))) == ((1, 8, 8), (1, 8, 8))
    assert plan.fitted_tiles(_geo((9, 9, 9), (3, 3, 3))) == ((4, 4, 4), (4, 4, 4))
    # a 1D problem has one box
    assert plan.fitted_tiles(_geo((32768,), (2048,))) == ((1, 1, 64), (1, 1, 64))


@pytest.mark.parametrize("d,dv", [(128, 128), (128, 96), (64, 64), (32, 32)])
def test_three_blocks_fit(d, dv):
    """The forward's default for 64-query tiles is three blocks per SM: the kernel's __launch_bounds__
    says so, Q shares the ring, and three blocks' shared memory (plus the driver's 1 KiB each) fits an
    H100/H200 SM's 228 KiB, with or without rpb. 128-query tiles of 16-row warps keep no bound and their own Q."""
    import math
    from dataclasses import replace

    from natten_mlx_cuda import source

    geo = replace(_geo((64, 64), (13, 13)), D=d, DV=dv)
    tiles = ((1, 8, 8), (1, 8, 8))
    v = plan.forward(geo, "float16", "float16", False, True, *tiles).variant
    t = dict(v.template)
    assert v.min_blocks == 3 and t["QALIAS"] and t["MAXT"] == plan.FWD_MAXT_SMALL
    assert 3 * (v.shared_memory + 1024) <= 228 * 1024, v.shared_memory
    assert "__launch_bounds__(128, 3)" in source.full_source(v)
    # with rpb too (one more int per key-tile column)
    w = plan.forward(geo, "float16", "float16", True, True, *tiles).variant
    assert w.min_blocks == 3 and dict(w.template)["QALIAS"] and 3 * (w.shared_memory + 1024) <= 228 * 1024
    assert w.shared_memory == v.shared_memory + 64 * 4
    w = plan.forward(geo, "float16", "float16", False, True, (1, 16, 8), tiles[1]).variant
    assert w.min_blocks == 0 and not dict(w.template)["QALIAS"] and "__launch_bounds__" not in source.full_source(w)
    assert w.shared_memory > v.shared_memory
    # the caller's choice wins over the default
    u = plan.forward(geo, "float16", "float16", False, True, *tiles, min_blocks=0).variant
    assert u.min_blocks == 0 and not dict(u.template)["QALIAS"] and math.isclose(u.shared_memory - v.shared_memory,
                                                                               64 * (plan._r16(d) + 8) * 2 + 4 * 5 * (plan.FWD_MAXT - plan.FWD_MAXT_SMALL))


def test_forward_layout_by_walk():
    """The forward's default layout: 128-query tiles of 4 warps x 32 rows (two blocks per SM, whose shared
    memory fits an SM's 228 KiB) where their larger union of windows costs less than FWD_MT2_COST per
    pair, else 64-query tiles of 16-row warps (three blocks); small problems and rpb keep 64-query tiles."""
    from dataclasses import replace

    from natten_mlx_cuda import source

    def layout(geo, **kw):
        v = plan.forward(geo, "float16", "float16", kw.pop("rpb", False), True, **kw).variant
        t = dict(v.template)
        return (t["QT0"], t["QT1"], t["QT2"]), t["MT"], t["NW"], v

    for spatial, K in (((256, 256), (80, 80)), ((30, 48, 80), (18, 24, 24))):
        geo = replace(_geo(spatial, K, H=24), D=128, DV=128)
        q128, _, c128 = plan._fitted(geo, 128)
        c64 = plan._fitted(geo, 64)[2]
        assert plan.FWD_MT2_COST * c128 < c64 < c128
        for rpb in (False, True):
            qt, mt, nw, v = layout(geo, rpb=rpb, m_tiles=None if not rpb else 2)
            assert (qt, mt, nw, v.min_blocks) == (q128, 2, 4, 2)
            assert 2 * (v.shared_memory + 1024) <= 228 * 1024 and dict(v.template)["MAXT"] == plan.FWD_MAXT_SMALL
            assert "__launch_bounds__(128, 2)" in source.full_source(v)
        # with rpb (unless asked) 16-row warps, three blocks per SM
        qt, mt, nw, v = layout(geo, rpb=True)
        assert (qt, mt, nw, v.min_blocks) == (plan.fitted_tiles(geo)[0], 1, 4, 3)
        # the caller's m_tiles picks the layout; a caller's tile keeps 16-row warps
        assert layout(geo, m_tiles=1)[1:3] == (1, 4)
        assert layout(geo, tile=q128)[1:3] == (1, 8)
    # small windows: the 128-query tiles' halo costs more than their layout saves (G4: 1.54x the pairs)
    g4 = replace(_geo((56, 56), (7, 7), B=64, H=4), D=32, DV=32)
    assert plan._fitted(g4, 128)[2] * plan.FWD_MT2_COST > plan._fitted(g4, 64)[2]
    assert layout(g4)[1:3] == (1, 4) and layout(g4)[3].min_blocks == 3
    # small problems: the 64-query box whatever the walk says; m_tiles=2 takes the 128-query box
    small = _geo((20, 20), (10, 10))
    assert layout(small)[:3] == ((1, 8, 8), 1, 4)
    assert layout(small, m_tiles=2)[:3] == (plan.default_tile(small, 128), 2, 4)


def test_forward_splits(monkeypatch):
    """The default never splits walks (plan.SPLIT_FILL 0: whole calls measured slower); with SPLIT_FILL > 0,
    grids of fewer blocks than that share of the GPU's slots split into the fewest parts that fill them,
    SPLIT_MIN_TILES key tiles or more each; the caller's count always wins. G1 (one head of 32768 tokens)
    takes 128-query tiles of 32-row warps: 256 blocks for 264 slots."""
    from dataclasses import replace

    def launch(spatial, K, H=1, **kw):
        geo = replace(_geo(spatial, K, H=H), D=128, DV=128)
        return plan.forward(geo, "float16", "float16", False, True, **kw)

    g1 = launch((32768,), (2048,))
    assert g1.splits == 1 and dict(g1.variant.template)["MT"] == 2 and g1.grid == (256 * 128, 1, 1)
    # half the sequence: 128 blocks of 128 queries would fill half the slots, so 64-query tiles (256 / 396)
    half = launch((16384,), (2048,))
    assert (half.splits, dict(half.variant.template)["MT"]) == (1, 1)
    assert launch((8192,), (2048,)).splits == 1
    # the caller's count
    q = launch((8192,), (2048,), splits=4)
    assert q.splits == 4 and q.grid[1] == 4 and q.output_shapes == ((4, 1, 8192, 1, 128), (4, 1, 8192, 1))
    assert dict(q.variant.template)["OT"] == "float32" and dict(q.variant.template)["SPLIT"] == 4
    assert launch((32768,), (2048,), splits=5).splits == 5
    monkeypatch.setattr(plan, "SPLIT_FILL", 0.5)
    # a quarter: 128 64-query tiles for 396 slots -> 4 parts of 33 / 4 key tiles (>= 8 each)
    assert launch((8192,), (2048,)).splits == 4
    # the parts' length bounds the count: window 1024 -> 17 key tiles, 2 parts
    assert launch((8192,), (1024,)).splits == 2
    # short walks are never split; neither are grids with enough blocks (8 heads), nor G1-G4
    assert launch((8192,), (129,)).splits == 1
    assert launch((8192,), (2048,), H=8).splits == 1
    assert launch((8192,), (2048,), splits=1).splits == 1
    for spatial, K, B, H in (((32768,), (2048,), 1, 1), ((256, 256), (80, 80), 1, 24), ((30, 48, 80), (18, 24, 24), 1, 24),
                             ((56, 56), (7, 7), 64, 4)):
        assert plan.forward(replace(_geo(spatial, K, B=B, H=H), D=128, DV=128), "float16", "float16", False, True).splits == 1


def test_plans_cached_per_tuning_constants(monkeypatch):
    """Launch plans are cached per arguments and per the module's tuning constants: changing one re-plans."""
    from dataclasses import replace

    geo = replace(_geo((8192,), (2048,)), D=128, DV=128)
    a = plan.forward(geo, "float16", "float16", False, True)
    assert plan.forward(geo, "float16", "float16", False, True) is a
    monkeypatch.setattr(plan, "SPLIT_FILL", 0.5)
    b = plan.forward(geo, "float16", "float16", False, True)
    assert (a.splits, b.splits) == (1, 4)
    # other arguments, another plan
    assert plan.forward(geo, "float16", "float16", False, True, splits=2).splits == 2


def test_compact_drops_comments_and_keeps_literals_and_continuations():
    """The text MLX hashes per launch (source.compact): comments, indentation and blank lines go; string and
    character literals (PTX in asm strings) stay as written; a macro's continuation keeps its next line."""
    from natten_mlx_cuda import source

    text = (
        "// a comment\n"
        "  int a = 1; /* block\n comment */ int b = 2;  // tail\n"
        "\n"
        '  asm("mov.b32 %0, 1; // kept in the string" : "=r"(a));\n'
        "  char c = '/', d = '\\'';\n"
        "#define M(x) \\\n"
        "  // gone, but the line stays\n"
        "int after;\n"
    )
    got = source.compact(text)
    assert "a comment" not in got and "block" not in got and "tail" not in got and "gone" not in got
    assert '"mov.b32 %0, 1; // kept in the string"' in got
    assert "char c = '/', d = '\\'';" in got
    lines = got.split("\n")
    assert lines[0] == "int a = 1;   int b = 2;"
    i = lines.index("#define M(x) \\")
    assert lines[i + 1] == "" and lines[i + 2] == "int after;"  # the macro still ends where it did
    assert "\n\n\n" not in got and not any(x.startswith(" ") for x in lines)
    # every kernel body loses its comments but keeps its code (an identifier of each survives)
    for name, ident in (("fmha_fwd", "na_load_rows"), ("fmha_bwd_dq", "scale"), ("merge_parts", "lse")):
        b = source.body(name)
        assert ident in b and "//" not in b.replace('"//', "")
