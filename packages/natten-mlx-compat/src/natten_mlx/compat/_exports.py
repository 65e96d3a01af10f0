"""How the era modules bind their public names: each list of names is written once.

``reexport`` binds names of a shared module in an era module (which puts the returned list in its
``__all__``); ``named`` names a function made by a per-dimension factory (``na1d``, ``na2d``, ...)
so that it reads, and is found by ``pickle``, as if defined at module level under that name.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

F = TypeVar("F", bound=Callable)


def reexport(namespace: dict, source, names: Iterable[str]) -> list[str]:
    """Bind ``source``'s ``names`` in ``namespace`` (a module's ``globals()``); returns the names."""
    names = list(names)
    namespace.update({name: getattr(source, name) for name in names})
    return names


def named(name: str, function: F, module: str | None = None) -> F:
    """``function`` with ``__name__``/``__qualname__`` ``name`` (and ``__module__``, when given)."""
    function.__name__ = function.__qualname__ = name
    if module is not None:
        function.__module__ = module
    return function
