"""The backend protocol (v2): what a plugin's backend object provides. This docstring is the contract;
a tier author needs no other file.

A plugin registers backends through the ``natten_mlx_register_backends(register)`` hook
(:mod:`natten_mlx.hookspecs`; entry-point group ``natten_mlx.backends``). The core validates every
call and hands a backend only a :class:`~natten_mlx.problem.Problem` (frozen, hashable, no arrays,
no streams) and arrays. Layouts are heads-last: query ``[B, *spatial, H, D]``, key
``[B, *kv_spatial, H_kv, D]``, value ``[B, *kv_spatial, H_kv, D_v]``, ``H % H_kv == 0`` (query head
``h`` reads key/value head ``h // (H // H_kv)``); additional keys/values ``[B, N_extra, H_kv, D|D_v]``;
rpb ``[H, 2K_1-1, ...]`` (never together with causal masking).

Problem
-------
``op`` ("fused", "qk", "av"), ``batch`` (>= 1 when a backend sees it), ``spatial``, ``heads``,
``kv_heads``, ``head_dim``, ``value_head_dim``, ``kernel_size``, ``stride``, ``dilation``,
``is_causal`` (tuples, one per axis), ``scale``, ``dtype``, ``num_extra``, ``has_rpb``,
``return_lse``, and:

=================  ======================================================  ==========================
field              meaning                                                 default
=================  ======================================================  ==========================
``device``         ``"cpu"`` or ``"gpu"``: the device type of the stream    from ``stream=`` or
                   the call runs on                                        ``mx.default_device()``
``domain``         global spatial extent the window rules apply to        ``spatial``
``query_offset``   global coordinate of local query 0, per axis           zeros
``kv_spatial``     spatial shape of the local key/value slab              ``spatial``
``kv_offset``      global coordinate of local key 0, per axis             zeros
=================  ======================================================  ==========================

``is_subdomain`` is True when any of the last four differ from their defaults. Then query/out/lse
are ``[B, *spatial, H, ...]``, key/value ``[B, *kv_spatial, H_kv, ...]``; local query ``i`` is global
``i + query_offset``, local key ``j`` is global ``j + kv_offset`` along each axis. Windows are those of
the global ``domain`` (``window.h`` / :mod:`natten_mlx.windows` in global coordinates), and the core's
validation guarantees every slot of every local query's window lies inside the key slab. rpb
columns are unchanged. A tier that does not serve sub-domains says so in ``supports()`` ("sub-domain
problems (sharded attention) are not implemented"); pure serves them. ``problem.geometry`` is the
nine-tuple every table function of :mod:`natten_mlx.geometry` takes. ``num_tokens`` counts queries,
``kv_tokens`` keys.

Required
--------
``name: str``
    Unique, lower-case; what ``backend=``, ``use_backend`` and ``NATTEN_BACKEND`` name.
``priority: int``
    Higher wins in automatic selection; see :data:`PRIORITIES`.
``available() -> str | None``
    None when the backend can run in this process, else why not (missing device, library, ...).
``supports(problem) -> str | None``
    None when the backend computes this problem exactly, else a human-readable reason. Called for
    every dispatch: keep it cheap. Refuse the wrong device here (nanobind serves ``device == "cpu"``
    only; cuda and metal ``device == "gpu"`` only), sub-domains you do not serve, and ``op in ("qk",
    "av")`` if you have no split ops.
``fused_forward(problem, query, key, value, additional_keys=None, additional_values=None, rpb=None)``
    ``-> (out, lse)``: out ``[B, *spatial, H, D_v]`` in ``problem.dtype``; lse ``[B, *spatial, H]``
    float32, natural log. **Return the lse always**, also when ``problem.return_lse`` is False: the
    core keeps it and hands it to the backward. (The only exception is a backend whose own backward
    does not read it; pure skips it on its fused-SDPA path.)

Optional
--------
``differentiation: str``, one of :data:`DIFFERENTIATION`:

- ``"backward"``: the backend has ``fused_backward(record)`` (and ``qk_backward``/``av_backward``
  if it has split ops); the core wraps the forward in ``mx.custom_function`` and calls them. A
  split op without its backward gets the pure backend's.
- ``"primitive"``: ``fused_forward`` (and the split ops) return outputs of MLX primitives that
  implement ``vjp`` themselves (a nanobind ``Primitive``); the core calls the op directly, with no
  ``custom_function``, and MLX's autodiff reaches the primitive's vjp. No backward methods needed.
- ``"pure"``: the core uses the pure backend's backward (recomputing from the same inputs).

Default when absent: ``"backward"`` if ``fused_backward`` exists, else ``"pure"``.

``fused_backward(record: BackwardRecord) -> dict[str, mx.array]``
    Gradients by input name (``"query"``, ``"key"``, ``"value"``, ``"additional_keys"``,
    ``"additional_values"``, ``"rpb"``), each in its input's shape and dtype; an input that is None
    in the record gets no entry (or None). ``record.d_lse`` is None when the caller did not ask for
    the lse.
``qk_forward(problem, query, key, additional_keys=None, rpb=None) -> scores``
    ``[B, *spatial, H, Kt (+N_extra)]`` in ``problem.dtype``, ``Kt = prod(kernel_size)``: scaled by
    ``problem.scale``, rpb added, invalid causal slots ``-inf``, slots row-major over the per-axis
    window slots (:mod:`natten_mlx.windows`), then the additional keys.
``av_forward(problem, attn, value, additional_values=None) -> out``
    ``attn [B, *spatial, H, Kt (+N_extra)]`` -> ``[B, *spatial, H, D_v]``; weights of invalid slots
    are ignored.
``qk_backward(record)``, ``av_backward(record)``
    As ``fused_backward``; inputs named ``query, key, additional_keys, rpb`` and
    ``attn, value, additional_values``; ``record.out`` is the scores (qk) or the output (av).
``configure(**options) -> backend``
    A copy with per-call options applied (tile shapes, a strategy, ...). Unknown options raise
    TypeError naming them and listing the known ones. ``use_backend("cuda", tile=(8, 8))`` and
    ``backend=get_backend("pure").configure(strategy="gather")`` go through it; without
    ``configure`` a backend refuses options with a TypeError. Returning the same object for the same
    options lets calls share the core's cached functions. Pure's options: ``strategy``
    (``slices``/``gather``/``tiled``) and ``tile``.
``distribution: str``, ``description: str``
    Shown by ``natten-mlx info``; the distribution defaults to the plugin's (set it: a subclass of
    PureBackend would inherit ``"natten-mlx"``).

Devices and streams
-------------------
Every op takes ``stream=None`` (an ``mx.Stream`` or ``mx.Device``, as MLX's own ops). The core fills
``problem.device`` from it and runs the backend's forward *and* backward inside
``with mx.stream(stream)`` when one was given, so a backend's MLX ops and ``mx.fast.*_kernel``
calls go to the right stream without passing it around.

Selection
---------
``backend=`` / ``use_backend(...)`` / ``NATTEN_BACKEND`` accept a name, a comma-separated ordered
list (``"cuda,pure"``), a sequence of names, or a backend object (``backend=`` and ``use_backend``
only; sequences may mix names and objects). A list: the first that serves wins; ``explain()`` and the
debug log say which and why the others were passed over. A single name keeps its strict meaning
(the call raises with the backend's reason). Without any of these, the highest-priority backend
that is available and supports the call serves it (:data:`PRIORITIES`).

What the core gives tier authors
--------------------------------
- ``natten_mlx/include/natten_mlx/window.h``: the per-axis window arithmetic in one C header for
  C++, CUDA and Metal (qualifier macro ``NA_FUNC``), tested against :mod:`natten_mlx.windows`
  (whole-domain and sub-domain coordinates).
- :mod:`natten_mlx.geometry`: ``window_header()``, ``include_dir()``, per-axis slot tables and tile
  plans as cached NumPy and MLX arrays, ``key_extent()``, ``outer()``, and ``dense_mask()``, the one
  dense reference mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, runtime_checkable

import mlx.core as mx

from .problem import Problem

#: the ways a backend is differentiated (see the module docstring)
DIFFERENTIATION = ("backward", "primitive", "pure")

#: which wins when several serve: backend -> (priority, what it serves)
PRIORITIES = {
    "cuda": (300, "GPU streams on NVIDIA (MLX's CUDA backend)"),
    "metal": (300, "GPU streams on Apple silicon (never available together with cuda)"),
    "nanobind": (200, "CPU streams"),
    "example-dense": (10, "small problems (the template third-party backend)"),
    "pure": (0, "everything"),
}


@dataclass(frozen=True)
class BackwardRecord:
    """What a backward may use. Handed to ``fused_backward``/``qk_backward``/``av_backward``.

    problem: the call's :class:`~natten_mlx.problem.Problem`.
    inputs:  every input name of the op -> its array, or None where the call had none.
    out:     the forward's primary output (fused: out; qk: scores; av: out).
    lse:     the fused forward's lse ``[B, *spatial, H]`` float32 (None for split ops).
    d_out:   the cotangent of ``out``.
    d_lse:   the cotangent of the lse; None when the caller did not ask for the lse.
    """

    problem: Problem
    inputs: Mapping[str, Optional[mx.array]]
    out: mx.array
    lse: Optional[mx.array]
    d_out: mx.array
    d_lse: Optional[mx.array]


@runtime_checkable
class Backend(Protocol):
    """The required members of a backend, for type checkers and ``isinstance`` (see the module docstring)."""

    name: str
    priority: int

    def available(self) -> Optional[str]: ...

    def supports(self, problem: Problem) -> Optional[str]: ...

    def fused_forward(
        self,
        problem: Problem,
        query: mx.array,
        key: mx.array,
        value: mx.array,
        additional_keys: Optional[mx.array] = None,
        additional_values: Optional[mx.array] = None,
        rpb: Optional[mx.array] = None,
    ) -> tuple[mx.array, Optional[mx.array]]: ...


REQUIRED = ("name", "priority", "available", "supports", "fused_forward")
OPTIONAL_METHODS = ("fused_backward", "qk_forward", "av_forward", "qk_backward", "av_backward", "configure")


def differentiation_of(backend) -> str:
    """The backend's ``differentiation``, or its default: ``"backward"`` with a ``fused_backward``,
    else ``"pure"``."""
    mode = getattr(backend, "differentiation", None)
    if mode is None:
        return "backward" if callable(getattr(backend, "fused_backward", None)) else "pure"
    return mode


def check_backend(obj) -> None:
    """Raise TypeError naming what a registered object lacks or gets wrong."""
    missing = [a for a in REQUIRED if not hasattr(obj, a)]
    if missing:
        raise TypeError(f"backend {obj!r} lacks {', '.join(missing)} (see natten_mlx.protocol)")
    if not isinstance(obj.name, str) or not obj.name:
        raise TypeError(f"backend {obj!r} has name={obj.name!r}; it must be a non-empty str")
    if "," in obj.name:
        raise TypeError(f"backend name {obj.name!r} contains ','; a comma separates names in a backend list")
    if isinstance(obj.priority, bool) or not isinstance(obj.priority, int):
        raise TypeError(f"backend {obj.name!r} has priority={obj.priority!r}; it must be an int")
    mode = differentiation_of(obj)
    if mode not in DIFFERENTIATION:
        raise TypeError(f"backend {obj.name!r} has differentiation={mode!r}; it must be one of {DIFFERENTIATION}")
    if mode == "backward" and not callable(getattr(obj, "fused_backward", None)):
        raise TypeError(f"backend {obj.name!r} has differentiation='backward' but no fused_backward(record) method")
