"""``natten.types`` and ``natten.attn_merge`` in compat v020 / v021 (issue 14).

v021 is compared with official NATTEN 0.21.7 where it is installed (public names, the structure of
every type alias, the enum, ``merge_attentions``' parameters and numbers). NATTEN 0.20.1 cannot be
installed next to it, so v020's names are checked against the list read from upstream's v0.20.1
sources (src/natten/types.py, src/natten/attn_merge.py).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import typing

import mlx.core as mx
import natten_mlx.compat.v020 as n020
import natten_mlx.compat.v021 as n021
import numpy as np
import pytest
from compat_support import assert_close, to_mx, to_np

# upstream's own imports, visible in dir() of its modules but not part of what they define
TYPING_IMPORTS = {"Enum", "Tuple", "Union"}
ATTN_MERGE_021_IMPORTS = {"Function", "List", "Tensor", "Tuple", "amp_bwd", "amp_fwd", "custom_bwd", "custom_fwd",
                          "functools", "torch"}
# documented in docs/compat.md: a torch.autograd.Function has no MLX counterpart
ATTN_MERGE_021_OMITTED = {"MergeAttentionsAutogradFn"}

TYPES_020 = {
    "NoneType", "Dimension1DType", "Dimension2DType", "Dimension3DType", "CausalArg1DType", "CausalArg2DType",
    "CausalArg3DType", "Dimension1DTypeOrDed", "Dimension2DTypeOrDed", "Dimension3DTypeOrDed", "CausalArg1DTypeOrDed",
    "CausalArg2DTypeOrDed", "CausalArg3DTypeOrDed", "DimensionType", "CausalArgType", "DimensionTypeOrDed",
    "CausalArgTypeOrDed", "QKTileShapeType", "KernelSchedule", "CutlassFnaForwardConfigType",
    "CutlassBlackwellFnaForwardConfigType", "CutlassHopperFnaForwardConfigType", "FlexFnaForwardConfigType",
    "CutlassFnaBackwardConfigType", "FmhaForwardConfigType", "CutlassFmhaForwardConfigType",
    "CutlassFmhaBackwardConfigType", "FlexFmhaForwardConfigType", "CutlassBlackwellFmhaForwardConfigType",
    "CutlassHopperFmhaForwardConfigType",
}
ATTN_MERGE_020 = {"maybe_torch_compile", "merge_attentions_fn", "merge_attentions_compile"}


def _public(module) -> set[str]:
    return {n for n in dir(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n))}


def _structure(t):
    """A type alias as nested (origin, args) with classes by name, comparable across packages."""
    if isinstance(t, type):
        return t.__name__
    origin = typing.get_origin(t)
    if origin is None:
        return repr(t)
    return (repr(origin), tuple(_structure(a) for a in typing.get_args(t)))


def _merge_inputs(n=3, shape=(2, 7, 3, 8), seed=0):
    rng = np.random.default_rng(seed)
    outs = [rng.standard_normal(shape) for _ in range(n)]
    lses = [rng.standard_normal(shape[:-1]) * 3 for _ in range(n)]
    return outs, lses


def _merge_reference(outs, lses):
    """Float64: the softmax over the concatenated contexts, from each part's output and lse."""
    lse = np.logaddexp.reduce(np.stack(lses), axis=0)
    out = sum(np.exp(part_lse - lse)[..., None] * o for o, part_lse in zip(outs, lses, strict=True))
    return out, lse


# ---- importable as upstream's modules -----------------------------------------------------------
@pytest.mark.parametrize("era", ["v020", "v021"])
def test_modules_import_by_upstreams_paths(era):
    types = importlib.import_module(f"natten_mlx.compat.{era}.types")
    attn_merge = importlib.import_module(f"natten_mlx.compat.{era}.attn_merge")
    package = importlib.import_module(f"natten_mlx.compat.{era}")
    assert package.types is types and package.attn_merge is attn_merge
    assert "types" not in package.__all__ and "attn_merge" not in package.__all__  # as upstream's __all__
    from_import = {}
    exec(f"from natten_mlx.compat.{era}.types import KernelSchedule, DimensionTypeOrDed", from_import)
    assert from_import["KernelSchedule"].WarpSpecializedPingpong.value == 2


def test_v020_names_are_upstreams():
    assert _public(n020.types) - TYPING_IMPORTS == TYPES_020
    assert _public(n020.attn_merge) == ATTN_MERGE_020


def test_v020_backward_configs_carry_splits_and_reduction():
    fna = _structure(n020.types.CutlassFnaBackwardConfigType)
    assert fna[0] == repr(typing.Union) and len(fna[1]) == 3
    for rank, member in enumerate(fna[1], start=1):
        dims = (repr(tuple), ("int",) * rank)
        assert member == (repr(tuple), (dims, dims, dims, "bool"))
    assert _structure(n020.types.CutlassFmhaBackwardConfigType) == (repr(tuple), ("int", "int", "int", "bool"))
    assert n020.types.KernelSchedule is n021.types.KernelSchedule


def test_kernel_schedule_members():
    ks = n021.types.KernelSchedule
    assert issubclass(ks, enum.Enum)
    assert {m.name: m.value for m in ks} == {"NonPersistent": 0, "WarpSpecializedCooperative": 1,
                                              "WarpSpecializedPingpong": 2}


# ---- against official NATTEN 0.21.7 -------------------------------------------------------------
@pytest.fixture(scope="module")
def upstream():
    natten = pytest.importorskip("natten")
    if not natten.__version__.startswith("0.21."):
        pytest.skip(f"official NATTEN 0.21 needed, found {natten.__version__}")
    return importlib.import_module("natten.types"), importlib.import_module("natten.attn_merge")


def test_v021_types_match_upstream(upstream):
    types, _ = upstream
    names = _public(types) - TYPING_IMPORTS
    assert _public(n021.types) - TYPING_IMPORTS == names
    for name in sorted(names - {"KernelSchedule", "NoneType"}):
        assert _structure(getattr(n021.types, name)) == _structure(getattr(types, name)), name
    assert n021.types.NoneType is types.NoneType
    assert [(m.name, m.value) for m in n021.types.KernelSchedule] == [(m.name, m.value) for m in types.KernelSchedule]


def test_v021_attn_merge_names_match_upstream(upstream):
    _, attn_merge = upstream
    assert n021.attn_merge.__all__ == attn_merge.__all__
    defined = _public(attn_merge) - ATTN_MERGE_021_IMPORTS - ATTN_MERGE_021_OMITTED
    assert defined <= _public(n021.attn_merge)
    assert list(inspect.signature(n021.attn_merge.merge_attentions).parameters) == list(
        inspect.signature(attn_merge.merge_attentions).parameters)
    assert n021.attn_merge.merge_attentions is n021.merge_attentions


def test_v021_merge_matches_upstream(upstream):
    torch = pytest.importorskip("torch")
    _, attn_merge = upstream
    outs, lses = _merge_inputs()
    want_out, want_lse = attn_merge.merge_attentions(
        [torch.from_numpy(o.astype(np.float32)) for o in outs], [torch.from_numpy(x.astype(np.float32)) for x in lses],
        torch_compile=False, use_autograd_fix=False)
    got_out, got_lse = n021.attn_merge.merge_attentions([to_mx(o) for o in outs], [to_mx(x) for x in lses])
    assert_close(to_np(got_out), want_out.double().numpy())
    assert_close(to_np(got_lse), want_lse.double().numpy())


# ---- numbers, without upstream --------------------------------------------------------------------
def test_merges_match_the_float64_reference():
    outs, lses = _merge_inputs(seed=1)
    ref_out, ref_lse = _merge_reference(outs, lses)
    mo, ml = [to_mx(o) for o in outs], [to_mx(x) for x in lses]
    out, lse = n021.attn_merge.merge_attentions(mo, ml)
    assert_close(to_np(out), ref_out)
    assert_close(to_np(lse), ref_lse)
    for fn in (n020.attn_merge.merge_attentions_fn, n020.attn_merge.merge_attentions_compile,
               n020.merge_attentions):
        assert_close(to_np(fn(mo, ml)), ref_out)


def test_v020_maybe_torch_compile_returns_the_function():
    def f(x):
        return x * 2

    assert n020.attn_merge.maybe_torch_compile(fullgraph=True)(f) is f
    assert n020.attn_merge.maybe_torch_compile()(f)(mx.array(3)).item() == 6


def test_v020_merge_rejects_a_single_output():
    out, lse = _merge_inputs(n=1)
    with pytest.raises(ValueError, match="at least two"):
        n020.attn_merge.merge_attentions_fn([to_mx(out[0])], [to_mx(lse[0])])
