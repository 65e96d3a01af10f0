"""Discovery of backend plugins through the ``natten_mlx.backends`` entry-point group.

The core's own pure backend registers through the same hook as any plugin. A plugin that fails
to import or to register is skipped with a RuntimeWarning naming the entry point and its
distribution; the import of ``natten_mlx`` never fails because of a plugin.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, hookimpl
from .protocol import check_backend
from .version import __version__

DISABLE_ENV = "NATTEN_MLX_DISABLE_PLUGINS"
BUILTIN = "natten_mlx.builtin"


@dataclass
class Registration:
    """One registered backend and where it came from."""

    backend: object
    plugin: str  # entry-point name, or natten_mlx.builtin
    distribution: str
    version: str


@dataclass
class Registry:
    """Registered backends by name, one status row per plugin, and the pluggy manager."""

    backends: dict[str, Registration] = field(default_factory=dict)
    plugins: list[dict] = field(default_factory=list)  # one row per plugin: name, distribution, status
    manager: pluggy.PluginManager | None = None


class _Builtin:
    """The core's hook implementation: registers the pure backend."""

    @staticmethod
    @hookimpl
    def natten_mlx_register_backends(register):
        from .backends.pure import PureBackend

        register(PureBackend())


def _core_version() -> str:
    try:
        return metadata.version("natten-mlx")
    except metadata.PackageNotFoundError:
        return __version__


def _distribution_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def _warn(message: str) -> None:
    warnings.warn(f"natten_mlx: {message}", RuntimeWarning, stacklevel=3)


# ---- the steps of discovery ----------------------------------------------------------------------
def installed_entry_points() -> list:
    """The entry points of the ``natten_mlx.backends`` group ([] when ``NATTEN_MLX_DISABLE_PLUGINS`` is set)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return []
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def remove_duplicates(entry_points) -> list:
    """Entry points with distinct names, the first of each kept; a repeated name is a RuntimeWarning
    (two installed distributions claiming one plugin name, or one installed twice)."""
    seen: dict[str, str] = {}
    unique = []
    for ep in entry_points:
        dist = _distribution_of(ep)[0]
        if ep.name in seen:
            _warn(f"plugin entry point {ep.name!r} of distribution {dist!r} duplicates the one of {seen[ep.name]!r}; "
                  "keeping the first")
            continue
        seen[ep.name] = dist
        unique.append(ep)
    return unique


def load_entry_points(registry: "Registry", entry_points) -> list[tuple]:
    """Import each entry point's module and register it with pluggy; a failure is a warning and a
    status row, never an exception. Returns ``(plugin name, module, distribution, version)`` rows."""
    sources = []
    for ep in entry_points:
        dist, version = _distribution_of(ep)
        row = {"name": ep.name, "distribution": dist, "version": version, "status": "ok"}
        registry.plugins.append(row)
        try:
            module = ep.load()
            registry.manager.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must never break the import
            row["status"] = f"failed to import: {type(exc).__name__}: {exc}"
            _warn(f"skipped plugin entry point {ep.name!r} of distribution {dist!r}: "
                  f"import failed with {type(exc).__name__}: {exc}")
            continue
        sources.append((ep.name, module, dist, version))
    return sources


def sort_backends(registrations) -> list:
    """Backend objects of ``registrations`` (Registration rows or backends), highest priority first;
    equal priorities keep registration order."""
    backends = [getattr(r, "backend", r) for r in registrations]
    return sorted(backends, key=lambda b: -b.priority)


def _ordered_hookimpls(manager: pluggy.PluginManager) -> list:
    """pluggy's hook implementations (it honours ``hookimpl(specname=...)``): the core first, then
    entry-point order, with tryfirst/trylast moving a plugin to the front/back."""
    return sorted(
        manager.hook.natten_mlx_register_backends.get_hookimpls(),
        key=lambda impl: (impl.plugin_name != BUILTIN, not impl.tryfirst, impl.trylast),
    )


def register_from_hooks(registry: "Registry", sources: list[tuple]) -> None:
    """Call each plugin's hook, one at a time, so that one failing plugin cannot stop the others;
    a plugin whose hook raises is rolled back whole (the first to register a name keeps it)."""
    rows = {row["name"]: row for row in registry.plugins}
    impls = _ordered_hookimpls(registry.manager)
    by_name = {name: (dist, version) for name, _, dist, version in sources}
    for plugin, _, dist, _ in sources:
        if not any(impl.plugin_name == plugin for impl in impls):
            rows[plugin]["status"] = "registers nothing: no natten_mlx_register_backends hook"
            _warn(f"plugin entry point {plugin!r} of distribution {dist!r} has no natten_mlx_register_backends hook")
    for impl in impls:
        plugin = impl.plugin_name
        dist, version = by_name[plugin]
        added: list[str] = []

        def register(backend, _plugin=plugin, _dist=dist, _version=version, _added=added):
            check_backend(backend)
            if backend.name in registry.backends:
                first = registry.backends[backend.name]
                _warn(f"backend name {backend.name!r} from plugin {_plugin!r} ({_dist}) is already registered by "
                      f"{first.plugin!r} ({first.distribution}); keeping the first")
                return
            registry.backends[backend.name] = Registration(backend, _plugin, _dist, _version)
            _added.append(backend.name)

        try:
            impl.function(register=register)
        except Exception as exc:
            for name in added:  # a plugin that failed is skipped whole
                del registry.backends[name]
            rows[plugin]["status"] = f"failed to register: {type(exc).__name__}: {exc}"
            _warn(f"skipped plugin entry point {plugin!r} of distribution {dist!r}: "
                  f"natten_mlx_register_backends raised {type(exc).__name__}: {exc}")


def build_engines(entry_points=None) -> Registry:
    """Build a registry: the built-in backend, then every entry point of the group.

    ``entry_points`` (an iterable of ``importlib.metadata.EntryPoint``-like objects) replaces the
    installed ones; tests use it to fake broken and duplicate plugins.
    """
    registry = Registry(manager=pluggy.PluginManager(PROJECT))
    registry.manager.add_hookspecs(hookspecs)
    registry.manager.register(_Builtin, name=BUILTIN)
    version = _core_version()
    registry.plugins.append({"name": BUILTIN, "distribution": "natten-mlx", "version": version, "status": "ok"})
    sources = [(BUILTIN, _Builtin, "natten-mlx", version)]
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        registry.plugins.append({"name": "*", "distribution": "-", "version": "-", "status": f"skipped: {DISABLE_ENV} is set"})
    else:
        eps = installed_entry_points() if entry_points is None else entry_points
        sources += load_entry_points(registry, remove_duplicates(eps))
    register_from_hooks(registry, sources)
    return registry


# the name of the step before it was split (tests and older plugins call it)
load_plugins = build_engines

_registry: Registry | None = None


def list_engines() -> Registry:
    """The registry of this process, built on first use (at ``import natten_mlx``) and cached."""
    global _registry
    if _registry is None:
        _registry = build_engines()
    return _registry


def refresh_engines(entry_points=None) -> Registry:
    """Discover again (after installing a plugin, or in tests with faked entry points)."""
    global _registry
    _registry = build_engines(entry_points)
    return _registry


registry = list_engines
reload_plugins = refresh_engines


def register_backend(backend, plugin: str = "runtime", distribution: str | None = None) -> None:
    """Register a backend object at run time (no entry point); tests and notebooks use this.

    ``plugin`` and ``distribution`` are what ``natten-mlx info`` shows for it (the distribution
    defaults to the backend's ``distribution`` attribute). ValueError when the name is taken."""
    check_backend(backend)
    reg = registry()
    if backend.name in reg.backends:
        raise ValueError(f"backend name {backend.name!r} is already registered by {reg.backends[backend.name].plugin!r}")
    dist = distribution or getattr(backend, "distribution", None) or "unknown"
    reg.backends[backend.name] = Registration(backend, plugin, dist, "unknown")


def unregister_backend(name: str) -> None:
    """Remove the backend ``name`` from this process' registry (ValueError when not registered)."""
    reg = registry()
    if name not in reg.backends:
        raise ValueError(f"backend {name!r} is not registered; registered: {sorted(reg.backends)}")
    del reg.backends[name]
