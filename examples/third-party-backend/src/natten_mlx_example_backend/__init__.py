"""natten-mlx-example-backend: a template third-party backend for natten-mlx.

The backend ``example-dense`` computes neighborhood attention exactly as dense attention under
the neighborhood mask. The mask comes from :func:`natten_mlx.geometry.dense_mask`, built from the
one place where the window rules are coded: a backend never re-derives them. It follows protocol v2
(:mod:`natten_mlx.protocol`): it returns the lse always, declares how it is differentiated
(``"pure"``: the core uses the pure backend's backward), and refuses what it does not serve.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
from natten_mlx import hookimpl
from natten_mlx.geometry import dense_mask

__version__ = "0.1.0"

# the dense [N, N] score matrix per head is what limits this backend
MAX_TOKENS = 256


@lru_cache(maxsize=64)
def _mask(geometry) -> mx.array:
    """``[N, N]`` bool: may query ``n`` attend to key ``m``."""
    return mx.array(dense_mask(geometry))


class ExampleDenseBackend:
    """Dense attention under the neighborhood mask; fused op only, small problems only."""

    name = "example-dense"
    # above the pure backend (0), below the compiled tiers (100 and up)
    priority = 10
    distribution = "natten-mlx-example-backend"
    description = f"dense attention under the neighborhood mask (template plugin); at most {MAX_TOKENS} tokens"
    # no backward of its own: the core differentiates through the pure backend's backward
    differentiation = "pure"

    def available(self) -> str | None:
        return None  # plain MLX operations run on every device

    def supports(self, problem) -> str | None:
        if problem.op != "fused":
            return "has no split ops (it computes the fused op only)"
        if problem.is_subdomain:
            return "sub-domain problems (sharded attention) are not implemented"
        if problem.num_tokens > MAX_TOKENS:
            return (
                f"{problem.num_tokens} tokens (spatial {problem.spatial}) exceed its limit of {MAX_TOKENS}: "
                "it builds a dense [N, N] score matrix"
            )
        if problem.has_rpb:
            return "does not implement the relative positional bias (rpb)"
        return None

    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """``(out [B, *spatial, H, Dv] in problem.dtype, lse [B, *spatial, H] float32)``."""
        p = problem
        b, n, h, hk = p.batch, p.num_tokens, p.heads, p.kv_heads
        g = h // hk
        # [B, H_kv, G, N, D]: query head h reads key/value head h // G
        q = query.astype(mx.float32).reshape(b, n, hk, g, -1).transpose(0, 2, 3, 1, 4) * p.scale
        k = key.astype(mx.float32).reshape(b, n, hk, -1).transpose(0, 2, 1, 3)[:, :, None]
        v = value.astype(mx.float32).reshape(b, n, hk, -1).transpose(0, 2, 1, 3)[:, :, None]
        scores = q @ k.swapaxes(-1, -2)  # [B, H_kv, G, N, N]
        scores = mx.where(_mask(p.geometry), scores, -mx.inf)
        if additional_keys is not None:
            ek = additional_keys.astype(mx.float32).transpose(0, 2, 1, 3)[:, :, None]  # [B, H_kv, 1, M, D]
            ev = additional_values.astype(mx.float32).transpose(0, 2, 1, 3)[:, :, None]
            scores = mx.concatenate([scores, q @ ek.swapaxes(-1, -2)], axis=-1)
            v = mx.concatenate([v, ev], axis=-2)
        lse = mx.logsumexp(scores, axis=-1)  # every query sees at least itself: never all -inf
        out = mx.exp(scores - lse[..., None]) @ v  # [B, H_kv, G, N, Dv]
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, *p.spatial, h, -1).astype(p.dtype)
        lse = lse.transpose(0, 3, 1, 2).reshape(b, *p.spatial, h)
        return out, lse


@hookimpl
def natten_mlx_register_backends(register):
    register(ExampleDenseBackend())
