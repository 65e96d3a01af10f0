"""``natten.functional`` of NATTEN 0.20.1, heads-last ``[B, *spatial, H, D]``.

``na{1,2,3}d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
additional_keys=None, additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None,
kv_tile_shape=None, backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
try_fuse_additional_kv=False)`` -> ``[B, *spatial, H, D_v]`` (no ``return_lse`` in 0.20).
``attention(query, key, value, scale=None, backend=None, ..., return_lse=False)`` is dense attention
over ``[B, S, H, D]``; ``merge_attentions(outputs, lse_tensors, torch_compile=True)`` returns the
merged output only. Q, K and V must have the same number of heads (no GQA/MQA in 0.20). The
performance keyword arguments are accepted and ignored (``backend`` must be one of upstream's
names or None).
"""

from __future__ import annotations

from .. import _modern


def attention(query, key, value, scale=None, backend=None, q_tile_size=None, kv_tile_size=None,
              backward_q_tile_size=None, backward_kv_tile_size=None, backward_kv_splits=None,
              backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
              return_lse=False):
    return _modern.attention(query, key, value, is_causal=False, scale=scale, backend=backend, return_lse=return_lse,
                             allow_gqa=False)


def merge_attentions(outputs, lse_tensors, torch_compile=True):
    return _modern.merge_attentions(outputs, lse_tensors)[0]


def _na(na_dim):
    """``na{na_dim}d``; ``na_dim=None``: ``neighborhood_attention_generic`` (any of 1 to 3 spatial axes)."""

    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
           backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
           backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
           try_fuse_additional_kv=False):
        return _modern.fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                             additional_keys, additional_values, backend, return_lse=False, allow_gqa=False)

    return _modern.named_na(na, na_dim, "0.20.1")


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)
neighborhood_attention_generic = _na(None)

__all__ = ["attention", "merge_attentions", "na1d", "na2d", "na3d", "neighborhood_attention_generic"]
