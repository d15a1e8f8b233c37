"""Vision Transformer with timm's parameter names and a ``reduction=`` policy.

timm weights load with ``load_state_dict`` (``patch_embed.proj``, ``cls_token``, ``dist_token``,
``reg_token``, ``pos_embed``, ``blocks.*``, ``norm``, ``attn_pool.*``, ``fc_norm``, ``head``,
``head_dist``). After a forward pass, ``model.token_counts`` lists the tokens leaving each block
(the prefix tokens included), and with a policy built with ``trace_source=True``, ``model.sources`` holds, after
each block, the map ``[B, N0]`` from every initial token to its current index (-1 once pruned).
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn import (AttentionPoolLatent, Block, PatchEmbed, ReductionPolicy, ReductionState,
                  check_policy)
from ..nn.pool import size_weighted_mean

__all__ = ["VisionTransformer", "MODELS", "create_model"]


class VisionTransformer(nn.Module):
    """ViT/DeiT with timm's layouts: a class token (``class_token``), a distillation token
    (``distilled``) and ``reg_tokens`` register tokens lead the sequence in that order (the
    model's ``num_prefix_tokens``, never reduced), then the patches. ``no_embed_class``: the
    position embedding covers the patches only. ``global_pool``: ``'token'`` (the class token),
    ``'avg'`` (the mean of the tokens after the prefix, weighted by ToMe's sizes), ``'map'``
    (timm's attention pool over the tokens after the prefix, SigLIP's head) or ``''`` (every
    token, no pooling). ``fc_norm`` None: the final norm follows the pooling for ``'avg'``, as
    timm's."""

    # TorchScript: distilled and the layout are constants, so a model compiles only the parts it
    # has; the per-pass results are typed here (an empty list in __init__ has no element type).
    __constants__ = ["distilled", "global_pool", "has_class_token", "no_embed_class",
                     "num_prefix_tokens"]
    token_counts: List[int]
    sources: List[Tensor]

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, init_values: Optional[float] = None,
                 distilled: bool = False, global_pool: str = "token",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, reduction: Optional[ReductionPolicy] = None,
                 class_token: bool = True, reg_tokens: int = 0, no_embed_class: bool = False,
                 fc_norm: Optional[bool] = None):
        super().__init__()
        global_pool = "" if global_pool == "none" else global_pool
        if global_pool not in ("token", "avg", "map", ""):
            raise ValueError(f"global_pool must be 'token', 'avg', 'map' or '' (none), got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs the class token (class_token=True)")
        if distilled and (not class_token or global_pool != "token"):
            raise ValueError("distilled=True needs the class token and global_pool='token' "
                             "(the two heads read the class and distillation tokens)")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.distilled = distilled
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.no_embed_class = no_embed_class
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [float(v) for v in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values,
                  drop_rate, attn_drop_rate, dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_layer)
                          if global_pool == "map" else None)
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = (nn.Linear(embed_dim, num_classes) if num_classes > 0
                              else nn.Identity())
        check_policy(reduction, "VisionTransformer")
        self.reduction = reduction
        self.token_counts = []
        self.sources = []
        self._init_weights()

    def _init_weights(self) -> None:
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def set_reduction(self, policy: Optional[ReductionPolicy]) -> "VisionTransformer":
        check_policy(policy, "VisionTransformer.set_reduction")
        self.reduction = policy
        return self

    def _embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b = x.shape[0]
        prefix: List[Tensor] = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        if self.no_embed_class:  # the position embedding covers the patches only
            x = x + self.pos_embed
            if len(prefix) > 0:
                x = torch.cat(prefix + [x], dim=1)
        else:
            if len(prefix) > 0:
                x = torch.cat(prefix + [x], dim=1)
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens after the last block ``[B, N_last, C]``."""
        return self._forward_tokens(x)[0]

    def _forward_tokens(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        x = self._embed(x)
        state = ReductionState(self.reduction, len(self.blocks), self.num_patches,
                               self.num_prefix_tokens, self.has_class_token)
        for i, blk in enumerate(self.blocks):
            x = state.step(i, x, blk)
        self.token_counts = state.token_counts
        self.sources = state.sources
        return self.norm(x), state.pool_size()

    def forward_head(self, x: Tensor, pre_logits: bool = False,
                     size: Optional[Tensor] = None) -> Tensor:
        p = self.num_prefix_tokens
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            return (self.head(self.head_drop(x)) + self.head_dist(self.head_drop(x_dist))) / 2
        if self.global_pool in ("avg", "map") and x.shape[1] == p:
            # Pooling nothing gives NaN (avg) or the bias alone (map), silently.
            raise ValueError("the reduction policy left no tokens after the prefix for the "
                             "pooling head to pool: keep at least one")
        if self.attn_pool is not None:
            x = self.attn_pool(x[:, p:])
        elif self.global_pool == "avg":
            x = size_weighted_mean(x[:, p:], None if size is None else size[:, p:])
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x, size = self._forward_tokens(x)
        return self.forward_head(x, size=size)


def _factory(name: str, **cfg) -> Callable[..., VisionTransformer]:
    def make(reduction: Optional[ReductionPolicy] = None, **kwargs) -> VisionTransformer:
        return VisionTransformer(**{**cfg, **kwargs}, reduction=reduction)

    make.__name__ = name
    make.__doc__ = f"{name}: {cfg} (timm names; load timm weights with load_state_dict)."
    return make


_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)

MODELS: Dict[str, Callable[..., VisionTransformer]] = {
    "deit_tiny_patch16_224": _factory("deit_tiny_patch16_224", **_TINY),
    "deit_small_patch16_224": _factory("deit_small_patch16_224", **_SMALL),
    "deit_base_patch16_224": _factory("deit_base_patch16_224", **_BASE),
    "deit_tiny_distilled_patch16_224": _factory("deit_tiny_distilled_patch16_224", **_TINY,
                                                distilled=True),
    "deit_small_distilled_patch16_224": _factory("deit_small_distilled_patch16_224", **_SMALL,
                                                 distilled=True),
    "deit_base_distilled_patch16_224": _factory("deit_base_distilled_patch16_224", **_BASE,
                                                distilled=True),
    "vit_base_patch16_224": _factory("vit_base_patch16_224", **_BASE),
    "vit_large_patch16_224": _factory("vit_large_patch16_224", **_LARGE),
    "vit_base_patch16_384": _factory("vit_base_patch16_384", **_BASE, img_size=384),
    "vit_large_patch16_384": _factory("vit_large_patch16_384", **_LARGE, img_size=384),
    # The prefix layouts: DINOv2 with 4 register tokens (at its 518 px), a class-token-free
    # average-pool ViT, and SigLIP's attention-pool head (DINOv2 and SigLIP without a classifier,
    # num_classes=0, as timm's).
    "vit_small_patch14_reg4_dinov2": _factory("vit_small_patch14_reg4_dinov2", **_SMALL,
                                              img_size=518, patch_size=14, init_values=1e-5,
                                              reg_tokens=4, no_embed_class=True, num_classes=0),
    "vit_base_patch16_gap_224": _factory("vit_base_patch16_gap_224", **dict(_BASE, num_heads=16),
                                         class_token=False, global_pool="avg", fc_norm=False),
    "vit_base_patch16_siglip_224": _factory("vit_base_patch16_siglip_224", **_BASE,
                                            class_token=False, global_pool="map", num_classes=0),
}
ALIASES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
           "deit_base": "deit_base_patch16_224"}

globals().update(MODELS)
__all__ += list(MODELS)


def create_model(name: str, reduction: Optional[ReductionPolicy] = None,
                 **kwargs) -> VisionTransformer:
    """Builds a model by name (``MODELS``, or the short ``deit_tiny/small/base``)."""
    full = ALIASES.get(name, name)
    if full not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list(ALIASES) + list(MODELS))}")
    return MODELS[full](reduction=reduction, **kwargs)
