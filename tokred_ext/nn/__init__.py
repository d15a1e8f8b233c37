"""Modules: timm-compatible attention and block, token-reduction policies, and BiFormer's
bi-level routing attention."""
from .attention import Attention, attention_forward
from .block import Block, DropPath, LayerScale, Mlp, PatchEmbed, block_forward
from .policies import (EViT, PolicyInterface, ReducingBlock, ReductionPolicy, ReductionState, ToMe,
                       TopK, check_policy, policy_from_spec)
from .pool import AttentionPoolLatent, size_weighted_mean
from .routing import BiLevelRoutingAttention

__all__ = ["Attention", "attention_forward", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed",
           "block_forward", "ReductionPolicy", "ReductionState", "TopK", "EViT", "ToMe",
           "policy_from_spec", "check_policy", "PolicyInterface", "ReducingBlock", "BiLevelRoutingAttention",
           "AttentionPoolLatent", "size_weighted_mean"]
