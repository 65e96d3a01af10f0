"""``natten.functional`` of NATTEN 0.14.6: the heads-first split ops.

``query``/``key``/``value``: ``[B, H, L, D]`` (1D) or ``[B, H, X, Y, D]`` (2D). The QK ops return
``[B, H, *spatial, K]`` / ``[B, H, X, Y, K*K]`` unscaled scores (the 0.14 modules scale the query
first) plus ``rpb[h, ...]`` (``[H, 2K-1]`` / ``[H, 2K-1, 2K-1]``) when given; the AV ops take those
weights after softmax. Slots run row-major over the window, as upstream.
"""

from __future__ import annotations

from .. import _exports, _heads_first


def _split_ops(na_dim):
    """``natten{n}dqkrpb``, ``natten{n}dqk`` and ``natten{n}dav``."""

    def qkrpb(query, key, rpb, kernel_size, dilation):
        return _heads_first.qk(na_dim, query, key, kernel_size, dilation, rpb=rpb)

    def qk(query, key, kernel_size, dilation):
        return _heads_first.qk(na_dim, query, key, kernel_size, dilation)

    def av(attn, value, kernel_size, dilation):
        return _heads_first.av(na_dim, attn, value, kernel_size, dilation)

    return (_exports.named(f"natten{na_dim}dqkrpb", qkrpb), _exports.named(f"natten{na_dim}dqk", qk),
            _exports.named(f"natten{na_dim}dav", av))


natten1dqkrpb, natten1dqk, natten1dav = _split_ops(1)
natten2dqkrpb, natten2dqk, natten2dav = _split_ops(2)

__all__ = ["natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav"]
