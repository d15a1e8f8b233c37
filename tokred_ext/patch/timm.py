"""Apply a tokred reduction policy to an existing timm ``VisionTransformer``, in place.

As ToMe's ``apply_patch`` does, the model's and its blocks' classes are swapped for subclasses
whose ``forward`` runs tokred's block (``tokred_ext.nn.block_forward``) on timm's own modules, so
the weights stay where they are and ``state_dict`` is unchanged. Class and distillation tokens,
LayerScale (``ls1``/``ls2``), q/k norm and timm's scale norm are all honoured.
"""
from functools import partial
from typing import Optional

from torch import Tensor, nn

from ..nn import ReductionPolicy, ReductionState, block_forward

__all__ = ["apply", "remove"]


class _Patch:
    """What the patched model shares with its blocks: the policy, and the driver of the forward
    pass under way (a new :class:`~tokred_ext.nn.ReductionState`, started by block 0)."""

    def __init__(self, policy: ReductionPolicy, model: nn.Module):
        self.policy = policy
        self.num_prefix = _num_prefix(model)
        self.depth = len(model.blocks)
        self.run: Optional[ReductionState] = None


_NO_SCRIPT = ("a timm model patched by tokred_ext.patch.timm cannot be scripted (its classes are "
              "swapped at run time and share a Python driver); script "
              "tokred_ext.models.VisionTransformer with the timm weights loaded "
              "(load_state_dict), or use torch.jit.trace on the patched model")


class _NotScriptable:
    """torch.jit.script calls ``__prepare_scriptable__`` on every module first: one clear
    message instead of TorchScript's error deep inside a mixin."""

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT)


class _TokredBlock(_NotScriptable):
    """Mixed in front of timm's Block class."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("tokred's patched blocks do not take attention masks (attn_mask, "
                             "is_causal): token reduction changes the sequence the mask refers to")
        patch = self._tokred_patch
        if self._tokred_layer == 0:
            # The patches of this input, not patch_embed.num_patches (the size the model was
            # built for): with timm's dynamic_img_size they differ, and Top-K counts from them.
            patch.run = ReductionState(patch.policy, patch.depth, x.shape[1] - patch.num_prefix,
                                       patch.num_prefix)
        if patch.run is None:
            raise RuntimeError("a block patched by tokred_ext.patch.timm runs after block 0 of "
                               "its model's forward, not on its own")
        return patch.run.step(self._tokred_layer, x, partial(block_forward, self))


class _TokredModel(_NotScriptable):
    """Mixed in front of timm's VisionTransformer class: publishes the pass's token counts."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        run = self._tokred_patch.run
        self.token_counts = run.token_counts if run is not None else []
        self.sources = run.sources if run is not None else []
        return out


def _subclass(obj: nn.Module, mixin: type) -> None:
    cls = obj.__class__
    if issubclass(cls, mixin):
        return
    obj.__class__ = type(f"Tokred{cls.__name__}", (mixin, cls), {"_tokred_base": cls})


def _num_prefix(model: nn.Module) -> int:
    if getattr(model, "cls_token", None) is None:
        raise ValueError("tokred_ext.patch.timm needs a model with a class token (cls_token)")
    n = 1 + int(getattr(model, "dist_token", None) is not None)
    declared = getattr(model, "num_prefix_tokens", n)
    if declared != n:
        raise ValueError(f"model has {declared} prefix tokens; only a class token and an "
                         "optional distillation token are supported (no register tokens)")
    return n


# The block and attention classes whose forward tokred's block reproduces exactly: timm's pre-norm
# vision_transformer.Block (LayerScale and q/k norm included) and its Attention (which timm 1.0.16+
# keeps in timm.layers.attention). Post-norm (ResPostBlock), parallel (ParallelScalingBlock,
# ParallelThingsBlock) and other blocks compute something else: they are refused, not changed.
_BLOCKS = {("timm.models.vision_transformer", "Block")}
_ATTENTIONS = {("timm.models.vision_transformer", "Attention"), ("timm.layers.attention", "Attention")}


def _check_block(i: int, blk: nn.Module) -> None:
    for part, obj, supported in (("block", blk, _BLOCKS),
                                 ("attention", getattr(blk, "attn", None), _ATTENTIONS)):
        cls = getattr(type(obj), "_tokred_base", type(obj))
        if (cls.__module__, cls.__name__) not in supported:
            names = " or ".join(sorted(f"{m}.{n}" for m, n in supported))
            raise ValueError(f"tokred_ext.patch.timm reproduces only timm's {names} {part}; block {i} "
                             f"has {cls.__module__}.{cls.__qualname__}, so it cannot be patched")
    # timm 1.0.31's Attention(gated=True) multiplies its output by sigmoid(gate(x)) before proj;
    # tokred's attention has no such gate, so patching would silently drop it.
    if getattr(blk.attn, "gate", None) is not None:
        raise ValueError(f"tokred_ext.patch.timm does not reproduce timm's gated attention "
                         f"(Attention(gated=True)); block {i} has one, so it cannot be patched")


def apply(model: nn.Module, policy: ReductionPolicy) -> nn.Module:
    """Makes ``model`` (a timm VisionTransformer or VisionTransformerDistilled) reduce tokens
    with ``policy``. Calling it again swaps the policy. Returns ``model``.

    After each forward, ``model.token_counts`` lists the tokens leaving each block and, with
    ``trace_source``, ``model.sources`` the per-block source maps.
    """
    if not isinstance(policy, ReductionPolicy):
        raise TypeError(f"policy must be a tokred_ext.nn.ReductionPolicy, got {type(policy)}")
    for attr in ("blocks", "patch_embed"):
        if not hasattr(model, attr):
            raise ValueError(f"not a timm VisionTransformer: the model has no '{attr}'")
    for i, blk in enumerate(model.blocks):
        _check_block(i, blk)
    patch = _Patch(policy, model)
    model._tokred_patch = patch
    _subclass(model, _TokredModel)
    for i, blk in enumerate(model.blocks):
        for name in ("ls1", "ls2"):
            if not hasattr(blk, name):        # timm < 0.6.12
                setattr(blk, name, nn.Identity())
        if not hasattr(blk, "drop_path1"):    # timm < 0.6.12 has one drop_path
            blk.drop_path1 = blk.drop_path2 = blk.drop_path
        blk._tokred_patch = patch
        blk._tokred_layer = i
        _subclass(blk, _TokredBlock)
    model.token_counts, model.sources = [], []
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undoes ``apply``: restores the original classes."""
    for obj in [model] + list(getattr(model, "blocks", [])):
        base = getattr(type(obj), "_tokred_base", None)
        if base is not None:
            obj.__class__ = base
    return model
