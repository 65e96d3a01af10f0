"""NATTEN's public APIs, era by era, on natten-mlx.

Each subpackage reproduces one upstream release's public names, positional argument order,
defaults, tensor layouts and module parameter names, with ``mlx.core.array`` in place of
``torch.Tensor``::

    import natten_mlx.compat.v014 as natten   # NATTEN 0.14.6: natten2dqkrpb, heads-first
    import natten_mlx.compat.v015 as natten   # NATTEN 0.15.1: na*d_qk / na*d_av, additional KV, 3D
    import natten_mlx.compat.v017 as natten   # NATTEN 0.17.5: fused na*d, is_causal, rel_pos_bias
    import natten_mlx.compat.v020 as natten   # NATTEN 0.20.1: stride, attention, merge_attentions
    import natten_mlx.compat.v021 as natten   # NATTEN 0.21.7: return_lse, GQA/MQA

:func:`load_torch_state_dict` loads a state dict saved by an upstream module into the matching
module here. The eras are imported on first use, not with this package.
"""

from .weights import load_torch_state_dict, to_mlx_weights

ERAS = ("v014", "v015", "v017", "v020", "v021")

__all__ = ["ERAS", "load_torch_state_dict", "to_mlx_weights"]
