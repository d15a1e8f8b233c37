"""The heads' pooling after token reduction: size-weighted average pooling and timm's attention
pool (``global_pool='map'``, SigLIP's head) with timm's parameter names."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import Mlp

__all__ = ["AttentionPoolLatent", "size_weighted_mean"]


def size_weighted_mean(x: Tensor, size: Optional[Tensor]) -> Tensor:
    """The mean of ``x`` ``[B, N, C]`` over tokens, each weighted by its size ``[B, N, 1]``
    (ToMe's merged tokens stand for ``size`` patches, as upstream's MAE pooling). ``size`` None:
    the plain mean (``x.mean(1)``, bitwise what an unreduced model computes)."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(dim=1) / size.sum(dim=1)


class AttentionPoolLatent(nn.Module):
    """timm's ``AttentionPoolLatent`` as ``VisionTransformer(global_pool='map')`` builds it: one
    learned query (``latent``, projected by ``q``) attends to the tokens (``kv``), then ``proj``
    and a residual MLP (``norm``, ``mlp``); returns the query's output ``[B, C]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.num_heads, self.head_dim)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, 1, c))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]
