"""The ViT block (timm's names: ``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``) with a
token-reduction step between the attention residual and the MLP."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .attention import Attention, attention_forward
from .policies import Amount, PolicyInterface

__all__ = ["Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed", "block_forward"]


class LayerScale(nn.Module):
    """timm's LayerScale: a per-channel ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's Mlp: ``fc1``, activation, ``fc2``."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a strided convolution ``proj``, flattened to ``[B, N, C]``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        if img_size < 1 or patch_size < 1:
            raise ValueError(f"img_size ({img_size}) and patch_size ({patch_size}) must be >= 1")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != self.img_size or x.shape[-1] != self.img_size:
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block whose reduction step is driven by a policy."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, init_values: Optional[float] = None,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop,
                              norm_layer)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, amount: Optional[Amount] = None,
                policy: Optional[PolicyInterface] = None, size: Optional[Tensor] = None,
                source: Optional[Tensor] = None, num_prefix: int = 1, class_token: bool = True
                ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """One block on this or any module with timm Block's attributes (as
        :func:`block_forward`, the timm patch runs it on timm's blocks), reducing tokens with
        ``policy`` (a :class:`~tokred_ext.nn.ReductionPolicy`) when ``amount`` is not None.

        ``num_prefix`` tokens lead the sequence and are never reduced; ``class_token`` says
        whether the first of them is a class token (what the pruning scores are read from).
        Returns ``(x, size, source)``; ``size`` and ``source`` pass through unless the policy
        merges.
        """
        need_scores = False
        need_metric = False
        attn_size: Optional[Tensor] = None
        if policy is not None:
            if amount is not None:
                need_scores, need_metric = policy.attention_needs()
            if policy.uses_size():
                attn_size = size
        h = self.norm1(x)
        if torch.jit.is_scripting():
            y, scores, metric = self.attn(h, attn_size, need_scores, num_prefix, need_metric,
                                          class_token)
        else:
            # The function, not the module: on a timm block ``attn`` is timm's attention, whose
            # own forward returns neither scores nor the metric.
            y, scores, metric = attention_forward(self.attn, h, attn_size, need_scores,
                                                  num_prefix, need_metric, class_token)
        x = x + self.drop_path1(self.ls1(y))
        if policy is not None and amount is not None:
            x, size, source = policy.reduce(x, amount, scores, metric, size, source, num_prefix)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source


# The same function on any module with timm Block's attributes: the timm patch runs it on timm's
# blocks (whose attention it calls through attention_forward).
block_forward = Block.forward


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode); also BiFormer's."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep
