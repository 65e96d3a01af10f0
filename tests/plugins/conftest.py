"""Fixtures of the plugin tests: a registry that is always restored, and a clean selection environment.

Every test that changes the registry goes through ``fresh_registry`` / ``register`` (or calls
``reload_plugins()`` in a ``finally``), so the real registry — with whatever plugins are installed,
the example backend included — is back after each test; ``_isolated`` is the safety net.
The toy backends and the fake entry points live in ``plugin_toys.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from natten_mlx import plugins  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """The nox ``tests`` session forces NATTEN_BACKEND; these tests set it themselves. Afterwards the
    environment is restored and, if a test left the registry changed, the real one rediscovered."""
    monkeypatch.delenv("NATTEN_BACKEND", raising=False)
    monkeypatch.delenv("NATTEN_MLX_DISABLE_PLUGINS", raising=False)
    before = plugins.registry()
    snapshot = dict(before.backends)
    yield
    monkeypatch.undo()
    if plugins.registry() is not before or dict(before.backends) != snapshot:
        plugins.reload_plugins()


@pytest.fixture
def fresh_registry():
    """A registry with the built-in pure backend only; the real one is rediscovered afterwards."""
    try:
        yield plugins.reload_plugins(entry_points=[])
    finally:
        plugins.reload_plugins()


@pytest.fixture
def register():
    """``register(backend, ...)`` into a fresh registry (pure only, then these)."""
    plugins.reload_plugins(entry_points=[])
    try:
        yield plugins.register_backend
    finally:
        plugins.reload_plugins()
