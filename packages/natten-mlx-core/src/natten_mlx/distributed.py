"""Neighborhood attention sharded along one spatial axis across the processes of an
``mx.distributed`` group, with halo exchange.

Every rank holds a contiguous slab of the global ``query``/``key``/``value`` along spatial axis
``axis`` (slabs in rank order; sizes may differ by rank) and gets back its slab of the output.
Because neighborhood attention is local, a rank needs, beyond its own keys, only the few border
rows of its neighbours' keys and values that its queries' windows reach: the *halo*. Those rows
travel point to point (``send``/``recv``, transport ``"p2p"``, the default on CPU streams) or in one
``all_gather`` of every rank's border rows (transport ``"gather"``, the default on GPU streams:
MLX's NCCL backend has no send/recv); the rank then computes its queries
against the halo-extended key slab as a sub-domain problem of the global domain
(:func:`natten_mlx.functional.na_subdomain`), on whichever backend serves it. In the backward the
halo rows' key/value gradients travel back to their owners and are summed there.

Halo of rank ``r`` (queries ``[a_r, b_r)`` along the sharded axis of global length ``L``):
``lo_r = min`` and ``hi_r = max + 1`` of the *valid* window keys of those queries, read off
:func:`natten_mlx.windows.axis_windows` in global coordinates. It receives
``a_r - lo_r`` rows from rank ``r-1`` and ``hi_r - b_r`` rows from rank ``r+1``; one row is
``B * prod(other spatial extents) * H_kv * (D + D_v) * itemsize`` bytes (key and value travel in
one message). With ``"p2p"`` rank ``r`` sends ``(hi_{r-1} - b_{r-1}) + (a_{r+1} - lo_{r+1})`` rows
in the forward and returns the gradients of the ``(a_r - lo_r) + (hi_r - b_r)`` rows it received in
the backward; with ``"gather"`` every rank sends ``(n - 1) * m`` rows, ``m`` the largest such count of
any rank (what a ring all_gather moves). Away from the borders, with stride 1 and dilation ``d``,
the halo is ``(K // 2) * d`` rows on the left and ``((K - 1) // 2) * d`` on the right (causal:
``(K - 1) * d`` on the left only). Keys that a kernel may
read but never uses (causal slots past a query) are zero rows, never sent. Rank ``r``'s halo must
come from its two neighbours only: a slab smaller than the halo its neighbour needs is an error.

Replicated inputs (``additional_keys``, ``additional_values``, ``rpb``) must be equal on every rank;
their gradients are each rank's partial sums, to be summed over the group like the gradients of any
replicated weight (``mlx.nn.average_gradients``).

Every rank first shares a description of its arguments (one ``all_gather`` of a fixed 2 KiB
record), so that bad or mismatched arguments raise the same ValueError on every rank instead of
leaving some of them waiting in a receive. That host round trip, and the exchange itself (evaluated
op by op in an order all ranks share), make the ops eager: they cannot be traced by ``mx.compile``,
and every rank must call them in the same order.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import numpy as np

from . import functional as _F
from . import problem as _p
from .windows import axis_windows, key_extent

__all__ = [
    "na1d", "na2d", "na3d", "HaloPlan", "halo_plan", "CommStats", "comm_stats", "reset_comm_stats",
]

_RECORD_BYTES = 2048


# --------------------------------------------------------------------------------------------
# byte accounting
# --------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """What this process has put on the wire since the last :func:`reset_comm_stats`.

    forward_bytes:  halo rows of key and value sent (payload bytes).
    backward_bytes: halo gradient rows sent back to their owners.
    messages:       point-to-point sends issued.
    control_bytes:  the argument records shared by ``all_gather`` (``2048`` per call and rank).
    Counted when the send is put in the graph (it happens when the graph is evaluated).
    """

    forward_bytes: int = 0
    backward_bytes: int = 0
    messages: int = 0
    control_bytes: int = 0
    log: list = field(default_factory=list)

    @property
    def halo_bytes(self) -> int:
        return self.forward_bytes + self.backward_bytes


_stats = CommStats()
_stats_lock = threading.Lock()


def comm_stats() -> CommStats:
    """This process' :class:`CommStats` (a live object)."""
    return _stats


def reset_comm_stats() -> None:
    with _stats_lock:
        _stats.forward_bytes = _stats.backward_bytes = _stats.messages = _stats.control_bytes = 0
        _stats.log.clear()


def _count(kind: str, nbytes: int, dst: int) -> None:
    with _stats_lock:
        if kind == "forward":
            _stats.forward_bytes += nbytes
        else:
            _stats.backward_bytes += nbytes
        _stats.messages += 1
        _stats.log.append((kind, dst, nbytes))


# --------------------------------------------------------------------------------------------
# the halo plan: who needs which rows, from the window tables in global coordinates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HaloPlan:
    """Where every rank's keys come from, along the sharded axis (global coordinates).

    sizes:   slab length of each rank; starts: global index of each rank's first row.
    need:    ``(lo, hi)`` per rank: the valid window keys of its queries span ``[lo, hi)``.
    slab:    ``(lo, hi)`` per rank: the key slab handed to the local problem; it holds ``need``,
             the rank's own rows, and every slot a kernel may read (``natten_mlx.windows.key_extent``),
             the rows outside ``need`` being zeros.
    """

    length: int
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    need: tuple[tuple[int, int], ...]
    slab: tuple[tuple[int, int], ...]

    def end(self, r: int) -> int:
        return self.starts[r] + self.sizes[r]

    def left(self, r: int) -> int:
        """Rows rank ``r`` receives from rank ``r - 1``."""
        return max(self.starts[r] - self.need[r][0], 0)

    def right(self, r: int) -> int:
        """Rows rank ``r`` receives from rank ``r + 1``."""
        return max(self.need[r][1] - self.end(r), 0)

    def pad(self, r: int) -> tuple[int, int]:
        """Zero rows before and after the received halo in rank ``r``'s key slab."""
        return (self.starts[r] - self.left(r) - self.slab[r][0], self.slab[r][1] - self.end(r) - self.right(r))

    def rows_sent(self, r: int) -> int:
        """Rows rank ``r`` sends in the forward (and receives back as gradients in the backward)."""
        n = len(self.sizes)
        return (self.right(r - 1) if r > 0 else 0) + (self.left(r + 1) if r + 1 < n else 0)


@lru_cache(maxsize=256)
def halo_plan(sizes: tuple[int, ...], kernel_size: int, stride: int, dilation: int, is_causal: bool) -> HaloPlan:
    """The :class:`HaloPlan` of slabs ``sizes`` (rank order) of one axis with these window parameters.

    Raises ValueError when a rank's halo reaches past its neighbour's slab (a slab smaller than the
    halo) or a slab is empty.
    """
    length = sum(sizes)
    for r, n in enumerate(sizes):
        if n < 1:
            raise ValueError(f"rank {r} holds an empty slab (slab sizes {list(sizes)}); every rank needs at least 1 row")
    win = axis_windows(length, kernel_size, stride, dilation, is_causal)
    starts = tuple(int(x) for x in np.cumsum((0,) + sizes[:-1]))
    need, slab = [], []
    for a, n in zip(starts, sizes):
        used = win.key_index[a : a + n][win.valid[a : a + n]]
        need.append((int(used.min()), int(used.max()) + 1))
        # every slot a kernel may read (key_extent), and the rank's own rows, which it always holds
        lo, hi = key_extent(length, kernel_size, stride, dilation, is_causal, a, n)
        slab.append((min(lo, a), max(hi, a + n)))
    for r in range(len(sizes)):
        a, b = starts[r], starts[r] + sizes[r]
        lo, hi = need[r]
        if r > 0 and lo < starts[r - 1]:
            raise ValueError(
                f"slab sizes {list(sizes)}: rank {r}'s queries [{a}, {b}) need keys from {lo}, beyond rank {r - 1}'s "
                f"slab [{starts[r - 1]}, {a}) ({sizes[r - 1]} rows < its halo of {a - lo} rows); with kernel_size="
                f"{kernel_size}, stride={stride}, dilation={dilation}, is_causal={is_causal} every slab must hold "
                "the halo its neighbours need (use fewer ranks or larger slabs)"
            )
        if r + 1 < len(sizes) and hi > starts[r + 1] + sizes[r + 1]:
            nb = starts[r + 1] + sizes[r + 1]
            raise ValueError(
                f"slab sizes {list(sizes)}: rank {r}'s queries [{a}, {b}) need keys up to {hi - 1}, beyond rank "
                f"{r + 1}'s slab [{b}, {nb}) ({sizes[r + 1]} rows < its halo of {hi - b} rows); with kernel_size="
                f"{kernel_size}, stride={stride}, dilation={dilation}, is_causal={is_causal} every slab must hold "
                "the halo its neighbours need (use fewer ranks or larger slabs)"
            )
    return HaloPlan(length, tuple(sizes), starts, tuple(need), tuple(slab))


# --------------------------------------------------------------------------------------------
# argument records: every rank learns every rank's arguments before anything can block
# --------------------------------------------------------------------------------------------


def _shape(x):
    return list(x.shape) if isinstance(x, mx.array) else None


def _dtype(x):
    return _p.DTYPE_NAMES.get(x.dtype, str(x.dtype)) if isinstance(x, mx.array) else None


def _local_record(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                  additional_values, rpb, return_lse, axis, transport=None, stream=None, backend=None) -> dict:
    """This rank's arguments as plain JSON values, or ``{"error": message}``. Never raises: a rank
    that raised here would leave the others waiting in the all_gather."""
    try:
        if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < na_dim:
            raise ValueError(
                f"axis={axis!r} is not a spatial axis of na{na_dim}d; the sharded axis is a spatial axis index "
                f"in 0..{na_dim - 1} (axis 0 is the first spatial axis, tensor dimension 1)"
            )
        layout = f" [B, {', '.join(f'X{i + 1}' for i in range(na_dim))}, H, D] for na{na_dim}d"
        for name, x in (("query", query), ("key", key), ("value", value)):
            _p._check_array(name, x, na_dim + 3, layout)
        for name, x in (("key", key), ("value", value)):
            if x.shape[1 + axis] != query.shape[1 + axis]:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but query has {tuple(query.shape)}: along the sharded axis "
                    f"{axis} each rank's query, key and value slabs must have the same length"
                )
        ks, st, dl, ca = _p._parse_window(na_dim, kernel_size, stride, dilation, is_causal)
        if scale is not None:
            scale = _p._parse_scale(scale, 1)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse={return_lse!r} must be a bool")
        # ranks mixing transports would wait on each other: it is part of the record they agree on
        transport = _transport(transport, stream)
        for name, x in (("additional_keys", additional_keys), ("additional_values", additional_values), ("rpb", rpb)):
            if x is not None:
                _p._check_array(name, x)
        return dict(
            na_dim=na_dim, axis=axis, slab=int(query.shape[1 + axis]),
            query=_shape(query), key=_shape(key), value=_shape(value), dtype=[_dtype(query), _dtype(key), _dtype(value)],
            kernel_size=ks, stride=st, dilation=dl, is_causal=ca, scale=scale, return_lse=return_lse,
            additional_keys=[_shape(additional_keys), _dtype(additional_keys)],
            additional_values=[_shape(additional_values), _dtype(additional_values)],
            rpb=[_shape(rpb), _dtype(rpb)], transport=transport, backend=_backend_name(backend),
        )
    except Exception as exc:  # noqa: BLE001 (every failure must reach the other ranks)
        return {"error": str(exc), "kind": type(exc).__name__}


def _backend_name(backend):
    """The requested backend as JSON: ranks asking for different backends is a disagreement caught
    before any transfer (a rank whose backend refuses the call after the exchange would strand the
    others in the backward)."""
    if backend is None or isinstance(backend, str):
        return backend
    if isinstance(backend, (list, tuple)) and all(isinstance(b, str) for b in backend):
        return list(backend)
    return f"<{type(backend).__name__} {getattr(backend, 'name', '?')}>"


def _encode(record: dict) -> mx.array:
    raw = json.dumps(record).encode()
    if len(raw) > _RECORD_BYTES:
        msg = record.get("error", "argument record too long")
        raw = json.dumps({"error": msg[: _RECORD_BYTES // 2] + " ...", "kind": record.get("kind", "ValueError")}).encode()
    buf = np.zeros(_RECORD_BYTES, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return mx.array(buf)


def _decode(row: np.ndarray) -> dict:
    return json.loads(bytes(row).rstrip(b"\0").decode())


def _share_records(record: dict, group) -> list[dict]:
    gathered = mx.distributed.all_gather(_encode(record)[None], group=group)
    with _stats_lock:
        _stats.control_bytes += _RECORD_BYTES
    rows = np.array(gathered)
    return [_decode(row) for row in rows]


def _agree(records: list[dict], rank: int) -> None:
    """Raise the same error on every rank when any rank's record is bad or the records disagree."""
    bad = [(r, rec) for r, rec in enumerate(records) if "error" in rec]
    if bad:
        if "error" in records[rank]:
            kind = TypeError if records[rank].get("kind") == "TypeError" else ValueError
            raise kind(f"natten_mlx.distributed (rank {rank}): {records[rank]['error']}")
        r, rec = bad[0]
        raise ValueError(f"natten_mlx.distributed: rank {r} rejected its arguments ({rec.get('kind')}): {rec['error']}")
    base = records[0]
    axis = base["axis"]
    for key in base:
        if key == "slab":
            continue
        values = [rec[key] for rec in records]
        if key in ("query", "key", "value"):
            values = [v[: 1 + axis] + v[2 + axis :] for v in values]
        if any(v != values[0] for v in values):
            listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            what = f"{key} shape outside the sharded axis {axis}" if key in ("query", "key", "value") else key
            raise ValueError(
                f"natten_mlx.distributed: the ranks disagree on {what} ({listing}); every rank must pass the same "
                "arguments and slabs that differ only in their length along the sharded axis"
            )


# --------------------------------------------------------------------------------------------
# halo exchange: point to point, in four phases so that no two ranks wait on each other
# --------------------------------------------------------------------------------------------


def _schedule(n: int, rank: int, counts_right, counts_left):
    """This rank's transfers, in an order every rank agrees on: ``("send"|"recv", peer, rows)``.

    ``counts_right[r]`` rows go from ``r`` to ``r + 1``, ``counts_left[r]`` from ``r`` to ``r - 1``.
    Phases: rightward from even ranks, rightward from odd ranks, leftward from even, leftward from
    odd. Each phase pairs every rank with at most one peer and all ranks walk the phases in the same
    order, so a blocking send (NCCL, or ring with a full socket buffer) always finds its receive.
    """
    ops = []
    for direction, counts in ((1, counts_right), (-1, counts_left)):
        for parity in (0, 1):
            if rank % 2 == parity:
                peer = rank + direction
                if 0 <= peer < n and counts[rank] > 0:
                    ops.append(("send", peer, counts[rank]))
            else:
                peer = rank - direction
                if 0 <= peer < n and counts[peer] > 0:
                    ops.append(("recv", peer, counts[peer]))
    return ops


def _take(x: mx.array, dim: int, start: int, stop: int) -> mx.array:
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, stop)
    return x[tuple(index)]


def _transfer(transport, rank, n, right, left, payload, template, group, kind, stream, dim) -> dict:
    """Move rows between neighbours: ``right[r]`` rows from ``r`` to ``r + 1``, ``left[r]`` from ``r``
    to ``r - 1`` (the same lists on every rank). ``payload(peer)`` is the array this rank sends to
    ``peer``, ``template(peer)`` the shape and dtype it receives from ``peer``. Returns the received
    arrays by peer.

    Both transports evaluate eagerly, op by op. A Recv primitive has no inputs, so nothing in a
    lazy graph orders it after this rank's sends, and two ranks that both evaluate their receive
    first wait forever (MLX 0.32: neither ``recv_like``'s template nor ``mx.depends`` reaches the
    Recv); evaluating in the schedule's order is what makes the exchange deadlock-free.

    ``"p2p"``: ``send``/``recv`` in the four phases of :func:`_schedule`; each rank sends exactly
    its neighbours' halo rows. ``"gather"``: one ``all_gather`` of every rank's outgoing rows
    (left-going then right-going, zero-padded to the largest such block of any rank), for backends
    without point-to-point (MLX's NCCL backend has no send/recv); with a ring all_gather each rank
    sends ``(n - 1) * block`` rows.
    """
    received = {}
    if transport == "p2p":
        for op, peer, _ in _schedule(n, rank, right, left):
            if op == "send":
                x = payload(peer)
                _count(kind, x.nbytes, peer)
                mx.eval(mx.distributed.send(x, peer, group=group, stream=stream))
            else:
                shape, dtype = template(peer)
                received[peer] = mx.distributed.recv(shape, dtype, peer, group=group, stream=stream)
                mx.eval(received[peer])
        return received
    block = max(left[r] + right[r] for r in range(n))
    if block == 0:
        return received
    parts = [payload(peer) for peer, rows in ((rank - 1, left[rank]), (rank + 1, right[rank])) if rows > 0]
    ref_shape, dtype = template(rank - 1 if rank > 0 else rank + 1)
    if not parts:
        parts = [mx.zeros(_set(ref_shape, dim, 0), dtype=dtype)]
    pad = block - left[rank] - right[rank]
    if pad:
        parts.append(mx.zeros(_set(parts[0].shape, dim, pad), dtype=parts[0].dtype))
    mine = mx.concatenate(parts, axis=dim) if len(parts) > 1 else parts[0]
    _count(kind, (n - 1) * mine.nbytes, -1)
    everyone = mx.distributed.all_gather(mine[None], group=group, stream=stream)
    mx.eval(everyone)
    if rank > 0 and right[rank - 1] > 0:  # what rank - 1 sent right sits after its left-going rows
        start = left[rank - 1]
        received[rank - 1] = _take(everyone[rank - 1], dim, start, start + right[rank - 1])
    if rank + 1 < n and left[rank + 1] > 0:
        received[rank + 1] = _take(everyone[rank + 1], dim, 0, left[rank + 1])
    return received


def _set(shape, dim, value) -> tuple:
    shape = list(shape)
    shape[dim] = value
    return tuple(shape)


def _with_rows(x: mx.array, dim: int, rows: int) -> tuple:
    shape = list(x.shape)
    shape[dim] = rows
    return tuple(shape)


def _zeros_rows(x: mx.array, dim: int, rows: int) -> list[mx.array]:
    return [mx.zeros(_with_rows(x, dim, rows), dtype=x.dtype)] if rows > 0 else []


def _halo_exchange(plan: HaloPlan, rank: int, group, dim: int, stream=None, transport: str = "p2p"):
    """A differentiable ``(key, value) -> (key_slab, value_slab)``: the rank's slabs extended by the
    neighbours' halo rows (and zero rows) along tensor dimension ``dim``."""
    n = len(plan.sizes)
    start = plan.starts[rank]
    # rows rank r sends right = left halo of r + 1; rows sent left = right halo of r - 1
    right = [plan.left(r + 1) if r + 1 < n else 0 for r in range(n)]
    left = [plan.right(r - 1) if r > 0 else 0 for r in range(n)]
    # gradients flow the other way: r returns its right halo's rows to r + 1, its left halo's to r - 1
    back_right, back_left = [plan.right(r) for r in range(n)], [plan.left(r) for r in range(n)]
    pad_lo, pad_hi = plan.pad(rank)
    n_left, n_right = plan.left(rank), plan.right(rank)

    def rows_for(peer):
        # the rows of this rank's slab that ``peer`` needs, in local coordinates
        if peer == rank - 1:
            return 0, plan.right(peer)
        return plan.need[peer][0] - start, plan.sizes[rank]

    def split(x, d):
        return x[..., :d], x[..., d:]

    @mx.custom_function
    def exchange(key, value):
        d = key.shape[-1]

        def payload(peer):
            lo, hi = rows_for(peer)
            return mx.concatenate([_take(key, dim, lo, hi), _take(value, dim, lo, hi)], axis=-1)

        def template(peer):
            rows = n_left if peer == rank - 1 else n_right
            shape = list(key.shape)
            shape[dim], shape[-1] = rows, d + value.shape[-1]
            return tuple(shape), key.dtype

        got = _transfer(transport, rank, n, right, left, payload, template, group, "forward", stream, dim)
        parts_k, parts_v = _zeros_rows(key, dim, pad_lo), _zeros_rows(value, dim, pad_lo)
        if n_left:
            k, v = split(got[rank - 1], d)
            parts_k.append(k)
            parts_v.append(v)
        parts_k.append(key)
        parts_v.append(value)
        if n_right:
            k, v = split(got[rank + 1], d)
            parts_k.append(k)
            parts_v.append(v)
        parts_k += _zeros_rows(key, dim, pad_hi)
        parts_v += _zeros_rows(value, dim, pad_hi)
        k_slab = mx.concatenate(parts_k, axis=dim) if len(parts_k) > 1 else key
        v_slab = mx.concatenate(parts_v, axis=dim) if len(parts_v) > 1 else value
        return k_slab, v_slab

    @exchange.vjp
    def exchange_vjp(primals, cotangents, outputs):
        key, value = primals
        d = key.shape[-1]
        dk, dv = (c if c is not None else mx.zeros_like(o) for c, o in zip(cotangents, outputs))
        own = pad_lo + n_left
        size = plan.sizes[rank]

        def payload(peer):
            lo, hi = (pad_lo, own) if peer == rank - 1 else (own + size, own + size + n_right)
            return mx.concatenate([_take(dk, dim, lo, hi), _take(dv, dim, lo, hi)], axis=-1)

        def template(peer):
            lo, hi = rows_for(peer)
            shape = list(key.shape)
            shape[dim], shape[-1] = hi - lo, d + value.shape[-1]
            return tuple(shape), dk.dtype

        got = _transfer(transport, rank, n, back_right, back_left, payload, template, group, "backward", stream, dim)
        gk, gv = _take(dk, dim, own, own + size), _take(dv, dim, own, own + size)
        for peer, g in got.items():
            lo, hi = rows_for(peer)
            hk, hv = split(g, d)
            # add the returned gradient rows in place of a scatter: pad them to the slab and sum
            pads = [(0, 0)] * key.ndim
            pads[dim] = (lo, size - hi)
            gk = gk + mx.pad(hk, pads)
            gv = gv + mx.pad(hv, pads)
        return gk, gv

    return exchange


# --------------------------------------------------------------------------------------------
# the ops
# --------------------------------------------------------------------------------------------


def _standin(shape, dtype) -> mx.array:
    """A lazy array of ``shape``: validation reads shapes and dtypes only, and this costs nothing."""
    return mx.broadcast_to(mx.zeros((), dtype=dtype), tuple(shape))


def _transport(transport, stream) -> str:
    """``"p2p"`` on CPU streams, ``"gather"`` on GPU streams (MLX's NCCL backend has no send/recv)."""
    if transport is None:
        return "gather" if _p.device_type(stream) == "gpu" else "p2p"
    if transport not in ("p2p", "gather"):
        raise ValueError(f"transport={transport!r} must be None (automatic), 'p2p' or 'gather'")
    return transport


def _distributed(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                 additional_values, rpb, return_lse, group, axis, backend, stream, transport):
    group = mx.distributed.init() if group is None else group
    n, rank = group.size(), group.rank()
    fused = (_F.na1d, _F.na2d, _F.na3d)[na_dim - 1]
    if n == 1:
        record = _local_record(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                               additional_keys, additional_values, rpb, return_lse, axis, transport, stream, backend)
        _agree([record], 0)
        return fused(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                     additional_values, rpb, return_lse, backend=backend, stream=stream)
    record = _local_record(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                           additional_keys, additional_values, rpb, return_lse, axis, transport, stream, backend)
    records = _share_records(record, group)
    _agree(records, rank)
    sizes = tuple(rec["slab"] for rec in records)
    dim = 1 + axis

    def global_shape(shape):
        shape = list(shape)
        shape[dim] = sum(sizes)
        return shape

    # the global problem is validated once, identically on every rank (all records agree)
    dtype = query.dtype
    _p.fused_problem(
        na_dim, _standin(global_shape(query.shape), dtype), _standin(global_shape(key.shape), key.dtype),
        _standin(global_shape(value.shape), value.dtype), kernel_size, stride, dilation, is_causal, scale,
        additional_keys, additional_values, rpb, return_lse, stream=stream,
    )
    ks, st, dl, ca = _p._parse_window(na_dim, kernel_size, stride, dilation, is_causal)
    plan = halo_plan(sizes, ks[axis], st[axis], dl[axis], ca[axis])
    k_slab, v_slab = _halo_exchange(plan, rank, group, dim, stream, record["transport"])(key, value)
    domain = list(query.shape[1 : 1 + na_dim])
    domain[axis] = plan.length
    query_offset = [0] * na_dim
    query_offset[axis] = plan.starts[rank]
    kv_offset = [0] * na_dim
    kv_offset[axis] = plan.slab[rank][0]
    return _F.na_subdomain(
        query, k_slab, v_slab, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
        additional_keys=additional_keys, additional_values=additional_values, rpb=rpb, return_lse=return_lse,
        domain=tuple(domain), query_offset=tuple(query_offset), kv_offset=tuple(kv_offset), backend=backend,
        stream=stream,
    )


_DOC = """Neighborhood attention over {n} spatial axis/axes, sharded along spatial axis ``axis``
    across the processes of ``group`` (default: ``mx.distributed.init()``).

    Each rank passes its contiguous slab of the global tensors, in rank order (sizes may differ):
    query ``[B, {axes}, H, D]``, key ``[B, {axes}, H_kv, D]``, value ``[B, {axes}, H_kv, D_v]``, whose
    extents agree across ranks except along ``axis`` (``0`` = the first spatial axis). Every other
    argument is that of :func:`natten_mlx.na{n}d` on the gathered tensors and must be equal on every
    rank (``additional_keys``/``additional_values``/``rpb`` replicated). Returns the rank's slab of
    ``out [B, {axes}, H, D_v]`` (and of the float32 ``lse [B, {axes}, H]`` with ``return_lse=True``),
    equal to the single-device op on the gathered tensors. Differentiable; the gradients of
    replicated inputs are this rank's partial sums. ``backend`` picks the local backend as in the
    single-device op; ``stream`` runs the local op and the transfers on that stream or device.
    ``transport``: ``"p2p"`` (send/recv to the neighbours only; default on CPU streams) or
    ``"gather"`` (one all_gather of the border rows; default on GPU streams, since MLX's NCCL
    backend has no send/recv). A group of one process runs the single-device op.
    """


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, rpb=None, return_lse=False, group=None, axis=0, backend=None, stream=None,
         transport=None):
    return _distributed(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                        additional_values, rpb, return_lse, group, axis, backend, stream, transport)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, rpb=None, return_lse=False, group=None, axis=0, backend=None, stream=None,
         transport=None):
    return _distributed(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                        additional_values, rpb, return_lse, group, axis, backend, stream, transport)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
         additional_values=None, rpb=None, return_lse=False, group=None, axis=0, backend=None, stream=None,
         transport=None):
    return _distributed(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                        additional_values, rpb, return_lse, group, axis, backend, stream, transport)


na1d.__doc__ = _DOC.format(n=1, axes="L")
na2d.__doc__ = _DOC.format(n=2, axes="X, Y")
na3d.__doc__ = _DOC.format(n=3, axes="X, Y, Z")
