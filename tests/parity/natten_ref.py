"""Helpers that evaluate official NATTEN (0.21.x, PyTorch, CPU) for parity tests.

* ``natten_forward``: NATTEN's public ``na1d/na2d/na3d`` forward (``flex-fna`` backend on CPU,
  float32), returning (out, lse) as float64 NumPy arrays.  NATTEN's flex backend only accepts
  head_dim == head_dim_v, a power of two in [8, 512], and float16/bfloat16/float32 inputs.
* ``natten_mask``: NATTEN's own mask predicate (``get_na_flex_mask(...).mask_mod``) evaluated
  on index grids -> bool [N, N].
* ``natten_dense``: dense float64 torch attention under NATTEN's mask (plus unmasked extra
  keys/values), differentiated with torch autograd.  This is how gradients are obtained from
  NATTEN without CUDA (its flex backend on CPU is forward-only in our setting).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import natten
import numpy as np
import torch
import torch.nn.attention.flex_attention as _flex_module
from natten.backends.flex import flex_fna_generic, get_na_flex_mask

warnings.filterwarnings("ignore", module=r"torch\.nn\.attention\.flex_attention")
warnings.filterwarnings("ignore", message=r".*flex_attention.*")
warnings.filterwarnings("ignore", message=r".*return_lse is deprecated.*")

NATTEN_FNS = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}


def _tup(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def flex_can_run(D: int, Dv: int) -> bool:
    return D == Dv and 8 <= D <= 512 and (D & (D - 1)) == 0


@lru_cache(maxsize=4096)
def natten_mask(shape: tuple, kernel_size: tuple, stride: tuple, dilation: tuple, is_causal: tuple) -> np.ndarray:
    n = len(shape)
    bm = get_na_flex_mask(
        device="cpu",
        na_dim=n,
        qkv_shape=tuple(shape),
        kernel_size=tuple(kernel_size),
        stride=tuple(stride),
        dilation=tuple(dilation),
        is_causal=tuple(bool(c) for c in is_causal),
    )
    N = math.prod(shape)
    qi = torch.arange(N)[:, None]
    ki = torch.arange(N)[None, :]
    z = torch.zeros((), dtype=torch.long)
    m = bm.mask_mod(z, z, qi, ki)
    m = torch.broadcast_to(m, (N, N))
    out = m.numpy().astype(bool)
    out.setflags(write=False)
    return out


def natten_forward(
    q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
    additional_keys=None, additional_values=None, dtype=torch.float32, use_public_api=True, dynamo=False,
):
    """Run NATTEN's forward on CPU; returns float64 numpy (out, lse).

    Uncompiled flex_attention still wraps its math in a dynamo trace (backend "eager") that is
    re-traced for every new mask/shape and costs ~1 s per configuration.  With ``dynamo=False``
    the debug switch named in torch's own warning (``_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG``) calls the same
    higher-order op directly (forward only); the parity tests check that both paths agree bitwise.
    """
    n = q.ndim - 3
    t = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    Q, K, V, AK, AV = t(q), t(k), t(v), t(additional_keys), t(additional_values)
    ks, st, dl, ca = _tup(kernel_size, n), _tup(stride, n), _tup(dilation, n), _tup(is_causal, n)
    shape = tuple(q.shape[1 : 1 + n])
    # NATTEN's self-attention fast path (1-D K == L, or all K == size and non-causal) calls
    # natten.attention, whose only CPU backend (flex-fmha) rejects causal masks.  In that case
    # go to the flex-fna backend directly; it implements the same NA definition.
    self_attn_causal = (
        AK is None and n == 1 and ks[0] == shape[0] and ca[0]
    )
    saved = _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = not dynamo
    try:
        return _natten_forward(Q, K, V, AK, AV, ks, st, dl, ca, scale, n, use_public_api and not self_attn_causal)
    finally:
        _flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = saved


def _natten_forward(Q, K, V, AK, AV, ks, st, dl, ca, scale, n, public):
    with torch.no_grad():
        if public:
            out, lse = NATTEN_FNS[n](
                Q, K, V, kernel_size=ks, stride=st, dilation=dl, is_causal=ca, scale=scale,
                additional_keys=AK, additional_values=AV, return_lse=True, backend="flex-fna",
                attention_kwargs={"backend": "flex-fmha"},
            )
        else:
            assert AK is None
            out, lse = flex_fna_generic(
                Q, K, V, kernel_size=ks, stride=st, dilation=dl, is_causal=ca, scale=scale,
                return_lse=True,
            )
    return out.double().numpy(), lse.double().numpy()


def natten_dense(
    q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
    additional_keys=None, additional_values=None, dout=None, dlse=None,
):
    """Dense float64 attention under NATTEN's mask_mod; returns (out, lse, grads dict)."""
    n = q.ndim - 3
    shape = tuple(q.shape[1 : 1 + n])
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    N = math.prod(shape)
    mask = torch.from_numpy(
        natten_mask(shape, _tup(kernel_size, n), _tup(stride, n), _tup(dilation, n), _tup(is_causal, n)).copy()
    )
    if scale is None:
        scale = D ** -0.5
    leaves = {}

    def leaf(name, x):
        if x is None:
            return None
        tt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
        leaves[name] = tt
        return tt

    Q, K, V = leaf("q", q), leaf("k", k), leaf("v", v)
    AK, AV = leaf("additional_keys", additional_keys), leaf("additional_values", additional_values)
    rep = H // Hkv
    Qf = Q.reshape(B, N, H, D).transpose(1, 2)
    Kf = K.reshape(B, N, Hkv, D).transpose(1, 2).repeat_interleave(rep, dim=1)
    Vf = V.reshape(B, N, Hkv, -1).transpose(1, 2).repeat_interleave(rep, dim=1)
    full_mask = mask
    if AK is not None:
        Kf = torch.cat([Kf, AK.transpose(1, 2).repeat_interleave(rep, dim=1)], dim=2)
        Vf = torch.cat([Vf, AV.transpose(1, 2).repeat_interleave(rep, dim=1)], dim=2)
        full_mask = torch.cat([mask, torch.ones(N, AK.shape[1], dtype=torch.bool)], dim=1)
    S = scale * Qf @ Kf.transpose(-1, -2)
    S = S.masked_fill(~full_mask, float("-inf"))
    lse = torch.logsumexp(S, dim=-1)  # [B, H, N]
    P = torch.softmax(S, dim=-1)
    O = P @ Vf
    out = O.transpose(1, 2).reshape(B, *shape, H, -1)
    lse_s = lse.transpose(1, 2).reshape(B, *shape, H)
    grads = {}
    if dout is not None or dlse is not None:
        loss = 0.0
        if dout is not None:
            loss = loss + (out * torch.from_numpy(np.asarray(dout, dtype=np.float64))).sum()
        if dlse is not None:
            loss = loss + (lse_s * torch.from_numpy(np.asarray(dlse, dtype=np.float64))).sum()
        loss.backward()
        grads = {name: t.grad.numpy().copy() for name, t in leaves.items()}
    return out.detach().numpy(), lse_s.detach().numpy(), grads
