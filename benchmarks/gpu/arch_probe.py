#!/usr/bin/env python3
"""What mx.fast.cuda_kernel compiles for on this GPU: prints __CUDA_ARCH__, whether the sm_90a
feature macro is defined, and whether a warpgroup instruction (``wgmma.fence``, Hopper's
arch-specific tensor-core path) compiles and runs. MLX >= 0.30 asks NVRTC for sm_90a on compute
capability 9.x (mlx/backend/cuda/jit_module.cpp); on the lent H200 with MLX 0.32.4 (2026-12-02):
``sm_90a features 1, wgmma.fence ran 1, __CUDA_ARCH__ 900``.

    source .device/setup.sh && python3 benchmarks/gpu/arch_probe.py
"""

import mlx.core as mx

SRC = r"""
  uint32_t r = 0;
#if defined(__CUDA_ARCH__)
  r |= ((uint32_t)__CUDA_ARCH__) << 8;
#endif
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
  r |= 1u;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");  // a whole warpgroup (128 threads) executes it
  r |= 2u;
#endif
  out[threadIdx.x] = r;
"""


def main() -> None:
    k = mx.fast.cuda_kernel(name="natten_arch_probe", input_names=["x"], output_names=["out"], source=SRC)
    (o,) = k(inputs=[mx.zeros((1,), dtype=mx.uint32)], grid=(128, 1, 1), threadgroup=(128, 1, 1),
             output_shapes=[(128,)], output_dtypes=[mx.uint32])
    v = int(o[0].item())
    print(f"sm_90a features {v & 1}, wgmma.fence ran {(v >> 1) & 1}, __CUDA_ARCH__ {v >> 8}")


if __name__ == "__main__":
    main()
