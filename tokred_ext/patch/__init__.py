"""Patches that add tokred's token reduction to models from other libraries.

``tokred_ext.patch.timm(model, policy)`` applies a policy to a timm VisionTransformer in place.
"""
from .timm import apply as timm  # noqa: F401
from .timm import remove  # noqa: F401

__all__ = ["timm", "remove"]
