"""Upstream NATTEN state dicts into compat modules.

The compat modules name their weights as upstream does (``qkv.weight``, ``qkv.bias``,
``proj.weight``, ``proj.bias``, ``rpb``) with the same shapes (``mlx.nn.Linear`` stores
``weight`` as ``[out, in]``, like ``torch.nn.Linear``), so a state dict moves over unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import mlx.core as mx
import numpy as np


def _to_array(name: str, value: Any) -> mx.array:
    if isinstance(value, mx.array):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name == "bfloat16":  # NumPy has no bfloat16: go through float32, exactly
            return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
        return mx.array(tensor.numpy())
    if isinstance(value, np.ndarray):
        return mx.array(value)
    raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}; expected a torch.Tensor, numpy array or mlx array")


def to_mlx_weights(state_dict: Mapping[str, Any]) -> list[tuple[str, mx.array]]:
    """``{name: tensor}`` (torch, NumPy or MLX) -> ``[(name, mx.array)]`` for ``Module.load_weights``.

    Entries that are ``None`` (an upstream ``rpb`` registered as ``None``) are dropped.
    """
    return [(name, _to_array(name, value)) for name, value in state_dict.items() if value is not None]


def load_torch_state_dict(module, state_dict: Mapping[str, Any], strict: bool = True):
    """Load an upstream NATTEN module's ``state_dict()`` into the matching compat module.

    ``strict=True`` (the default) requires exactly the module's parameter names and shapes, as
    ``torch.nn.Module.load_state_dict`` does; MLX raises a ValueError naming the mismatch.
    Returns the module.
    """
    module.load_weights(to_mlx_weights(state_dict), strict=strict)
    return module
