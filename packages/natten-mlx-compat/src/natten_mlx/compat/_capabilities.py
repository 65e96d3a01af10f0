"""What upstream's ``has_*`` probes would answer for natten-mlx, and the recorded kernel switches.

Truthful for MLX: there is no CUDA and no GEMM/tiled/fused CUDA kernel, so ``has_cuda``,
``has_gemm``, ``has_tf32_gemm``/``has_fp32_gemm``/``has_fp64_gemm`` and ``has_fna`` are False;
MLX computes float16 and bfloat16 on every device, so ``has_half`` and ``has_bfloat`` are True.
The ``device_index`` argument of upstream's probes is accepted and ignored.

The switches (``enable_gemm_na``, ``use_tiled_na``, ...) selected among upstream's CUDA kernels;
here they are recorded, readable back, and change no result.
"""

from __future__ import annotations


def has_cuda() -> bool:
    return False


def has_half(device_index=None) -> bool:
    return True


def has_bfloat(device_index=None) -> bool:
    return True


def has_gemm(device_index=None) -> bool:
    return False


def has_tf32_gemm(device_index=None) -> bool:
    return False


has_fp32_gemm = has_tf32_gemm


def has_fp64_gemm(device_index=None) -> bool:
    return False


def has_fna(device_index=None) -> bool:
    return False


has_fused_na = has_fna

# The probes each era exports, in upstream's order (0.17 added the fused-NA ones).
PROBES_015 = ["has_cuda", "has_half", "has_bfloat", "has_gemm", "has_tf32_gemm", "has_fp32_gemm", "has_fp64_gemm"]
PROBES_017 = [*PROBES_015[:4], "has_fna", "has_fused_na", *PROBES_015[4:]]


class KernelSwitches:
    """Recorded settings of upstream's CUDA kernel selection (one instance per era).

    Defaults as libnatten's: GEMM and tiled NA on. TF32 stays off, as in a libnatten built
    without CUTLASS, where setting it is a no-op.
    """

    def __init__(self):
        self.gemm_na = True
        self.tiled_na = True
