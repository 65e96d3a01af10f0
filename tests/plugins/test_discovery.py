"""Discovery of plugins: faked entry points for every way a plugin can go wrong, real entry points
from a distribution laid on ``sys.path``, the disable switch, and run-time registration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import mlx.core as mx
import natten_mlx
import pytest
from natten_mlx import hookimpl, plugins
from natten_mlx.plugins import BUILTIN, DISABLE_ENV
from plugin_toys import DenseToy, FakeEntryPoint, plugin_module

ISSUES = "see tests/plugins/CORE_ISSUES.md"


def _row(registry, name):
    return next(r for r in registry.plugins if r["name"] == name)


def _runtime_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def _still_computes():
    """natten_mlx works after discovery: an automatic call runs and gives a finite output."""
    q = mx.random.normal((1, 9, 2, 4), key=mx.random.key(0))
    out = natten_mlx.na1d(q, q, q, kernel_size=3)
    assert out.shape == (1, 9, 2, 4) and bool(mx.isfinite(out).all())


# ---- a plugin that raises on import ---------------------------------------------------------------
@pytest.mark.parametrize("error", [ImportError("No module named 'missing_kernel_lib'"), RuntimeError("no device"),
                                   SyntaxError("invalid syntax")], ids=lambda e: type(e).__name__)
def test_plugin_raising_on_import_is_skipped_with_a_warning(error):
    before = DenseToy("before-ep")
    after = DenseToy("after-ep")
    eps = [
        FakeEntryPoint("good-one", plugin_module("good_one", before), distribution="good-dist"),
        FakeEntryPoint("broken", error, distribution="broken-dist", version="0.0.1"),
        FakeEntryPoint("good-two", plugin_module("good_two", after), distribution="good-dist"),
    ]
    try:
        with pytest.warns(RuntimeWarning) as record:
            reg = plugins.reload_plugins(entry_points=eps)
        messages = _runtime_warnings(record)
        assert len(messages) == 1, messages
        assert "'broken'" in messages[0] and "'broken-dist'" in messages[0]
        assert type(error).__name__ in messages[0] and str(error.args[0]) in messages[0]
        assert set(reg.backends) == {"pure", "before-ep", "after-ep"}
        assert _row(reg, "broken")["status"].startswith("failed to import")
        assert _row(reg, "good-one")["status"] == _row(reg, "good-two")["status"] == "ok"
        assert [b.name for b in natten_mlx.list_backends()] == ["before-ep", "after-ep", "pure"]
        _still_computes()
    finally:
        plugins.reload_plugins()


# ---- a plugin that raises inside the hook ---------------------------------------------------------
def test_plugin_raising_inside_the_hook_is_skipped_with_a_warning():
    @hookimpl
    def natten_mlx_register_backends(register):
        raise KeyError("kernel table missing")

    good = DenseToy("good")
    eps = [
        FakeEntryPoint("raiser", plugin_module("raiser", hook=natten_mlx_register_backends), distribution="raiser-dist"),
        FakeEntryPoint("good", plugin_module("good", good), distribution="good-dist"),
    ]
    try:
        with pytest.warns(RuntimeWarning) as record:
            reg = plugins.reload_plugins(entry_points=eps)
        messages = _runtime_warnings(record)
        assert len(messages) == 1, messages
        assert "'raiser'" in messages[0] and "'raiser-dist'" in messages[0]
        assert "natten_mlx_register_backends raised KeyError" in messages[0] and "kernel table missing" in messages[0]
        assert set(reg.backends) == {"pure", "good"}
        assert reg.backends["good"].backend is good
        assert _row(reg, "raiser")["status"].startswith("failed to register: KeyError")
        _still_computes()
    finally:
        plugins.reload_plugins()


def test_registering_a_malformed_backend_fails_that_plugin_only():
    class NoForward:
        name, priority = "no-forward", 1

        def available(self):
            return None

        def supports(self, problem):
            return None

    class BadPriority(DenseToy):
        priority = "high"

    eps = [
        FakeEntryPoint("lacks", plugin_module("lacks", NoForward()), distribution="lacks-dist"),
        FakeEntryPoint("badprio", plugin_module("badprio", BadPriority("bad-priority")), distribution="prio-dist"),
        FakeEntryPoint("good", plugin_module("good", DenseToy("good")), distribution="good-dist"),
    ]
    try:
        with pytest.warns(RuntimeWarning) as record:
            reg = plugins.reload_plugins(entry_points=eps)
        messages = _runtime_warnings(record)
        assert len(messages) == 2, messages
        assert "'lacks'" in messages[0] and "'lacks-dist'" in messages[0] and "lacks fused_forward" in messages[0]
        assert "'badprio'" in messages[1] and "'prio-dist'" in messages[1] and "priority='high'" in messages[1]
        assert set(reg.backends) == {"pure", "good"}
    finally:
        plugins.reload_plugins()


def test_hook_with_a_signature_the_spec_lacks_is_skipped_with_a_warning():
    @hookimpl
    def natten_mlx_register_backends(register, device):
        register(DenseToy("never"))

    eps = [FakeEntryPoint("wrongsig", plugin_module("wrongsig", hook=natten_mlx_register_backends), distribution="ws-dist")]
    try:
        with pytest.warns(RuntimeWarning, match=r"(?s)'wrongsig'.*'ws-dist'.*device"):
            reg = plugins.reload_plugins(entry_points=eps)
        assert set(reg.backends) == {"pure"}
    finally:
        plugins.reload_plugins()



def test_plugin_whose_hook_raises_registers_nothing():
    @hookimpl
    def natten_mlx_register_backends(register):
        register(DenseToy("half"))
        raise RuntimeError("second backend failed")

    eps = [FakeEntryPoint("half", plugin_module("half", hook=natten_mlx_register_backends))]
    try:
        with pytest.warns(RuntimeWarning, match="skipped plugin entry point 'half'"):
            reg = plugins.reload_plugins(entry_points=eps)
        assert set(reg.backends) == {"pure"}
    finally:
        plugins.reload_plugins()



def test_hookimpl_with_specname_registers():
    @hookimpl(specname="natten_mlx_register_backends")
    def provide(register):
        register(DenseToy("by-specname"))

    module = plugin_module("specname_plugin", hook=lambda register: None)
    del module.natten_mlx_register_backends
    module.provide = provide
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            reg = plugins.reload_plugins(entry_points=[FakeEntryPoint("specname", module)])
        assert "by-specname" in reg.backends
    finally:
        plugins.reload_plugins()


# ---- duplicates and modules without the hook ------------------------------------------------------
def test_duplicate_backend_name_warns_and_the_first_keeps_it():
    first, second = DenseToy("dup", priority=1), DenseToy("dup", priority=99)
    eps = [
        FakeEntryPoint("first", plugin_module("first", first), distribution="first-dist"),
        FakeEntryPoint("second", plugin_module("second", second), distribution="second-dist"),
    ]
    try:
        with pytest.warns(RuntimeWarning) as record:
            reg = plugins.reload_plugins(entry_points=eps)
        messages = _runtime_warnings(record)
        assert len(messages) == 1, messages
        for part in ("'dup'", "'second'", "second-dist", "'first'", "first-dist", "keeping the first"):
            assert part in messages[0]
        assert reg.backends["dup"].backend is first
        assert reg.backends["dup"].plugin == "first"
        assert natten_mlx.get_backend("dup") is first
        # the second plugin loaded fine; only its duplicate was refused
        assert _row(reg, "second")["status"] == "ok"
    finally:
        plugins.reload_plugins()


def test_plugin_cannot_take_the_builtin_pure_name():
    class Impostor(DenseToy):
        pass

    impostor = Impostor("pure", priority=1000)
    try:
        with pytest.warns(RuntimeWarning, match=r"'pure'.*already registered by 'natten_mlx.builtin'"):
            reg = plugins.reload_plugins(entry_points=[FakeEntryPoint("impostor", plugin_module("impostor", impostor))])
        assert reg.backends["pure"].plugin == BUILTIN
        assert natten_mlx.get_backend("pure") is not impostor
    finally:
        plugins.reload_plugins()


def test_module_without_the_hook_warns_and_registers_nothing():
    import types

    empty = types.ModuleType("no_hook_here")
    eps = [
        FakeEntryPoint("nohook", empty, distribution="nohook-dist"),
        FakeEntryPoint("good", plugin_module("good", DenseToy("good"))),
    ]
    try:
        with pytest.warns(RuntimeWarning, match=r"'nohook'.*'nohook-dist'.*no natten_mlx_register_backends hook"):
            reg = plugins.reload_plugins(entry_points=eps)
        assert set(reg.backends) == {"pure", "good"}
        assert _row(reg, "nohook")["status"].startswith("registers nothing")
    finally:
        plugins.reload_plugins()


def test_entry_point_without_distribution_is_reported_as_unknown():
    ep = FakeEntryPoint("orphan", RuntimeError("broken"))
    ep.dist = None
    try:
        with pytest.warns(RuntimeWarning, match=r"'orphan' of distribution 'unknown'"):
            reg = plugins.reload_plugins(entry_points=[ep])
        assert _row(reg, "orphan")["distribution"] == "unknown"
    finally:
        plugins.reload_plugins()


# ---- the disable switch ---------------------------------------------------------------------------
def test_disable_switch_skips_discovery(monkeypatch):
    ep = FakeEntryPoint("never-loaded", plugin_module("never", DenseToy("never")))
    monkeypatch.setenv(DISABLE_ENV, "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            reg = plugins.reload_plugins(entry_points=[ep])
        assert ep.loads == 0
        assert set(reg.backends) == {"pure"}
        assert [b.name for b in natten_mlx.list_backends()] == ["pure"]
        assert any(r["status"] == f"skipped: {DISABLE_ENV} is set" for r in reg.plugins)
        _still_computes()
    finally:
        monkeypatch.delenv(DISABLE_ENV)
        plugins.reload_plugins()


@pytest.mark.parametrize("value", ["", "0"])
def test_disable_switch_off_values_keep_discovery(monkeypatch, value):
    ep = FakeEntryPoint("loaded", plugin_module("loaded", DenseToy("loaded")))
    monkeypatch.setenv(DISABLE_ENV, value)
    try:
        reg = plugins.reload_plugins(entry_points=[ep])
        assert ep.loads == 1 and "loaded" in reg.backends
    finally:
        monkeypatch.delenv(DISABLE_ENV)
        plugins.reload_plugins()


# ---- run-time registration ------------------------------------------------------------------------
def test_register_and_unregister_at_run_time(fresh_registry):
    toy = DenseToy("runtime-toy")
    natten_mlx.register_backend(toy, distribution="my-notebook")
    reg = plugins.registry()
    assert reg.backends["runtime-toy"].backend is toy
    assert reg.backends["runtime-toy"].plugin == "runtime"
    assert reg.backends["runtime-toy"].distribution == "my-notebook"
    with pytest.raises(ValueError, match="'runtime-toy' is already registered"):
        natten_mlx.register_backend(DenseToy("runtime-toy"))
    with pytest.raises(TypeError, match="lacks"):
        natten_mlx.register_backend(object())
    with pytest.raises(TypeError, match="priority"):
        natten_mlx.register_backend(DenseToy("boolprio", priority=True))
    natten_mlx.unregister_backend("runtime-toy")
    assert "runtime-toy" not in plugins.registry().backends
    with pytest.raises(ValueError, match=r"'runtime-toy' is not registered; registered: \['pure'\]"):
        natten_mlx.unregister_backend("runtime-toy")


def test_dataclass_backend_can_be_called(fresh_registry):
    from dataclasses import dataclass

    @dataclass
    class DataclassBackend:
        name: str = "dataclass-toy"
        priority: int = 5

        def available(self):
            return None

        def supports(self, problem):
            return None

        def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
            return DenseToy().fused_forward(problem, query, key, value, additional_keys, additional_values, rpb)

    natten_mlx.register_backend(DataclassBackend())
    q = mx.random.normal((1, 9, 2, 4), key=mx.random.key(0))
    natten_mlx.na1d(q, q, q, kernel_size=3, backend="dataclass-toy")


# ---- real entry points: a distribution laid on sys.path ---------------------------------------------
def _lay_distribution(root, dist: str, module: str, source: str, entry: str | None = None):
    """A minimal installed distribution under ``root``: ``<dist>.dist-info`` with an entry point in
    ``natten_mlx.backends`` naming ``module``, and the module's source."""
    info = root / f"{dist.replace('-', '_')}-0.7.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.7.0\n")
    (info / "entry_points.txt").write_text(f"[natten_mlx.backends]\n{entry or module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


BROKEN_SOURCE = """
    import natten_mlx_missing_dependency  # noqa: F401
"""

GOOD_SOURCE = """
    from natten_mlx import hookimpl
    from natten_mlx.backends.pure import PureBackend


    class LaidBackend:
        # the pure backend's forward under another name; the distribution comes from the entry point

        name = "laid-out"
        priority = -1

        def available(self):
            return None

        def supports(self, problem):
            return None if problem.op == "fused" else "fused op only"

        def fused_forward(self, problem, *arrays, **kw):
            return PureBackend().fused_forward(problem, *arrays, **kw)


    @hookimpl
    def natten_mlx_register_backends(register):
        register(LaidBackend())
"""


@pytest.fixture
def laid_out(tmp_path):
    _lay_distribution(tmp_path, "natten-mlx-broken-plugin", "natten_mlx_broken_plugin_tmp", BROKEN_SOURCE, "broken")
    _lay_distribution(tmp_path, "natten-mlx-laid-plugin", "natten_mlx_laid_plugin_tmp", GOOD_SOURCE, "laid")
    return tmp_path


def test_real_entry_points_are_discovered_and_a_broken_one_skipped(laid_out, monkeypatch):
    monkeypatch.syspath_prepend(str(laid_out))
    try:
        with pytest.warns(RuntimeWarning) as record:
            reg = plugins.reload_plugins()
        messages = [m for m in _runtime_warnings(record) if "natten-mlx-broken-plugin" in m]
        assert len(messages) == 1
        assert "'broken'" in messages[0] and "ModuleNotFoundError" in messages[0]
        assert "natten_mlx_missing_dependency" in messages[0]
        laid = reg.backends["laid-out"]
        assert (laid.plugin, laid.distribution, laid.version) == ("laid", "natten-mlx-laid-plugin", "0.7.0")
        assert _row(reg, "laid") == {"name": "laid", "distribution": "natten-mlx-laid-plugin", "version": "0.7.0",
                                     "status": "ok"}
        _still_computes()
    finally:
        monkeypatch.undo()
        plugins.reload_plugins()
    assert "laid-out" not in plugins.registry().backends


def _core_path() -> str:
    """The directory holding the natten_mlx package this test process imported."""
    return os.path.dirname(os.path.dirname(os.path.abspath(natten_mlx.__file__)))


IMPORT_PROBE = """
import sys, warnings
warnings.simplefilter("always")
import natten_mlx
print("IMPORTED", file=sys.stderr, flush=True)
print("BACKENDS", sorted(b.name for b in natten_mlx.list_backends()), file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def import_with_broken_plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("laid")
    _lay_distribution(root, "natten-mlx-broken-plugin", "natten_mlx_broken_plugin_tmp", BROKEN_SOURCE, "broken")
    _lay_distribution(root, "natten-mlx-laid-plugin", "natten_mlx_laid_plugin_tmp", GOOD_SOURCE, "laid")
    env = {k: v for k, v in os.environ.items() if k not in ("NATTEN_BACKEND", DISABLE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(root), _core_path()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_import_never_fails_because_of_a_plugin(import_with_broken_plugin):
    run = import_with_broken_plugin
    assert run.returncode == 0, run.stderr
    assert "IMPORTED" in run.stderr
    assert "skipped plugin entry point 'broken' of distribution 'natten-mlx-broken-plugin'" in run.stderr
    backends = next(line for line in run.stderr.splitlines() if line.startswith("BACKENDS "))
    assert "'laid-out'" in backends and "'pure'" in backends



def test_discovery_happens_at_import(import_with_broken_plugin):
    stderr = import_with_broken_plugin.stderr
    warned = stderr.find("skipped plugin entry point 'broken'")
    assert 0 <= warned < stderr.find("IMPORTED")
