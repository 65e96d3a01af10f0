"""Upstream's ``natten.backends`` configuration queries (0.20.1 and 0.21.7).

Each lists upstream's CUDA/Flex tile configurations usable for the given inputs. natten-mlx has
none of those kernels, so each returns ``[]`` (as upstream does on a machine without CUDA).
``NAMES_020`` and ``NAMES_021`` are each era's queries: 0.21 added the Hopper and Blackwell
backward ones.
"""

from __future__ import annotations


def get_bwd_configs_for_cutlass_blackwell_fmha(query, key, value) -> list:
    return []


def get_bwd_configs_for_cutlass_blackwell_fna(query, key, value) -> list:
    return []


def get_bwd_configs_for_cutlass_fmha(query, key, value) -> list:
    return []


def get_bwd_configs_for_cutlass_fna(query, key, value) -> list:
    return []


def get_bwd_configs_for_cutlass_hopper_fmha(query, key, value) -> list:
    return []


def get_bwd_configs_for_cutlass_hopper_fna(query, key, value) -> list:
    return []


def get_configs_for_cutlass_blackwell_fmha(query, key, value) -> list:
    return []


def get_configs_for_cutlass_blackwell_fna(query, key, value) -> list:
    return []


def get_configs_for_cutlass_fmha(query, key, value) -> list:
    return []


def get_configs_for_cutlass_fna(query, key, value) -> list:
    return []


def get_configs_for_cutlass_hopper_fmha(query, key, value) -> list:
    return []


def get_configs_for_cutlass_hopper_fna(query, key, value) -> list:
    return []


def get_configs_for_flex_fmha(query, key, value, torch_compile: bool = False) -> list:
    return []


def get_configs_for_flex_fna(query, key, value, torch_compile: bool = False) -> list:
    return []


__all__ = [
    "get_bwd_configs_for_cutlass_blackwell_fmha",
    "get_bwd_configs_for_cutlass_blackwell_fna",
    "get_bwd_configs_for_cutlass_fmha",
    "get_bwd_configs_for_cutlass_fna",
    "get_bwd_configs_for_cutlass_hopper_fmha",
    "get_bwd_configs_for_cutlass_hopper_fna",
    "get_configs_for_cutlass_blackwell_fmha",
    "get_configs_for_cutlass_blackwell_fna",
    "get_configs_for_cutlass_fmha",
    "get_configs_for_cutlass_fna",
    "get_configs_for_cutlass_hopper_fmha",
    "get_configs_for_cutlass_hopper_fna",
    "get_configs_for_flex_fmha",
    "get_configs_for_flex_fna",
]

NAMES_021 = __all__
NAMES_020 = [name for name in __all__ if not name.startswith(("get_bwd_configs_for_cutlass_blackwell_",
                                                              "get_bwd_configs_for_cutlass_hopper_"))]
