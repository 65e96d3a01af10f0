"""The pure backend: neighborhood attention from MLX array operations, on every MLX device.

Everything reduces to three *slot primitives* over the ``Kt`` slots of each query
(:mod:`natten_mlx.windows`): ``dot`` (a query-side vector against each slot's key-side vector),
``wsum`` (slot weights times the slots' key-side vectors) and ``scatter`` (its transpose: slot
weights times query-side vectors, summed into the keys). The forward is ``dot`` -> softmax ->
``wsum``; the backward is two ``dot``, one ``wsum`` and two ``scatter``. Each primitive has two
strategies that compute the same numbers:

- ``slices`` (default on the CPU): queries are covered by runs whose windows move in lock-step
  (:func:`natten_mlx.windows.axis_runs`), so each slot of a run is a strided slice of the keys:
  one fused multiply-reduce per (run, slot), no gathered copy of the keys per query. Used while
  the number of such ops stays small (``MAX_SLICE_OPS``), else ``gather``.
- ``gather``: the key-side vectors of every slot are gathered through the slot table; simple,
  ``O(N * Kt)`` memory.

A third strategy, ``tiled`` (default on a GPU), cuts queries into tiles that attend to their halo
through batched matmuls under a per-tile mask, forward and backward, chunk by chunk. Its forward
without lse uses MLX's fused SDPA where that keeps float32 scores (measured once per device,
dtype and head dims: :func:`_sdpa_keeps_float32_scores`).
When the window covers the whole input (no causal axis, no dilation), neighborhood attention is
dense attention, and dense attention is what runs.

The strategy follows ``problem.device`` (the stream the call runs on), unless configured:
``use_backend("pure", strategy="gather")``, ``get_backend("pure").configure(strategy=..., tile=...)``,
or ``$NATTEN_MLX_PURE_STRATEGY`` for a whole process. Every strategy serves sub-domain problems
(a query block against a key slab, :func:`natten_mlx.functional.na_subdomain`).

Scores and softmax statistics are float32 whatever the input dtype (on a GPU the tiled path keeps
its operands in the input dtype but upcasts the score matmul: issue 13); outputs are cast back.
"""

from __future__ import annotations

import itertools
import os
from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..problem import Problem
from ..tiles import rpb_weights, tile_plan
from ..windows import axis_args, axis_runs, axis_windows, neighborhood_tables, outer

STRATEGY_ENV = "NATTEN_MLX_PURE_STRATEGY"
FUSED_INPUTS = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
STRATEGIES = ("slices", "gather", "tiled")
# the slices strategy emits a few ops per (run combination, slot): past this many, gather wins
MAX_SLICE_OPS = 400


def default_strategy(device: str | None = None) -> str:
    """The strategy used on ``device`` (``"cpu"``/``"gpu"``; None: MLX's default device) when none is
    configured: ``$NATTEN_MLX_PURE_STRATEGY`` if set, else ``tiled`` on a GPU and ``slices`` on the CPU."""
    chosen = os.environ.get(STRATEGY_ENV)
    if chosen:
        if chosen not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV}={chosen!r} is not a strategy; choose one of {STRATEGIES}")
        return chosen
    if device is None:
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return "tiled" if device == "gpu" else "slices"


def _softmax_lse(s: mx.array, axis: int) -> tuple[mx.array, mx.array]:
    """Softmax weights and logsumexp (keepdims) along ``axis`` with a single exp pass.

    Every query sees at least itself, so no row is all -inf."""
    m = mx.stop_gradient(s.max(axis=axis, keepdims=True))
    e = mx.exp(s - m)
    total = e.sum(axis=axis, keepdims=True)
    return e / total, m + mx.log(total)


@lru_cache(maxsize=128)
def _tables(geometry):
    """Slot tables of a problem's geometry as MLX arrays (built once per geometry)."""
    t = neighborhood_tables(*geometry)
    valid = None if t.valid is None else mx.array(t.valid)
    return mx.array(t.key_index), valid, mx.array(t.rpb_index)


class SlicePlan:
    """How the slices strategy walks a geometry (see :func:`natten_mlx.windows.axis_runs`).

    The leading ``front`` axes are covered by runs; the last axis of a 2D/3D problem is gathered
    (each key repeated once per slot of that axis) so that one op per run combination and slot
    of the front axes computes a whole block of scores.
    """

    def __init__(self, geometry):
        spatial, kernel_size, stride, dilation, is_causal, _, _, kv_spatial, _ = geometry
        per_axis = axis_args(geometry)
        n = len(spatial)
        self.front = max(n - 1, 1)
        self.front_shape = tuple(spatial[: self.front])
        self.tail = spatial[-1] if n > 1 else 1
        # keys live in their own slab (sub-domain problems): its front shape and tail length
        self.kv_front_shape = tuple(kv_spatial[: self.front])
        self.kv_tail = kv_spatial[-1] if n > 1 else 1
        self.tail_slots = kernel_size[-1] if n > 1 else 1
        self.front_slots = tuple(itertools.product(*(range(k) for k in kernel_size[: self.front])))
        self.dilation = dilation[: self.front]
        # every run of an axis advances by stride * dilation; front axes are stored split as
        # [step, ceil(L / step)] (residue outermost) so that a run's keys are a contiguous block
        self.steps = tuple(s * d for s, d in zip(stride[: self.front], dilation[: self.front]))
        self.split = tuple(-(-n // st) for n, st in zip(self.kv_front_shape, self.steps))
        runs = [axis_runs(*args) for args in per_axis][: self.front]
        self.combos = tuple(itertools.product(*runs))
        self.num_ops = len(self.combos) * len(self.front_slots)
        weights = [int(np.prod(self.front_shape[a + 1 :], dtype=np.int64)) for a in range(self.front)]
        order = []
        for combo in self.combos:
            flat = 0
            for a, run in enumerate(combo):
                pos = np.arange(run.first, run.first + run.step * run.count, run.step)
                shape = [1] * self.front
                shape[a] = run.count
                flat = flat + pos.reshape(shape) * weights[a]
            order.append(np.asarray(flat).reshape(-1))
        order = np.concatenate(order)
        self.perm = mx.array(order.astype(np.int32))  # run order -> front token
        self.inverse = mx.array(np.argsort(order).astype(np.int32))  # front token -> run order
        self.tail_index = None
        if n > 1:
            w = axis_windows(*per_axis[-1])
            self.tail_index = mx.array(w.key_index.reshape(-1).astype(np.int32))


@lru_cache(maxsize=128)
def _slice_plan(geometry) -> SlicePlan:
    return SlicePlan(geometry)


def _gather_tokens(x: mx.array, key_index: mx.array) -> mx.array:
    """``x [B, N, Hk, E]`` -> ``[B, N, Kt, Hk, E]``: the key of every slot of every query."""
    n, kt = key_index.shape
    g = mx.take(x, key_index.reshape(-1), axis=1)
    return g.reshape(x.shape[0], n, kt, *x.shape[2:])


def _rpb_bias(p: Problem, rpb: mx.array, rpb_index: mx.array) -> mx.array:
    """``[N, H, Kt]`` bias of every slot, float32."""
    flat = rpb.astype(mx.float32).reshape(p.heads, -1)
    bias = mx.take(flat, rpb_index.reshape(-1), axis=1).reshape(p.heads, *rpb_index.shape)
    return bias.transpose(1, 0, 2)


def _geometry(p: Problem):
    return p.geometry


def _mask_invalid(p: Problem, x: mx.array, fill: float) -> mx.array:
    """``x [B, N, H_kv, G, Kt]`` with the slots outside the neighborhood (causal) set to ``fill``."""
    valid = _tables(p.geometry)[1]
    return x if valid is None else mx.where(valid[:, None, None, :], x, fill)


class PureBackend:
    """Reference-exact backend built from MLX operations; serves every valid problem."""

    name = "pure"
    priority = 0
    distribution = "natten-mlx"
    description = "MLX array operations (slot slices or gathers on CPU, tiled halo matmuls on GPU); every feature"
    differentiation = "backward"
    #: what :meth:`configure` accepts
    OPTIONS = ("strategy", "tile")

    def __init__(self, strategy: str | None = None, tile: tuple[int, ...] | None = None):
        """``strategy``: one of ``slices``, ``gather``, ``tiled`` (None: :func:`default_strategy` of
        the problem's device); ``tile``: queries per tile along each axis for ``tiled`` (None: the
        defaults of :func:`natten_mlx.tiles.default_tile`; clipped to each axis' length)."""
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not a strategy; choose one of {STRATEGIES}")
        if tile is not None:
            if isinstance(tile, int) and not isinstance(tile, bool):
                tile = (tile,)
            if not isinstance(tile, (tuple, list)) or not all(isinstance(t, int) and t >= 1 for t in tile):
                raise ValueError(f"tile={tile!r} must be a tuple of ints >= 1 (queries per tile along each axis)")
            tile = tuple(tile)
        self.strategy = strategy
        self.tile = tile
        self._configured: dict = {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in (("strategy", self.strategy), ("tile", self.tile)) if v is not None)
        return f"PureBackend({opts})"

    def configure(self, **options) -> "PureBackend":
        """A copy with ``strategy=`` and/or ``tile=`` set (see :meth:`__init__`); the same object is
        returned for the same options, so calls through it share compiled functions."""
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise TypeError(f"backend 'pure' has no option {', '.join(map(repr, unknown))}; its options: {', '.join(self.OPTIONS)}")
        merged = dict(strategy=self.strategy, tile=self.tile)
        merged.update(options)
        if isinstance(merged["tile"], list):
            merged["tile"] = tuple(merged["tile"])
        key = tuple(sorted(merged.items()))
        if key not in self._configured:
            self._configured[key] = PureBackend(**merged)
        return self._configured[key]

    def available(self) -> str | None:
        return None

    def supports(self, problem: Problem) -> str | None:
        if self.tile is not None and len(self.tile) != problem.na_dim and self._strategy(problem) == "tiled":
            return f"configured with tile={self.tile} ({len(self.tile)} axes) but the problem has {problem.na_dim}"
        return None

    def strategy_for(self, problem: Problem) -> str:
        """The strategy that serves ``problem``: the configured one, else the device's default."""
        return self._strategy(problem)

    def _strategy(self, p: Problem) -> str:
        return self.strategy or default_strategy(p.device)

    def _use_slices(self, p: Problem) -> bool:
        strategy = self._strategy(p)
        if strategy == "gather":
            return False
        return strategy == "slices" or _slice_plan(p.geometry).num_ops <= MAX_SLICE_OPS

    # ---- layouts -----------------------------------------------------------------------------
    @staticmethod
    def _queries(p: Problem, x: mx.array) -> mx.array:
        """``[B, *spatial, H, E]`` -> float32 ``[B, N, H_kv, G, E]`` (query head h reads kv head h // G)."""
        return x.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, p.heads // p.kv_heads, -1)

    @staticmethod
    def _tokens(p: Problem, x: mx.array) -> mx.array:
        """``[B, *kv_spatial, H_kv, E]`` -> float32 ``[B, N_kv, H_kv, E]``."""
        return x.astype(mx.float32).reshape(p.batch, p.kv_tokens, p.kv_heads, -1)

    @staticmethod
    def _extra(x: mx.array) -> mx.array:
        return x.astype(mx.float32)

    @staticmethod
    def _spatial(p: Problem, x: mx.array, heads: int, dtype) -> mx.array:
        """``[B, N, ...]`` -> ``[B, *spatial, heads, E]`` in ``dtype`` (query side)."""
        return x.reshape(p.batch, *p.spatial, heads, -1).astype(dtype)

    @staticmethod
    def _kv_spatial(p: Problem, x: mx.array, dtype) -> mx.array:
        """``[B, N_kv, H_kv, E]`` -> ``[B, *kv_spatial, H_kv, E]`` in ``dtype`` (key/value side)."""
        return x.reshape(p.batch, *p.kv_spatial, p.kv_heads, -1).astype(dtype)

    # ---- the slot primitives -----------------------------------------------------------------
    def _dot(self, p: Problem, x: mx.array, y: mx.array) -> mx.array:
        """``x [B, N, H_kv, G, E]``, ``y [B, N, H_kv, E]`` -> ``[B, N, H_kv, G, Kt]``: x . y[slot key]."""
        if self._use_slices(p):
            return _slices_dot(p, x, y)
        yg = _gather_tokens(y, _tables(p.geometry)[0])  # [B, N, Kt, Hkv, E]
        return (yg[:, :, :, :, None, :] * x[:, :, None]).sum(-1).transpose(0, 1, 3, 4, 2)

    def _wsum(self, p: Problem, w: mx.array, y: mx.array) -> mx.array:
        """``w [B, N, H_kv, G, Kt]``, ``y [B, N, H_kv, E]`` -> ``[B, N, H_kv, G, E]``: sum_slot w * y[slot key]."""
        if self._use_slices(p):
            return _slices_wsum(p, w, y)
        yg = _gather_tokens(y, _tables(p.geometry)[0])
        return (w.transpose(0, 1, 4, 2, 3)[..., None] * yg[:, :, :, :, None, :]).sum(2)

    def _scatter(self, p: Problem, w: mx.array, x: mx.array) -> mx.array:
        """``w [B, N, H_kv, G, Kt]``, ``x [B, N, H_kv, G, E]`` -> ``[B, N, H_kv, E]``: the transpose of
        ``_wsum``; each key sums ``w * x`` over the (query, slot) pairs that read it, and over G."""
        if self._use_slices(p):
            return _slices_scatter(p, w, x)
        key_index = _tables(p.geometry)[0]
        contrib = (w.transpose(0, 1, 4, 2, 3)[..., None] * x[:, :, None]).sum(4)  # [B, N, Kt, Hkv, E]
        zeros = mx.zeros((p.batch, p.kv_tokens, p.kv_heads, x.shape[-1]), dtype=mx.float32)
        return zeros.at[:, key_index].add(contrib)

    # ---- scores and weights ------------------------------------------------------------------
    def _scores(self, p: Problem, query, key, additional_keys, rpb) -> tuple[mx.array, int]:
        """Scaled scores ``[B, N, H_kv, G, Kt (+N_extra)]`` float32, invalid slots -inf; and Kt."""
        q = self._queries(p, query) * p.scale
        if p.covers_everything and p.op == "fused":
            s = mx.einsum("bnhgd,bmhd->bnhgm", q, self._tokens(p, key))  # slot j is token j
        else:
            s = self._dot(p, q, self._tokens(p, key))
        if rpb is not None:
            rpb_index = _tables(p.geometry)[2]
            s = s + _rpb_bias(p, rpb, rpb_index).reshape(p.num_tokens, p.kv_heads, -1, s.shape[-1])
        s = _mask_invalid(p, s, -mx.inf)
        kt = s.shape[-1]
        if additional_keys is not None:
            s = mx.concatenate([s, mx.einsum("bnhgd,bmhd->bnhgm", q, self._extra(additional_keys))], -1)
        return s, kt

    def _weighted_values(self, p: Problem, w: mx.array, value, additional_values, kt: int) -> mx.array:
        """``w [B, N, H_kv, G, Kt (+N_extra)]`` -> ``[B, N, H_kv, G, Dv]``."""
        if p.covers_everything and p.op == "fused":
            out = mx.einsum("bnhgm,bmhe->bnhge", w[..., :kt], self._tokens(p, value))
        else:
            out = self._wsum(p, w[..., :kt], self._tokens(p, value))
        if additional_values is not None:
            out = out + mx.einsum("bnhgm,bmhe->bnhge", w[..., kt:], self._extra(additional_values))
        return out

    # ---- fused -------------------------------------------------------------------------------
    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """``(out [B, *spatial, H, Dv] in the input dtype, lse [B, *spatial, H] float32)``."""
        p = problem
        if not p.covers_everything and self._strategy(p) == "tiled":
            return self._tiled_forward(p, query, key, value, additional_keys, additional_values, rpb)
        s, kt = self._scores(p, query, key, additional_keys, rpb)
        w, lse = _softmax_lse(s, axis=-1)
        out = self._weighted_values(p, w, value, additional_values, kt)
        return self._spatial(p, out, p.heads, p.dtype), lse.reshape(p.batch, *p.spatial, p.heads)

    def fused_backward(self, record) -> dict:
        """Gradients by input name from a :class:`~natten_mlx.protocol.BackwardRecord` of the fused op
        (recomputed from the inputs; the record's lse is not needed)."""
        x = record.inputs
        grads = self._fused_backward(record.problem, x["query"], x["key"], x["value"], x.get("additional_keys"),
                                     x.get("additional_values"), x.get("rpb"), record.d_out, record.d_lse)
        return dict(zip(FUSED_INPUTS, grads))

    def _fused_backward(self, problem, query, key, value, additional_keys, additional_values, rpb, d_out, d_lse):
        """Gradients for (query, key, value, additional_keys, additional_values, rpb); None where absent."""
        p = problem
        if p.covers_everything:
            return self._autodiff_backward(p, query, key, value, additional_keys, additional_values, rpb, d_out, d_lse)
        if self._strategy(p) == "tiled":
            return self._tiled_backward(p, query, key, value, additional_keys, additional_values, rpb, d_out, d_lse)
        s, kt = self._scores(p, query, key, additional_keys, rpb)
        w, _ = _softmax_lse(s, axis=-1)
        do = self._queries(p, d_out)  # [B, N, Hkv, G, Dv]
        dw = self._dot(p, do, self._tokens(p, value))
        if additional_values is not None:
            dw = mx.concatenate([dw, mx.einsum("bnhge,bmhe->bnhgm", do, self._extra(additional_values))], -1)
        ds = w * (dw - (w * dw).sum(-1, keepdims=True))
        if d_lse is not None:
            ds = ds + w * d_lse.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, -1)[..., None]
        grads = self._score_backward(p, query, key, additional_keys, rpb, ds, kt)
        d_value = self._scatter(p, w[..., :kt], do)
        d_ev = None
        if additional_values is not None:
            d_ev = mx.einsum("bnhgm,bnhge->bmhe", w[..., kt:], do).astype(additional_values.dtype)
        dq, dk, dek, drpb = grads
        return dq, dk, self._kv_spatial(p, d_value, value.dtype), dek, d_ev, drpb

    def _score_backward(self, p: Problem, query, key, additional_keys, rpb, ds, kt):
        """Given ``ds = dLoss/dscores [B, N, H_kv, G, Kt (+N_extra)]``: (d_query, d_key, d_extra_keys, d_rpb)."""
        dsn = _mask_invalid(p, ds[..., :kt], 0.0)
        q = self._queries(p, query)
        dq = self._wsum(p, dsn, self._tokens(p, key))
        dk = self._scatter(p, dsn, q)
        dek = None
        if additional_keys is not None:
            dq = dq + mx.einsum("bnhgm,bmhd->bnhgd", ds[..., kt:], self._extra(additional_keys))
            dek = (mx.einsum("bnhgm,bnhgd->bmhd", ds[..., kt:], q) * p.scale).astype(additional_keys.dtype)
        drpb = None
        if rpb is not None:
            rpb_index = _tables(p.geometry)[2]
            cot = dsn.reshape(p.batch, p.num_tokens, p.heads, kt).sum(0)  # [N, H, Kt]
            _, (drpb,) = mx.vjp(lambda r: _rpb_bias(p, r, rpb_index), [rpb], [cot])
            drpb = drpb.astype(rpb.dtype)
        return (
            self._spatial(p, dq * p.scale, p.heads, query.dtype),
            self._kv_spatial(p, dk * p.scale, key.dtype),
            dek,
            drpb,
        )

    def _autodiff_backward(self, p, query, key, value, additional_keys, additional_values, rpb, d_out, d_lse):
        """Dense problems (whole-input windows): MLX's autodiff of the dense forward."""
        names = ("query", "key", "value", "additional_keys", "additional_values", "rpb")
        given = dict(zip(names, (query, key, value, additional_keys, additional_values, rpb)))
        present = [n for n in names if given[n] is not None]

        def forward(*xs):
            out, lse = self.fused_forward(p, **{**given, **dict(zip(present, xs))})
            return out, lse

        cot_lse = mx.zeros((p.batch, *p.spatial, p.heads), mx.float32) if d_lse is None else d_lse
        _, grads = mx.vjp(forward, [given[n] for n in present], [d_out, cot_lse])
        by_name = dict(zip(present, grads))
        return tuple(by_name.get(n) for n in names)

    # ---- tiled -------------------------------------------------------------------------------
    def _tiled_forward(self, p: Problem, query, key, value, additional_keys, additional_values, rpb):
        plan = _plan(p.geometry, self.tile)
        use_sdpa = (not p.return_lse and rpb is None and additional_keys is None
                    and _sdpa_keeps_float32_scores(p, plan.query_index.shape[1], not plan.all_valid))
        outs, lses = [], []
        chunks = list(_tile_chunks(p, plan))
        for rows in chunks:
            t = _TileChunk(p, plan, rows, query, key, value, additional_keys, additional_values)
            if use_sdpa:
                outs.append(t.sdpa_out())
            else:
                w, lse = _softmax_lse(t.scores(rpb), axis=-1)
                outs.append(t.weighted_values(w))
                lses.append(lse.squeeze(-1))
            if len(chunks) > 1:
                _bound_memory(outs[-1], *lses[-1:])
        out = _tile_outputs(p, plan, outs)
        lse = None if use_sdpa else _tile_outputs(p, plan, [x[..., None] for x in lses]).squeeze(-1)
        return out.reshape(p.batch, *p.spatial, p.heads, -1).astype(p.dtype), (
            None if lse is None else lse.reshape(p.batch, *p.spatial, p.heads)
        )

    def _tiled_backward(self, p: Problem, query, key, value, additional_keys, additional_values, rpb, d_out, d_lse):
        plan = _plan(p.geometry, self.tile)
        f32 = mx.float32
        dk = mx.zeros((p.batch, p.kv_tokens, p.kv_heads, p.head_dim), f32)
        dv = mx.zeros((p.batch, p.kv_tokens, p.kv_heads, p.value_head_dim), f32)
        dqs, dek, dev, drpb = [], None, None, None
        do_all = self._queries(p, d_out)
        dl_all = None if d_lse is None else d_lse.astype(f32).reshape(p.batch, p.num_tokens, p.kv_heads, -1)
        chunks = list(_tile_chunks(p, plan))
        for rows in chunks:
            t = _TileChunk(p, plan, rows, query, key, value, additional_keys, additional_values)
            s = t.scores(rpb)
            w, _ = _softmax_lse(s, axis=-1)
            real = plan.query_real[rows][None, :, None, None, :, None]  # padding queries carry no gradient
            do = mx.where(real, t.tiles(do_all).astype(f32), 0.0)  # [B, Tc, Hkv, G, Tq, Dv]
            dw = do @ t.v.astype(f32).swapaxes(-1, -2)
            if additional_values is not None:
                dw = mx.concatenate([dw, do @ t.ev.astype(f32).swapaxes(-1, -2)], -1)
            ds = w * (dw - (w * dw).sum(-1, keepdims=True))
            if dl_all is not None:
                ds = ds + w * mx.where(real, t.tiles(dl_all[..., None]).astype(f32), 0.0)
            hk = t.hk
            dsn, wn = ds[..., :hk], w[..., :hk]
            q32 = t.q.astype(f32)
            dq = dsn @ t.k.astype(f32)
            dk_halo = (dsn.swapaxes(-1, -2) @ q32).sum(3)  # [B, Tc, Hkv, Hk, D]
            dv_halo = (wn.swapaxes(-1, -2) @ do).sum(3)
            idx = plan.key_index[rows].reshape(-1)
            dk = dk.at[:, idx].add(dk_halo.transpose(0, 1, 3, 2, 4).reshape(p.batch, -1, p.kv_heads, p.head_dim))
            dv = dv.at[:, idx].add(dv_halo.transpose(0, 1, 3, 2, 4).reshape(p.batch, -1, p.kv_heads, p.value_head_dim))
            if additional_keys is not None:
                dse, we = ds[..., hk:], w[..., hk:]
                dq = dq + dse @ t.ek.astype(f32)
                part_k = (dse.swapaxes(-1, -2) @ q32).sum(axis=(1, 3))  # [B, Hkv, M, D]
                part_v = (we.swapaxes(-1, -2) @ do).sum(axis=(1, 3))
                dek = part_k if dek is None else dek + part_k
                dev = part_v if dev is None else dev + part_v
            if rpb is not None:
                # [B, Tc, Hkv, G, Tq, Hk] -> [H, Tc * Tq * Hk], summed over the batch, into rpb's flat index
                cot = dsn.sum(0).transpose(1, 2, 0, 3, 4).reshape(p.heads, -1)
                flat = mx.zeros((p.heads, rpb[0].size), f32).at[:, plan.rpb_index(rows).reshape(-1)].add(cot)
                drpb = flat if drpb is None else drpb + flat
            dqs.append(dq)
            if len(chunks) > 1:
                _bound_memory(dq, dk, dv, *(x for x in (dek, dev, drpb) if x is not None))
        dq = _tile_outputs(p, plan, dqs).reshape(p.batch, *p.spatial, p.heads, -1) * p.scale
        d_ek = None if dek is None else (dek.transpose(0, 2, 1, 3) * p.scale).astype(additional_keys.dtype)
        d_ev = None if dev is None else dev.transpose(0, 2, 1, 3).astype(additional_values.dtype)
        d_rpb = None if drpb is None else drpb.reshape(rpb.shape).astype(rpb.dtype)
        return (
            dq.astype(query.dtype),
            self._kv_spatial(p, dk * p.scale, key.dtype),
            self._kv_spatial(p, dv, value.dtype),
            d_ek,
            d_ev,
            d_rpb,
        )

    # ---- split ops -----------------------------------------------------------------------------
    def qk_forward(self, problem, query, key, additional_keys=None, rpb=None):
        """Scores ``[B, *spatial, H, Kt (+N_extra)]`` in the input dtype; invalid causal slots -inf."""
        s, _ = self._scores(problem, query, key, additional_keys, rpb)
        return self._spatial(problem, s, problem.heads, problem.dtype)

    def qk_backward(self, record) -> dict:
        """Gradients of ``query, key, additional_keys, rpb`` from the record of a qk call."""
        p, x = record.problem, record.inputs
        ds = record.d_out.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, p.heads // p.kv_heads, -1)
        grads = self._score_backward(p, x["query"], x["key"], x.get("additional_keys"), x.get("rpb"), ds, p.window_size)
        return dict(zip(("query", "key", "additional_keys", "rpb"), grads))

    def _av_weights(self, p: Problem, attn: mx.array) -> mx.array:
        """attn as float32 ``[B, N, H_kv, G, Kt (+N_extra)]`` with invalid slots zeroed (upstream never reads them)."""
        w = attn.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, p.heads // p.kv_heads, -1)
        kt = p.window_size
        wn = _mask_invalid(p, w[..., :kt], 0.0)
        return mx.concatenate([wn, w[..., kt:]], -1) if w.shape[-1] > kt else wn

    def av_forward(self, problem, attn, value, additional_values=None):
        """``attn [B, *spatial, H, Kt (+N_extra)]`` x values -> ``[B, *spatial, H, Dv]``."""
        p = problem
        out = self._weighted_values(p, self._av_weights(p, attn), value, additional_values, p.window_size)
        return self._spatial(p, out, p.heads, p.dtype)

    def av_backward(self, record) -> dict:
        """Gradients of ``attn, value, additional_values`` from the record of an av call."""
        p, x, d_out = record.problem, record.inputs, record.d_out
        attn, value, additional_values = x["attn"], x["value"], x.get("additional_values")
        kt = p.window_size
        w = self._av_weights(p, attn)
        do = self._queries(p, d_out)
        dw = _mask_invalid(p, self._dot(p, do, self._tokens(p, value)), 0.0)
        d_ev = None
        if additional_values is not None:
            dw = mx.concatenate([dw, mx.einsum("bnhge,bmhe->bnhgm", do, self._extra(additional_values))], -1)
            d_ev = mx.einsum("bnhgm,bnhge->bmhe", w[..., kt:], do).astype(additional_values.dtype)
        dv = self._scatter(p, w[..., :kt], do)
        return dict(attn=self._spatial(p, dw, p.heads, attn.dtype), value=self._kv_spatial(p, dv, value.dtype),
                    additional_values=d_ev)


# ---- the slices strategy -------------------------------------------------------------------------
# Layouts put H_kv before the tail axis so that the per-slot contractions are batched matmuls over
# contiguous [.., G, E] x [.., E, Kg] blocks (MLX's matmul beats element-wise multiply-reduce here).
def _split_front(p: Problem, plan: "SlicePlan", y: mx.array) -> mx.array:
    """``[B, *front, ...]`` -> ``[B, step_1, L_1 / step_1, (step_2, L_2 / step_2), ...]`` (zero-padded)."""
    n = plan.front
    pads = [(0, 0)] + [(0, st * q - length) for st, q, length in zip(plan.steps, plan.split, plan.kv_front_shape)]
    if any(hi for _, hi in pads):
        y = mx.pad(y, pads + [(0, 0)] * (y.ndim - n - 1))
    shape = [p.batch]
    for st, q in zip(plan.steps, plan.split):
        shape += [q, st]
    y = y.reshape(*shape, *y.shape[n + 1 :])
    order = [0]
    for a in range(n):
        order += [2 + 2 * a, 1 + 2 * a]
    return y.transpose(*order, *range(2 * n + 1, y.ndim))


def _unsplit_front(p: Problem, plan: "SlicePlan", y: mx.array) -> mx.array:
    """The inverse of :func:`_split_front` (padding cropped)."""
    n = plan.front
    order = [0]
    for a in range(n):
        order += [2 + 2 * a, 1 + 2 * a]
    y = y.transpose(*order, *range(2 * n + 1, y.ndim))
    y = y.reshape(p.batch, *(st * q for st, q in zip(plan.steps, plan.split)), *y.shape[2 * n + 1 :])
    return y[(slice(None),) + tuple(slice(0, length) for length in plan.kv_front_shape)]


def _slices_layout(p: Problem, plan: "SlicePlan", y: mx.array) -> mx.array:
    """``y [B, N, H_kv, E]`` -> split-front ``[B, (step, L / step) per front axis, H_kv, tail, tail_slots, E]``."""
    y = y.reshape(p.batch, *plan.kv_front_shape, plan.kv_tail, p.kv_heads, -1)
    y = mx.swapaxes(y, plan.front + 1, plan.front + 2)  # [B, *front, Hkv, tail, E]
    if plan.tail_index is not None:
        y = mx.take(y, plan.tail_index, axis=plan.front + 2)
    y = y.reshape(p.batch, *plan.kv_front_shape, p.kv_heads, plan.tail, plan.tail_slots, -1)
    # contiguous: MLX's matmul copies an operand whose buffer flags say otherwise, once per slot
    return mx.contiguous(_split_front(p, plan, y))


def _run_order(p: Problem, plan: "SlicePlan", x: mx.array) -> mx.array:
    """``x [B, N, H_kv, ...]`` -> ``[B, F, H_kv, tail, ...]`` with the front tokens in run order."""
    x = x.reshape(p.batch, -1, plan.tail, *x.shape[2:]).swapaxes(2, 3)
    return mx.take(x, plan.perm, axis=1)


def _token_order(p: Problem, plan: "SlicePlan", parts: list) -> mx.array:
    """Run-ordered blocks ``[B, size, H_kv, tail, ...]`` -> ``[B, N, H_kv, ...]`` in token order."""
    x = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    x = mx.take(x, plan.inverse, axis=1).swapaxes(2, 3)
    return x.reshape(p.batch, p.num_tokens, *x.shape[3:])


def _blocks(p: Problem, plan: "SlicePlan"):
    """Yield (run combination, its front extents, the slice of run order it occupies)."""
    offset = 0
    for combo in plan.combos:
        counts = tuple(r.count for r in combo)
        size = int(np.prod(counts))
        yield combo, counts, slice(offset, offset + size)
        offset += size


def _key_slices(plan: "SlicePlan", combo, js) -> tuple:
    """Index of a split-front array selecting the keys of front slot ``js`` for every query of ``combo``."""
    index = [slice(None)]
    for run, j, d, st in zip(combo, js, plan.dilation, plan.steps):
        start = run.key_start + j * d
        length = 1 if run.key_step == 0 else run.count
        index += [slice(start % st, start % st + 1), slice(start // st, start // st + length)]
    return tuple(index)


def _keys(y: mx.array, plan: "SlicePlan", combo, js) -> mx.array:
    """The keys of front slot ``js`` for ``combo``: ``[B, c_1 or 1, ..., rest]`` (split axes merged)."""
    k = y[_key_slices(plan, combo, js)]
    merged = [k.shape[2 + 2 * a] for a in range(plan.front)]
    return k.reshape(k.shape[0], *merged, *k.shape[1 + 2 * plan.front :])


def _matmul(a: mx.array, b: mx.array) -> mx.array:
    """``a @ b``, element-wise where one side is a vector (1D problems have one tail slot): MLX's
    CPU matmul is slow for dot products and outer products."""
    if b.shape[-1] == 1:
        return (a * b.swapaxes(-1, -2)).sum(-1, keepdims=True)
    if a.shape[-1] == 1:
        return a * b
    return a @ b


def _slices_dot(p: Problem, x: mx.array, y: mx.array) -> mx.array:
    plan = _slice_plan(p.geometry)
    xr = mx.contiguous(_run_order(p, plan, x))  # [B, F, Hkv, tail, G, E]
    yt = mx.contiguous(_slices_layout(p, plan, y).swapaxes(-1, -2))  # [B, *front, Hkv, tail, E, Kg]
    parts = []
    for combo, counts, rows in _blocks(p, plan):
        xs = xr[:, rows].reshape(p.batch, *counts, *xr.shape[2:])
        per_slot = [_matmul(xs, _keys(yt, plan, combo, js)) for js in plan.front_slots]  # [.., G, Kg]
        block = mx.stack(per_slot, axis=-2)  # [B, c.., Hkv, tail, G, Kf, Kg]
        parts.append(block.reshape(p.batch, -1, *xr.shape[2:5], p.window_size))
    return _token_order(p, plan, parts)


def _slot_major(p: Problem, plan: "SlicePlan", w: mx.array) -> mx.array:
    """``w [B, N, H_kv, G, Kt]`` -> run-ordered ``[Kf, B, F, H_kv, tail, G, Kg]``: each front slot a
    contiguous block (MLX's matmul copies operands with gaps between batch entries)."""
    wr = _run_order(p, plan, w)  # [B, F, Hkv, tail, G, Kt]
    wr = wr.reshape(*wr.shape[:-1], len(plan.front_slots), plan.tail_slots)
    return mx.contiguous(mx.moveaxis(wr, -2, 0))


def _slices_wsum(p: Problem, w: mx.array, y: mx.array) -> mx.array:
    plan = _slice_plan(p.geometry)
    yl = _slices_layout(p, plan, y)  # [B, *front, Hkv, tail, Kg, E]
    wr = _slot_major(p, plan, w)
    parts = []
    for combo, counts, rows in _blocks(p, plan):
        acc = None
        for f, js in enumerate(plan.front_slots):
            wc = wr[f, :, rows].reshape(p.batch, *counts, *wr.shape[3:])
            term = _matmul(wc, _keys(yl, plan, combo, js))  # [.., G, E]
            acc = term if acc is None else acc + term
        parts.append(acc.reshape(p.batch, -1, *acc.shape[-4:]))
    return _token_order(p, plan, parts)


def _slices_scatter(p: Problem, w: mx.array, x: mx.array) -> mx.array:
    plan = _slice_plan(p.geometry)
    e, g = x.shape[-1], x.shape[3]
    wr = _slot_major(p, plan, w)  # [Kf, B, F, Hkv, tail, G, Kg]
    xr = _run_order(p, plan, x)  # [B, F, Hkv, tail, G, E]
    # one accumulator per combination of front residues (the split layout's step axes): indexing
    # only the L / step axes keeps MLX's scatter within its 10 dimensions (CUDA) for 3D problems
    rest = (p.kv_heads, plan.tail, plan.tail_slots, e)
    accs: dict = {}
    for combo, counts, rows in _blocks(p, plan):
        xc = xr[:, rows].reshape(p.batch, *counts, *xr.shape[2:])[..., None, :]  # [.., G, 1, E]
        shared = tuple(1 + a for a, r in enumerate(combo) if r.key_step == 0 and r.count > 1)
        for f, js in enumerate(plan.front_slots):
            wc = wr[f, :, rows].reshape(p.batch, *counts, *wr.shape[3:])
            if g == 1:  # no GQA: an outer product, no sum over the group
                contrib = wc[..., 0, :, None] * xc[..., 0, :, :]  # [B, c.., Hkv, tail, Kg, E]
            else:
                contrib = (wc[..., None] * xc).sum(-3)
            if shared:
                contrib = contrib.sum(axis=shared, keepdims=True)
            index = _key_slices(plan, combo, js)
            residue = tuple(sl.start for sl in index[1::2])
            acc = accs.get(residue)
            if acc is None:
                acc = mx.zeros((p.batch, *plan.split, *rest), dtype=mx.float32)
            accs[residue] = acc.at[(slice(None),) + index[2::2]].add(contrib)
    zeros = None
    parts = []
    for residue in itertools.product(*(range(st) for st in plan.steps)):
        if residue not in accs and zeros is None:
            zeros = mx.zeros((p.batch, *plan.split, *rest), dtype=mx.float32)
        parts.append(accs.get(residue, zeros))
    acc = mx.stack(parts, axis=1).reshape(p.batch, *plan.steps, *plan.split, *rest)  # [B, st.., q.., rest]
    n = plan.front
    order = [0] + [x for a in range(n) for x in (1 + a, 1 + n + a)]
    acc = acc.transpose(*order, *range(2 * n + 1, acc.ndim))  # split layout [B, st_1, q_1, ...]
    acc = _unsplit_front(p, plan, acc)
    # fold the gathered tail axis back: key position tail_index[t * Kg + j] receives acc[.., t, j, :]
    if plan.tail_index is not None:
        # scatter along the leading axis: MLX turns leading full slices into index arrays too, and
        # its CUDA scatter allows 10 dimensions of index plus update
        acc = acc.reshape(p.batch, *plan.kv_front_shape, p.kv_heads, plan.tail * plan.tail_slots, e)
        acc = mx.moveaxis(acc, -2, 0)
        zeros = mx.zeros((plan.kv_tail, p.batch, *plan.kv_front_shape, p.kv_heads, e), dtype=mx.float32)
        acc = mx.moveaxis(zeros.at[plan.tail_index].add(acc), 0, -2)
    acc = acc.reshape(p.batch, *plan.kv_front_shape, p.kv_heads, plan.kv_tail, e)
    return mx.swapaxes(acc, plan.front + 1, plan.front + 2).reshape(p.batch, p.kv_tokens, p.kv_heads, e)


# ---- the tiled strategy ---------------------------------------------------------------------------
# The forward without lse may use mx.fast.scaled_dot_product_attention (2-2.7x faster on an H200).
# For float16/bfloat16 that is exact only where MLX runs a fused kernel with float32 statistics: on
# other paths (its CPU SDPA, its GPU fallback for head dims the fused kernels lack) it rounds the
# scores to the input dtype, the error of issue 13. Which path MLX takes depends on device, head
# dims, query count and mask, so it is measured once per such key (_sdpa_keeps_float32_scores).
_SDPA_EXACT: dict = {}


def _sdpa_keeps_float32_scores(p: Problem, tq: int, masked: bool) -> bool:
    """Whether MLX's SDPA, on ``p``'s device for its dtype, head dims and scale with ``tq`` queries a
    tile, keeps scores in float32: two key classes whose scores (~1000) differ by 0.625, a gap that
    float16 (spacing 0.5) and bfloat16 (spacing 4) cannot hold, must get float32's softmax weights."""
    if p.dtype == mx.float32:
        return True
    key = (p.device, p.dtype, p.head_dim, p.value_head_dim, tq <= 8, masked, p.scale)
    if key in _SDPA_EXACT:
        return _SDPA_EXACT[key]
    if p.head_dim < 2:
        return False
    n, tq = 16, min(tq, 8) if tq <= 8 else 16
    dt = p.dtype
    a = mx.array([32.0 / p.scale, 1.0 / p.scale]).astype(dt)
    q = mx.concatenate([mx.broadcast_to(a, (tq, 2)), mx.zeros((tq, p.head_dim - 2), dt)], -1)
    odd = (mx.arange(n) % 2).astype(mx.float32)
    k = mx.zeros((n, p.head_dim), mx.float32)
    k = mx.concatenate([mx.full((n, 1), 31.25), (0.625 * odd)[:, None], k[:, 2:]], -1).astype(dt)
    v = mx.concatenate([odd[:, None], mx.zeros((n, p.value_head_dim - 1))], -1).astype(dt)
    mask = None
    if masked:
        mask = mx.broadcast_to(mx.arange(n) < n - 2, (1, 1, tq, n))
    try:
        out = mx.fast.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], scale=p.scale,
                                                   mask=mask)
        got = float(out[0, 0, 0, 0].astype(mx.float32).item())
    except ValueError:  # inside mx.compile nothing may be evaluated: take the float32 path, decide later
        return False
    qa = np.array(a.astype(mx.float32), dtype=np.float64)
    gap = p.scale * qa[1] * 0.625  # the score difference of odd over even keys, in float64
    want = 1.0 / (1.0 + np.exp(-gap))
    exact = bool(abs(got - want) < 0.01)
    _SDPA_EXACT[key] = exact
    return exact
# scores of one chunk of tiles stay below this many elements (4 GiB as float32)
TILE_CHUNK_ELEMENTS = 1 << 30


def _tile_chunks(p: Problem, plan: _DevicePlan):
    """Slices of tiles whose scores fit in ``TILE_CHUNK_ELEMENTS``."""
    tn, tq = plan.query_index.shape
    per_tile = p.batch * p.heads * tq * (plan.key_index.shape[1] + p.num_extra)
    step = max(1, TILE_CHUNK_ELEMENTS // per_tile)
    for start in range(0, tn, step):
        yield slice(start, min(start + step, tn))


def _bound_memory(*arrays) -> None:
    """Evaluate one chunk's results now, so that its scores are freed before the next chunk's exist
    (a lazy graph would hold every chunk's scores at once: tens of GiB on large windows). Inside
    ``mx.compile`` evaluation is not allowed (MLX raises ValueError); there the graph stays whole."""
    try:
        mx.eval(*arrays)
    except ValueError:
        pass


def _tile_outputs(p: Problem, plan: _DevicePlan, chunks: list) -> mx.array:
    """Per-chunk ``[B, Tc, H_kv, G, Tq, E]`` -> ``[B, N, H, E]`` in token order."""
    x = mx.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]
    x = x.transpose(0, 1, 4, 2, 3, 5).reshape(p.batch, -1, p.heads, x.shape[-1])
    return mx.take(x, plan.output_index, axis=1)


def _scores_matmul(q: mx.array, k: mx.array) -> mx.array:
    """float32 ``q @ k^T``. MLX's matmul returns its inputs' dtype, so low-precision operands are
    upcast first (the products are exact in float32 either way; only the output rounding differs)."""
    return q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)


class _TileChunk:
    """The tiles ``rows`` of a plan: their queries, halo keys/values, and what they compute.

    On a GPU, operands stay in the input dtype (tensor cores) except the score matmul, whose
    float32 output keeps scores exact enough for the softmax (a float16/bfloat16 result rounds
    scores near 60 to steps of 0.25-0.5: two near-equal top scores then swap weights). On the CPU
    everything is float32. Softmax statistics are float32 everywhere."""

    def __init__(self, p: Problem, plan, rows, query, key, value, additional_keys, additional_values):
        self.p, self.plan, self.rows = p, plan, rows
        dtype = p.dtype if p.device == "gpu" else mx.float32
        g = p.heads // p.kv_heads
        self.tc = rows.stop - rows.start
        self.tq = plan.query_index.shape[1]
        self.hk = plan.key_index.shape[1]
        self.q = self.tiles(query.astype(dtype).reshape(p.batch, p.num_tokens, p.kv_heads, g, -1))
        idx = plan.key_index[rows].reshape(-1)

        def halo(x):  # [B, N_kv, Hkv, E] -> [B, Tc, Hkv, 1, Hk, E]
            x = mx.take(x.astype(dtype).reshape(p.batch, p.kv_tokens, p.kv_heads, -1), idx, axis=1)
            return x.reshape(p.batch, self.tc, self.hk, p.kv_heads, -1).transpose(0, 1, 3, 2, 4)[:, :, :, None]

        self.k, self.v = halo(key), halo(value)
        # extra keys/values: [B, 1, Hkv, 1, M, E]
        self.ek = None if additional_keys is None else additional_keys.astype(dtype).transpose(0, 2, 1, 3)[:, None, :, None]
        self.ev = None if additional_values is None else additional_values.astype(dtype).transpose(0, 2, 1, 3)[:, None, :, None]

    def tiles(self, x: mx.array) -> mx.array:
        """Token-ordered ``[B, N, H_kv, G, E]`` -> ``[B, Tc, H_kv, G, Tq, E]`` for these tiles."""
        p = self.p
        t = mx.take(x, self.plan.query_index[self.rows].reshape(-1), axis=1)
        return t.reshape(p.batch, self.tc, self.tq, *x.shape[2:]).transpose(0, 1, 3, 4, 2, 5)

    def scores(self, rpb) -> mx.array:
        """float32 ``[B, Tc, H_kv, G, Tq, Hk (+N_extra)]``, masked pairs -inf."""
        p, plan, rows = self.p, self.plan, self.rows
        s = _scores_matmul(self.q, self.k) * p.scale
        if rpb is not None:
            flat = rpb.astype(mx.float32).reshape(p.heads, -1)
            bias = mx.take(flat, plan.rpb_index(rows).reshape(-1), axis=1)
            bias = bias.reshape(p.kv_heads, p.heads // p.kv_heads, self.tc, self.tq, self.hk)
            s = s + bias.transpose(2, 0, 1, 3, 4)
        mask = plan.mask(rows)
        if mask is not None:
            s = mx.where(mask[:, None, None], s, -mx.inf)
        if self.ek is not None:
            s = mx.concatenate([s, _scores_matmul(self.q, self.ek) * p.scale], -1)
        return s

    def weighted_values(self, w: mx.array) -> mx.array:
        """float32 weights ``[B, Tc, H_kv, G, Tq, Hk (+N_extra)]`` -> ``[B, Tc, H_kv, G, Tq, Dv]``."""
        out = w[..., : self.hk].astype(self.v.dtype) @ self.v
        if self.ev is not None:
            out = out + w[..., self.hk :].astype(self.ev.dtype) @ self.ev
        return out.astype(mx.float32)

    def sdpa_out(self) -> mx.array:
        """The same output through ``mx.fast.scaled_dot_product_attention`` (no lse needed)."""
        p = self.p
        g = p.heads // p.kv_heads
        b = p.batch * self.tc
        q = self.q.reshape(b, p.heads, self.tq, -1)
        k = self.k.reshape(b, p.kv_heads, self.hk, -1)
        v = self.v.reshape(b, p.kv_heads, self.hk, -1)
        mask = self.plan.mask(self.rows)
        if mask is not None:
            m = mask[:, None]  # [Tc, 1, Tq, Hk]
            mask = mx.broadcast_to(m[None], (p.batch, *m.shape)).reshape(b, 1, self.tq, self.hk)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=p.scale, mask=mask)
        return out.reshape(p.batch, self.tc, p.kv_heads, g, self.tq, -1).astype(mx.float32)


class _DevicePlan:
    """A :class:`~natten_mlx.tiles.TilePlan` with its tables as MLX arrays, and the pair tables
    (mask, rpb index) of a chunk of tiles built on the device from the compact per-axis ones
    (``[T, tile]`` key ranges), never as ``[T, tile, halo]`` host tables."""

    def __init__(self, geometry, tile=None):
        spatial, kernel_size, stride, dilation, is_causal, domain, query_offset, kv_spatial, kv_offset = geometry
        t = tile_plan(spatial, kernel_size, stride, dilation, is_causal, tile, domain, query_offset, kv_spatial,
                      kv_offset)
        self.query_index = mx.array(t.query_index)
        self.query_real = mx.array(t.query_real)
        self.key_index = mx.array(t.key_index)
        self.output_index = mx.array(t.output_index)
        self.tile_coords = mx.array(t.tile_coords)
        self.tile_shape, self.halo_shape = t.tile_shape, t.halo_shape
        self.all_valid = t.all_valid
        self.kernel_size = kernel_size
        i32 = np.int32
        self.axes = [
            dict(lo=mx.array(ax.query_lo.astype(i32)), hi=mx.array(ax.query_hi.astype(i32)),
                 hstart=mx.array(ax.halo_start.astype(i32)), qgc=mx.array(ax.query_group_coord.astype(i32)),
                 kgc=mx.array(ax.key_group_coord.astype(i32)), halo=ax.halo)
            for ax in t.axes
        ]
        self.rel_weights = rpb_weights(kernel_size)

    def _axis_pairs(self, a: int, rows: slice, rel: bool) -> mx.array:
        """``[Tc, tile_a, halo_a]`` mask (or rpb column) of axis ``a`` for the tiles ``rows``."""
        ax = self.axes[a]
        t = self.tile_coords[rows][:, a]
        h = mx.take(ax["hstart"], t)[:, None] + mx.arange(ax["halo"], dtype=mx.int32)[None, :]  # [Tc, halo]
        lo, hi = mx.take(ax["lo"], t, axis=0)[:, :, None], mx.take(ax["hi"], t, axis=0)[:, :, None]
        inside = (h[:, None, :] >= lo) & (h[:, None, :] <= hi)
        if not rel:
            return inside
        col = mx.take(ax["kgc"], h)[:, None, :] - mx.take(ax["qgc"], t, axis=0)[:, :, None] + self.kernel_size[a] - 1
        return mx.where(inside, col, 0)

    def mask(self, rows: slice) -> mx.array | None:
        """``[Tc, Tq, Hk]`` bool, or None when every pair is valid."""
        if self.all_valid:
            return None
        return outer([self._axis_pairs(a, rows, False) for a in range(len(self.axes))], mx.logical_and, xp=mx)

    def rpb_index(self, rows: slice) -> mx.array:
        """``[Tc, Tq, Hk]`` int32 index into ``rpb.reshape(H, -1)`` (0 for masked pairs)."""
        rels = [self._axis_pairs(a, rows, True) for a in range(len(self.axes))]
        return outer(rels, mx.add, self.rel_weights, xp=mx)


@lru_cache(maxsize=64)
def _plan(geometry, tile=None) -> _DevicePlan:
    return _DevicePlan(geometry, tile)
