"""Shared body of NATTEN 0.20 and 0.21 (heads-last ``[B, *spatial, H, D]``): the top-level names, the
naming of the ``na*`` functions, the fused op, ``attention`` and ``merge_attentions``.

Performance arguments (``backend``, ``q_tile_shape``, ``kv_tile_shape``, ``backward_*``,
``run_persistent_kernel``, ``kernel_schedule``, ``torch_compile``, ``attention_kwargs``,
``try_fuse_additional_kv``) chose among upstream's CUDA/Flex kernels of the same function: they are
accepted and ignored, except that ``backend`` must name one of upstream's backends (or None), as
upstream requires. Which natten-mlx backend runs is natten-mlx's choice
(``natten_mlx.use_backend``).
"""

from __future__ import annotations

import mlx.core as mx
import natten_mlx

from . import _dense
from ._core_ops import FUSED
from ._exports import named, reexport

NA_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")
FMHA_BACKENDS = ("cutlass-fmha", "hopper-fmha", "blackwell-fmha", "flex-fmha")


def check_backend(backend, known) -> None:
    if backend is not None and backend not in known:
        raise NotImplementedError(f"Unrecognized NATTEN backend {backend}; upstream's choices are {known}.")


def top_level(namespace: dict, backends, context, functional, modules) -> list[str]:
    """Bind the top-level names of ``natten`` 0.20/0.21 from the era's submodules in ``namespace`` (the
    era package's ``globals()``, which defines ``__version__`` and ``HAS_LIBNATTEN``); returns its ``__all__``."""
    return [
        "__version__",
        *reexport(namespace, modules, ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]),
        *reexport(namespace, context, sorted(set(context.__all__) - {"MemoryUsagePreference", "NattenContext"})),
        *reexport(namespace, backends, backends.__all__),
        "HAS_LIBNATTEN",
        *reexport(namespace, functional, ["na1d", "na2d", "na3d", "attention", "merge_attentions"]),
    ]


def named_na(na, na_dim, version: str):
    """An era's ``na`` function made for ``na_dim`` spatial axes, named and documented: ``na{na_dim}d``, or
    ``neighborhood_attention_generic`` for ``na_dim=None``."""
    if na_dim is None:
        na.__doc__ = f"Neighborhood attention of NATTEN {version} over 1 to 3 spatial axes (see the module docstring)."
        return named("neighborhood_attention_generic", na)
    na.__doc__ = f"{na_dim}-D neighborhood attention of NATTEN {version} (see the module docstring)."
    return named(f"na{na_dim}d", na)


# ----------------------------------------------------------------------------------------------
# ops


def fused(na_dim, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
          additional_values, backend, return_lse, allow_gqa):
    """``na{na_dim}d``; ``na_dim=None`` (``neighborhood_attention_generic``) takes it from the query's rank."""
    if na_dim is None:
        na_dim = query.ndim - 3 if hasattr(query, "ndim") else 0
        if na_dim not in (1, 2, 3):
            shape = getattr(query, "shape", None)
            raise ValueError(f"query must be [B, *spatial, H, D] with 1 to 3 spatial axes, got shape {shape}")
    check_backend(backend, NA_BACKENDS)
    if not isinstance(query, mx.array):
        raise TypeError(f"query must be an mlx.core.array, got {type(query).__name__}")
    if not allow_gqa:
        heads = [("query", query)] + [(n, x) for n, x in (("key", key), ("value", value),
                                                          ("additional_keys", additional_keys),
                                                          ("additional_values", additional_values))
                                      if isinstance(x, mx.array)]
        if len({x.shape[-2] for _, x in heads}) > 1:
            raise ValueError(
                "NATTEN 0.20 does not support GQA/MQA, therefore number of heads in Q, K, and V must match, got "
                + ", ".join(f"{n}: {x.shape[-2]}" for n, x in heads) + "."
            )
    return FUSED[na_dim](
        query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
        scale=scale or query.shape[-1] ** -0.5, additional_keys=additional_keys, additional_values=additional_values,
        return_lse=return_lse,
    )


def attention(query, key, value, *, is_causal, scale, backend, return_lse, allow_gqa, cu_q=None, cu_kv=None):
    check_backend(backend, FMHA_BACKENDS)
    _dense.check_tensors(query, key, value, allow_gqa)
    if is_causal and cu_q is None and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"Causal attention here needs as many queries as keys (got {query.shape[1]} and {key.shape[1]}): "
            "with different lengths, upstream's CUDA kernels' mask alignment is not reproduced."
        )
    out, lse = _dense.attention(query, key, value, scale=scale, is_causal=is_causal, cu_q=cu_q, cu_kv=cu_kv)
    return (out, lse) if return_lse else out


def merge_attentions(outputs, lse_tensors):
    """Upstream's rank checks, then the core merge -> ``(out, lse)``."""
    if not isinstance(outputs, (list, tuple)) or not isinstance(lse_tensors, (list, tuple)):
        raise TypeError("`merge_attentions` takes lists of outputs and LSE tensors.")
    if len(outputs) < 2:
        raise ValueError("`merge_attentions` expects at least two tensors.")
    if len(outputs) != len(lse_tensors):
        raise ValueError(
            "`merge_attentions` expected number of outputs and LSE tensors to match, "
            f"got {len(outputs)=} != {len(lse_tensors)}."
        )
    for i, (output, lse) in enumerate(zip(outputs, lse_tensors, strict=True)):
        if output.ndim != 4:
            raise ValueError(
                "Output tensors must be rank-4 tensors with (batch, seq, heads, dim), "
                f"but got output {i} with rank={output.ndim}."
            )
        if lse.ndim != 3:
            raise ValueError(
                f"LSE tensors must be rank-3 tensors with (batch, seq, heads), but got LSE {i} with rank={lse.ndim}."
            )
    return natten_mlx.merge_attentions(list(outputs), list(lse_tensors))
