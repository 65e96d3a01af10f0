"""The Metal backend object (natten_mlx.protocol v2): fused forward and backward kernels, and the
split qk/av ops with their backwards, compiled at run time by ``mx.fast.metal_kernel``.

Verified by emulation only: tests/metal runs every launch this backend makes through the CPU
emulator in packages/natten-mlx-metal/emulator against the float64 oracle and the pure backend.
It has not yet run on Apple hardware; ``natten-mlx check`` on a Mac is the first real test.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from . import kernels

KNOWN_OPTIONS = ("tile", "variant")


class MetalBackend:
    name = "metal"
    priority = 300
    differentiation = "backward"
    distribution = "natten-mlx-metal"
    description = (
        "Metal kernels via mx.fast.metal_kernel (tiled, online softmax, fused backward; split qk/av); "
        "verified by emulation, not yet run on Apple hardware"
    )

    def __init__(self, launcher: Optional[Callable] = None, tile: Optional[tuple] = None, variant: str = "auto"):
        # launcher(Launch) -> list of outputs; the tests pass the emulator's
        self._launch = launcher or kernels.metal_launch
        self._tile = tile
        self._variant = variant

    # ---- protocol ----
    def available(self) -> Optional[str]:
        try:
            ok = mx.metal.is_available()
        except Exception as e:  # an MLX build without the metal module
            return f"mlx.core.metal is not usable here ({e})"
        return None if ok else "no Metal device (mx.metal.is_available() is False): Apple silicon only"

    def supports(self, problem) -> Optional[str]:
        p = problem
        device = getattr(p, "device", None)
        if device is not None and device != "gpu":
            return f"device={device!r}: the Metal tier serves GPU streams only"
        if p.op not in ("fused", "qk", "av"):
            return f"op={p.op!r} is not an op of the Metal tier (fused, qk, av)"
        if p.dtype not in kernels.DTYPE_NAMES:
            return f"dtype {p.dtype} is not one of float32, float16, bfloat16"
        if max(p.head_dim, p.value_head_dim) > kernels.MAX_HEAD_DIM:
            return (f"head dims D={p.head_dim}, Dv={p.value_head_dim}: the Metal kernels hold at most "
                    f"{kernels.MAX_HEAD_DIM} per thread")
        if p.op == "fused" and self._tile is not None and len(self._tile) != len(p.spatial):
            return f"tile={self._tile!r} has {len(self._tile)} entries for a {len(p.spatial)}D problem"
        return None

    def configure(self, **options) -> "MetalBackend":
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for backend 'metal'; known: {list(KNOWN_OPTIONS)}")
        variant = options.get("variant", self._variant)
        if variant not in kernels.VARIANTS:
            raise ValueError(f"variant={variant!r} is not a Metal kernel variant; choose one of {kernels.VARIANTS}")
        tile = options.get("tile", self._tile)
        if tile is not None:
            if not isinstance(tile, (tuple, list)) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                              for x in tile):
                raise ValueError(f"tile={tile!r} must be a tuple of positive ints, one per spatial axis")
            prod = 1
            for x in tile:
                prod *= x
            if prod != kernels.THREADS:
                raise ValueError(f"tile={tile!r} holds {prod} queries; a Metal query tile holds exactly {kernels.THREADS}")
            tile = tuple(tile)
        return MetalBackend(self._launch, tile, variant)

    def _tile3(self, geo):
        return None if self._tile is None else (1,) * (3 - len(self._tile)) + tuple(self._tile)

    # ---- ops ----
    def fused_forward(self, problem, query, key, value, additional_keys=None, additional_values=None, rpb=None):
        """query [B, *spatial, H, D], key/value [B, *kv_spatial, H_kv, D|Dv] -> out [B, *spatial, H, Dv]
        (problem.dtype), lse [B, *spatial, H] float32 (natural log)."""
        geo = kernels.geometry(problem)
        q, k, v = _tokens(query, geo.N), _tokens(key, geo.NK), _tokens(value, geo.NK)
        r = None if rpb is None else rpb.reshape(geo.H, geo.rpb_size)
        launch = kernels.forward_launch(geo, q, k, v, additional_keys, additional_values, r, self._tile3(geo),
                                        self._variant)
        out, lse = self._launch(launch)
        spatial = tuple(query.shape[1:-2])
        return out.reshape(geo.B, *spatial, geo.H, geo.DV), lse.reshape(geo.B, *spatial, geo.H)

    def fused_backward(self, record) -> dict:
        """Gradients by input name from the saved lse (FlashAttention-2 style: probabilities are
        recomputed per tile; delta = rowsum(dO * O) - dlse is precomputed in float32)."""
        p = record.problem
        geo = kernels.geometry(p)
        inp = record.inputs
        query, key, value = inp["query"], inp["key"], inp["value"]
        ak, av, rpb = inp.get("additional_keys"), inp.get("additional_values"), inp.get("rpb")
        q, k, v = _tokens(query, geo.N), _tokens(key, geo.NK), _tokens(value, geo.NK)
        dout = _tokens(record.d_out.astype(query.dtype), geo.N)
        out = _tokens(record.out, geo.N)
        lse = record.lse.astype(mx.float32).reshape(geo.B, geo.N, geo.H)
        delta = (dout.astype(mx.float32) * out.astype(mx.float32)).sum(-1)
        if record.d_lse is not None:
            delta = delta - record.d_lse.astype(mx.float32).reshape(geo.B, geo.N, geo.H)
        r = None if rpb is None else rpb.reshape(geo.H, geo.rpb_size)
        launches = kernels.backward_launches(geo, q, k, v, ak, av, r, dout, lse, delta, self._tile3(geo),
                                             self._variant)
        (dq,) = self._launch(launches["dq"])
        dk, dv = self._launch(launches["dkv"])
        grads = {
            "query": dq.reshape(query.shape),
            "key": dk.reshape(key.shape),
            "value": dv.reshape(value.shape),
        }
        if "extra" in launches:
            dak, dav = self._launch(launches["extra"])
            grads["additional_keys"] = dak
            grads["additional_values"] = dav
        if "rpb" in launches:
            (drpb,) = self._launch(launches["rpb"])
            grads["rpb"] = drpb.reshape(rpb.shape).astype(rpb.dtype)
        return grads


    # ---- the split ops (split_*.metal; one thread per query or key, see kernels.py) ----
    def qk_forward(self, problem, query, key, additional_keys=None, rpb=None):
        """query [B, *spatial, H, D], key [B, *kv_spatial, H_kv, D] -> scores [B, *spatial, H, Kt (+E)]
        (problem.dtype): scaled, rpb added, invalid (causal) slots -inf, then the additional keys."""
        geo = kernels.geometry(problem)
        r = None if rpb is None else rpb.reshape(geo.H, geo.rpb_size)
        launch = kernels.split_dot_launch(geo, geo.D, _tokens(query, geo.N), _tokens(key, geo.NK), additional_keys, r,
                                          problem.scale, float("-inf"))
        (scores,) = self._launch(launch)
        return scores.reshape(*query.shape[:-1], -1)

    def av_forward(self, problem, attn, value, additional_values=None):
        """attn [B, *spatial, H, Kt (+E)], value [B, *kv_spatial, H_kv, Dv] -> [B, *spatial, H, Dv];
        weights of invalid slots are ignored."""
        geo = kernels.geometry(problem)
        launch = kernels.split_wsum_launch(geo, geo.DV, _tokens(attn, geo.N), _tokens(value, geo.NK),
                                           additional_values, 1.0)
        (out,) = self._launch(launch)
        return out.reshape(*attn.shape[:-1], geo.DV)

    def qk_backward(self, record) -> dict:
        """Gradients of query, key, additional_keys, rpb from dScores (record.d_out); slots that are
        invalid carry no gradient. dQ and dK by kernels; the additional keys' gradient is one dense
        contraction, left to MLX's matmul."""
        p = record.problem
        geo = kernels.geometry(p)
        x = record.inputs
        query, key, ak, rpb = x["query"], x["key"], x.get("additional_keys"), x.get("rpb")
        ds = _tokens(record.d_out.astype(query.dtype), geo.N)
        q, k = _tokens(query, geo.N), _tokens(key, geo.NK)
        (dq,) = self._launch(kernels.split_wsum_launch(geo, geo.D, ds, k, ak, p.scale))
        (dk,) = self._launch(kernels.split_scatter_launch(geo, geo.D, ds, q, p.scale, key.dtype))
        grads = {"query": dq.reshape(query.shape), "key": dk.reshape(key.shape)}
        kt = geo.window_size
        if ak is not None:
            g = geo.H // geo.HKV
            dse = ds[..., kt:].astype(mx.float32).reshape(geo.B, geo.N, geo.HKV, g, geo.E)
            qf = q.astype(mx.float32).reshape(geo.B, geo.N, geo.HKV, g, geo.D)
            grads["additional_keys"] = (mx.einsum("bnhgm,bnhgd->bmhd", dse, qf) * p.scale).astype(ak.dtype)
        if rpb is not None:
            (drpb,) = self._launch(kernels.split_rpb_launch(geo, ds))
            grads["rpb"] = drpb.reshape(rpb.shape).astype(rpb.dtype)
        return grads

    def av_backward(self, record) -> dict:
        """Gradients of attn (0 in invalid slots), value and additional_values from dOut."""
        p = record.problem
        geo = kernels.geometry(p)
        x = record.inputs
        attn, value, av = x["attn"], x["value"], x.get("additional_values")
        dout = _tokens(record.d_out.astype(value.dtype), geo.N)
        w = _tokens(attn, geo.N)
        (dattn,) = self._launch(kernels.split_dot_launch(geo, geo.DV, dout, _tokens(value, geo.NK), av, None, 1.0, 0.0))
        (dv,) = self._launch(kernels.split_scatter_launch(geo, geo.DV, w, dout, 1.0, value.dtype))
        grads = {"attn": dattn.reshape(attn.shape).astype(attn.dtype), "value": dv.reshape(value.shape)}
        if av is not None:
            g = geo.H // geo.HKV
            kt = geo.window_size
            we = w[..., kt:].astype(mx.float32).reshape(geo.B, geo.N, geo.HKV, g, geo.E)
            do = dout.astype(mx.float32).reshape(geo.B, geo.N, geo.HKV, g, geo.DV)
            grads["additional_values"] = mx.einsum("bnhgm,bnhge->bmhe", we, do).astype(av.dtype)
        return grads


def _tokens(x, n):
    """[B, *spatial, H, D] -> [B, N, H, D] (a view when contiguous; MLX copies otherwise)."""
    return x.reshape(x.shape[0], n, x.shape[-2], x.shape[-1])
