"""Apply a tokred reduction policy to an existing timm ``VisionTransformer``, in place.

As ToMe's ``apply_patch`` does, the model's and its blocks' classes are swapped for subclasses
whose ``forward`` runs tokred's block (``tokred_ext.nn.block_forward``) on timm's own modules, so
the weights stay where they are and ``state_dict`` is unchanged. Every prefix layout of timm's
ViT is honoured (class token or none, distillation token, register tokens: ``num_prefix_tokens``
tokens that are never reduced), as are LayerScale (``ls1``/``ls2``), q/k norm and timm's scale
norm. The heads ``global_pool='token'``, ``'avg'`` (weighted by ToMe's sizes once tokens merged,
through the model's ``pool``), ``'map'`` (timm's attention pool) and ``''`` are supported.
"""
from functools import partial
from typing import Optional, Tuple

from torch import Tensor, nn

from ..nn import ReductionPolicy, ReductionState, block_forward, check_policy, size_weighted_mean

__all__ = ["apply", "remove"]


class _Patch:
    """What the patched model shares with its blocks: the policy, and the driver of the forward
    pass under way (a new :class:`~tokred_ext.nn.ReductionState`, started by block 0)."""

    def __init__(self, policy: ReductionPolicy, model: nn.Module):
        self.policy = policy
        self.num_prefix, self.class_token = _prefix(model)
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
                                       patch.num_prefix, patch.class_token)
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

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """timm's pooling, except that average pooling weights each token by its ToMe size once
        tokens merged (as upstream ToMe's MAE patch); with nothing merged it is timm's own."""
        run = self._tokred_patch.run
        size = run.pool_size() if run is not None else None
        pool_type = self.global_pool if pool_type is None else pool_type
        if size is None or getattr(self, "attn_pool", None) is not None or pool_type != "avg":
            return super().pool(x, pool_type)
        p = self.num_prefix_tokens
        return size_weighted_mean(x[:, p:], size[:, p:])


def _subclass(obj: nn.Module, mixin: type) -> None:
    cls = obj.__class__
    if issubclass(cls, mixin):
        return
    obj.__class__ = type(f"Tokred{cls.__name__}", (mixin, cls), {"_tokred_base": cls})


def _prefix(model: nn.Module) -> Tuple[int, bool]:
    """The model's prefix (class, distillation and register tokens, timm's order) and whether
    it starts with a class token; refuses a layout or head the patch does not reproduce."""
    has_cls = getattr(model, "cls_token", None) is not None
    reg = getattr(model, "reg_token", None)
    n = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
    n += 0 if reg is None else reg.shape[1]
    declared = getattr(model, "num_prefix_tokens", n)
    if declared != n:
        raise ValueError(f"model declares num_prefix_tokens={declared} but has {n} prefix tokens "
                         "(cls_token, dist_token, reg_token); tokred_ext.patch.timm cannot tell "
                         "which tokens to protect")
    pool = getattr(model, "global_pool", "token")
    if pool not in _POOLS:
        raise ValueError(f"tokred_ext.patch.timm supports global_pool {', '.join(map(repr, _POOLS))}; "
                         f"the model has global_pool={pool!r}, whose pooling of reduced tokens "
                         "it does not reproduce")
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("tokred_ext.patch.timm does not support pool_include_prefix=True (its "
                         "pooling over the prefix tokens is not reproduced)")
    if pool == "avg" and not hasattr(model, "pool"):
        raise ValueError("tokred_ext.patch.timm needs timm's VisionTransformer.pool (timm >= 1.0) "
                         "to weight global_pool='avg' by the merged tokens' sizes")
    if pool == "token" and not has_cls:
        raise ValueError("global_pool='token' needs a class token (cls_token); the model has none")
    return n, has_cls


_POOLS = ("token", "avg", "map", "")


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
    check_policy(policy, "tokred_ext.patch.timm", optional=False)
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
