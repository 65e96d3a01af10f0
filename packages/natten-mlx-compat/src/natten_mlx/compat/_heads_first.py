"""The heads-first split ops of NATTEN 0.14 to 0.17, on natten-mlx's heads-last core.

Upstream's unfused ops take ``query/key/value [B, H, *spatial, D]`` and produce or take attention
weights ``[B, H, *spatial, K1*K2*K3 (+N_extra)]``; their additional keys/values are
``[B, H, N_extra, D]``. The core takes ``[B, *spatial, H, D]`` and ``[B, N_extra, H, D]``, with the
same slot order along the last axis, so these wrappers only move the heads axis. The split QK op
never scales (upstream's modules scale the query before calling it): ``scale=1.0``.
"""

from __future__ import annotations

import mlx.core as mx

from ._core_ops import AV, QK


def _check_rank(name: str, x, na_dim: int, layout: str) -> None:
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mlx.core.array, got {type(x).__name__}")
    if x.ndim != na_dim + 3:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; a {na_dim}D op expects rank {na_dim + 3}: {layout}")


def _spatial(na_dim: int) -> str:
    return ", ".join(("L",) if na_dim == 1 else ("X", "Y", "Z")[:na_dim])


def to_heads_last(x: mx.array, na_dim: int) -> mx.array:
    """``[B, H, *spatial, E]`` -> ``[B, *spatial, H, E]``."""
    return x.transpose(0, *range(2, 2 + na_dim), 1, 2 + na_dim)


def to_heads_first(x: mx.array, na_dim: int) -> mx.array:
    """``[B, *spatial, H, E]`` -> ``[B, H, *spatial, E]``."""
    return x.transpose(0, 1 + na_dim, *range(1, 1 + na_dim), 2 + na_dim)


def _extra_heads_last(name: str, x):
    """Additional keys/values ``[B, H, N_extra, E]`` -> ``[B, N_extra, H, E]``."""
    if x is None:
        return None
    if not isinstance(x, mx.array) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, mx.array) else type(x).__name__
        raise ValueError(f"{name} must be a rank-4 [B, H, N_extra, D] array (heads first), got {shape}")
    return x.transpose(0, 2, 1, 3)


def qk(na_dim, query, key, kernel_size, dilation, *, is_causal=False, rpb=None, additional_keys=None):
    """Heads-first QK: ``[B, H, *spatial, D]`` x2 -> ``[B, H, *spatial, K1*K2*K3 (+N_extra)]``, unscaled, plus rpb."""
    layout = f"[B, H, {_spatial(na_dim)}, D]"
    _check_rank("query", query, na_dim, layout)
    _check_rank("key", key, na_dim, layout)
    if rpb is not None and isinstance(rpb, mx.array):
        rpb = rpb.astype(query.dtype)  # upstream casts the bias to the inputs' dtype
    attn = QK[na_dim](
        to_heads_last(query, na_dim),
        to_heads_last(key, na_dim),
        kernel_size,
        dilation=dilation,
        is_causal=is_causal,
        rpb=rpb,
        scale=1.0,
        additional_keys=_extra_heads_last("additional_keys", additional_keys),
    )
    return to_heads_first(attn, na_dim)


def av(na_dim, attn, value, kernel_size, dilation, *, is_causal=False, additional_values=None):
    """Heads-first AV: ``attn [B, H, *spatial, K1*K2*K3 (+N_extra)]``, ``value [B, H, *spatial, D]`` -> ``[B, H, *spatial, D]``."""
    _check_rank("attn", attn, na_dim, f"[B, H, {_spatial(na_dim)}, K1*K2*K3]")
    _check_rank("value", value, na_dim, f"[B, H, {_spatial(na_dim)}, D]")
    out = AV[na_dim](
        to_heads_last(attn.astype(value.dtype), na_dim),  # upstream casts the weights to the values' dtype
        to_heads_last(value, na_dim),
        kernel_size,
        dilation=dilation,
        is_causal=is_causal,
        additional_values=_extra_heads_last("additional_values", additional_values),
    )
    return to_heads_first(out, na_dim)
