"""Dense (standard) attention for the ``attention`` op of NATTEN 0.20/0.21, in MLX.

natten-mlx's core has no dense attention op, so it lives here: heads-last
``query [B, S_q, H, D]``, ``key [B, S_kv, H_kv, D]``, ``value [B, S_kv, H_kv, D_v]`` ->
``out [B, S_q, H, D_v]`` and the float32 logsumexp ``[B, S_q, H]``. Scores, softmax statistics and
the weighted sum run in float32 whatever the input dtype; the output takes the query's dtype.

Causal masking lets query ``i`` see keys ``j <= i``; it needs ``S_q == S_kv`` (per sequence when
varlen), where the top-left and bottom-right conventions agree. Varlen packs several sequences
into batch 1: ``cu_q``/``cu_kv`` are the cumulative lengths ``[0, n_1, n_1 + n_2, ...]``; a query
attends only to keys of its own sequence. Queries past the last sequence get zeros and lse -inf.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np


def check_tensors(query, key, value, allow_gqa: bool) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, mx.array):
            raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; attention expects rank-4 [batch, seqlen, heads, head_dim]")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}.")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"Q and K head dims must match, got {query.shape[-1]=}, {key.shape[-1]=}.")
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        raise ValueError(f"Q, K and V must match in batch size, got {query.shape[0]}, {key.shape[0]}, {value.shape[0]}.")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"K and V must match in sequence length, got {key.shape[1]=}, {value.shape[1]=}.")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"Key and value must have the same number of heads, got {key.shape[2]}, {value.shape[2]}.")
    heads, heads_kv = query.shape[2], key.shape[2]
    if not allow_gqa and heads != heads_kv:
        raise ValueError(
            "This NATTEN release does not support GQA/MQA, therefore number of heads in Q, K, and V must match, "
            f"got {heads=}, {heads_kv=}."
        )
    if heads % heads_kv != 0:
        raise ValueError(f"Number of query heads ({heads}) must be a multiple of the number of KV heads ({heads_kv}).")


def _segments(cumulative: np.ndarray, length: int):
    """Sequence id and position within it of each of ``length`` packed tokens (-1: no sequence)."""
    ids = np.full(length, -1, dtype=np.int64)
    pos = np.zeros(length, dtype=np.int64)
    for s, (start, end) in enumerate(zip(cumulative[:-1], cumulative[1:], strict=True)):
        ids[start:end] = s
        pos[start:end] = np.arange(end - start)
    return ids, pos


def attention(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    *,
    scale: Optional[float],
    is_causal: bool = False,
    cu_q: Optional[Sequence[int]] = None,
    cu_kv: Optional[Sequence[int]] = None,
):
    """Returns ``(out [B, S_q, H, D_v], lse [B, S_q, H] float32)``."""
    batch, seq_q, heads, head_dim = query.shape
    seq_kv, heads_kv = key.shape[1], key.shape[2]
    scale = scale or head_dim**-0.5
    group = heads // heads_kv
    q = query.astype(mx.float32).transpose(0, 2, 1, 3)
    k = key.astype(mx.float32).transpose(0, 2, 1, 3)
    v = value.astype(mx.float32).transpose(0, 2, 1, 3)
    if group > 1:
        k = mx.repeat(k, group, axis=1)
        v = mx.repeat(v, group, axis=1)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # [B, H, S_q, S_kv]

    allowed = None
    if cu_q is not None:
        ids_q, pos_q = _segments(np.asarray(cu_q), seq_q)
        ids_kv, pos_kv = _segments(np.asarray(cu_kv), seq_kv)
        allowed = (ids_q[:, None] == ids_kv[None, :]) & (ids_q[:, None] >= 0)
        if is_causal:
            allowed &= pos_kv[None, :] <= pos_q[:, None]
    elif is_causal:
        allowed = np.tril(np.ones((seq_q, seq_kv), dtype=bool))
    if allowed is not None:
        scores = mx.where(mx.array(allowed), scores, -mx.inf)

    lse = mx.logsumexp(scores, axis=-1)  # [B, H, S_q]
    finite = mx.isfinite(lse)
    probs = mx.where(finite[..., None], mx.exp(scores - mx.where(finite, lse, 0.0)[..., None]), 0.0)
    out = (probs @ v).transpose(0, 2, 1, 3).astype(query.dtype)
    return out, lse.transpose(0, 2, 1)


def varlen_boundaries(query, key, seqlens_Q, seqlens_KV, cumulative_seqlen_Q, cumulative_seqlen_KV,
                      max_seqlen_Q, max_seqlen_KV, is_causal: bool):
    """Upstream's two ways to give sequence lengths -> ``(cu_q, cu_kv)`` NumPy arrays, or ``(None, None)``."""
    by_lengths = seqlens_Q is not None or seqlens_KV is not None
    by_cumulative = cumulative_seqlen_Q is not None or cumulative_seqlen_KV is not None
    if by_lengths and by_cumulative:
        raise ValueError("Pass either seqlens_{Q,KV} or cumulative_seqlen_{Q,KV} (+ max_seqlen_{Q,KV}), not both.")
    if not by_lengths and not by_cumulative:
        return None, None
    if by_lengths:
        if seqlens_Q is None or seqlens_KV is None:
            raise ValueError("seqlens_Q and seqlens_KV must be passed together.")
        lengths_q = np.asarray(seqlens_Q, dtype=np.int64).reshape(-1)
        lengths_kv = np.asarray(seqlens_KV, dtype=np.int64).reshape(-1)
        cu_q = np.concatenate([[0], np.cumsum(lengths_q)])
        cu_kv = np.concatenate([[0], np.cumsum(lengths_kv)])
    else:
        if cumulative_seqlen_Q is None or cumulative_seqlen_KV is None:
            raise ValueError("cumulative_seqlen_Q and cumulative_seqlen_KV must be passed together.")
        if not isinstance(max_seqlen_Q, int) or not isinstance(max_seqlen_KV, int):
            raise ValueError(
                f"max_seqlen_Q and max_seqlen_KV must be ints, got {type(max_seqlen_Q)=}, {type(max_seqlen_KV)=}."
            )
        cu_q = np.asarray(cumulative_seqlen_Q, dtype=np.int64).reshape(-1)
        cu_kv = np.asarray(cumulative_seqlen_KV, dtype=np.int64).reshape(-1)
    if query.shape[0] != 1:
        raise ValueError(f"Varlen attention takes sequence-packed inputs with batch size 1, got {query.shape[0]}.")
    if len(cu_q) != len(cu_kv) or len(cu_q) < 2:
        raise ValueError(f"Q and KV need the same number (>= 1) of sequences, got {len(cu_q) - 1} and {len(cu_kv) - 1}.")
    if np.any(np.diff(cu_q) < 0) or np.any(np.diff(cu_kv) < 0) or cu_q[0] != 0 or cu_kv[0] != 0:
        raise ValueError(f"Cumulative sequence lengths must start at 0 and not decrease, got {cu_q=}, {cu_kv=}.")
    if cu_q[-1] > query.shape[1] or cu_kv[-1] > key.shape[1]:
        raise ValueError(
            f"Sequence lengths add up to {cu_q[-1]} (Q) and {cu_kv[-1]} (KV), more than the inputs hold "
            f"({query.shape[1]}, {key.shape[1]})."
        )
    if is_causal and not np.array_equal(np.diff(cu_q), np.diff(cu_kv)):
        raise ValueError("Causal varlen attention here needs equal Q and KV lengths for every sequence.")
    return cu_q, cu_kv
