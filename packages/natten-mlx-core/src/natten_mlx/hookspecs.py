"""Pluggy markers and the hook specification of natten-mlx. Every hook is documented here."""

from __future__ import annotations

import pluggy

PROJECT = "natten_mlx"
ENTRY_POINT_GROUP = "natten_mlx.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def natten_mlx_register_backends(register):
    """Register the backends this plugin provides.

    Call ``register(backend)`` once per backend object; the object follows
    :mod:`natten_mlx.protocol` (``name``, ``priority``, ``available()``, ``supports(problem)``,
    ``fused_forward`` and the optional backward and split ops). Called once, when
    ``natten_mlx`` is imported (or when :func:`natten_mlx.plugins.load_plugins` reloads).
    """
