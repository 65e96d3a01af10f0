"""The immutable description of one neighborhood-attention call, and the validation that builds it.

A backend sees a :class:`Problem` and arrays, nothing else. Every rule of SEMANTICS.md's
"Validation" section is enforced here, each failure a ValueError/TypeError naming the argument,
its value and the rule.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

import mlx.core as mx

Op = Literal["fused", "qk", "av"]

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Problem:
    """One normalised call. Tuples hold one entry per spatial axis.

    op:             "fused" (na*d), "qk" (na*d_qk) or "av" (na*d_av).
    batch:          ``B``; 0 is allowed (an empty output of the right shape is returned).
    spatial:        the spatial shape of the queries (and of out and lse) ``(L1[, L2[, L3]])``.
    heads:          query heads ``H``; kv_heads: ``H_kv`` (``H % H_kv == 0``).
    head_dim:       ``D`` of query and key (0 for "av", which never sees them).
    value_head_dim: ``D_v`` of values (0 for "qk").
    kernel_size, stride, dilation, is_causal: the window parameters, one per axis.
    scale:          the softmax scale (1.0 for "av", which never applies one).
    dtype:          the inputs' MLX dtype.
    num_extra:      number of additional keys/values (0 when none).
    has_rpb:        whether a relative positional bias is added.
    return_lse:     whether the caller asked for the logsumexp ("fused" only; a fused forward
                    returns it always, the core keeps it for the backward).
    device:         ``"cpu"`` or ``"gpu"``: the device type of the stream the call runs on.

    Sub-domain problems (sharded attention; :func:`natten_mlx.functional.na_subdomain`):

    domain:         the global spatial extent the window rules apply to (default: ``spatial``).
    query_offset:   global coordinate of local query 0, per axis (default: zeros).
    kv_spatial:     spatial shape of the local key/value slab (default: ``spatial``).
    kv_offset:      global coordinate of local key 0, per axis (default: zeros).

    Query local index ``i`` is global ``i + query_offset``; key local index ``j`` is global
    ``j + kv_offset``. Windows are those of the global domain; validation guarantees that every
    slot of every local query's window (valid or not) lies inside the key slab.
    """

    op: Op
    batch: int
    spatial: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    value_head_dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    dtype: Any
    num_extra: int = 0
    has_rpb: bool = False
    return_lse: bool = False
    device: str = ""
    domain: tuple[int, ...] = ()
    query_offset: tuple[int, ...] = ()
    kv_spatial: tuple[int, ...] = ()
    kv_offset: tuple[int, ...] = ()

    def __post_init__(self):
        # defaults that depend on other fields; a Problem stays frozen and hashable
        fill = object.__setattr__
        if not self.device:
            fill(self, "device", device_type(None))
        if not self.domain:
            fill(self, "domain", tuple(self.spatial))
        if not self.query_offset:
            fill(self, "query_offset", (0,) * len(self.spatial))
        if not self.kv_spatial:
            fill(self, "kv_spatial", tuple(self.spatial))
        if not self.kv_offset:
            fill(self, "kv_offset", (0,) * len(self.spatial))

    @property
    def na_dim(self) -> int:
        return len(self.spatial)

    @property
    def num_tokens(self) -> int:
        """Query tokens ``prod(spatial)``."""
        n = 1
        for x in self.spatial:
            n *= x
        return n

    @property
    def kv_tokens(self) -> int:
        """Key/value tokens ``prod(kv_spatial)`` (``num_tokens`` unless a sub-domain problem)."""
        n = 1
        for x in self.kv_spatial:
            n *= x
        return n

    @property
    def window_size(self) -> int:
        n = 1
        for x in self.kernel_size:
            n *= x
        return n

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))

    @property
    def is_subdomain(self) -> bool:
        """True when the queries or the key slab are a part of a larger domain (sharded attention)."""
        n = len(self.spatial)
        return bool(n) and (
            self.domain != self.spatial
            or self.kv_spatial != self.spatial
            or any(self.query_offset)
            or any(self.kv_offset)
        )

    @property
    def geometry(self) -> tuple:
        """``(spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial,
        kv_offset)``: everything the window tables depend on (the arguments of
        :func:`natten_mlx.windows.neighborhood_tables` and :func:`natten_mlx.tiles.tile_plan`)."""
        return (self.spatial, self.kernel_size, self.stride, self.dilation, self.is_causal, self.domain,
                self.query_offset, self.kv_spatial, self.kv_offset)

    @property
    def covers_everything(self) -> bool:
        """True when every query attends to every token: dense attention is the same thing."""
        return not self.is_subdomain and all(
            k == n and d == 1 and not c for k, n, d, c in zip(self.kernel_size, self.spatial, self.dilation, self.is_causal)
        )

    def with_(self, **changes) -> "Problem":
        return replace(self, **changes)


def device_type(stream) -> str:
    """``"cpu"`` or ``"gpu"``: the device type of ``stream`` (an ``mx.Stream``, an ``mx.Device``,
    ``mx.cpu``/``mx.gpu``, or None for MLX's default device)."""
    if stream is None:
        kind = mx.default_device().type
    elif isinstance(stream, mx.Stream):
        kind = stream.device.type
    elif isinstance(stream, mx.Device):
        kind = stream.type
    elif isinstance(stream, mx.DeviceType):
        kind = stream
    else:
        raise TypeError(f"stream={stream!r} must be an mlx.core.Stream, an mlx.core.Device or None")
    return "gpu" if kind == mx.DeviceType.gpu else "cpu"


def _is_int(x) -> bool:
    # a plain int first: the ABC check of numbers.Integral is most of a call's validation time
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def normalize_tuple(name: str, value, na_dim: int, minimum: int) -> tuple[int, ...]:
    """An int or a tuple with one int per axis, each ``>= minimum``."""
    if _is_int(value):
        values = (int(value),) * na_dim
    elif isinstance(value, (tuple, list)):
        if len(value) != na_dim:
            raise ValueError(
                f"{name}={value!r} has {len(value)} entries; a {na_dim}D op needs an int or {na_dim} ints (one per spatial axis)"
            )
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name}={value!r} must hold ints (one per spatial axis)")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name}={value!r} must be an int or a tuple of {na_dim} ints, not {type(value).__name__}")
    for v in values:
        if v < minimum:
            raise ValueError(f"{name}={value!r}: every entry must be >= {minimum}")
    return values


def normalize_causal(value, na_dim: int) -> tuple[bool, ...]:
    """A bool or a tuple with one bool per axis -> ``na_dim`` bools (TypeError/ValueError naming ``is_causal``)."""
    if isinstance(value, bool):
        return (value,) * na_dim
    if isinstance(value, (tuple, list)):
        if len(value) != na_dim:
            raise ValueError(
                f"is_causal={value!r} has {len(value)} entries; a {na_dim}D op needs a bool or {na_dim} bools"
            )
        if not all(isinstance(v, bool) for v in value):
            raise TypeError(f"is_causal={value!r} must hold bools (one per spatial axis)")
        return tuple(value)
    raise TypeError(f"is_causal={value!r} must be a bool or a tuple of {na_dim} bools, not {type(value).__name__}")


def _check_array(name: str, x, rank: int | None = None, what: str = "") -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are float32, float16 and bfloat16")
    if rank is not None and x.ndim != rank:
        raise ValueError(f"{name} has shape {tuple(x.shape)} (rank {x.ndim}); expected rank {rank}{what}")


def _check_window(spatial, kernel_size, stride, dilation):
    for axis, (n, k, s, d) in enumerate(zip(spatial, kernel_size, stride, dilation)):
        if k * d > n:
            raise ValueError(
                f"kernel_size={k} with dilation={d} spans {k * d} tokens along spatial axis {axis}, "
                f"but the input has only {n}; kernel_size * dilation must be <= input size"
            )
        if s > k:
            raise ValueError(f"stride={s} along spatial axis {axis} exceeds kernel_size={k}; stride must be <= kernel_size")


@lru_cache(maxsize=8)
def _layout(na_dim: int) -> str:
    return "[B, " + ", ".join(f"X{i + 1}" for i in range(na_dim)) + ", H, D]"


def _parse_window(na_dim, kernel_size, stride, dilation, is_causal):
    kernel_size = normalize_tuple("kernel_size", kernel_size, na_dim, 2)
    stride = normalize_tuple("stride", stride, na_dim, 1)
    dilation = normalize_tuple("dilation", dilation, na_dim, 1)
    is_causal = normalize_causal(is_causal, na_dim)
    return kernel_size, stride, dilation, is_causal


def _parse_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} must be a real number or None")
    return float(scale)


def _check_rpb(rpb, heads: int, kernel_size, is_causal, dtype) -> bool:
    if rpb is None:
        return False
    _check_array("rpb", rpb)
    expected = (heads,) + tuple(2 * k - 1 for k in kernel_size)
    if tuple(rpb.shape) != expected:
        raise ValueError(f"rpb has shape {tuple(rpb.shape)}; expected [H, 2*K-1 per axis] = {expected}")
    if any(is_causal):
        raise ValueError(f"rpb cannot be combined with causal masking (is_causal={is_causal})")
    if rpb.dtype != dtype:
        raise ValueError(f"rpb has dtype {rpb.dtype} but the inputs are {dtype}; dtypes must be equal")
    return True


def _check_extra(extra_k, extra_v, batch, kv_heads, head_dim, value_head_dim, dtype, need_k=True, need_v=True) -> int:
    if need_k and need_v and (extra_k is None) != (extra_v is None):
        given, missing = ("additional_keys", "additional_values") if extra_v is None else ("additional_values", "additional_keys")
        raise ValueError(f"{given} was given without {missing}; extra keys and values come in pairs")
    num = 0
    for name, x, dim, needed in (
        ("additional_keys", extra_k, head_dim, need_k),
        ("additional_values", extra_v, value_head_dim, need_v),
    ):
        if x is None or not needed:
            continue
        _check_array(name, x, 4, " [B, N_extra, H_kv, D]")
        b, n, h, d = x.shape
        if b != batch or h != kv_heads or d != dim or n < 1:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected [B={batch}, N_extra>=1, H_kv={kv_heads}, {dim}]"
            )
        if x.dtype != dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but the inputs are {dtype}; dtypes must be equal")
        if num and n != num:
            raise ValueError(f"additional_keys and additional_values disagree on N_extra ({num} vs {n})")
        num = n
    return num


def _check_sizes(batch: int, heads: int, kv_heads: int, dims: dict) -> None:
    """H, H_kv and the head dims must be >= 1 (B = 0 is allowed: the output is empty)."""
    for name, n in (("H (query heads)", heads), ("H_kv (key/value heads)", kv_heads), *dims.items()):
        if n < 1:
            raise ValueError(f"{name}={n}: must be >= 1")


def _check_subdomain(spatial, kv_spatial, kernel_size, stride, dilation, is_causal, subdomain) -> dict:
    """The sub-domain fields of a problem, validated (see :class:`Problem`); {} for a plain call.

    ``subdomain`` is None or a dict with ``domain``, ``query_offset`` and ``kv_offset`` (tuples)."""
    na_dim = len(spatial)
    if subdomain is None:
        if kv_spatial != spatial:
            raise ValueError(
                f"query spatial shape {spatial} and key/value spatial shape {kv_spatial} differ; they must be equal "
                "(a query range against a key slab is natten_mlx.functional.na_subdomain)"
            )
        _check_window(spatial, kernel_size, stride, dilation)
        return {}
    from .windows import key_extent

    domain = normalize_tuple("domain", subdomain["domain"], na_dim, 1)
    query_offset = normalize_tuple("query_offset", subdomain["query_offset"], na_dim, 0)
    kv_offset = normalize_tuple("kv_offset", subdomain["kv_offset"], na_dim, 0)
    _check_window(domain, kernel_size, stride, dilation)
    for a in range(na_dim):
        if query_offset[a] + spatial[a] > domain[a]:
            raise ValueError(
                f"query_offset={query_offset} with query spatial shape {spatial}: queries [{query_offset[a]}, "
                f"{query_offset[a] + spatial[a]}) along axis {a} leave domain={domain} (length {domain[a]})"
            )
        if kv_offset[a] + kv_spatial[a] > domain[a]:
            raise ValueError(
                f"kv_offset={kv_offset} with key/value spatial shape {kv_spatial}: keys [{kv_offset[a]}, "
                f"{kv_offset[a] + kv_spatial[a]}) along axis {a} leave domain={domain} (length {domain[a]})"
            )
        lo, hi = key_extent(domain[a], kernel_size[a], stride[a], dilation[a], is_causal[a], query_offset[a], spatial[a])
        if lo < kv_offset[a] or hi > kv_offset[a] + kv_spatial[a]:
            raise ValueError(
                f"kv_offset={kv_offset} with key/value spatial shape {kv_spatial}: the key slab [{kv_offset[a]}, "
                f"{kv_offset[a] + kv_spatial[a]}) along axis {a} does not hold the windows of queries "
                f"[{query_offset[a]}, {query_offset[a] + spatial[a]}), which need keys [{lo}, {hi}) "
                "(natten_mlx.windows.key_extent); every window must lie inside the key slab"
            )
    return dict(domain=domain, query_offset=query_offset, kv_spatial=kv_spatial, kv_offset=kv_offset)


def _typed(x):
    """A cache-key part that tells ``1`` from ``True`` (validation does): an int or bool with its type, a
    tuple with its elements' types; None (do not cache) for anything else."""
    c = x.__class__
    if c is int or c is bool:
        return c, x
    if c is tuple:
        return tuple(map(type, x)), x
    return None


_FUSED_CACHE: dict = {}


def fused_problem(
    na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values, rpb,
    return_lse, stream=None, subdomain=None,
) -> Problem:
    """Validate a fused call into a :class:`Problem` (see :func:`natten_mlx.functional.na1d`).

    Plain calls (no extra keys, rpb or sub-domain; mx.array inputs; ints, bools and tuples of them) are
    cached by everything validation reads, so a repeated call skips it (~8 us of a call's ~30 here)."""
    ck = None
    if (additional_keys is None and additional_values is None and rpb is None and subdomain is None
            and type(query) is mx.array and type(key) is mx.array and type(value) is mx.array):
        parts = (_typed(kernel_size), _typed(stride), _typed(dilation), _typed(is_causal))
        if None not in parts and scale.__class__ in (float, int, type(None)) and return_lse.__class__ is bool:
            ck = (na_dim, query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, parts,
                  scale.__class__, scale, return_lse, device_type(stream))
            try:
                hit = _FUSED_CACHE.get(ck)
            except TypeError:  # an unhashable element inside a tuple
                hit = ck = None
            if hit is not None:
                return hit
    problem = _fused_problem(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                             additional_keys, additional_values, rpb, return_lse, stream, subdomain)
    if ck is not None:
        if len(_FUSED_CACHE) >= 512:
            _FUSED_CACHE.clear()
        _FUSED_CACHE[ck] = problem
    return problem


def _fused_problem(
    na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys, additional_values, rpb,
    return_lse, stream=None, subdomain=None,
) -> Problem:
    rank = na_dim + 3
    layout = _layout(na_dim)
    _check_array("query", query, rank, f" {layout} for na{na_dim}d")
    _check_array("key", key, rank, f" {layout} for na{na_dim}d")
    _check_array("value", value, rank, f" {layout} for na{na_dim}d")
    kernel_size, stride, dilation, is_causal = _parse_window(na_dim, kernel_size, stride, dilation, is_causal)
    q, k, v = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    if k[0] != q[0] or v[0] != q[0]:
        raise ValueError(f"query {q}, key {k} and value {v} must share the batch size (axis 0)")
    if v[: na_dim + 1] != k[: na_dim + 1]:
        raise ValueError(f"key {k} and value {v} must share batch and spatial shape (the first {na_dim + 1} axes)")
    if k[-1] != q[-1]:
        raise ValueError(f"key head dim {k[-1]} differs from query head dim {q[-1]}; query and key need the same D")
    if k[-2] != v[-2]:
        raise ValueError(f"key has {k[-2]} heads but value has {v[-2]}; key and value need the same H_kv")
    _check_sizes(q[0], q[-2], k[-2], {"D (query/key head dim)": q[-1], "D_v (value head dim)": v[-1]})
    if q[-2] % k[-2] != 0:
        raise ValueError(f"query has {q[-2]} heads, key/value {k[-2]}: H % H_kv must be 0 (GQA/MQA)")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key, value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype}); they must be equal")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse={return_lse!r} must be a bool")
    spatial = q[1 : na_dim + 1]
    if subdomain is None and k[: na_dim + 1] != q[: na_dim + 1]:
        raise ValueError(
            f"query {q}, key {k} and value {v} must share batch and spatial shape (the first {na_dim + 1} axes)"
        )
    sub = _check_subdomain(spatial, k[1 : na_dim + 1], kernel_size, stride, dilation, is_causal, subdomain)
    has_rpb = _check_rpb(rpb, q[-2], kernel_size, is_causal, query.dtype)
    num_extra = _check_extra(additional_keys, additional_values, q[0], k[-2], q[-1], v[-1], query.dtype)
    return Problem(
        op="fused", batch=q[0], spatial=spatial, heads=q[-2], kv_heads=k[-2], head_dim=q[-1], value_head_dim=v[-1],
        kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
        scale=_parse_scale(scale, q[-1]), dtype=query.dtype, num_extra=num_extra, has_rpb=has_rpb,
        return_lse=return_lse, device=device_type(stream), **sub,
    )


def qk_problem(na_dim, query, key, kernel_size, stride, dilation, is_causal, rpb, scale, additional_keys,
               stream=None) -> Problem:
    """Validate a split qk call into a :class:`Problem` (see :func:`natten_mlx.functional.na1d_qk`)."""
    rank = na_dim + 3
    layout = _layout(na_dim)
    _check_array("query", query, rank, f" {layout} for na{na_dim}d_qk")
    _check_array("key", key, rank, f" {layout} for na{na_dim}d_qk")
    kernel_size, stride, dilation, is_causal = _parse_window(na_dim, kernel_size, stride, dilation, is_causal)
    q, k = tuple(query.shape), tuple(key.shape)
    if k[: na_dim + 1] != q[: na_dim + 1]:
        raise ValueError(f"query {q} and key {k} must share batch and spatial shape (the first {na_dim + 1} axes)")
    if k[-1] != q[-1]:
        raise ValueError(f"key head dim {k[-1]} differs from query head dim {q[-1]}; query and key need the same D")
    _check_sizes(q[0], q[-2], k[-2], {"D (query/key head dim)": q[-1]})
    if q[-2] % k[-2] != 0:
        raise ValueError(f"query has {q[-2]} heads, key {k[-2]}: H % H_kv must be 0 (GQA/MQA)")
    if query.dtype != key.dtype:
        raise ValueError(f"query and key dtypes differ ({query.dtype}, {key.dtype}); they must be equal")
    spatial = q[1 : na_dim + 1]
    _check_window(spatial, kernel_size, stride, dilation)
    has_rpb = _check_rpb(rpb, q[-2], kernel_size, is_causal, query.dtype)
    num_extra = _check_extra(additional_keys, None, q[0], k[-2], q[-1], 0, query.dtype, need_v=False)
    return Problem(
        op="qk", batch=q[0], spatial=spatial, heads=q[-2], kv_heads=k[-2], head_dim=q[-1], value_head_dim=0,
        kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
        scale=_parse_scale(scale, q[-1]), dtype=query.dtype, num_extra=num_extra, has_rpb=has_rpb,
        device=device_type(stream),
    )


def av_problem(na_dim, attn, value, kernel_size, stride, dilation, is_causal, additional_values, stream=None) -> Problem:
    """Validate a split av call into a :class:`Problem` (see :func:`natten_mlx.functional.na1d_av`)."""
    rank = na_dim + 3
    _check_array("attn", attn, rank, f" [B, {', '.join(f'X{i + 1}' for i in range(na_dim))}, H, K_total] for na{na_dim}d_av")
    _check_array("value", value, rank, f" {_layout(na_dim)} for na{na_dim}d_av")
    kernel_size, stride, dilation, is_causal = _parse_window(na_dim, kernel_size, stride, dilation, is_causal)
    a, v = tuple(attn.shape), tuple(value.shape)
    if a[: na_dim + 1] != v[: na_dim + 1]:
        raise ValueError(f"attn {a} and value {v} must share batch and spatial shape (the first {na_dim + 1} axes)")
    _check_sizes(a[0], a[-2], v[-2], {"D_v (value head dim)": v[-1]})
    if a[-2] % v[-2] != 0:
        raise ValueError(f"attn has {a[-2]} heads, value {v[-2]}: H % H_kv must be 0 (GQA/MQA)")
    if attn.dtype != value.dtype:
        raise ValueError(f"attn and value dtypes differ ({attn.dtype}, {value.dtype}); they must be equal")
    spatial = a[1 : na_dim + 1]
    _check_window(spatial, kernel_size, stride, dilation)
    num_extra = _check_extra(None, additional_values, a[0], v[-2], 0, v[-1], attn.dtype, need_k=False)
    window = 1
    for x in kernel_size:
        window *= x
    if a[-1] != window + num_extra:
        raise ValueError(
            f"attn has {a[-1]} weights per query; kernel_size={kernel_size} needs {window}"
            + (f" plus {num_extra} for additional_values" if num_extra else "")
        )
    return Problem(
        op="av", batch=a[0], spatial=spatial, heads=a[-2], kv_heads=v[-2], head_dim=0, value_head_dim=v[-1],
        kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
        scale=1.0, dtype=attn.dtype, num_extra=num_extra, device=device_type(stream),
    )
