"""Modules: timm-compatible attention and block, token-reduction policies, and BiFormer's
bi-level routing attention."""
from .attention import Attention, attention_forward
from .block import Block, LayerScale, Mlp, PatchEmbed, block_forward
from .policies import EViT, ReductionPolicy, ToMe, TopK
from .routing import BiLevelRoutingAttention

__all__ = ["Attention", "attention_forward", "Block", "LayerScale", "Mlp", "PatchEmbed",
           "block_forward", "ReductionPolicy", "TopK", "EViT", "ToMe", "BiLevelRoutingAttention"]
