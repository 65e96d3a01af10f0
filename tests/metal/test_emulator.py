"""The Metal emulator itself: the signature it generates, what it executes, and the planted bugs
it must catch (a missing barrier, a window off by one, a read past a threadgroup array, a
simdgroup_matrix used with the wrong layout, and more).

Runs on any machine with g++ (no Apple GPU involved)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "packages" / "natten-mlx-metal" / "emulator"))
sys.path.insert(0, str(ROOT / "tests"))

mx = pytest.importorskip("mlx.core")
if shutil.which("g++") is None:
    pytest.skip("the Metal emulator needs g++", allow_module_level=True)

import oracle  # noqa: E402
from metal_emulator import EmulatorError, SignatureError, emulate, generated_sources  # noqa: E402

WINDOW_H = (ROOT / "packages/natten-mlx-core/src/natten_mlx/include/natten_mlx/window.h").read_text()


@dataclass(frozen=True)
class Spec:
    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""


def run(spec, inputs, grid, tg, shapes, dtypes=None, **kw):
    dtypes = dtypes or [mx.float32] * len(shapes)
    return [np.array(o) for o in emulate(spec, inputs, grid=grid, threadgroup=tg, output_shapes=shapes,
                                         output_dtypes=dtypes, **kw)]


# --------------------------------------------------------------------------------------
# The generated signature (metal-kernel-facts section 1)
# --------------------------------------------------------------------------------------

EXP = Spec("myexp", ("inp",), ("out",), """
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
""")


def test_signature_of_mlx_documentation_example():
    x = mx.zeros((16,), dtype=mx.float16)
    metal, _, sig, _ = generated_sources(EXP, [x], [mx.float16], [("T", mx.float32)])
    assert sig.kernel_name == "custom_kernel_myexp__float"
    assert "template <typename T>\n[[kernel]] void custom_kernel_myexp__float(" in metal
    assert "  const device float16_t* inp [[buffer(0)]],\n  device float16_t* out [[buffer(1)]],\n" in metal
    assert "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {" in metal
    assert ('template [[host_name("custom_kernel_myexp__float")]] [[kernel]] '
            "decltype(custom_kernel_myexp__float<float>) custom_kernel_myexp__float<float>;") in metal


def test_signature_buffers_constants_shapes_and_attribute_order():
    body = """
    // reads a_shape[0] and b_strides; attributes in any order in the body
    uint l = thread_index_in_simdgroup; uint s = simdgroup_index_in_threadgroup;
    out[thread_position_in_grid.x] = a[0] + b[0] + c + float(a_shape[0]) + float(b_strides[0]) + float(l + s);
    """
    spec = Spec("k", ("a", "b", "c"), ("out",), body)
    a = mx.ones((4, 4))
    b = mx.ones((3,))
    metal, _, sig, _ = generated_sources(spec, [a, b, 2.0], [mx.float32])
    kinds = [(p.name, p.mtype, p.buffer) for p in sig.params]
    assert kinds == [
        ("a", "const device float*", 0),
        ("a_shape", "const constant int*", 1),
        ("b", "const constant float*", 2),  # fewer than 8 elements: constant address space
        ("b_strides", "const constant int64_t*", 3),
        ("c", "const constant float&", 4),  # a Python float is a 0-d float32 array
        ("out", "device float*", 5),
        ("simdgroup_index_in_threadgroup", "uint", -1),  # MLX's fixed order, not the body's
        ("thread_index_in_simdgroup", "uint", -1),
        ("thread_position_in_grid", "uint3", -1),
    ]
    assert "a_ndim" not in metal and "b_shape" not in metal
    out = run(spec, [a, b, 2.0], (32, 1, 1), (32, 1, 1), [(32,)])[0]
    lanes = np.arange(32)
    assert np.array_equal(out, 1 + 1 + 2 + 4 + 1 + lanes)


def test_signature_mlx_quirk_is_refused():
    spec = Spec("q", ("a",), ("o1", "o2"), "o1[0] = a_shape[0]; o2[0] = 1;")
    with pytest.raises(SignatureError, match="broken signature"):
        generated_sources(spec, [mx.ones((8,))], [mx.float32, mx.float32])


def test_signature_buffer_limit():
    names = tuple(f"x{i}" for i in range(31))
    spec = Spec("many", names, ("out",), "out[0] = x0[0];")
    with pytest.raises(SignatureError, match="at most 31 buffers"):
        generated_sources(spec, [mx.ones((8,))] * 31, [mx.float32])


def test_signature_rejects_unmodelled_forms():
    spec = Spec("q", ("a",), ("o",), "threadgroup float t[4][4]; o[0] = a[0];")
    with pytest.raises(SignatureError, match="one-dimensional"):
        emulate(spec, [mx.ones((8,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                output_dtypes=[mx.float32])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_elementwise_dtypes_and_template(dtype):
    x = mx.random.normal((64,), key=mx.random.key(0)).astype(dtype)
    (o,) = emulate(EXP, [x], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)], output_dtypes=[dtype],
                   template=[("T", mx.float32)])
    ref = np.exp(np.array(x.astype(mx.float32)))
    got = np.array(o.astype(mx.float32))
    tol = {mx.float32: 1e-6, mx.float16: 2e-3, mx.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# Threadgroup memory, barriers and races
# --------------------------------------------------------------------------------------

REDUCE = """
    threadgroup float part[128];
    uint t = thread_index_in_threadgroup;
    uint g = threadgroup_position_in_grid.x;
    part[t] = x[g * 128 + t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 64; s > 0; s /= 2) {
        if (t < s) part[t] = part[t] + part[t + s];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (t == 0) out[g] = part[0];
"""


def test_tree_reduction_with_barriers_is_exact_in_every_order():
    x = mx.random.normal((4 * 128,), key=mx.random.key(1))
    ref = np.array(x).reshape(4, 128).astype(np.float64).sum(1)
    spec = Spec("reduce", ("x",), ("out",), REDUCE)
    results = [run(spec, [x], (512, 1, 1), (128, 1, 1), [(4,)], order=o)[0] for o in (0, 1, 7)]
    for r in results:
        np.testing.assert_allclose(r, ref, rtol=1e-5)
        assert np.array_equal(r, results[0])


def test_planted_missing_barrier_is_a_race():
    body = REDUCE.replace(
        "if (t < s) part[t] = part[t] + part[t + s];\n        threadgroup_barrier(mem_flags::mem_threadgroup);",
        "if (t < s) part[t] = part[t] + part[t + s];",
    )
    assert body != REDUCE
    spec = Spec("reduce_nobarrier", ("x",), ("out",), body)
    with pytest.raises(EmulatorError, match="race on threadgroup part"):
        run(spec, [mx.ones((512,))], (512, 1, 1), (128, 1, 1), [(4,)])


def test_planted_missing_first_barrier_is_a_race():
    body = REDUCE.replace("part[t] = x[g * 128 + t];\n    threadgroup_barrier(mem_flags::mem_threadgroup);",
                          "part[t] = x[g * 128 + t];")
    assert body != REDUCE
    # in index order thread 0 reads part[64] before thread 64 wrote it; thread 64's write is then
    # reported as a write-after-read race; in reverse order the read sees the write: read-after-write
    for order in (0, 1):
        with pytest.raises(EmulatorError, match="race on threadgroup part"):
            run(Spec("reduce_nobarrier0", ("x",), ("out",), body), [mx.ones((512,))], (512, 1, 1), (128, 1, 1),
                [(4,)], order=order, max_errors=1000)


def test_write_after_read_without_barrier_is_a_race():
    body = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float left = buf[(t + 1) % 64];
    buf[t] = left * 2.0f;   // a neighbour may not have read buf[t] yet
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = buf[t];
    """
    with pytest.raises(EmulatorError, match="overwrites it while other threads read it"):
        run(Spec("war", ("x",), ("out",), body), [mx.ones((64,))], (64, 1, 1), (64, 1, 1), [(64,)])


def test_simdgroup_barrier_orders_lanes_of_one_simdgroup():
    # lanes exchange through threadgroup memory within one simdgroup: a simdgroup barrier suffices
    body = """
    threadgroup float buf[32];
    uint l = thread_index_in_simdgroup;
    buf[l] = x[l];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[l] = buf[31 - l];
    """
    out = run(Spec("sgbar", ("x",), ("out",), body), [mx.arange(32).astype(mx.float32)], (32, 1, 1), (32, 1, 1),
              [(32,)])[0]
    assert np.array_equal(out, np.arange(32)[::-1])
    with pytest.raises(EmulatorError, match="race"):
        run(Spec("sgbar_missing", ("x",), ("out",), body.replace("simdgroup_barrier(mem_flags::mem_threadgroup);", "")),
            [mx.arange(32).astype(mx.float32)], (32, 1, 1), (32, 1, 1), [(32,)])


def test_planted_read_past_threadgroup_array():
    body = REDUCE.replace("if (t == 0) out[g] = part[0];", "if (t == 0) out[g] = part[0] + part[128];")
    with pytest.raises(EmulatorError, match=r"out-of-bounds read of threadgroup array part\[128\]"):
        run(Spec("reduce_oob", ("x",), ("out",), body), [mx.ones((512,))], (512, 1, 1), (128, 1, 1), [(4,)])


def test_read_past_device_buffer_and_pointer_arithmetic():
    body = """
    uint i = thread_position_in_grid.x;
    const device float* p = x + i;
    out[i] = p[1];   // the last thread reads x[16]
    """
    with pytest.raises(EmulatorError, match=r"out-of-bounds read of input x\[16\]"):
        run(Spec("dev_oob", ("x",), ("out",), body), [mx.ones((16,))], (16, 1, 1), (16, 1, 1), [(16,)])
    with pytest.raises(EmulatorError, match=r"out-of-bounds write of output out\[-1\]"):
        run(Spec("dev_oob_w", ("x",), ("out",), "int i = int(thread_position_in_grid.x) - 1; out[i] = x[0];"),
            [mx.ones((16,))], (16, 1, 1), (16, 1, 1), [(16,)], check_unwritten=False)


def test_uninitialised_threadgroup_read_and_unwritten_output():
    body = """
    threadgroup float buf[32];
    uint t = thread_index_in_threadgroup;
    if (t > 0) buf[t] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = buf[(t + 1) % 32];
    """
    with pytest.raises(EmulatorError, match=r"read of threadgroup buf\[0\] before any thread"):
        run(Spec("uninit", ("x",), ("out",), body), [mx.ones((32,))], (32, 1, 1), (32, 1, 1), [(32,)])
    with pytest.raises(EmulatorError, match="1 of 32 elements never written"):
        run(Spec("unwritten", ("x",), ("out",), "uint t = thread_position_in_grid.x; if (t != 5) out[t] = x[t];"),
            [mx.ones((32,))], (32, 1, 1), (32, 1, 1), [(32,)])
    # init_value makes outputs defined (MLX fills them before the launch)
    out = run(Spec("unwritten_init", ("x",), ("out",), "uint t = thread_position_in_grid.x; if (t != 5) out[t] = x[t];"),
              [mx.ones((32,))], (32, 1, 1), (32, 1, 1), [(32,)], init_value=3.0)[0]
    assert out[5] == 3.0 and out[4] == 1.0


def test_two_threads_writing_one_output_element():
    with pytest.raises(EmulatorError, match=r"race on output out\[0\]"):
        run(Spec("waw", ("x",), ("out",), "out[thread_position_in_grid.x / 2] = x[0];"), [mx.ones((4,))],
            (64, 1, 1), (32, 1, 1), [(32,)])


def test_barrier_in_divergent_branch_and_early_return():
    body = """
    uint t = thread_index_in_threadgroup;
    if (t < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    out[t] = x[t];
    """
    with pytest.raises(EmulatorError, match="while 16 had returned"):
        run(Spec("divergent", ("x",), ("out",), body), [mx.ones((32,))], (32, 1, 1), (32, 1, 1), [(32,)])


def test_threadgroup_memory_limit_and_launch_limits():
    body = "threadgroup float a[8192]; threadgroup float b[16]; uint t = thread_index_in_threadgroup; a[t] = 1; b[t] = 1; out[t] = a[t] + b[t];"
    with pytest.raises(EmulatorError, match="threadgroup memory: 32832 bytes"):
        run(Spec("tgmem", ("x",), ("out",), body), [mx.ones((16,))], (16, 1, 1), (16, 1, 1), [(16,)])
    with pytest.raises(EmulatorError, match="Apple GPUs allow 1 to 1024"):
        run(EXP, [mx.ones((2048,))], (2048, 1, 1), (2048, 1, 1), [(2048,)], template=[("T", mx.float32)])
    with pytest.raises(EmulatorError, match="not a multiple of the threadgroup"):
        run(EXP, [mx.ones((48,))], (48, 1, 1), (32, 1, 1), [(48,)], template=[("T", mx.float32)])


# --------------------------------------------------------------------------------------
# SIMD collectives and simdgroup_matrix
# --------------------------------------------------------------------------------------


def test_simd_collectives():
    body = """
    uint l = thread_index_in_simdgroup;
    uint i = thread_position_in_grid.x;
    float v = x[i];
    out[i * 6 + 0] = simd_sum(v);
    out[i * 6 + 1] = simd_max(v);
    out[i * 6 + 2] = simd_shuffle_xor(v, 5);
    out[i * 6 + 3] = simd_shuffle_down(v, 3);
    out[i * 6 + 4] = simd_shuffle(v, 31 - l);
    out[i * 6 + 5] = simd_broadcast(v, 2);
    """
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    out = run(Spec("simd", ("x",), ("out",), body), [mx.array(x)], (64, 1, 1), (64, 1, 1), [(64 * 6,)])[0]
    out = out.reshape(64, 6)
    for s in range(2):
        v = x[32 * s:32 * s + 32]
        o = out[32 * s:32 * s + 32]
        lanes = np.arange(32)
        np.testing.assert_allclose(o[:, 0], v.sum(), rtol=1e-5)
        assert np.all(o[:, 1] == v.max())
        assert np.array_equal(o[:, 2], v[lanes ^ 5])
        assert np.array_equal(o[:, 3], np.where(lanes + 3 < 32, v[np.minimum(lanes + 3, 31)], v))
        assert np.array_equal(o[:, 4], v[31 - lanes])
        assert np.all(o[:, 5] == v[2])


def test_lanes_at_different_collectives_are_reported():
    body = """
    uint l = thread_index_in_simdgroup;
    float v = x[l];
    if (l < 8) v = simd_sum(v); else v = simd_max(v);
    out[l] = v;
    """
    with pytest.raises(EmulatorError, match="different collectives"):
        run(Spec("diverge", ("x",), ("out",), body), [mx.ones((32,))], (32, 1, 1), (32, 1, 1), [(32,)])


# C = A @ B for A, B, C [8, 8], by one simdgroup; lanes fill thread_elements() in Apple's layout
# (MLX steel's get_coord). The planted layout bugs swap row and column for one operand.
MMA = """
    uint l = thread_index_in_simdgroup;
    short qid = l / 4;
    short row = (qid & 4) + ((l / 2) % 4);
    short col = (qid & 2) * 2 + (l % 2) * 2;
    simdgroup_matrix<float, 8, 8> A, B, C;
    A.thread_elements()[0] = a[ROW_A * 8 + COL_A];
    A.thread_elements()[1] = a[ROW_A * 8 + COL_A + 1];
    B.thread_elements()[0] = b[row * 8 + col];
    B.thread_elements()[1] = b[row * 8 + col + 1];
    C.thread_elements()[0] = 0.0f;
    C.thread_elements()[1] = 0.0f;
    simdgroup_multiply_accumulate(C, A, B, C);
    out[row * 8 + col] = C.thread_elements()[0];
    out[row * 8 + col + 1] = C.thread_elements()[1];
"""


def _mma(src):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    out = run(Spec("mma", ("a", "b"), ("out",), src), [mx.array(a), mx.array(b)], (32, 1, 1), (32, 1, 1), [(64,)])[0]
    return out.reshape(8, 8), a @ b


def test_simdgroup_matrix_multiply_in_apple_layout():
    got, ref = _mma(MMA.replace("ROW_A", "row").replace("COL_A", "col"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_planted_simdgroup_matrix_wrong_layout():
    # A filled as if the lane layout were (col, row): the transposed lane mapping
    bad = MMA.replace("a[ROW_A * 8 + COL_A]", "a[col * 8 + row]").replace("a[ROW_A * 8 + COL_A + 1]",
                                                                          "a[(col + 1) * 8 + row]")
    got, ref = _mma(bad)
    assert not np.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_simdgroup_load_store_and_planted_transposed_load():
    body = """
    simdgroup_matrix<float, 8, 8> A, B, C;
    simdgroup_load(A, a, 8, ulong2(0, 0), TRANSPOSE_A);
    simdgroup_load(B, b, 8);
    C = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_multiply_accumulate(C, A, B, C);
    simdgroup_store(C, out, 8);
    """
    rng = np.random.default_rng(4)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    for transpose, ref in (("false", a @ b), ("true", a.T @ b)):
        out = run(Spec("mmaload", ("a", "b"), ("out",), body.replace("TRANSPOSE_A", transpose)),
                  [mx.array(a), mx.array(b)], (32, 1, 1), (32, 1, 1), [(64,)])[0]
        np.testing.assert_allclose(out.reshape(8, 8), ref, rtol=1e-5, atol=1e-5)
    # the planted bug: loading K untransposed where K^T is needed gives wrong numbers
    assert not np.allclose(a @ b, a.T @ b, atol=1e-3)


def test_multiply_accumulate_needs_all_32_lanes():
    body = MMA.replace("ROW_A", "row").replace("COL_A", "col")
    with pytest.raises(EmulatorError, match="all 32 lanes must take part"):
        run(Spec("mma16", ("a", "b"), ("out",), "if (thread_index_in_simdgroup < 16) return;\n" + body),
            [mx.ones((8, 8)), mx.ones((8, 8))], (32, 1, 1), (32, 1, 1), [(64,)], check_unwritten=False)


# --------------------------------------------------------------------------------------
# A window kernel on window.h: the planted off-by-one is caught by the oracle
# --------------------------------------------------------------------------------------

NA1D = """
    // one thread per (query, head); 1D neighborhood attention, float32 accumulation
    uint i = thread_position_in_grid.x;
    uint h = thread_position_in_grid.y;
    int L = p[0], K = p[1], s = p[2], d = p[3];
    bool causal = p[4] != 0;
    int H = p[5], D = p[6];
    float scale = metal::rsqrt(float(D));
    int g = int(i) % d, c = int(i) / d, Lg = na_group_len(L, d, g);
    int k0 = na_window_start(c, Lg, K, s, causal);
    int k1 = na_window_end(c, Lg, K, s, causal) OFF_BY_ONE;
    float m = -INFINITY, l = 0.0f;
    float acc[8];
    for (int e = 0; e < D; ++e) acc[e] = 0.0f;
    for (int kc = k0; kc < k1; ++kc) {
        int j = kc * d + g;
        float sc = 0.0f;
        for (int e = 0; e < D; ++e) sc += float(q[(i * H + h) * D + e]) * float(k[(j * H + h) * D + e]);
        sc *= scale;
        float mn = metal::max(m, sc);
        float a = metal::exp(m - mn), pj = metal::exp(sc - mn);
        l = l * a + pj;
        for (int e = 0; e < D; ++e) acc[e] = acc[e] * a + pj * float(v[(j * H + h) * D + e]);
        m = mn;
    }
    for (int e = 0; e < D; ++e) out[(i * H + h) * D + e] = acc[e] / l;
"""


@pytest.mark.parametrize("geom", [(17, 4, 1, 1, False), (17, 5, 2, 2, False), (16, 6, 3, 1, True), (20, 3, 1, 3, True)])
def test_window_kernel_matches_oracle_and_planted_off_by_one_does_not(geom):
    L, K, s, d, causal = geom
    H, D = 2, 4
    rng = np.random.default_rng(L * K)
    q, k, v = (rng.standard_normal((1, L, H, D)).astype(np.float32) for _ in range(3))
    ref, _ = oracle.na_forward(q, k, v, K, s, d, causal)
    params = mx.array([L, K, s, d, int(causal), H, D], dtype=mx.int32)

    def go(off):
        spec = Spec("na1d_naive", ("q", "k", "v", "p"), ("out",), NA1D.replace("OFF_BY_ONE", off), header=WINDOW_H)
        return run(spec, [mx.array(q[0]), mx.array(k[0]), mx.array(v[0]), params], (L, H, 1), (1, 1, 1),
                   [(L * H * D,)])[0].reshape(1, L, H, D)

    np.testing.assert_allclose(go(""), ref, rtol=1e-5, atol=1e-5)
    # one key too many where it stays in bounds, and reads past the keys where it does not:
    # either the numbers disagree with the oracle or the emulator reports the read
    try:
        bad = go("+ 1")
    except EmulatorError as e:
        assert "out-of-bounds read of input k" in str(e)
    else:
        assert not np.allclose(bad, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("line,why", [
    ("float y = std::max(x[0], 1.0f);", "std::"),
    ("double y = x[0];", "no double"),
    ("float y = x[0]; printf(\"%f\", y);", "C library"),
    ("float y = __builtin_expf(x[0]);", "built-ins"),
])
def test_cpp_that_is_not_metal_is_refused(line, why):
    spec = Spec("notmsl", ("x",), ("out",), line + "\nout[0] = y;  // std::max in a comment is fine")
    with pytest.raises(SignatureError, match=why):
        run(spec, [mx.ones((8,))], (1, 1, 1), (1, 1, 1), [(1,)])
