"""natten-mlx-metal: neighborhood attention kernels for Apple GPUs through mx.fast.metal_kernel.

Registers the backend "metal" (priority 300) with natten_mlx through the ``natten_mlx.backends``
entry point. Verified by emulation (tests/metal runs every launch through the CPU emulator in
packages/natten-mlx-metal/emulator); not yet run on Apple hardware.
"""

from natten_mlx import hookimpl

from .backend import MetalBackend

__all__ = ["MetalBackend"]


@hookimpl
def natten_mlx_register_backends(register):
    register(MetalBackend())
