"""``natten.attn_merge`` of NATTEN 0.20.1: ``merge_attentions_fn(outputs, lse_tensors)`` and
``merge_attentions_compile(outputs, lse_tensors)`` merge attention outputs ``[B, S, H, D]`` of the
same queries by their logsumexps ``[B, S, H]`` and return the merged output only (0.20's
``merge_attentions`` is built on them); ``maybe_torch_compile(*args, **kwargs)`` is upstream's
decorator factory.
"""


from .. import _modern


def maybe_torch_compile(*args, **kwargs):
    """Upstream wrapped a function in ``torch.compile`` where available; here the decorator returns
    the function unchanged (wrap it in ``mx.compile`` yourself if you want MLX's compilation)."""

    def decorator(f):
        return f

    return decorator


def merge_attentions_fn(outputs, lse_tensors):
    """The merged output ``[B, S, H, D]`` of at least two outputs and their lse tensors."""
    return _modern.merge_attentions(outputs, lse_tensors)[0]


def merge_attentions_compile(outputs, lse_tensors):
    """:func:`merge_attentions_fn` (upstream: its ``torch.compile``'d form)."""
    return merge_attentions_fn(outputs, lse_tensors)
