"""``natten.functional`` of NATTEN 0.14.6: the heads-first split ops.

``query``/``key``/``value``: ``[B, H, L, D]`` (1D) or ``[B, H, X, Y, D]`` (2D). The QK ops return
``[B, H, *spatial, K]`` / ``[B, H, X, Y, K*K]`` unscaled scores (the 0.14 modules scale the query
first) plus ``rpb[h, ...]`` (``[H, 2K-1]`` / ``[H, 2K-1, 2K-1]``) when given; the AV ops take those
weights after softmax. Slots run row-major over the window, as upstream.
"""

from __future__ import annotations

from .. import _heads_first


def natten1dqkrpb(query, key, rpb, kernel_size, dilation):
    return _heads_first.qk(1, query, key, kernel_size, dilation, rpb=rpb)


def natten1dqk(query, key, kernel_size, dilation):
    return _heads_first.qk(1, query, key, kernel_size, dilation)


def natten1dav(attn, value, kernel_size, dilation):
    return _heads_first.av(1, attn, value, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    return _heads_first.qk(2, query, key, kernel_size, dilation, rpb=rpb)


def natten2dqk(query, key, kernel_size, dilation):
    return _heads_first.qk(2, query, key, kernel_size, dilation)


def natten2dav(attn, value, kernel_size, dilation):
    return _heads_first.av(2, attn, value, kernel_size, dilation)


__all__ = ["natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav"]
