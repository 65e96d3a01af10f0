"""natten-mlx-metal: neighborhood attention kernels for Apple GPUs through mx.fast.metal_kernel.

Registers the backend "metal" (priority 300) with natten_mlx through the ``natten_mlx.backends``
entry point. Verified by emulation (tests/metal); not yet run on Apple hardware.
"""

from .backend import MetalBackend

__all__ = ["MetalBackend"]
