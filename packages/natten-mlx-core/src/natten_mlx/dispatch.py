"""Choosing the backend of a call.

Order: the call's ``backend=`` argument, else the innermost :func:`use_backend` context of this
thread, else the ``NATTEN_BACKEND`` environment variable, else the highest-priority backend that
is available and supports the problem. Each of the first three names one backend (which must serve
the call or the call raises with its reason) or an ordered list (the first that serves wins; the
call raises with every reason when none does). Passing over a backend is logged (debug) with its
reason, and :func:`explain_problem` returns the same account.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .plugins import registry, sort_backends
from .problem import Problem
from .protocol import differentiation_of
from .version import __version__

log = logging.getLogger("natten_mlx")

BACKEND_ENV = "NATTEN_BACKEND"
# the tiers of this project and the pip extra that installs each (its distribution is natten-mlx-<tier>)
KNOWN_TIERS = {
    "nanobind": "natten-mlx[nanobind]",
    "metal": "natten-mlx[metal]",
    "cuda": "natten-mlx[cuda]",
}

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _is_backend_object(x) -> bool:
    return not isinstance(x, str) and hasattr(x, "fused_forward") and hasattr(x, "name")


def parse_backends(spec, what: str = "backend") -> tuple:
    """Normalise a backend request into a tuple of names and backend objects (None stays None).

    ``spec``: a name, a comma-separated ordered list (``"cuda,pure"``), a sequence of names and/or
    backend objects, or a backend object. Names are checked against the registry (ValueError naming
    an unknown one and what is installed)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")]
        if not all(items):
            raise ValueError(f"{what}={spec!r}: an empty name in the list; separate backend names by single commas")
    elif _is_backend_object(spec):
        items = [spec]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
        if not items:
            raise ValueError(f"{what}={spec!r}: an empty list names no backend")
    else:
        raise TypeError(
            f"{what}={spec!r} must be a backend name, a comma-separated list of names, a sequence of names or "
            "backend objects, or a backend object"
        )
    for item in items:
        if isinstance(item, str):
            get_backend(item)
        elif not _is_backend_object(item):
            raise TypeError(f"{what}={spec!r}: {item!r} is neither a backend name nor a backend object")
    return tuple(items)


def _configured(spec: tuple, options: dict, what: str) -> tuple:
    """Apply ``options`` to the one backend of ``spec`` through its ``configure``."""
    if not options:
        return spec
    if len(spec) != 1:
        raise TypeError(
            f"{what}: options {sorted(options)} apply to one backend, not to the list {_names(spec)}; configure each "
            "and pass the objects, e.g. use_backend([get_backend('cuda').configure(...), 'pure'])"
        )
    backend = get_backend(spec[0]) if isinstance(spec[0], str) else spec[0]
    configure = getattr(backend, "configure", None)
    if not callable(configure):
        raise TypeError(f"backend {backend.name!r} takes no options (it has no configure()); got {sorted(options)}")
    return (configure(**options),)


def _names(spec) -> list[str]:
    return [s if isinstance(s, str) else s.name for s in spec]


@contextmanager
def use_backend(name_or_list, **options):
    """Within the block, calls of this thread use these backends (unless a call names others).

    ``name_or_list``: a backend name, a comma-separated ordered list (``"cuda,pure"``: the first
    that serves each call), a sequence of names or backend objects, or a backend object.
    ``options`` go to the one named backend's ``configure`` (``use_backend("pure", strategy="gather")``,
    ``use_backend("cuda", tile=(8, 8))``); unknown options are a TypeError."""
    spec = _configured(parse_backends(name_or_list, "use_backend"), options, "use_backend")
    _stack().append(spec)
    try:
        yield
    finally:
        _stack().pop()


def configure(name: str, **options):
    """The backend ``name`` with ``options`` applied through its ``configure`` (a backend object to
    pass as ``backend=`` or to :func:`use_backend`): ``configure("pure", strategy="tiled")``."""
    return _configured((name,), options, f"configure({name!r})")[0]


def list_backends() -> list:
    """Registered backend objects, highest priority first."""
    return sort_backends(registry().backends.values())


def get_backend(name: str):
    """The registered backend called ``name``; ValueError naming what is installed and how to get more."""
    regs = registry().backends
    if name in regs:
        return regs[name].backend
    installed = ", ".join(sorted(regs)) or "none"
    hint = (f"; it is the distribution natten-mlx-{name}: from a clone, pip install ./packages/natten-mlx-{name}; "
            f'from a wheelhouse (nox -s build), pip install --find-links dist "{KNOWN_TIERS[name]}=={__version__}"'
            if name in KNOWN_TIERS else "")
    extras = ", ".join(f"{n} ({extra})" for n, extra in KNOWN_TIERS.items() if n not in regs)
    more = f"; other known tiers: {extras}" if extras and not hint else ""
    raise ValueError(f"unknown backend {name!r}{hint}; installed backends: {installed}{more}")


def _reason(backend, problem: Problem) -> str | None:
    """None when ``backend`` can serve ``problem``, else why not (its own words, or what it lacks)."""
    if problem.op != "fused" and not callable(getattr(backend, f"{problem.op}_forward", None)):
        return f"has no split {problem.op} op ({problem.op}_forward)"
    try:
        why = backend.available()
        if why is None:
            why = backend.supports(problem)
    except Exception as exc:  # a plugin's own failure is a reason, not a crash of the call
        why = f"raised {type(exc).__name__}: {exc}"
    return why


def requested_backend(backend=None) -> tuple[tuple | None, str]:
    """``(spec, how)``: the requested backends (names/objects, or None for automatic) and where the
    request came from."""
    if backend is not None:
        return parse_backends(backend), "backend= argument"
    if _stack():
        return _stack()[-1], "use_backend context"
    env = os.environ.get(BACKEND_ENV)
    if env:
        return parse_backends(env, BACKEND_ENV), f"{BACKEND_ENV} environment variable"
    return None, "automatic"


@dataclass(frozen=True)
class Explanation:
    """Why a call goes where it goes.

    chosen:   name of the backend that serves the call, or None when none can.
    how:      where the choice came from ("backend= argument", "use_backend context",
              "NATTEN_BACKEND environment variable", "automatic").
    reasons:  every registered backend's reason (None for one that could serve), plus those of
              requested backend objects.
    problem:  the validated :class:`~natten_mlx.problem.Problem`.
    requested: the requested backend names in order (empty for automatic).
    differentiation: how the chosen backend is differentiated ("backward", "primitive", "pure").
    """

    chosen: str | None
    how: str
    reasons: dict
    problem: Problem
    requested: tuple = ()
    differentiation: str | None = None
    backend: object = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        head = f"chosen: {self.chosen} ({self.how}"
        if self.requested:
            head += f": {', '.join(self.requested)}"
        head += ")"
        if self.chosen is not None:
            head += f"; device {self.problem.device}; gradients: {_DIFF_WORDS[self.differentiation]}"
        lines = [head]
        for name, why in self.reasons.items():
            lines.append(f"  {name}: {'can serve' if why is None else why}")
        return "\n".join(lines)


_DIFF_WORDS = {
    "backward": "its own backward",
    "primitive": "its MLX primitives' vjp",
    "pure": "the pure backend's backward",
    None: "-",
}


def _resolve(spec: tuple, problem: Problem):
    """``(chosen object or None, reasons of the requested in order)``."""
    reasons = {}
    for item in spec:
        backend = get_backend(item) if isinstance(item, str) else item
        why = _reason(backend, problem)
        if why is None:
            return backend, reasons
        reasons[backend.name] = why
    return None, reasons


def explain_problem(problem: Problem, backend=None) -> Explanation:
    """The :class:`Explanation` of dispatching ``problem`` (``backend`` as the ops' argument)."""
    spec, how = requested_backend(backend)
    reasons = {b.name: _reason(b, problem) for b in list_backends()}
    if spec is not None:
        chosen, passed = _resolve(spec, problem)
        reasons.update(passed)
        if chosen is not None:
            reasons[chosen.name] = None
        return Explanation(None if chosen is None else chosen.name, how, reasons, problem, tuple(_names(spec)),
                           None if chosen is None else differentiation_of(chosen), chosen)
    chosen = next((b for b in list_backends() if reasons[b.name] is None), None)
    return Explanation(None if chosen is None else chosen.name, how, reasons, problem, (),
                       None if chosen is None else differentiation_of(chosen), chosen)


def select(problem: Problem, backend=None):
    """The backend object for ``problem``; raises ValueError when the requested one(s) cannot serve."""
    spec, how = requested_backend(backend)
    if spec is not None:
        chosen, reasons = _resolve(spec, problem)
        if chosen is None:
            if len(spec) == 1:
                name = _names(spec)[0]
                raise ValueError(f"backend {name!r} (from the {how}) cannot serve this call: {reasons[name]}")
            raise ValueError(f"none of the backends {_names(spec)} (from the {how}) can serve this call: {reasons}")
        if reasons and log.isEnabledFor(logging.DEBUG):
            log.debug("natten_mlx: %s op uses %r (from the %s); passed over: %s", problem.op, chosen.name, how, reasons)
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
