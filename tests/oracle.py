"""Float64 NumPy oracle for neighborhood attention.

Written only from /work/shared/SEMANTICS.md (the definition natten-mlx must compute).
It deliberately uses the most literal formulation available: dense scores over every
(query, key) pair, an explicit boolean mask built one axis at a time and AND-ed across
axes, and a plain masked softmax.  It must never import natten_mlx.

Layout is heads-last as in the public API:
    q [B, *spatial, H, D], k [B, *spatial, Hkv, D], v [B, *spatial, Hkv, Dv]
    additional_keys [B, E, Hkv, D], additional_values [B, E, Hkv, Dv]
    rpb [H, 2K1-1(, 2K2-1(, 2K3-1))]
Outputs: out [B, *spatial, H, Dv], lse [B, *spatial, H].

Public helpers:
    axis_window(i, L, K, s, d, causal)       -> (group, start_c, end_c) for one query
    axis_mask(L, K, s, d, causal)            -> bool [L, L]
    na_mask(shape, K, s, d, causal)          -> bool [N, N]  (row-major flattening)
    slot_keys(shape, K, s, d, causal)        -> (key_idx [N, prod K], valid [N, prod K])
    na_forward(...)                          -> (out, lse)
    na_backward(..., dout, dlse=None)        -> dict of float64 gradients
    na_qk(...), na_av(...)                   -> split-op oracle (slot layout)
    na_qk_backward(...), na_av_backward(...) -> gradients of the split ops
    merge_attentions(outs, lses)             -> (out, lse)
    numeric_grad(f, x)                       -> central finite differences (self-checks)
"""

from __future__ import annotations

import itertools
from typing import Dict, Sequence, Tuple

import numpy as np

__all__ = [
    "as_tuple",
    "axis_window",
    "axis_mask",
    "na_mask",
    "slot_keys",
    "rpb_index",
    "dense_scores",
    "na_forward",
    "na_backward",
    "na_qk",
    "na_av",
    "na_qk_backward",
    "na_av_backward",
    "merge_attentions",
    "numeric_grad",
]


# --------------------------------------------------------------------------------------
# Argument normalisation
# --------------------------------------------------------------------------------------


def as_tuple(x, n: int) -> tuple:
    if isinstance(x, (tuple, list)):
        assert len(x) == n, (x, n)
        return tuple(x)
    return (x,) * n


# --------------------------------------------------------------------------------------
# One axis at a time (SEMANTICS.md, "One axis at a time")
# --------------------------------------------------------------------------------------


def axis_window(i: int, L: int, K: int, s: int, d: int, causal: bool) -> Tuple[int, int, int]:
    """Return (group g, first key coord, last key coord) in group coordinates for query i."""
    g = i % d
    c = i // d
    Lg = -(-(L - g) // d)  # ceil((L - g) / d)
    if causal:
        leader = min((c // s) * s + s - 1, Lg - 1)
        start = max(leader - K + 1, 0)
        end = c
    else:
        wl = K // 2
        wr = K // 2 + (K % 2) - 1
        leader = min((c // s) * s + s // 2, Lg - 1)
        centre = min(max(leader, wl), Lg - 1 - wr)
        start = centre - wl
        end = centre + wr
    return g, start, end


def _window_start(i: int, L: int, K: int, s: int, d: int, causal: bool) -> int:
    """First slot coordinate (group coordinates) of the split-op slot layout."""
    g = i % d
    c = i // d
    Lg = -(-(L - g) // d)
    if causal:
        leader = min((c // s) * s + s - 1, Lg - 1)
        return max(leader - K + 1, 0)
    wl = K // 2
    wr = K // 2 + (K % 2) - 1
    leader = min((c // s) * s + s // 2, Lg - 1)
    centre = min(max(leader, wl), Lg - 1 - wr)
    return centre - K // 2


def axis_mask(L: int, K: int, s: int, d: int, causal: bool) -> np.ndarray:
    """Boolean [L_query, L_key]: does query i interact with key j along this axis."""
    m = np.zeros((L, L), dtype=bool)
    for i in range(L):
        g, start, end = axis_window(i, L, K, s, d, causal)
        for j in range(L):
            if j % d == g and start <= j // d <= end:
                m[i, j] = True
    return m


def na_mask(shape: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """Boolean [N, N] mask over row-major flattened tokens, AND of the per-axis masks."""
    n = len(shape)
    K = as_tuple(kernel_size, n)
    S = as_tuple(stride, n)
    Dl = as_tuple(dilation, n)
    C = as_tuple(is_causal, n)
    N = int(np.prod(shape))
    coords = np.array(list(itertools.product(*[range(L) for L in shape])), dtype=np.int64)
    coords = coords.reshape(N, n)
    m = np.ones((N, N), dtype=bool)
    for a in range(n):
        am = axis_mask(shape[a], K[a], S[a], Dl[a], bool(C[a]))
        m &= am[coords[:, a][:, None], coords[:, a][None, :]]
    return m


def rpb_index(shape: Sequence[int], kernel_size, dilation=1) -> Tuple[np.ndarray, ...]:
    """Per-axis rpb index (kc - qc) + K - 1 in group coordinates, each [N, N] (unclipped)."""
    n = len(shape)
    K = as_tuple(kernel_size, n)
    Dl = as_tuple(dilation, n)
    N = int(np.prod(shape))
    coords = np.array(list(itertools.product(*[range(L) for L in shape])), dtype=np.int64)
    coords = coords.reshape(N, n)
    out = []
    for a in range(n):
        gc = coords[:, a] // Dl[a]
        out.append(gc[None, :] - gc[:, None] + K[a] - 1)
    return tuple(out)


def slot_keys(shape: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False):
    """Split-op slot layout.

    Returns (key_idx [N, prodK] int64 flat key index, valid [N, prodK] bool).
    Slot j is the row-major index over per-axis slot offsets (j1, j2, j3); per axis slot jj
    refers to the key at group coordinate window_start + jj; causal slots beyond the query
    are invalid (-inf scores).
    """
    n = len(shape)
    K = as_tuple(kernel_size, n)
    S = as_tuple(stride, n)
    Dl = as_tuple(dilation, n)
    C = as_tuple(is_causal, n)
    N = int(np.prod(shape))
    KK = int(np.prod(K))
    # per axis: key position [L, K] and validity [L, K]
    ax_key, ax_valid = [], []
    for a in range(n):
        L = shape[a]
        kp = np.zeros((L, K[a]), dtype=np.int64)
        kv = np.zeros((L, K[a]), dtype=bool)
        for i in range(L):
            g = i % Dl[a]
            c = i // Dl[a]
            st = _window_start(i, L, K[a], S[a], Dl[a], bool(C[a]))
            for jj in range(K[a]):
                kc = st + jj
                kp[i, jj] = g + Dl[a] * kc
                kv[i, jj] = (kc <= c) if C[a] else True
                assert kp[i, jj] < L
        ax_key.append(kp)
        ax_valid.append(kv)
    key_idx = np.zeros((N, KK), dtype=np.int64)
    valid = np.zeros((N, KK), dtype=bool)
    qcoords = list(itertools.product(*[range(L) for L in shape]))
    scoords = list(itertools.product(*[range(k) for k in K]))
    strides = [int(np.prod(shape[a + 1 :])) for a in range(n)]
    for qi, qc in enumerate(qcoords):
        for si, sc in enumerate(scoords):
            flat = 0
            ok = True
            for a in range(n):
                flat += int(ax_key[a][qc[a], sc[a]]) * strides[a]
                ok = ok and bool(ax_valid[a][qc[a], sc[a]])
            key_idx[qi, si] = flat
            valid[qi, si] = ok
    return key_idx, valid


# --------------------------------------------------------------------------------------
# Dense attention
# --------------------------------------------------------------------------------------


def _flat_heads_first(x: np.ndarray, n: int) -> np.ndarray:
    """[B, *spatial, H, D] -> [B, H, N, D] float64."""
    B = x.shape[0]
    H, D = x.shape[-2], x.shape[-1]
    x = np.asarray(x, dtype=np.float64).reshape(B, -1, H, D)
    return np.transpose(x, (0, 2, 1, 3))


def _kv_head_map(H: int, Hkv: int) -> np.ndarray:
    assert H % Hkv == 0
    return np.arange(H) // (H // Hkv)


def _bias(rpb, shape, K, dilation, H):
    """Dense rpb bias [H, N, N] (zero where the index is out of range; masked anyway)."""
    n = len(shape)
    rpb = np.asarray(rpb, dtype=np.float64)
    assert rpb.shape == (H,) + tuple(2 * k - 1 for k in K), (rpb.shape, K)
    idx = rpb_index(shape, K, dilation)
    inb = np.ones_like(idx[0], dtype=bool)
    clipped = []
    for a in range(n):
        inb &= (idx[a] >= 0) & (idx[a] <= 2 * K[a] - 2)
        clipped.append(np.clip(idx[a], 0, 2 * K[a] - 2))
    bias = rpb[(slice(None),) + tuple(clipped)]  # [H, N, N]
    return np.where(inb[None], bias, 0.0), clipped, inb


def dense_scores(
    q, k, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None, rpb=None
):
    """Scaled, biased, masked dense scores [B, H, N, N + E] (masked = -inf) and the mask."""
    n = q.ndim - 3
    shape = q.shape[1 : 1 + n]
    K = as_tuple(kernel_size, n)
    H, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    if scale is None:
        scale = D ** -0.5
    Q = _flat_heads_first(q, n)
    Kf = _flat_heads_first(k, n)[:, _kv_head_map(H, Hkv)]
    S = scale * np.einsum("bhqd,bhkd->bhqk", Q, Kf)
    if rpb is not None:
        assert not any(as_tuple(is_causal, n)), "rpb with causal is an error"
        S = S + _bias(rpb, shape, K, as_tuple(dilation, n), H)[0][None]
    mask = na_mask(shape, K, stride, dilation, is_causal)
    S = np.where(mask[None, None], S, -np.inf)
    if additional_keys is not None:
        E = additional_keys.shape[1]
        AK = np.transpose(np.asarray(additional_keys, dtype=np.float64), (0, 2, 1, 3))
        AK = AK[:, _kv_head_map(H, Hkv)]
        SE = scale * np.einsum("bhqd,bhkd->bhqk", Q, AK)
        S = np.concatenate([S, SE], axis=-1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], E), dtype=bool)], axis=1)
    return S, mask, scale


def _softmax_lse(S):
    m = np.max(S, axis=-1, keepdims=True)
    e = np.exp(S - m)
    z = np.sum(e, axis=-1, keepdims=True)
    P = e / z
    lse = (np.log(z) + m)[..., 0]
    return P, lse


def _values_dense(v, additional_values, H, n):
    Hkv = v.shape[-2]
    V = _flat_heads_first(v, n)[:, _kv_head_map(H, Hkv)]
    if additional_values is not None:
        AV = np.transpose(np.asarray(additional_values, dtype=np.float64), (0, 2, 1, 3))
        V = np.concatenate([V, AV[:, _kv_head_map(H, Hkv)]], axis=2)
    return V


def na_forward(
    q,
    k,
    v,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
    rpb=None,
):
    """Returns (out [B, *spatial, H, Dv], lse [B, *spatial, H]) in float64."""
    assert (additional_keys is None) == (additional_values is None)
    n = q.ndim - 3
    shape = q.shape[1 : 1 + n]
    B, H = q.shape[0], q.shape[-2]
    S, _, _ = dense_scores(q, k, kernel_size, stride, dilation, is_causal, scale, additional_keys, rpb)
    P, lse = _softmax_lse(S)
    V = _values_dense(v, additional_values, H, n)
    O = np.einsum("bhqk,bhkd->bhqd", P, V)
    Dv = V.shape[-1]
    out = np.transpose(O, (0, 2, 1, 3)).reshape(B, *shape, H, Dv)
    lse = np.transpose(lse, (0, 2, 1)).reshape(B, *shape, H)
    return out, lse


def _reduce_heads(x, H, Hkv):
    """[B, H, ...] -> [B, Hkv, ...] by summing the query heads that share a kv head."""
    return x.reshape(x.shape[0], Hkv, H // Hkv, *x.shape[2:]).sum(axis=2)


def na_backward(
    q,
    k,
    v,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
    rpb=None,
    dout=None,
    dlse=None,
) -> Dict[str, np.ndarray]:
    """Analytic float64 gradients of sum(dout * out) + sum(dlse * lse).

    Returns a dict with keys q, k, v and, when given, rpb, additional_keys,
    additional_values; shapes equal the inputs' shapes.
    """
    n = q.ndim - 3
    shape = q.shape[1 : 1 + n]
    B, H = q.shape[0], q.shape[-2]
    Hkv = k.shape[-2]
    N = int(np.prod(shape))
    K = as_tuple(kernel_size, n)
    S, mask, scale = dense_scores(q, k, kernel_size, stride, dilation, is_causal, scale, additional_keys, rpb)
    P, _ = _softmax_lse(S)
    V = _values_dense(v, additional_values, H, n)
    O = np.einsum("bhqk,bhkd->bhqd", P, V)
    dO = np.zeros_like(O) if dout is None else _flat_heads_first(dout, n)
    dP = np.einsum("bhqd,bhkd->bhqk", dO, V)
    delta = np.sum(dO * O, axis=-1, keepdims=True)
    dS = P * (dP - delta)
    if dlse is not None:
        dL = np.transpose(np.asarray(dlse, dtype=np.float64).reshape(B, N, H), (0, 2, 1))
        dS = dS + P * dL[..., None]
    dV_full = np.einsum("bhqk,bhqd->bhkd", P, dO)  # [B, H, N+E, Dv]
    Q = _flat_heads_first(q, n)
    Kf = _flat_heads_first(k, n)[:, _kv_head_map(H, Hkv)]
    if additional_keys is not None:
        AK = np.transpose(np.asarray(additional_keys, dtype=np.float64), (0, 2, 1, 3))
        Kf = np.concatenate([Kf, AK[:, _kv_head_map(H, Hkv)]], axis=2)
    dQ = scale * np.einsum("bhqk,bhkd->bhqd", dS, Kf)
    dK_full = scale * np.einsum("bhqk,bhqd->bhkd", dS, Q)
    dK_full = _reduce_heads(dK_full, H, Hkv)
    dV_full = _reduce_heads(dV_full, H, Hkv)

    def to_spatial(x, heads):
        return np.transpose(x, (0, 2, 1, 3)).reshape(B, *shape, heads, x.shape[-1])

    grads = {
        "q": to_spatial(dQ, H),
        "k": to_spatial(dK_full[:, :, :N], Hkv),
        "v": to_spatial(dV_full[:, :, :N], Hkv),
    }
    if additional_keys is not None:
        grads["additional_keys"] = np.transpose(dK_full[:, :, N:], (0, 2, 1, 3))
        grads["additional_values"] = np.transpose(dV_full[:, :, N:], (0, 2, 1, 3))
    if rpb is not None:
        _, clipped, inb = _bias(rpb, shape, K, as_tuple(dilation, n), H)
        sel = mask[:, :N] & inb
        dR = np.zeros(np.asarray(rpb).shape, dtype=np.float64)
        dSn = dS[:, :, :, :N].sum(axis=0)  # [H, N, N]
        qi, ki = np.nonzero(sel)
        for h in range(H):
            np.add.at(dR[h], tuple(c[qi, ki] for c in clipped), dSn[h, qi, ki])
        grads["rpb"] = dR
    return grads


# --------------------------------------------------------------------------------------
# Split ops (slot layout)
# --------------------------------------------------------------------------------------


def na_qk(
    q,
    k,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    rpb=None,
    scale=None,
    additional_keys=None,
):
    """Scores [B, *spatial, H, prodK (+E)], scaled, rpb added, invalid causal slots -inf."""
    n = q.ndim - 3
    shape = q.shape[1 : 1 + n]
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    N = int(np.prod(shape))
    K = as_tuple(kernel_size, n)
    if scale is None:
        scale = D ** -0.5
    key_idx, valid = slot_keys(shape, K, stride, dilation, is_causal)
    Q = _flat_heads_first(q, n)
    Kf = _flat_heads_first(k, n)[:, _kv_head_map(H, Hkv)]
    S = scale * np.einsum("bhqd,bhkd->bhqk", Q, Kf)  # dense [B, H, N, N]
    if rpb is not None:
        assert not any(as_tuple(is_causal, n))
        S = S + _bias(rpb, shape, K, as_tuple(dilation, n), H)[0][None]
    rows = np.arange(N)[:, None]
    slots = S[:, :, rows, key_idx]  # [B, H, N, prodK]
    slots = np.where(valid[None, None], slots, -np.inf)
    if additional_keys is not None:
        AK = np.transpose(np.asarray(additional_keys, dtype=np.float64), (0, 2, 1, 3))
        AK = AK[:, _kv_head_map(H, Hkv)]
        SE = scale * np.einsum("bhqd,bhkd->bhqk", Q, AK)
        slots = np.concatenate([slots, SE], axis=-1)
    out = np.transpose(slots, (0, 2, 1, 3))  # [B, N, H, slots]
    return out.reshape(B, *shape, H, out.shape[-1])


def _slots_to_dense(A, shape, K, stride, dilation, is_causal, n_extra):
    """A [B, *spatial, H, prodK + E] -> dense [B, H, N, N + E] (only valid slots scattered)."""
    B, H = A.shape[0], A.shape[-2]
    N = int(np.prod(shape))
    KK = int(np.prod(K))
    key_idx, valid = slot_keys(shape, K, stride, dilation, is_causal)
    A = np.transpose(np.asarray(A, dtype=np.float64).reshape(B, N, H, KK + n_extra), (0, 2, 1, 3))
    Dn = np.zeros((B, H, N, N + n_extra), dtype=np.float64)
    for qi in range(N):
        for s in range(KK):
            if valid[qi, s]:
                Dn[:, :, qi, key_idx[qi, s]] += A[:, :, qi, s]
    if n_extra:
        Dn[:, :, :, N:] = A[:, :, :, KK:]
    return Dn


def na_av(attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None):
    """Out [B, *spatial, H, Dv] = sum over valid slots of attn * value[slot key] (+ extra)."""
    n = value.ndim - 3
    shape = value.shape[1 : 1 + n]
    B, H = attn.shape[0], attn.shape[-2]
    K = as_tuple(kernel_size, n)
    E = 0 if additional_values is None else additional_values.shape[1]
    A = _slots_to_dense(attn, shape, K, stride, dilation, is_causal, E)
    V = _values_dense(value, additional_values, H, n)
    O = np.einsum("bhqk,bhkd->bhqd", A, V)
    return np.transpose(O, (0, 2, 1, 3)).reshape(B, *shape, H, V.shape[-1])


def na_qk_backward(
    q, k, kernel_size, stride=1, dilation=1, is_causal=False, rpb=None, scale=None, additional_keys=None, dscores=None
):
    """Gradients of sum(dscores * na_qk(...)) over valid slots (invalid slots carry no gradient)."""
    n = q.ndim - 3
    shape = q.shape[1 : 1 + n]
    H, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    N = int(np.prod(shape))
    K = as_tuple(kernel_size, n)
    if scale is None:
        scale = D ** -0.5
    E = 0 if additional_keys is None else additional_keys.shape[1]
    G = _slots_to_dense(dscores, shape, K, stride, dilation, is_causal, E)  # [B, H, N, N+E]
    Q = _flat_heads_first(q, n)
    Kf = _flat_heads_first(k, n)[:, _kv_head_map(H, Hkv)]
    if additional_keys is not None:
        AK = np.transpose(np.asarray(additional_keys, dtype=np.float64), (0, 2, 1, 3))
        Kf = np.concatenate([Kf, AK[:, _kv_head_map(H, Hkv)]], axis=2)
    dQ = scale * np.einsum("bhqk,bhkd->bhqd", G, Kf)
    dK = _reduce_heads(scale * np.einsum("bhqk,bhqd->bhkd", G, Q), H, Hkv)
    out = {
        "q": np.transpose(dQ, (0, 2, 1, 3)).reshape(q.shape),
        "k": np.transpose(dK[:, :, :N], (0, 2, 1, 3)).reshape(k.shape),
    }
    if additional_keys is not None:
        out["additional_keys"] = np.transpose(dK[:, :, N:], (0, 2, 1, 3))
    if rpb is not None:
        _, clipped, inb = _bias(rpb, shape, K, as_tuple(dilation, n), H)
        dR = np.zeros(np.asarray(rpb).shape, dtype=np.float64)
        Gs = G[:, :, :, :N].sum(axis=0)
        qi, ki = np.nonzero(na_mask(shape, K, stride, dilation, is_causal) & inb)
        for h in range(H):
            np.add.at(dR[h], tuple(c[qi, ki] for c in clipped), Gs[h, qi, ki])
        out["rpb"] = dR
    return out


def na_av_backward(
    attn, value, kernel_size, stride=1, dilation=1, is_causal=False, additional_values=None, dout=None
):
    """Gradients of sum(dout * na_av(...)): attn (valid slots only; invalid slots 0), value, extra."""
    n = value.ndim - 3
    shape = value.shape[1 : 1 + n]
    B, H = attn.shape[0], attn.shape[-2]
    Hkv = value.shape[-2]
    N = int(np.prod(shape))
    K = as_tuple(kernel_size, n)
    KK = int(np.prod(K))
    E = 0 if additional_values is None else additional_values.shape[1]
    A = _slots_to_dense(attn, shape, K, stride, dilation, is_causal, E)
    V = _values_dense(value, additional_values, H, n)
    dO = _flat_heads_first(dout, n)
    dA_dense = np.einsum("bhqd,bhkd->bhqk", dO, V)
    dV = _reduce_heads(np.einsum("bhqk,bhqd->bhkd", A, dO), H, Hkv)
    key_idx, valid = slot_keys(shape, K, stride, dilation, is_causal)
    rows = np.arange(N)[:, None]
    dA = np.where(valid[None, None], dA_dense[:, :, rows, key_idx], 0.0)
    if E:
        dA = np.concatenate([dA, dA_dense[:, :, :, N:]], axis=-1)
    out = {
        "attn": np.transpose(dA, (0, 2, 1, 3)).reshape(B, *shape, H, KK + E),
        "value": np.transpose(dV[:, :, :N], (0, 2, 1, 3)).reshape(value.shape),
        "valid": valid,
    }
    if E:
        out["additional_values"] = np.transpose(dV[:, :, N:], (0, 2, 1, 3))
    return out


# --------------------------------------------------------------------------------------
# merge_attentions
# --------------------------------------------------------------------------------------


def merge_attentions(outs, lses):
    """o = sum_i exp(l_i - l) o_i, l = logsumexp_i l_i (float64 here)."""
    L = np.stack([np.asarray(x, dtype=np.float64) for x in lses], 0)
    O = np.stack([np.asarray(x, dtype=np.float64) for x in outs], 0)
    m = np.max(L, axis=0)
    lse = m + np.log(np.sum(np.exp(L - m), axis=0))
    w = np.exp(L - lse)[..., None]
    return np.sum(w * O, axis=0), lse


# --------------------------------------------------------------------------------------
# Finite differences (used to self-check the analytic backward)
# --------------------------------------------------------------------------------------


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        idx = it.multi_index
        old = x[idx]
        x[idx] = old + eps
        fp = f(x)
        x[idx] = old - eps
        fm = f(x)
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g
