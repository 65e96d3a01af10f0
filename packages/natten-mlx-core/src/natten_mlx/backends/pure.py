"""The pure backend: neighborhood attention from MLX array operations, on every MLX device.

Two strategies compute the same function:

- ``gather`` (default on the CPU): each query's ``Kt`` keys are gathered through the cached slot
  table of :mod:`natten_mlx.windows` and reduced with element-wise products. Work and memory are
  ``O(N * Kt)``; no matrix multiply, which matters where MLX's CPU matmul is a reference BLAS.
- ``tiled`` (default on a GPU): queries are cut into tiles; each tile attends to its halo, the
  union of its queries' windows, through batched matmuls under a per-tile mask. Work is
  ``O(N * halo)`` and the keys are read once per tile instead of once per query.

When the window covers the whole input (and nothing is causal or dilated), neighborhood attention
*is* dense attention; both strategies then run dense attention.

Softmax statistics are float32 whatever the input dtype. Gradients come from MLX's autodiff of
these same operations (the core calls :meth:`PureBackend.fused_forward` under ``mx.vjp``).
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx
from ..problem import Problem
from ..tiles import TilePlan, tile_plan
from ..windows import neighborhood_tables

STRATEGY_ENV = "NATTEN_MLX_PURE_STRATEGY"
STRATEGIES = ("gather", "tiled")


def default_strategy() -> str:
    chosen = os.environ.get(STRATEGY_ENV)
    if chosen:
        if chosen not in STRATEGIES:
            raise ValueError(f"{STRATEGY_ENV}={chosen!r} is not a strategy; choose one of {STRATEGIES}")
        return chosen
    return "tiled" if mx.default_device() == mx.gpu else "gather"


@lru_cache(maxsize=128)
def _tables(spatial, kernel_size, stride, dilation, is_causal):
    """Slot tables of a problem's geometry as MLX arrays (built once per geometry)."""
    t = neighborhood_tables(spatial, kernel_size, stride, dilation, is_causal)
    valid = None if t.valid is None else mx.array(t.valid)
    return mx.array(t.key_index), valid, mx.array(t.rpb_index)


def _geometry(p: Problem):
    return p.spatial, p.kernel_size, p.stride, p.dilation, p.is_causal


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


class PureBackend:
    """Reference-exact backend built from MLX operations; serves every valid problem."""

    name = "pure"
    priority = 0
    distribution = "natten-mlx"
    description = "MLX array operations (gather on CPU, tiled halo matmuls on GPU); every feature"

    def __init__(self, strategy: str | None = None):
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not a strategy; choose one of {STRATEGIES}")
        self.strategy = strategy

    def available(self) -> str | None:
        return None

    def supports(self, problem: Problem) -> str | None:
        return None

    def _strategy(self) -> str:
        return self.strategy or default_strategy()

    # ---- shapes --------------------------------------------------------------------------------
    @staticmethod
    def _queries(p: Problem, query: mx.array) -> mx.array:
        """``[B, *spatial, H, D]`` -> float32 ``[B, N, H_kv, G, D]`` (query head h reads kv head h // G)."""
        return query.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, p.heads // p.kv_heads, -1)

    @staticmethod
    def _tokens(p: Problem, x: mx.array) -> mx.array:
        """``[B, *spatial, H_kv, E]`` -> float32 ``[B, N, H_kv, E]``."""
        return x.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, -1)

    @staticmethod
    def _heads_out(p: Problem, x: mx.array, last: int) -> mx.array:
        """``[B, N, H_kv, G, E]`` -> ``[B, *spatial, H, E]``."""
        return x.reshape(p.batch, *p.spatial, p.heads, last)

    # ---- slot scores (gather strategy and the split ops) -----------------------------------------
    def _slot_scores(self, p: Problem, query: mx.array, key: mx.array, rpb) -> mx.array:
        """Scaled scores of the ``Kt`` slots, float32 ``[B, N, H_kv, G, Kt]``; invalid slots -inf."""
        key_index, valid, rpb_index = _tables(*_geometry(p))
        q = self._queries(p, query) * p.scale
        kg = _gather_tokens(self._tokens(p, key), key_index)  # [B, N, Kt, Hkv, D]
        s = (kg[:, :, :, :, None, :] * q[:, :, None]).sum(-1).transpose(0, 1, 3, 4, 2)
        if rpb is not None:
            s = s + _rpb_bias(p, rpb, rpb_index).reshape(p.num_tokens, p.kv_heads, -1, s.shape[-1])
        if valid is not None:
            s = mx.where(valid[:, None, None, :], s, -mx.inf)
        return s

    def _slot_values(self, p: Problem, weights: mx.array, value: mx.array) -> mx.array:
        """``weights [B, N, H_kv, G, Kt]`` float32 times gathered values -> ``[B, N, H_kv, G, Dv]``."""
        key_index = _tables(*_geometry(p))[0]
        vg = _gather_tokens(self._tokens(p, value), key_index)  # [B, N, Kt, Hkv, Dv]
        w = weights.transpose(0, 1, 4, 2, 3)[..., None]  # [B, N, Kt, Hkv, G, 1]
        return (w * vg[:, :, :, :, None, :]).sum(2)

    def _extra_scores(self, p: Problem, q: mx.array, additional_keys: mx.array) -> mx.array:
        """``q [B, N, H_kv, G, D]`` (scaled) against the extra keys -> ``[B, N, H_kv, G, N_extra]``."""
        return mx.einsum("bnhgd,bmhd->bnhgm", q, additional_keys.astype(mx.float32))

    def _extra_values(self, weights: mx.array, additional_values: mx.array) -> mx.array:
        return mx.einsum("bnhgm,bmhe->bnhge", weights, additional_values.astype(mx.float32))

    # ---- fused -------------------------------------------------------------------------------
    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """``(out [B, *spatial, H, Dv] in the input dtype, lse [B, *spatial, H] float32)``."""
        p = problem
        if not p.covers_everything and self._strategy() == "tiled":
            return self._tiled_forward(p, query, key, value, additional_keys, additional_values, rpb)
        if p.covers_everything:
            # the window is the whole input with start 0, so slot j is token j: dense attention
            q = self._queries(p, query) * p.scale
            s = mx.einsum("bnhgd,bmhd->bnhgm", q, self._tokens(p, key))
            if rpb is not None:
                rpb_index = _tables(*_geometry(p))[2]
                s = s + _rpb_bias(p, rpb, rpb_index).reshape(p.num_tokens, p.kv_heads, -1, s.shape[-1])

            def neighborhood_values(w):
                return mx.einsum("bnhgm,bmhe->bnhge", w, self._tokens(p, value))
        else:
            s = self._slot_scores(p, query, key, rpb)

            def neighborhood_values(w):
                return self._slot_values(p, w, value)

        kt = s.shape[-1]
        if additional_keys is not None:
            s = mx.concatenate([s, self._extra_scores(p, self._queries(p, query) * p.scale, additional_keys)], -1)
        lse = mx.logsumexp(s, axis=-1, keepdims=True)
        w = mx.exp(s - lse)
        out = neighborhood_values(w[..., :kt])
        if additional_values is not None:
            out = out + self._extra_values(w[..., kt:], additional_values)
        return (
            self._heads_out(p, out, p.value_head_dim).astype(p.dtype),
            lse.reshape(p.batch, *p.spatial, p.heads),
        )

    # ---- tiled -------------------------------------------------------------------------------
    def _tiled_forward(self, p: Problem, query, key, value, additional_keys, additional_values, rpb):
        plan = _plan(*_geometry(p))
        tn, tq = plan.query_index.shape
        hk = plan.key_index.shape[1]
        g = p.heads // p.kv_heads
        q = self._queries(p, query) * p.scale  # [B, N, Hkv, G, D]
        qt = mx.take(q, plan.query_index.reshape(-1), axis=1).reshape(p.batch, tn, tq, p.kv_heads, g, -1)
        qt = qt.transpose(0, 1, 3, 4, 2, 5)  # [B, Tn, Hkv, G, Tq, D]
        kt = mx.take(self._tokens(p, key), plan.key_index.reshape(-1), axis=1).reshape(p.batch, tn, hk, p.kv_heads, -1)
        vt = mx.take(self._tokens(p, value), plan.key_index.reshape(-1), axis=1).reshape(p.batch, tn, hk, p.kv_heads, -1)
        kt = kt.transpose(0, 1, 3, 2, 4)[:, :, :, None]  # [B, Tn, Hkv, 1, Hk, D]
        vt = vt.transpose(0, 1, 3, 2, 4)[:, :, :, None]  # [B, Tn, Hkv, 1, Hk, Dv]
        s = qt @ kt.swapaxes(-1, -2)  # [B, Tn, Hkv, G, Tq, Hk]
        if rpb is not None:
            flat = rpb.astype(mx.float32).reshape(p.heads, -1)
            bias = mx.take(flat, plan.rpb_index.reshape(-1), axis=1).reshape(p.kv_heads, g, tn, tq, hk)
            s = s + bias.transpose(2, 0, 1, 3, 4)
        if plan.mask is not None:
            s = mx.where(plan.mask[:, None, None], s, -mx.inf)
        if additional_keys is not None:
            ek = additional_keys.astype(mx.float32).transpose(0, 2, 1, 3)[:, None, :, None]  # [B,1,Hkv,1,M,D]
            s = mx.concatenate([s, qt @ ek.swapaxes(-1, -2)], -1)
        lse = mx.logsumexp(s, axis=-1, keepdims=True)
        w = mx.exp(s - lse)
        out = w[..., :hk] @ vt  # [B, Tn, Hkv, G, Tq, Dv]
        if additional_values is not None:
            ev = additional_values.astype(mx.float32).transpose(0, 2, 1, 3)[:, None, :, None]
            out = out + w[..., hk:] @ ev
        out = out.transpose(0, 1, 4, 2, 3, 5).reshape(p.batch, tn * tq, p.heads, -1)
        lse = lse.squeeze(-1).transpose(0, 1, 4, 2, 3).reshape(p.batch, tn * tq, p.heads)
        out = mx.take(out, plan.output_index, axis=1)
        lse = mx.take(lse, plan.output_index, axis=1)
        return (
            out.reshape(p.batch, *p.spatial, p.heads, -1).astype(p.dtype),
            lse.reshape(p.batch, *p.spatial, p.heads),
        )

    # ---- split ops -----------------------------------------------------------------------------
    def qk_forward(self, problem, query, key, additional_keys=None, rpb=None):
        """Scores ``[B, *spatial, H, Kt (+N_extra)]`` in the input dtype; invalid causal slots -inf."""
        p = problem
        s = self._slot_scores(p, query, key, rpb)
        if additional_keys is not None:
            s = mx.concatenate([s, self._extra_scores(p, self._queries(p, query) * p.scale, additional_keys)], -1)
        return self._heads_out(p, s, s.shape[-1]).astype(p.dtype)

    def av_forward(self, problem, attn, value, additional_values=None):
        """``attn [B, *spatial, H, Kt (+N_extra)]`` x values -> ``[B, *spatial, H, Dv]``.

        Weights of invalid (causal) slots are ignored, as upstream's kernels never read them.
        """
        p = problem
        valid = _tables(*_geometry(p))[1]
        kt = p.window_size
        w = attn.astype(mx.float32).reshape(p.batch, p.num_tokens, p.kv_heads, p.heads // p.kv_heads, -1)
        wn = w[..., :kt]
        if valid is not None:
            wn = mx.where(valid[:, None, None, :], wn, 0.0)
        out = self._slot_values(p, wn, value)
        if additional_values is not None:
            out = out + self._extra_values(w[..., kt:], additional_values)
        return self._heads_out(p, out, p.value_head_dim).astype(p.dtype)


@lru_cache(maxsize=64)
def _plan(spatial, kernel_size, stride, dilation, is_causal):
    """The tile plan of a geometry with its tables as MLX arrays."""
    t = tile_plan(spatial, kernel_size, stride, dilation, is_causal)
    return TilePlan(
        mx.array(t.query_index),
        mx.array(t.key_index),
        None if t.mask is None else mx.array(t.mask),
        mx.array(t.rpb_index),
        mx.array(t.output_index),
    )
