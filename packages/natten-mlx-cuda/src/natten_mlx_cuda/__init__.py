"""natten-mlx-cuda: NATTEN's neighborhood attention on NVIDIA GPUs through MLX's CUDA backend.

Registers the ``cuda`` backend (priority 300) through the ``natten_mlx.backends`` entry point.
Kernels are CUDA source (``cu/``) compiled at run time by ``mx.fast.cuda_kernel``: the wheel is
pure Python.
"""

from __future__ import annotations

from natten_mlx import hookimpl

from .backend import CudaBackend

__version__ = "0.4.0"
__all__ = ["CudaBackend"]


@hookimpl
def natten_mlx_register_backends(register):
    register(CudaBackend())
