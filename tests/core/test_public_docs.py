"""Every public function and class of the runtime layer has a docstring, every module constructor
argument is documented, and every op documents its ``stream`` and ``backend`` arguments."""

from __future__ import annotations

import inspect

import natten_mlx
import pytest
from natten_mlx import dispatch, functional, geometry, plugins, problem, protocol, tiles, windows

MODULES = (natten_mlx, dispatch, functional, geometry, plugins, problem, protocol, tiles, windows)


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "").startswith("natten_mlx"):
            yield f"{module.__name__}.{name}", obj


PUBLIC = sorted({name: obj for m in MODULES for name, obj in _public(m)}.items())


@pytest.mark.parametrize("name,obj", PUBLIC, ids=[p[0] for p in PUBLIC])
def test_has_a_docstring(name, obj):
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


MODULE_ARGS = list(inspect.signature(natten_mlx.modules._NeighborhoodAttention.__init__).parameters)[1:]


@pytest.mark.parametrize("cls", [natten_mlx.NeighborhoodAttention1D, natten_mlx.NeighborhoodAttention2D,
                                 natten_mlx.NeighborhoodAttention3D])
def test_module_arguments_are_documented(cls):
    assert len(MODULE_ARGS) == 14
    for arg in MODULE_ARGS:
        assert f"{arg}:" in cls.__doc__, f"{cls.__name__} does not document {arg}"


OPS = [natten_mlx.na1d, natten_mlx.na2d, natten_mlx.na3d, natten_mlx.na1d_qk, natten_mlx.na2d_qk, natten_mlx.na3d_qk,
       natten_mlx.na1d_av, natten_mlx.na2d_av, natten_mlx.na3d_av, natten_mlx.na_subdomain, natten_mlx.merge_attentions]


@pytest.mark.parametrize("op", OPS, ids=[op.__name__ for op in OPS])
def test_every_op_takes_and_documents_a_stream(op):
    assert "stream" in inspect.signature(op).parameters
    assert "stream" in op.__doc__
