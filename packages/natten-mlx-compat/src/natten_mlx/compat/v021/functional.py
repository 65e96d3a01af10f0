"""``natten.functional`` of NATTEN 0.21.7, heads-last ``[B, *spatial, H, D]``; GQA/MQA allowed
(``H % H_kv == 0``).

``na{1,2,3}d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
additional_keys=None, additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None,
kv_tile_shape=None, backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
return_lse=False)`` -> out ``[B, *spatial, H, D_v]`` (and the float32 logsumexp ``[B, *spatial, H]``).

``attention(query, key, value, is_causal=False, scale=None, seqlens_Q=None, seqlens_KV=None,
cumulative_seqlen_Q=None, cumulative_seqlen_KV=None, max_seqlen_Q=None, max_seqlen_KV=None,
backend=None, ..., return_lse=False)``: dense attention over ``[B, S, H, D]``, with causal masking
(equal query/key lengths) and varlen (sequence-packed, batch 1).
``merge_attentions(outputs, lse_tensors, torch_compile=True, use_autograd_fix=True)`` returns
``(output, lse)``. The performance keyword arguments are accepted and ignored (``backend`` must be
one of upstream's names or None).
"""

from __future__ import annotations

from .. import _dense, _modern


def attention(query, key, value, is_causal=False, scale=None, seqlens_Q=None, seqlens_KV=None,
              cumulative_seqlen_Q=None, cumulative_seqlen_KV=None, max_seqlen_Q=None, max_seqlen_KV=None,
              backend=None, q_tile_size=None, kv_tile_size=None, backward_q_tile_size=None,
              backward_kv_tile_size=None, backward_kv_splits=None, backward_use_pt_reduction=False,
              run_persistent_kernel=True, kernel_schedule=None, torch_compile=False, return_lse=False):
    _dense.check_tensors(query, key, value, allow_gqa=True)
    cu_q, cu_kv = _dense.varlen_boundaries(query, key, seqlens_Q, seqlens_KV, cumulative_seqlen_Q,
                                           cumulative_seqlen_KV, max_seqlen_Q, max_seqlen_KV, is_causal)
    return _modern.attention(query, key, value, is_causal=is_causal, scale=scale, backend=backend,
                             return_lse=return_lse, allow_gqa=True, cu_q=cu_q, cu_kv=cu_kv)


def merge_attentions(outputs, lse_tensors, torch_compile=True, use_autograd_fix=True):
    return _modern.merge_attentions(outputs, lse_tensors)


def _na(na_dim):
    """``na{na_dim}d``; ``na_dim=None``: ``neighborhood_attention_generic`` (any of 1 to 3 spatial axes)."""

    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
           backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
           backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
           return_lse=False):
        return _modern.fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                             additional_keys, additional_values, backend, return_lse=return_lse, allow_gqa=True)

    return _modern.named_na(na, na_dim, "0.21.7")


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)
neighborhood_attention_generic = _na(None)

__all__ = ["attention", "merge_attentions", "na1d", "na2d", "na3d", "neighborhood_attention_generic"]
