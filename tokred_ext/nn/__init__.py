"""Modules: timm-compatible attention and block, and the token-reduction policies."""
from .attention import Attention, attention_forward
from .block import Block, LayerScale, Mlp, PatchEmbed, block_forward
from .policies import EViT, ReductionPolicy, ToMe, TopK

__all__ = ["Attention", "attention_forward", "Block", "LayerScale", "Mlp", "PatchEmbed",
           "block_forward", "ReductionPolicy", "TopK", "EViT", "ToMe"]
