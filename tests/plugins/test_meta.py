"""Meta-tests in the manner of datasette: every hook is documented, every hook is exercised by a
test, every part of the backend protocol is documented and implemented by some toy here, and the
example plugin declares what the core discovers."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import natten_mlx
import pytest
from natten_mlx import hookspecs, plugins, protocol
from natten_mlx.dispatch import KNOWN_TIERS
from plugin_toys import FakeEntryPoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EXAMPLE = ROOT / "examples" / "third-party-backend"
ISSUES = "see tests/plugins/CORE_ISSUES.md"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def _hookspecs() -> dict:
    """Every function of natten_mlx.hookspecs carrying the hookspec marker, by name."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: f for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker)}


HOOKS = sorted(_hookspecs())


def _test_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(HERE.glob("*.py")) if p.name != Path(__file__).name}


def test_there_are_hooks_and_the_markers_are_public():
    assert HOOKS == ["natten_mlx_register_backends"]
    assert natten_mlx.hookimpl is hookspecs.hookimpl and natten_mlx.hookspec is hookspecs.hookspec
    assert hookspecs.ENTRY_POINT_GROUP == "natten_mlx.backends"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring_naming_its_arguments(hook):
    spec = _hookspecs()[hook]
    doc = inspect.getdoc(spec) or ""
    assert len(doc) > 80, f"{hook} needs a docstring stating the contract"
    for arg in inspect.signature(spec).parameters:
        assert re.search(rf"\b{arg}\b", doc), f"the docstring of {hook} does not mention its argument {arg!r}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_named_in_the_protocol_file(hook):
    assert hook in Path(protocol.__file__).read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_named_in_the_example_plugin_readme(hook):
    assert hook in (EXAMPLE / "README.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_named_in_the_project_readme(hook):
    assert hook in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_implemented_in_the_tests(hook):
    """A test module (or the toys they use) defines a hookimpl-marked function of the hook's name."""
    implemented_in = []
    for name, source in _test_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == hook:
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if any(d.startswith("hookimpl") for d in decorators):
                    implemented_in.append(name)
    assert implemented_in, f"no test implements {hook}"
    assert any(n.startswith("test_") for n in implemented_in)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_called_by_discovery(hook):
    """A plugin implementing every hookspec sees each of them called, with the spec's arguments."""
    import types

    calls = {}
    module = types.ModuleType("every_hook")
    for name in _hookspecs():
        def impl(_name=name, **kwargs):
            calls[_name] = kwargs

        impl.__name__ = name
        setattr(module, name, natten_mlx.hookimpl(impl))
    try:
        reg = plugins.reload_plugins(entry_points=[FakeEntryPoint("every-hook", module)])
        assert next(r for r in reg.plugins if r["name"] == "every-hook")["status"] == "ok"
        assert hook in calls
        assert set(calls[hook]) == set(inspect.signature(_hookspecs()[hook]).parameters)
        # and pluggy knows the plugin's implementation of it
        impls = reg.manager.hook.__dict__[hook].get_hookimpls()
        assert "every-hook" in [i.plugin_name for i in impls]
    finally:
        plugins.reload_plugins()


# ---- the backend protocol ------------------------------------------------------------------------------
MEMBERS = protocol.REQUIRED + protocol.OPTIONAL_METHODS


@pytest.mark.parametrize("member", MEMBERS)
def test_every_protocol_member_is_documented_in_the_protocol_file(member):
    assert f"``{member}" in (protocol.__doc__ or ""), f"natten_mlx.protocol's docstring does not document {member}"


@pytest.mark.parametrize("member", protocol.OPTIONAL_METHODS)
def test_every_optional_method_is_implemented_by_a_toy(member):
    import plugin_toys

    toys = [c for c in vars(plugin_toys).values() if inspect.isclass(c) and c.__module__ == "plugin_toys"]
    assert any(member in vars(c) for c in toys), f"no toy backend implements {member}: it is never exercised"


@pytest.mark.parametrize("member", protocol.REQUIRED)
def test_a_backend_lacking_a_required_member_is_refused(member):
    from plugin_toys import DenseToy

    class Lacking:
        pass

    toy = DenseToy("complete")
    lacking = Lacking()
    for m in protocol.REQUIRED:
        if m != member:
            setattr(lacking, m, getattr(toy, m))
    with pytest.raises(TypeError, match=member):
        protocol.check_backend(lacking)
    protocol.check_backend(toy)


# ---- the example plugin --------------------------------------------------------------------------------
@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_example_declares_the_entry_point_group_the_core_reads():
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "natten-mlx-example-backend"
    eps = meta["project"]["entry-points"][hookspecs.ENTRY_POINT_GROUP]
    assert eps == {"example": "natten_mlx_example_backend"}
    assert any(dep.startswith("natten-mlx") for dep in meta["project"]["dependencies"])
    assert (EXAMPLE / "src" / "natten_mlx_example_backend" / "__init__.py").exists()


def test_example_module_registers_from_source_through_a_faked_entry_point():
    """Without installing it: the example's module, loaded from its source file, registers its backend."""
    path = EXAMPLE / "src" / "natten_mlx_example_backend" / "__init__.py"
    spec = importlib.util.spec_from_file_location("natten_mlx_example_backend_from_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        reg = plugins.reload_plugins(entry_points=[FakeEntryPoint("example-src", module, distribution="from-source")])
        backend = reg.backends["example-dense"].backend
        assert isinstance(backend, module.ExampleDenseBackend)
        protocol.check_backend(backend)
        assert isinstance(backend, protocol.Backend)
    finally:
        plugins.reload_plugins()


def test_the_readme_plugin_snippet_registers():
    """The plugin code of the README's "Writing a backend" section follows the protocol."""
    import types

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (snippet,) = [b for b in blocks if "def natten_mlx_register_backends" in b]
    module = types.ModuleType("readme_plugin")
    exec(compile(snippet, "README.md", "exec"), module.__dict__)
    try:
        reg = plugins.reload_plugins(entry_points=[FakeEntryPoint("readme", module)])
        (name,) = set(reg.backends) - {"pure"}
        protocol.check_backend(reg.backends[name].backend)
    finally:
        plugins.reload_plugins()


# ---- the pip extras the errors name --------------------------------------------------------------------
def _core_extras() -> dict:
    meta = tomllib.loads((ROOT / "packages" / "natten-mlx-core" / "pyproject.toml").read_text())
    return meta["project"].get("optional-dependencies", {})


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
@pytest.mark.parametrize("tier", sorted(KNOWN_TIERS))
def test_the_extra_an_unknown_tier_error_names_installs_that_tier(tier):
    """``unknown backend 'metal'; install it with: pip install "natten-mlx[metal]"`` must be true advice."""
    extra = re.fullmatch(r"natten-mlx\[(\w+)\]", KNOWN_TIERS[tier]).group(1)
    requirements = _core_extras().get(extra, [])
    assert any(r.replace(" ", "").startswith(f"natten-mlx-{tier}") for r in requirements), requirements
