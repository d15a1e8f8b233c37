"""BiFormer (Zhu et al., CVPR 2023) on tokred's routed attention.

Module and parameter names follow upstream (rayleizhu/BiFormer ``models/biformer.py`` and
``models/_common.py``) so the released ImageNet checkpoints load with
``model.load_state_dict(torch.load(path)["model"])``. Stages 1-3 use
:class:`~tokred_ext.nn.BiLevelRoutingAttention` (topk 1, 4, 16); stage 4 is global attention with
LePE (``topk=-2``; 8 heads whatever the stage's head count, as upstream).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn.block import DropPath
from ..nn.routing import BiLevelRoutingAttention

__all__ = ["BiFormer", "Block", "Attention", "AttentionLePE", "biformer_tiny", "biformer_small",
           "biformer_base", "set_backend"]


class DWConv(nn.Module):
    """Depthwise 3x3 conv on an NHWC tensor (the MLP's optional conv)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Global multi-head attention on NHWC input (upstream ``topk == -1``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, side_dwconv: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (nn.Conv2d(dim, dim, kernel_size=side_dwconv, stride=1,
                               padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        n, H, W, C = x.shape
        x = x.reshape(n, H * W, C)
        qkv = self.qkv(x).reshape(n, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(n, H * W, C)
        if self.lepe is not None:
            # LePE on the block input x (not on V), as upstream's AttentionLePE.
            lepe = self.lepe(x.transpose(1, 2).reshape(n, C, H, W))
            out = out + lepe.flatten(2).transpose(1, 2)
        return self.proj(out).reshape(n, H, W, C)


class AttentionLePE(Attention):
    """Global attention plus a depthwise-conv positional term (upstream ``topk == -2``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, side_dwconv: int = 5):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, side_dwconv)


class _NHWCConvAttention(nn.Module):
    """Upstream's ``topk == 0`` pseudo attention: 1x1, depthwise 5x5, 1x1 convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), nn.Conv2d(dim, dim, 1),
                                     nn.Conv2d(dim, dim, 5, padding=2, groups=dim),
                                     nn.Conv2d(dim, dim, 1)])

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 3, 1, 2)
        for layer in self.layers:
            x = layer(x)
        return x.permute(0, 2, 3, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Upstream's keys are attn.1/2/3.*; ours are attn.layers.1/2/3.*.
        for key in list(state_dict):
            if key.startswith(prefix) and key[len(prefix):len(prefix) + 1].isdigit():
                state_dict[prefix + "layers." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Block(nn.Module):
    """BiFormer block, NCHW in and out: conv pos-embed, then pre-norm attention and MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = -1,
                 num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, kv_per_win: int = 4,
                 kv_downsample_ratio: int = 4, kv_downsample_kernel: Optional[int] = None,
                 kv_downsample_mode: str = "ada_avgpool", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False,
                 diff_routing: bool = False, soft_routing: bool = False, mlp_ratio: float = 4,
                 mlp_dwconv: bool = False, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 pre_norm: bool = True, auto_pad: bool = False, backend: str = "tokred"):
        super().__init__()
        qk_dim = qk_dim or dim
        self.pos_embed = (nn.Conv2d(dim, dim, kernel_size=before_attn_dwconv, padding=1,
                                    groups=dim) if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim=dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
                kv_per_win=kv_per_win, kv_downsample_ratio=kv_downsample_ratio,
                kv_downsample_kernel=kv_downsample_kernel,
                kv_downsample_mode=kv_downsample_mode, topk=topk,
                param_attention=param_attention, param_routing=param_routing,
                diff_routing=diff_routing, soft_routing=soft_routing, side_dwconv=side_dwconv,
                auto_pad=auto_pad, backend=backend)
        elif topk == -1:
            self.attn = Attention(dim=dim)
        elif topk == -2:
            self.attn = AttentionLePE(dim=dim, side_dwconv=side_dwconv)
        elif topk == 0:
            self.attn = _NHWCConvAttention(dim)
        else:
            raise ValueError(f"topk must be > 0, 0, -1 or -2, got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden),
                                 DWConv(hidden) if mlp_dwconv else nn.Identity(), nn.GELU(),
                                 nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.use_layer_scale = layer_scale_init_value > 0
        # None without layer scale (not registered, so state_dict keys are upstream's): TorchScript
        # compiles the `is not None` branches out, and skipping the scale equals upstream's 1.0 *.
        self.gamma1: Optional[nn.Parameter] = None
        self.gamma2: Optional[nn.Parameter] = None
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.pre_norm = pre_norm

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        if self.pre_norm:
            x = x + self.drop_path(_scaled(self.gamma1, self.attn(self.norm1(x))))
            x = x + self.drop_path(_scaled(self.gamma2, self.mlp(self.norm2(x))))
        else:
            x = self.norm1(x + self.drop_path(_scaled(self.gamma1, self.attn(x))))
            x = self.norm2(x + self.drop_path(_scaled(self.gamma2, self.mlp(x))))
        return x.permute(0, 3, 1, 2)


def _scaled(gamma: Optional[Tensor], x: Tensor) -> Tensor:
    """Layer scale: ``gamma * x``, or ``x`` itself without one."""
    return x if gamma is None else gamma * x


class BiFormer(nn.Module):
    """BiFormer backbone and classifier (upstream defaults; the released variants below)."""

    def __init__(self, depth: List[int] = (3, 4, 8, 3), in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: List[int] = (64, 128, 320, 512),
                 head_dim: int = 64, qk_scale: Optional[float] = None,
                 drop_path_rate: float = 0.0, n_win: int = 7,
                 kv_downsample_mode: str = "ada_avgpool", kv_per_wins=(2, 2, -1, -1),
                 topks=(8, 8, -1, -1), side_dwconv: int = 5, layer_scale_init_value: float = -1,
                 qk_dims=(None, None, None, None), param_routing: bool = False,
                 diff_routing: bool = False, soft_routing: bool = False, pre_norm: bool = True,
                 before_attn_dwconv: int = 3, auto_pad: bool = False,
                 kv_downsample_kernels=(4, 2, 1, 1), kv_downsample_ratios=(4, 2, 1, 1),
                 mlp_ratios=(4, 4, 4, 4), param_attention: str = "qkvo", mlp_dwconv: bool = False,
                 backend: str = "tokred"):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = list(embed_dim)
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0])))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[i + 1])))
        qk_dims = [q or d for q, d in zip(qk_dims, embed_dim)]
        nheads = [d // head_dim for d in qk_dims]
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depth))]
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(dim=embed_dim[i], drop_path=rates[cur + j],
                      layer_scale_init_value=layer_scale_init_value, topk=topks[i],
                      num_heads=nheads[i], n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                      kv_per_win=kv_per_wins[i], kv_downsample_ratio=kv_downsample_ratios[i],
                      kv_downsample_kernel=kv_downsample_kernels[i],
                      kv_downsample_mode=kv_downsample_mode, param_attention=param_attention,
                      param_routing=param_routing, diff_routing=diff_routing,
                      soft_routing=soft_routing, mlp_ratio=mlp_ratios[i], mlp_dwconv=mlp_dwconv,
                      side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                      pre_norm=pre_norm, auto_pad=auto_pad, backend=backend)
                for j in range(depth[i])]))
            cur += depth[i]
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.pre_logits(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x).flatten(2).mean(-1))


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switches every BiLevelRoutingAttention in ``model`` to ``backend`` ('tokred' or
    'reference'). Returns the model."""
    for m in model.modules():
        if isinstance(m, BiLevelRoutingAttention):
            m.backend = backend
    return model


# Released configs (upstream models/biformer.py): n_win 7, identity KV, topk 1/4/16 and global
# attention with LePE in stage 4, side_dwconv 5, head_dim 32, mlp ratio 3, qk_dims = embed dims.
_RELEASED = dict(n_win=7, kv_downsample_mode="identity", kv_per_wins=(-1, -1, -1, -1),
                 topks=(1, 4, 16, -2), side_dwconv=5, before_attn_dwconv=3,
                 layer_scale_init_value=-1, head_dim=32, mlp_ratios=(3, 3, 3, 3),
                 param_routing=False, diff_routing=False, soft_routing=False, pre_norm=True)


def _build(depth, dims, pretrained: bool, **kwargs) -> BiFormer:
    if pretrained:
        raise ValueError("tokred does not download weights: build with pretrained=False and "
                         "load upstream's checkpoint with model.load_state_dict(ckpt['model'])")
    cfg = dict(_RELEASED, depth=depth, embed_dim=dims, qk_dims=dims)
    cfg.update(kwargs)
    return BiFormer(**cfg)


def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: depth [2, 2, 8, 2], dims [64, 128, 256, 512] (13.1M params)."""
    return _build([2, 2, 8, 2], [64, 128, 256, 512], pretrained, **kwargs)


def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: depth [4, 4, 18, 4], dims [64, 128, 256, 512] (25.5M params)."""
    return _build([4, 4, 18, 4], [64, 128, 256, 512], pretrained, **kwargs)


def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: depth [4, 4, 18, 4], dims [96, 192, 384, 768] (56.8M params)."""
    return _build([4, 4, 18, 4], [96, 192, 384, 768], pretrained, **kwargs)
