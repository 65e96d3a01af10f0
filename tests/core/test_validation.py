"""Table-driven validation tests: every malformed call raises ValueError/TypeError whose message
names the argument and the bad value (SEMANTICS.md, "Validation").

Each row: (id, call, exception type(s), patterns).  Every pattern must be found (re.search) in the
message; patterns always include the argument's name and the offending value.
Wrong Python types (non-int, bool, str, None, non-array, unsupported dtype) -> TypeError;
wrong values (ranges, lengths, shapes, combinations) -> ValueError.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
natten_mlx = pytest.importorskip("natten_mlx")

na1d, na2d, na3d = natten_mlx.na1d, natten_mlx.na2d, natten_mlx.na3d
F32 = mx.float32


def arr(*shape, dtype=F32):
    return mx.zeros(shape, dtype=dtype)


def q1(L=8, H=2, D=4, B=1, dtype=F32):
    return arr(B, L, H, D, dtype=dtype)


def q2(X=6, Y=6, H=2, D=4, B=1, dtype=F32):
    return arr(B, X, Y, H, D, dtype=dtype)


def q3(X=4, Y=4, Z=4, H=2, D=4, B=1):
    return arr(B, X, Y, Z, H, D)


def n1(**kw):
    """na1d on [1, 8, 2, 4] inputs with K=3, overridable."""
    args = dict(query=q1(), key=q1(), value=q1(), kernel_size=3)
    args.update(kw)
    return lambda: na1d(**args)


def n2(**kw):
    args = dict(query=q2(), key=q2(), value=q2(), kernel_size=3)
    args.update(kw)
    return lambda: na2d(**args)


def n3(**kw):
    args = dict(query=q3(), key=q3(), value=q3(), kernel_size=2)
    args.update(kw)
    return lambda: na3d(**args)


VE, TE = ValueError, TypeError
VT = ValueError  # SEMANTICS.md: mismatched dtypes are a ValueError

CASES = [
    # ---- kernel_size -------------------------------------------------------------------
    ("k=1", n1(kernel_size=1), VE, [r"kernel_size", r"\b1\b"]),
    ("k=0", n1(kernel_size=0), VE, [r"kernel_size", r"\b0\b"]),
    ("k=-3", n1(kernel_size=-3), VE, [r"kernel_size", r"-3"]),
    ("k=True", n1(kernel_size=True), TE, [r"kernel_size", r"True"]),
    ("k=3.0", n1(kernel_size=3.0), TE, [r"kernel_size", r"3\.0"]),
    ("k='3'", n1(kernel_size="3"), TE, [r"kernel_size", r"'3'"]),
    ("k=None", n1(kernel_size=None), TE, [r"kernel_size", r"None"]),
    ("k=(3.5,)", n1(kernel_size=(3.5,)), TE, [r"kernel_size", r"3\.5"]),
    ("k=(True,3) 2d", n2(kernel_size=(True, 3)), TE, [r"kernel_size", r"True"]),
    ("k tuple too long 1d", n1(kernel_size=(3, 3)), VE, [r"kernel_size", r"\(3, 3\)"]),
    ("k tuple too short 2d", n2(kernel_size=(3,)), VE, [r"kernel_size", r"\(3,\)"]),
    ("k tuple 4 in 3d", n3(kernel_size=(2, 2, 2, 2)), VE, [r"kernel_size", r"\(2, 2, 2, 2\)"]),
    ("k entry 1 in 2d", n2(kernel_size=(3, 1)), VE, [r"kernel_size", r"\(3, 1\)"]),
    ("k > L", n1(kernel_size=9), VE, [r"kernel_size", r"\b9\b", r"\b8\b"]),
    ("k > X in 2d axis1", n2(kernel_size=(3, 7)), VE, [r"kernel_size", r"\b7\b", r"\b6\b"]),
    ("k > size 3d", n3(kernel_size=(2, 5, 2)), VE, [r"kernel_size", r"\b5\b", r"\b4\b"]),
    ("3d axis of size 1", n3(query=arr(1, 4, 4, 1, 2, 4), key=arr(1, 4, 4, 1, 2, 4), value=arr(1, 4, 4, 1, 2, 4)), VE,
     [r"kernel_size", r"\b2\b", r"\b1\b"]),
    # ---- dilation ----------------------------------------------------------------------
    ("k*d > L", n1(dilation=3), VE, [r"dilation", r"\b3\b", r"\b8\b"]),
    ("k*d > Y 2d", n2(dilation=(1, 3)), VE, [r"dilation", r"\b3\b", r"\b6\b"]),
    ("d=0", n1(dilation=0), VE, [r"dilation", r"\b0\b"]),
    ("d=-2", n1(dilation=-2), VE, [r"dilation", r"-2"]),
    ("d=True", n1(dilation=True), TE, [r"dilation", r"True"]),
    ("d=1.0", n1(dilation=1.0), TE, [r"dilation", r"1\.0"]),
    ("d tuple short 2d", n2(dilation=(1,)), VE, [r"dilation", r"\(1,\)"]),
    # ---- stride ------------------------------------------------------------------------
    ("s > k", n1(stride=4), VE, [r"stride", r"\b4\b", r"kernel_size", r"\b3\b"]),
    ("s > k 2d axis1", n2(kernel_size=(3, 2), stride=(1, 3)), VE, [r"stride", r"\b3\b", r"\b2\b"]),
    ("s=0", n1(stride=0), VE, [r"stride", r"\b0\b"]),
    ("s=-1", n1(stride=-1), VE, [r"stride", r"-1"]),
    ("s=1.5", n1(stride=1.5), TE, [r"stride", r"1\.5"]),
    ("s=False", n1(stride=False), TE, [r"stride", r"False"]),
    ("s tuple long 1d", n1(stride=(1, 1)), VE, [r"stride", r"\(1, 1\)"]),
    # ---- is_causal ---------------------------------------------------------------------
    ("causal=1", n1(is_causal=1), TE, [r"is_causal", r"\b1\b"]),
    ("causal='yes'", n1(is_causal="yes"), TE, [r"is_causal", r"yes"]),
    ("causal tuple short 2d", n2(is_causal=(True,)), VE, [r"is_causal", r"\(True,\)"]),
    ("causal tuple ints 2d", n2(is_causal=(1, 0)), TE, [r"is_causal", r"\(1, 0\)"]),
    ("causal None", n1(is_causal=None), TE, [r"is_causal", r"None"]),
    # ---- tensors: rank, shape, heads, dtype --------------------------------------------
    ("q rank 5 in na1d", n1(query=arr(1, 8, 8, 2, 4)), VE, [r"query", r"\(1, 8, 8, 2, 4\)"]),
    ("k rank 3", n1(key=arr(1, 8, 4)), VE, [r"key", r"\(1, 8, 4\)"]),
    ("q rank 4 in na2d", n2(query=arr(1, 6, 2, 4)), VE, [r"query", r"\(1, 6, 2, 4\)"]),
    ("v rank 7 in na3d", n3(value=arr(1, 4, 4, 4, 1, 2, 4)), VE, [r"value", r"\(1, 4, 4, 4, 1, 2, 4\)"]),
    ("v spatial mismatch", n1(value=q1(L=7)), VE, [r"value", r"\(1, 7, 2, 4\)"]),
    ("k spatial mismatch 2d", n2(key=q2(Y=5)), VE, [r"key", r"\(1, 6, 5, 2, 4\)"]),
    ("k batch mismatch", n1(key=q1(B=2)), VE, [r"key", r"\(2, 8, 2, 4\)"]),
    ("k head dim mismatch", n1(key=q1(D=5)), VE, [r"key", r"\b5\b", r"\b4\b"]),
    ("v heads != k heads", n1(value=q1(H=1)), VE, [r"value", r"\b1\b", r"\b2\b"]),
    ("H % Hkv != 0", n1(query=q1(H=3)), VE, [r"query|key", r"\b3\b", r"\b2\b"]),
    ("Hkv > H", n1(key=q1(H=4), value=q1(H=4)), VE, [r"query|key", r"\b4\b", r"\b2\b"]),
    ("dtype mismatch k fp16", n1(key=q1(dtype=mx.float16)), VT, [r"key|dtype", r"float16"]),
    ("dtype mismatch v bf16", n1(value=q1(dtype=mx.bfloat16)), VT, [r"value|dtype", r"bfloat16"]),
    ("q int32", n1(query=q1(dtype=mx.int32), key=q1(dtype=mx.int32), value=q1(dtype=mx.int32)), TE,
     [r"query", r"int32"]),
    ("q numpy", n1(query=np.zeros((1, 8, 2, 4), np.float32)), TE, [r"query", r"ndarray"]),
    ("v list", n1(value=[[0.0]]), TE, [r"value", r"list"]),
    # ---- rpb ---------------------------------------------------------------------------
    ("rpb wrong K", n1(rpb=arr(2, 4)), VE, [r"rpb", r"\(2, 4\)"]),
    ("rpb wrong H", n1(rpb=arr(3, 5)), VE, [r"rpb", r"\(3, 5\)"]),
    ("rpb rank 2 in 2d", n2(rpb=arr(2, 5)), VE, [r"rpb", r"\(2, 5\)"]),
    ("rpb with causal", n1(rpb=arr(2, 5), is_causal=True), VE, [r"rpb", r"causal"]),
    ("rpb with one causal axis 2d", n2(rpb=arr(2, 5, 5), is_causal=(False, True)), VE, [r"rpb", r"causal"]),
    ("rpb dtype", n1(rpb=arr(2, 5, dtype=mx.float16)), VT, [r"rpb", r"float16"]),
    ("rpb numpy", n1(rpb=np.zeros((2, 5), np.float32)), TE, [r"rpb", r"ndarray"]),
    # ---- additional keys / values ------------------------------------------------------
    ("extra k without v", n1(additional_keys=arr(1, 3, 2, 4)), VE, [r"additional_keys", r"additional_values"]),
    ("extra v without k", n1(additional_values=arr(1, 3, 2, 4)), VE, [r"additional_values", r"additional_keys"]),
    ("extra k head dim", n1(additional_keys=arr(1, 3, 2, 5), additional_values=arr(1, 3, 2, 4)), VE,
     [r"additional_keys", r"\(1, 3, 2, 5\)"]),
    ("extra v head dim", n1(additional_keys=arr(1, 3, 2, 4), additional_values=arr(1, 3, 2, 6)), VE,
     [r"additional_values", r"\(1, 3, 2, 6\)"]),
    ("extra kv heads", n1(additional_keys=arr(1, 3, 1, 4), additional_values=arr(1, 3, 1, 4)), VE,
     [r"additional_keys", r"\(1, 3, 1, 4\)"]),
    ("extra batch", n1(additional_keys=arr(2, 3, 2, 4), additional_values=arr(2, 3, 2, 4)), VE,
     [r"additional_keys", r"\(2, 3, 2, 4\)"]),
    ("extra N mismatch", n1(additional_keys=arr(1, 3, 2, 4), additional_values=arr(1, 2, 2, 4)), VE,
     [r"additional_(keys|values)|N_extra", r"\b3\b", r"\b2\b"]),
    ("extra rank 3", n1(additional_keys=arr(3, 2, 4), additional_values=arr(3, 2, 4)), VE,
     [r"additional_keys", r"\(3, 2, 4\)"]),
    ("extra dtype", n1(additional_keys=arr(1, 3, 2, 4, dtype=mx.float16), additional_values=arr(1, 3, 2, 4)), VT,
     [r"additional_keys", r"float16"]),
    # ---- other scalars -----------------------------------------------------------------
    ("scale str", n1(scale="a"), TE, [r"scale", r"'a'"]),
    ("return_lse str", n1(return_lse="yes"), TE, [r"return_lse", r"yes"]),
    ("unknown backend", n1(backend="no-such-backend"), VE, [r"backend", r"no-such-backend"]),
    ("unknown backend in a list", n1(backend="pure,no-such-backend"), VE, [r"backend", r"no-such-backend"]),
    ("backend not a name", n1(backend=3), TE, [r"backend=", r"\b3\b"]),
    ("stream str", n1(stream="gpu"), TE, [r"stream=", r"'gpu'"]),
    # ---- zero sizes (issue 8): B = 0 is accepted (see ACCEPTED); H, H_kv, D, D_v are not ----
    ("H=0", n1(query=q1(H=0), key=q1(H=0), value=q1(H=0)), VE, [r"\bH\b", r"=0", r">= 1"]),
    ("H_kv=0", n1(key=q1(H=0), value=q1(H=0)), VE, [r"H_kv", r"=0", r">= 1"]),
    ("D=0", n1(query=q1(D=0), key=q1(D=0)), VE, [r"\bD\b", r"=0", r">= 1"]),
    ("D_v=0", n1(value=q1(D=0)), VE, [r"D_v", r"=0", r">= 1"]),
    ("H=0 2d", n2(query=q2(H=0), key=q2(H=0), value=q2(H=0)), VE, [r"\bH\b", r"=0"]),
    ("D=0 3d", n3(query=arr(1, 4, 4, 4, 2, 0), key=arr(1, 4, 4, 4, 2, 0)), VE, [r"\bD\b", r"=0"]),
]


@pytest.mark.parametrize("call, exc, patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fused_rejects(call, exc, patterns):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} lacks {pat!r}"


def test_enough_cases():
    assert len(CASES) >= 40


# ---- split ops --------------------------------------------------------------------------

qk1, av1 = natten_mlx.na1d_qk, natten_mlx.na1d_av
qk2, av2 = natten_mlx.na2d_qk, natten_mlx.na2d_av

SPLIT_CASES = [
    ("qk k=1", lambda: qk1(q1(), q1(), 1), VE, [r"kernel_size", r"\b1\b"]),
    ("qk k>L", lambda: qk1(q1(), q1(), 9), VE, [r"kernel_size", r"\b9\b", r"\b8\b"]),
    ("qk s>k", lambda: qk1(q1(), q1(), 3, stride=5), VE, [r"stride", r"\b5\b"]),
    ("qk key spatial 2d", lambda: qk2(q2(), q2(X=5), 3), VE, [r"key", r"\(1, 5, 6, 2, 4\)"]),
    ("qk head dim", lambda: qk1(q1(), q1(D=3), 3), VE, [r"key", r"\b3\b", r"\b4\b"]),
    ("qk H%Hkv", lambda: qk2(q2(H=3), q2(H=2), 3), VE, [r"query|key", r"\b3\b", r"\b2\b"]),
    ("qk rpb causal", lambda: qk1(q1(), q1(), 3, is_causal=True, rpb=arr(2, 5)), VE, [r"rpb", r"causal"]),
    ("qk rpb shape", lambda: qk2(q2(), q2(), (3, 2), rpb=arr(2, 5, 5)), VE, [r"rpb", r"\(2, 5, 5\)"]),
    ("qk extra keys D", lambda: qk1(q1(), q1(), 3, additional_keys=arr(1, 2, 2, 3)), VE,
     [r"additional_keys", r"\(1, 2, 2, 3\)"]),
    ("qk dtype", lambda: qk1(q1(), q1(dtype=mx.float16), 3), VT, [r"key|dtype", r"float16"]),
    ("qk causal int", lambda: qk1(q1(), q1(), 3, is_causal=0), TE, [r"is_causal", r"\b0\b"]),
    ("av wrong slots", lambda: av1(arr(1, 8, 2, 4), q1(), 3), VE, [r"attn", r"\b4\b", r"\b3\b"]),
    ("av missing extra slots", lambda: av1(arr(1, 8, 2, 3), q1(), 3, additional_values=arr(1, 2, 2, 4)), VE,
     [r"attn|additional_values", r"\b3\b", r"\b2\b"]),
    ("av spatial mismatch", lambda: av1(arr(1, 7, 2, 3), q1(), 3), VE, [r"attn", r"\(1, 7, 2, 3\)"]),
    ("av 2d slots", lambda: av2(arr(1, 6, 6, 2, 6), q2(), (3, 3)), VE, [r"attn", r"\b6\b", r"\b9\b"]),
    ("av H%Hkv", lambda: av1(arr(1, 8, 3, 3), q1(H=2), 3), VE, [r"attn|value", r"\b3\b", r"\b2\b"]),
    ("av dtype", lambda: av1(arr(1, 8, 2, 3, dtype=mx.float16), q1(), 3), VT, [r"attn|value|dtype", r"float16"]),
    ("av k*d > L", lambda: av1(arr(1, 8, 2, 3), q1(), 3, dilation=4), VE, [r"dilation", r"\b4\b"]),
    ("qk H=0", lambda: qk1(q1(H=0), q1(H=0), 3), VE, [r"\bH\b", r"=0", r">= 1"]),
    ("qk D=0", lambda: qk1(q1(D=0), q1(D=0), 3), VE, [r"\bD\b", r"=0", r">= 1"]),
    ("av D_v=0", lambda: av1(arr(1, 8, 2, 3), q1(D=0), 3), VE, [r"D_v", r"=0", r">= 1"]),
    ("av H_kv=0", lambda: av1(arr(1, 8, 2, 3), q1(H=0), 3), VE, [r"H_kv", r"=0", r">= 1"]),
]


@pytest.mark.parametrize("call, exc, patterns", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES])
def test_split_rejects(call, exc, patterns):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} lacks {pat!r}"


# ---- merge_attentions -------------------------------------------------------------------

merge = natten_mlx.merge_attentions
O, L_ = arr(1, 8, 2, 4), arr(1, 8, 2)

MERGE_CASES = [
    ("one output", lambda: merge([O], [L_]), VE, [r"output", r"\b1\b"]),
    ("length mismatch", lambda: merge([O, O], [L_]), VE, [r"lse", r"\b2\b", r"\b1\b"]),
    ("not sequences", lambda: merge(O, L_), TE, [r"outputs|lses", r"array"]),
    ("lse shape", lambda: merge([O, O], [L_, arr(1, 8, 3)]), VE, [r"lses\[1\]", r"\(1, 8, 3\)"]),
    ("output shape", lambda: merge([O, arr(1, 8, 2, 5)], [L_, L_]), VE, [r"outputs\[1\]", r"\(1, 8, 2, 5\)"]),
    ("numpy output", lambda: merge([O, np.zeros((1, 8, 2, 4))], [L_, L_]), TE, [r"outputs\[1\]"]),
]


@pytest.mark.parametrize("call, exc, patterns", [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES])
def test_merge_rejects(call, exc, patterns):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} lacks {pat!r}"


# ---- accepted forms (so the rejections above are not over-eager) ------------------------

ACCEPTED = [
    ("numpy int kernel", n1(kernel_size=np.int64(3))),
    ("list kernel 2d", n2(kernel_size=[3, 2], stride=[1, 2], dilation=[2, 1], is_causal=[True, False])),
    ("k == L", n1(kernel_size=8)),
    ("k*d == L", n1(kernel_size=4, dilation=2)),
    ("s == k", n1(stride=3)),
    ("even k", n2(kernel_size=(2, 4))),
    ("MQA", n1(query=q1(H=4), key=q1(H=1), value=q1(H=1))),
    ("Dv != D", n1(value=q1(D=6))),
    ("rpb stride even k", n2(kernel_size=(2, 4), stride=(2, 3), rpb=arr(2, 3, 7))),
    ("rpb with dilation", n1(dilation=2, rpb=arr(2, 5))),
    ("extra kv", n1(additional_keys=arr(1, 3, 2, 4), additional_values=arr(1, 3, 2, 5), value=q1(D=5))),
    ("scale int", n1(scale=1)),
    ("fp16 all", n1(query=q1(dtype=mx.float16), key=q1(dtype=mx.float16), value=q1(dtype=mx.float16))),
    ("3d mixed causal", n3(is_causal=(True, False, True), stride=(1, 2, 1))),
    ("B=0 (empty output)", n1(query=q1(B=0), key=q1(B=0), value=q1(B=0))),
    ("B=0 2d with lse", n2(query=q2(B=0), key=q2(B=0), value=q2(B=0), return_lse=True)),
    ("backend list", n1(backend=["pure"])),
    ("stream cpu", n1(stream=mx.cpu)),
]


def test_batch_zero_shapes():
    out, lse = na2d(q2(B=0), q2(B=0), q2(B=0, D=5), 3, return_lse=True)
    assert out.shape == (0, 6, 6, 2, 5) and out.dtype == F32 and lse.shape == (0, 6, 6, 2) and lse.dtype == F32
    assert natten_mlx.na1d_qk(q1(B=0), q1(B=0), 3, additional_keys=arr(0, 2, 2, 4)).shape == (0, 8, 2, 5)
    assert natten_mlx.na1d_av(arr(0, 8, 2, 3), q1(B=0, D=6), 3).shape == (0, 8, 2, 6)


@pytest.mark.parametrize("call", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(call):
    out = call()
    mx.eval(out)


def test_fused_problem_cache_keeps_validation():
    """fused_problem caches plain calls by everything validation reads: a repeat gets the same Problem, and
    a value that equals a cached one but has the wrong type (True for 1, 0 for False) still raises."""
    from natten_mlx.problem import _FUSED_CACHE, fused_problem

    q = q1()
    args = (1, q, q, q, 3, 1, 1, False, None, None, None, None, False)
    p = fused_problem(*args)
    assert fused_problem(*args) is p and any(v is p for v in _FUSED_CACHE.values())
    with pytest.raises(TypeError, match="stride"):
        fused_problem(1, q, q, q, 3, True, 1, False, None, None, None, None, False)
    with pytest.raises(TypeError, match="is_causal"):
        fused_problem(1, q, q, q, 3, 1, 1, 0, None, None, None, None, False)
    with pytest.raises(TypeError, match="return_lse"):
        fused_problem(1, q, q, q, 3, 1, 1, False, None, None, None, None, 0)
    with pytest.raises(TypeError, match="scale"):
        fused_problem(1, q, q, q, 3, 1, 1, False, True, None, None, None, False)
    # uncached forms give the same Problem
    assert fused_problem(1, q, q, q, [3], (1,), np.int64(1), (False,), None, None, None, None, False) == p
    assert fused_problem(1, q, q, q, (3,), 1, 1, False, 4**-0.5, None, None, None, False) == p  # D = 4
    # another shape or dtype is validated afresh
    with pytest.raises(ValueError, match="kernel_size"):
        fused_problem(1, q1(L=2), q1(L=2), q1(L=2), 3, 1, 1, False, None, None, None, None, False)
