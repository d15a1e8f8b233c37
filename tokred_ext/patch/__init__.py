"""Patches that add tokred's token reduction to models from other libraries.

``tokred_ext.patch.timm(model, policy)`` applies a policy to a timm VisionTransformer in place;
``tokred_ext.patch.diffusers(model, ratio=0.5, ...)`` adds dense ToMe (merge, compute, unmerge)
to a diffusers UNet, DiT or pipeline in place. ``tokred_ext.patch.remove(model)`` undoes whichever
of them the model carries: each patch module owns its own ``remove``.
"""
from . import diffusers as _diffusers
from . import timm as _timm

timm = _timm.apply
diffusers = _diffusers.apply


def remove(model):
    """Undoes ``tokred_ext.patch.timm`` or ``tokred_ext.patch.diffusers``; returns ``model``
    (unchanged when it carries no patch)."""
    if _diffusers.owns(model):
        return _diffusers.remove(model)
    return _timm.remove(model)


__all__ = ["timm", "diffusers", "remove"]
