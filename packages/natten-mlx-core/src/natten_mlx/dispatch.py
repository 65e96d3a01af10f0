"""Choosing the backend of a call.

Order: the call's ``backend=`` argument, else the innermost :func:`use_backend` context of this
thread, else the ``NATTEN_BACKEND`` environment variable, else the highest-priority backend that
is available and supports the problem. A backend named by any of the first three must serve the
call or raise with its reason; the automatic choice is logged (debug) with every reason and
:func:`explain` returns the same.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .plugins import registry
from .problem import Problem

log = logging.getLogger("natten_mlx")

BACKEND_ENV = "NATTEN_BACKEND"
# the tiers of this project and the pip extra that installs each
KNOWN_TIERS = {
    "nanobind": "natten-mlx[nanobind]",
    "metal": "natten-mlx[metal]",
    "cuda": "natten-mlx[cuda]",
}

_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextmanager
def use_backend(name: str):
    """Within the block, calls of this thread use backend ``name`` (unless a call names another)."""
    if not isinstance(name, str):
        raise TypeError(f"use_backend(name={name!r}): name must be a str")
    get_backend(name)
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def list_backends() -> list:
    """Registered backend objects, highest priority first."""
    regs = registry().backends.values()
    return [r.backend for r in sorted(regs, key=lambda r: -r.backend.priority)]


def get_backend(name: str):
    regs = registry().backends
    if name in regs:
        return regs[name].backend
    installed = ", ".join(sorted(regs)) or "none"
    hint = f"; install it with: pip install \"{KNOWN_TIERS[name]}\"" if name in KNOWN_TIERS else ""
    extras = ", ".join(f"{n} ({extra})" for n, extra in KNOWN_TIERS.items() if n not in regs)
    more = f"; other known tiers: {extras}" if extras and not hint else ""
    raise ValueError(f"unknown backend {name!r}{hint}; installed backends: {installed}{more}")


def _reason(backend, problem: Problem) -> str | None:
    if problem.op != "fused" and not callable(getattr(backend, f"{problem.op}_forward", None)):
        return f"has no split {problem.op} op ({problem.op}_forward)"
    try:
        why = backend.available()
        if why is None:
            why = backend.supports(problem)
    except Exception as exc:  # a plugin's own failure is a reason, not a crash of the call
        why = f"raised {type(exc).__name__}: {exc}"
    return why


def requested_backend(backend: str | None) -> tuple[str | None, str]:
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend={backend!r} must be a backend name (str) or None")
        return backend, "backend= argument"
    if _stack():
        return _stack()[-1], "use_backend context"
    env = os.environ.get(BACKEND_ENV)
    if env:
        return env, f"{BACKEND_ENV} environment variable"
    return None, "automatic"


@dataclass(frozen=True)
class Explanation:
    """Why a call goes where it goes: ``chosen`` backend name, how it was chosen, and every
    backend's reason (None for one that could serve)."""

    chosen: str | None
    how: str
    reasons: dict
    problem: Problem

    def __str__(self) -> str:
        lines = [f"chosen: {self.chosen} ({self.how})"]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: {'can serve' if why is None else why}")
        return "\n".join(lines)


def explain_problem(problem: Problem, backend: str | None = None) -> Explanation:
    name, how = requested_backend(backend)
    reasons = {b.name: _reason(b, problem) for b in list_backends()}
    if name is not None:
        get_backend(name)
        chosen = name if reasons[name] is None else None
        return Explanation(chosen, how, reasons, problem)
    chosen = next((n for n, why in reasons.items() if why is None), None)
    return Explanation(chosen, how, reasons, problem)


def select(problem: Problem, backend: str | None = None):
    """The backend object for ``problem``; raises ValueError when the requested one cannot serve."""
    name, how = requested_backend(backend)
    if name is not None:
        chosen = get_backend(name)
        why = _reason(chosen, problem)
        if why is not None:
            raise ValueError(f"backend {name!r} (from the {how}) cannot serve this call: {why}")
        return chosen
    reasons = {}
    for candidate in list_backends():
        why = _reason(candidate, problem)
        if why is None:
            if reasons and log.isEnabledFor(logging.DEBUG):
                log.debug("natten_mlx: %s op uses %r; skipped: %s", problem.op, candidate.name, reasons)
            return candidate
        reasons[candidate.name] = why
    raise ValueError(f"no installed backend can serve this call: {reasons}")
