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

DISABLE_ENV = "NATTEN_MLX_DISABLE_PLUGINS"
BUILTIN = "natten_mlx.builtin"


@dataclass
class Registration:
    backend: object
    plugin: str  # entry-point name, or natten_mlx.builtin
    distribution: str
    version: str


@dataclass
class Registry:
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
        from . import __version__

        return __version__


def _distribution_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def load_plugins(entry_points=None) -> Registry:
    """Build a registry: the built-in backend, then every entry point of the group.

    ``entry_points`` (an iterable of ``importlib.metadata.EntryPoint``-like objects) replaces the
    installed ones; tests use it to fake broken and duplicate plugins.
    """
    registry = Registry()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    registry.manager = pm
    sources = [(BUILTIN, _Builtin, "natten-mlx", _core_version())]
    pm.register(_Builtin, name=BUILTIN)
    registry.plugins.append({"name": BUILTIN, "distribution": "natten-mlx", "version": _core_version(), "status": "ok"})

    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        registry.plugins.append({"name": "*", "distribution": "-", "version": "-", "status": f"skipped: {DISABLE_ENV} is set"})
    else:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points
        for ep in eps:
            dist, version = _distribution_of(ep)
            row = {"name": ep.name, "distribution": dist, "version": version, "status": "ok"}
            registry.plugins.append(row)
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # a broken plugin must never break the import
                row["status"] = f"failed to import: {type(exc).__name__}: {exc}"
                warnings.warn(
                    f"natten_mlx: skipped plugin entry point {ep.name!r} of distribution {dist!r}: "
                    f"import failed with {type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            sources.append((ep.name, module, dist, version))

    rows = {row["name"]: row for row in registry.plugins}
    # pluggy's own view of the implementations (it honours hookimpl(specname=...)), called one by
    # one so that one failing plugin cannot stop the others: the core first, then entry-point order,
    # with tryfirst/trylast moving a plugin to the front/back (the first to register a name keeps it)
    impls = sorted(
        pm.hook.natten_mlx_register_backends.get_hookimpls(),
        key=lambda impl: (impl.plugin_name != BUILTIN, not impl.tryfirst, impl.trylast),
    )
    by_name = {name: (dist, version) for name, _, dist, version in sources}
    for plugin, _, dist, _ in sources:
        if not any(impl.plugin_name == plugin for impl in impls):
            rows[plugin]["status"] = "registers nothing: no natten_mlx_register_backends hook"
            warnings.warn(
                f"natten_mlx: plugin entry point {plugin!r} of distribution {dist!r} has no "
                "natten_mlx_register_backends hook",
                RuntimeWarning,
                stacklevel=2,
            )
    for impl in impls:
        plugin = impl.plugin_name
        dist, version = by_name[plugin]
        added: list[str] = []

        def register(backend, _plugin=plugin, _dist=dist, _version=version, _added=added):
            check_backend(backend)
            if backend.name in registry.backends:
                first = registry.backends[backend.name]
                warnings.warn(
                    f"natten_mlx: backend name {backend.name!r} from plugin {_plugin!r} ({_dist}) is already "
                    f"registered by {first.plugin!r} ({first.distribution}); keeping the first",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            registry.backends[backend.name] = Registration(backend, _plugin, _dist, _version)
            _added.append(backend.name)

        try:
            impl.function(register=register)
        except Exception as exc:
            for name in added:  # a plugin that failed is skipped whole
                del registry.backends[name]
            rows[plugin]["status"] = f"failed to register: {type(exc).__name__}: {exc}"
            warnings.warn(
                f"natten_mlx: skipped plugin entry point {plugin!r} of distribution {dist!r}: "
                f"natten_mlx_register_backends raised {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    return registry


_registry: Registry | None = None


def registry() -> Registry:
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def reload_plugins(entry_points=None) -> Registry:
    """Discover again (after installing a plugin, or in tests with faked entry points)."""
    global _registry
    _registry = load_plugins(entry_points)
    return _registry


def register_backend(backend, plugin: str = "runtime", distribution: str | None = None) -> None:
    """Register a backend object at run time (no entry point); tests and notebooks use this."""
    check_backend(backend)
    reg = registry()
    if backend.name in reg.backends:
        raise ValueError(f"backend name {backend.name!r} is already registered by {reg.backends[backend.name].plugin!r}")
    dist = distribution or getattr(backend, "distribution", None) or "unknown"
    reg.backends[backend.name] = Registration(backend, plugin, dist, "unknown")


def unregister_backend(name: str) -> None:
    reg = registry()
    if name not in reg.backends:
        raise ValueError(f"backend {name!r} is not registered; registered: {sorted(reg.backends)}")
    del reg.backends[name]

