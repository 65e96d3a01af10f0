"""Upstream's normalisation of per-axis arguments (``check_all_args``) for the era modules.

An int (or bool) stands for every axis; a tuple or list needs one entry per axis; ``None`` means
the default. Anything else is a ValueError, as upstream.
"""

from __future__ import annotations


def _per_axis(name: str, na_dim: int, value, kind, default):
    if value is None and default is not None:
        return (default,) * na_dim
    if isinstance(value, (tuple, list)) and len(value) == na_dim and all(_is(kind, v) for v in value):
        return tuple(value)
    if _is(kind, value):
        return (value,) * na_dim
    raise ValueError(
        f"Invalid value for `{name}`; expected {'a boolean' if kind is bool else 'an integer'} or a tuple of "
        f"{na_dim}, got {value!r}."
    )


def _is(kind, v) -> bool:
    if kind is bool:
        return isinstance(v, bool)
    return isinstance(v, int) and not isinstance(v, bool)


def kernel_size_arg(na_dim: int, kernel_size):
    return _per_axis("kernel_size", na_dim, kernel_size, int, None)


def stride_arg(na_dim: int, stride):
    return _per_axis("stride", na_dim, stride, int, 1)


def dilation_arg(na_dim: int, dilation):
    return _per_axis("dilation", na_dim, dilation, int, 1)


def causal_arg(na_dim: int, is_causal):
    return _per_axis("is_causal", na_dim, is_causal, bool, False)
