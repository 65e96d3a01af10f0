"""``natten.functional`` of NATTEN 0.17.5.

Unfused, heads-first ``[B, H, *spatial, D]``:
``na{1,2,3}d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None)``
-> unscaled scores ``[B, H, *spatial, K1*K2*K3 + N_extra]`` (causally masked slots ``-inf``), and
``na{1,2,3}d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False)``
(``na3d_av``'s ``dilation`` has no default, as upstream); additional keys/values ``[B, H, N, D]``.

Fused, heads-last ``[B, *spatial, H, D]``:
``na{1,2,3}d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
additional_keys=None, additional_values=None, xformers_kwargs=None)``; additional keys/values
``[B, N, H, D]``; ``scale`` falls back to ``D ** -0.5`` when None (or 0, as upstream's ``or``).
``xformers_kwargs`` configured xFormers for the additional keys; accepted and ignored.
"""

from __future__ import annotations

import mlx.core as mx
import natten_mlx

from .. import _heads_first

_FUSED = {1: natten_mlx.na1d, 2: natten_mlx.na2d, 3: natten_mlx.na3d}


def _fused(na_dim, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
           additional_values):
    if not isinstance(query, mx.array):
        raise TypeError(f"query must be an mlx.core.array, got {type(query).__name__}")
    if rpb is not None and isinstance(rpb, mx.array):
        rpb = rpb.astype(query.dtype)
    return _FUSED[na_dim](
        query, key, value, kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb,
        scale=scale or query.shape[-1] ** -0.5, additional_keys=additional_keys, additional_values=additional_values,
    )


def na1d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    return _heads_first.qk(1, query, key, kernel_size, dilation, is_causal=is_causal, rpb=rpb,
                           additional_keys=additional_keys)


def na1d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
    return _heads_first.av(1, attn, value, kernel_size, dilation, is_causal=is_causal,
                           additional_values=additional_values)


def na2d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    return _heads_first.qk(2, query, key, kernel_size, dilation, is_causal=is_causal, rpb=rpb,
                           additional_keys=additional_keys)


def na2d_av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
    return _heads_first.av(2, attn, value, kernel_size, dilation, is_causal=is_causal,
                           additional_values=additional_values)


def na3d_qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
    return _heads_first.qk(3, query, key, kernel_size, dilation, is_causal=is_causal, rpb=rpb,
                           additional_keys=additional_keys)


def na3d_av(attn, value, kernel_size, dilation, additional_values=None, is_causal=False):
    return _heads_first.av(3, attn, value, kernel_size, dilation, is_causal=is_causal,
                           additional_values=additional_values)


def na1d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    return _fused(1, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na2d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    return _fused(2, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na3d(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
         additional_values=None, xformers_kwargs=None):
    return _fused(3, query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


__all__ = ["na1d_qk", "na1d_av", "na2d_qk", "na2d_av", "na3d_qk", "na3d_av", "na1d", "na2d", "na3d"]
