"""``natten.attn_merge`` of NATTEN 0.21.7: ``merge_attentions(outputs, lse_tensors, torch_compile=True,
use_autograd_fix=True)`` -> ``(output [B, S, H, D], lse [B, S, H])``, the same function as
``natten_mlx.compat.v021.merge_attentions``.

Upstream's ``MergeAttentionsAutogradFn`` (a ``torch.autograd.Function``) has no counterpart: MLX
differentiates ``merge_attentions`` itself, so ``use_autograd_fix`` is accepted and ignored.
"""


from .functional import merge_attentions

__all__ = ["merge_attentions"]
