"""A CPU emulator for the Metal kernels natten-mlx hands to ``mx.fast.metal_kernel``.

It exists because the Metal tier is developed where no Apple GPU is: the exact source string
the backend ships is wrapped in the signature MLX would generate, compiled as C++ against
metal_shim.h and run with the threads of each threadgroup as fibers. See driver.py.
"""

from .driver import CompileError, EmulatorError, compile_kernel, emulate, generated_sources
from .signature import SignatureError, build_signature, mlx_source

__all__ = [
    "emulate", "EmulatorError", "CompileError", "SignatureError", "generated_sources", "compile_kernel",
    "build_signature", "mlx_source",
]
