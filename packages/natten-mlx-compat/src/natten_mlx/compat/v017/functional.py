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

from .. import _core_ops, _exports, _heads_first


def _ops(na_dim):
    """``na{n}d_qk``, ``na{n}d_av`` (heads first, unfused) and ``na{n}d`` (heads last, fused)."""

    def qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
        return _heads_first.qk(na_dim, query, key, kernel_size, dilation, is_causal=is_causal, rpb=rpb,
                               additional_keys=additional_keys)

    def av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
        return _heads_first.av(na_dim, attn, value, kernel_size, dilation, is_causal=is_causal,
                               additional_values=additional_values)

    def na(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None,
           additional_values=None, xformers_kwargs=None):
        if not isinstance(query, mx.array):
            raise TypeError(f"query must be an mlx.core.array, got {type(query).__name__}")
        if rpb is not None and isinstance(rpb, mx.array):
            rpb = rpb.astype(query.dtype)
        return _core_ops.FUSED[na_dim](
            query, key, value, kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb,
            scale=scale or query.shape[-1] ** -0.5, additional_keys=additional_keys,
            additional_values=additional_values,
        )

    return (_exports.named(f"na{na_dim}d_qk", qk), _exports.named(f"na{na_dim}d_av", av),
            _exports.named(f"na{na_dim}d", na))


na1d_qk, na1d_av, na1d = _ops(1)
na2d_qk, na2d_av, na2d = _ops(2)
na3d_qk, na3d_av, na3d = _ops(3)
na3d_av.__defaults__ = na3d_av.__defaults__[1:]  # upstream's na3d_av has no default `dilation`

__all__ = ["na1d_qk", "na1d_av", "na2d_qk", "na2d_av", "na3d_qk", "na3d_av", "na1d", "na2d", "na3d"]
