"""The ``nanobind`` backend of natten-mlx (entry point ``natten_mlx.backends: nanobind``).

Protocol v2 (docs/protocol-v2.md): ``differentiation = "primitive"``: the ops return outputs of MLX
primitives whose ``vjp`` is the compiled backward, so the core calls them directly. Serves CPU streams
only; serves sub-domain (sharded) problems of the fused op.
"""

from __future__ import annotations

import mlx.core as mx
import pluggy

from . import UNAVAILABLE, __version__, extension

hookimpl = pluggy.HookimplMarker("natten_mlx")

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)


class NanobindBackend:
    """Neighborhood attention as C++ MLX primitives on the CPU (every parameter, all float dtypes)."""

    name = "nanobind"
    priority = 200
    differentiation = "primitive"
    distribution = "natten-mlx-nanobind"
    version = __version__
    description = "C++ MLX primitives (nanobind) on CPU streams: tiled GEMM forward/backward, SIMD, thread pool"

    def available(self) -> str | None:
        return UNAVAILABLE

    def supports(self, problem) -> str | None:
        if UNAVAILABLE is not None:
            return UNAVAILABLE
        device = getattr(problem, "device", None)
        if device is None:  # a core before protocol v2: the op runs on the default device
            device = "cpu" if mx.default_device() == mx.cpu else "gpu"
        if device != "cpu":
            return f"serves CPU streams only (this call runs on {device!r}; the cuda/metal tiers serve GPU streams)"
        if getattr(problem, "is_subdomain", False) and problem.op != "fused":
            return "sub-domain problems of the split ops are not implemented (the fused op serves them)"
        if problem.dtype not in _FLOATS:
            return f"dtype {problem.dtype} is not served (float32, float16, bfloat16)"
        sizes = [problem.batch, problem.heads, problem.kv_heads, *problem.spatial]
        if problem.op != "av":
            sizes.append(problem.head_dim)
        if problem.op != "qk":
            sizes.append(problem.value_head_dim)
        if min(sizes) <= 0:
            return "empty arrays (a zero-length axis) are not served"
        return None

    @staticmethod
    def _window(problem) -> dict:
        return dict(
            kernel_size=list(problem.kernel_size),
            stride=list(problem.stride),
            dilation=list(problem.dilation),
            is_causal=list(problem.is_causal),
        )

    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """``(out [B, *spatial, H, Dv] in the input dtype, lse [B, *spatial, H] float32)``; lse always."""
        sub = {}
        if getattr(problem, "is_subdomain", False):
            sub = dict(domain=list(problem.domain), query_offset=list(problem.query_offset), kv_offset=list(problem.kv_offset))
        out, lse = extension().fused_forward(
            query, key, value, additional_keys, additional_values, rpb, scale=problem.scale, **self._window(problem), **sub
        )
        return out, lse

    def qk_forward(self, problem, query, key, additional_keys=None, rpb=None):
        """Scores ``[B, *spatial, H, Kt (+N_extra)]``, scaled, rpb added, invalid causal slots -inf."""
        return extension().qk_forward(query, key, additional_keys, rpb, scale=problem.scale, **self._window(problem))

    def av_forward(self, problem, attn, value, additional_values=None):
        """``attn [B, *spatial, H, Kt (+N_extra)]`` x values -> ``[B, *spatial, H, Dv]``."""
        return extension().av_forward(attn, value, additional_values, **self._window(problem))


@hookimpl
def natten_mlx_register_backends(register):
    register(NanobindBackend())
