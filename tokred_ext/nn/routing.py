"""BiFormer's Bi-Level Routing Attention on tokred's fused routed attention.

Semantics and parameter names follow upstream's legacy NHWC module (rayleizhu/BiFormer
``ops/bra_legacy.py``, used by every released BiFormer checkpoint), so released state_dicts load:
``qkv.qkv.*``, ``wo.*``, ``lepe.*`` and ``router.emb.*`` (with ``param_routing``).

Two backends compute the same function:

* ``"tokred"`` (default): routing by ``tokred::topk`` (ties to the lower index) and attention by
  ``tokred::routed_attention`` -- no gathered K/V buffer, deterministic backward.
  With ``soft_routing`` the weighted K/V are gathered by ``tokred::routed_gather`` first.
* ``"reference"``: upstream's algorithm in pure PyTorch (``torch.topk``, a gathered K/V buffer,
  matmuls), for tests and benchmarks. It is written here, not taken from ``tokred_ext.reference``
  (the test oracle, which production code does not import).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = ["BiLevelRoutingAttention", "TopkRouting", "KVGather", "QKVLinear", "BACKENDS"]

BACKENDS = ("tokred", "reference")


class TopkRouting(nn.Module):
    """Region routing: top-k of ``(emb(q_win) * scale) @ emb(k_win)^T`` per query region.

    Returns ``(r_weight, r_idx)``, both ``[n, P, topk]``; ``r_weight`` is the softmax over the
    selected logits. Without ``diff_routing`` the inputs are detached, as upstream.
    """

    def __init__(self, qk_dim: int, topk: int = 4, qk_scale: Optional[float] = None,
                 param_routing: bool = False, diff_routing: bool = False):
        super().__init__()
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim ** -0.5
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()
        self.routing_act = nn.Softmax(dim=-1)
        self.backend = "tokred"

    def forward(self, query: Tensor, key: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        # Upstream's region-to-region logits: (q_win * scale) @ k_win^T.
        logit = (self.emb(query) * self.scale) @ self.emb(key).transpose(-2, -1)
        if self.backend == "reference":
            top_logit, r_idx = torch.topk(logit, k=self.topk, dim=-1)
        else:
            top_logit, r_idx = ops.topk(logit, self.topk)
        return self.routing_act(top_logit), r_idx


class KVGather(nn.Module):
    """Gathers the routed K/V windows (``mul_weight``: 'none' or 'soft'; 'hard' is not
    implemented upstream either)."""

    def __init__(self, mul_weight: str = "none"):
        super().__init__()
        if mul_weight == "hard":
            raise ValueError("differentiable hard routing (diff_routing=True without soft_routing) "
                             "is not implemented, upstream neither: use soft_routing=True or "
                             "diff_routing=False")
        if mul_weight not in ("none", "soft"):
            raise ValueError(f"mul_weight must be 'none' or 'soft', got {mul_weight!r}")
        self.mul_weight = mul_weight
        self.backend = "tokred"

    def forward(self, r_idx: Tensor, r_weight: Tensor, kv: Tensor) -> Tensor:
        weight = r_weight if self.mul_weight == "soft" else None
        if self.backend == "reference":
            return _gather_windows(kv, r_idx, weight)
        return ops.routed_gather(kv, r_idx, weight)


def _gather_windows(kv: Tensor, r_idx: Tensor, r_weight: Optional[Tensor]) -> Tensor:
    """Upstream's KVGather in plain PyTorch: ``out[b, i, t] = kv[b, r_idx[b, i, t]]``
    ``[n, P, topk, w2, c]``, scaled by ``r_weight`` when given."""
    batch = torch.arange(kv.shape[0], device=kv.device).view(-1, 1, 1)
    out = kv[batch, r_idx.long()]
    if r_weight is not None:
        out = (r_weight[..., None, None] * out).to(kv.dtype)
    return out


class QKVLinear(nn.Module):
    """One Linear to ``qk_dim + qk_dim + dim`` channels, split into q and kv (K first)."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        q, kv = self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)
        return q, kv


def _attend_gathered(q_pix: Tensor, kv_sel: Tensor, qk_dim: int, num_heads: int,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """Upstream's token attention over gathered K/V ``[n, P, topk, w2, qk_dim + dim]``.

    Returns the output ``[n, P, wq, dim]`` and the attention weights
    ``[n * P, num_heads, wq, topk * w2]``."""
    n, p2, topk, w2, _ = kv_sel.shape
    wq = q_pix.shape[2]
    m = num_heads
    k_sel, v_sel = kv_sel.split([qk_dim, kv_sel.shape[-1] - qk_dim], dim=-1)
    cv = v_sel.shape[-1]
    k_sel = k_sel.reshape(n * p2, topk * w2, m, qk_dim // m).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * p2, topk * w2, m, cv // m).permute(0, 2, 1, 3)
    q = q_pix.reshape(n * p2, wq, m, qk_dim // m).permute(0, 2, 1, 3)
    attn = torch.softmax((q * scale) @ k_sel, dim=-1)
    return (attn @ v_sel).permute(0, 2, 1, 3).reshape(n, p2, wq, cv), attn


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention (BiFormer, CVPR 2023), NHWC in and out.

    Args follow upstream: ``n_win`` windows per side (``n_win**2`` regions), ``num_heads``,
    ``qk_dim`` (default ``dim``), ``qk_scale`` (default ``qk_dim ** -0.5``, the full qk_dim as
    upstream), ``kv_per_win`` / ``kv_downsample_ratio`` / ``kv_downsample_mode`` ('identity',
    'avgpool', 'maxpool', 'ada_avgpool', 'ada_maxpool'), ``topk`` routed regions per region,
    ``param_attention`` ('qkvo' or 'qkv'), ``param_routing``, ``diff_routing``,
    ``soft_routing``, ``side_dwconv`` (LePE kernel size, 0 disables), ``auto_pad`` (zero-pad H, W
    to multiples of ``n_win`` before the projection and crop after; padded pixels are not
    masked, as upstream). ``backend`` is 'tokred' (fused kernels) or 'reference' (upstream's
    gather + matmul).
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, kv_per_win: int = 4,
                 kv_downsample_ratio: int = 4, kv_downsample_kernel: Optional[int] = None,
                 kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False,
                 diff_routing: bool = False, soft_routing: bool = False, side_dwconv: int = 3,
                 auto_pad: bool = False, backend: str = "tokred"):
        super().__init__()
        if n_win < 1 or num_heads < 1:
            raise ValueError(f"n_win ({n_win}) and num_heads ({num_heads}) must be >= 1")
        if not 0 <= topk <= n_win * n_win:
            raise ValueError(f"topk must be in [0, n_win**2 = {n_win * n_win}] routed regions, "
                             f"got {topk}")
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads != 0 or dim % num_heads != 0:
            raise ValueError(f"qk_dim ({self.qk_dim}) and dim ({dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.lepe = (nn.Conv2d(dim, dim, kernel_size=side_dwconv, stride=1,
                               padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)
        self.topk = topk
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True requires diff_routing=True (as upstream)")
        self.router = TopkRouting(qk_dim=self.qk_dim, qk_scale=self.scale, topk=topk,
                                  diff_routing=diff_routing, param_routing=param_routing)
        mul_weight = "soft" if soft_routing else ("hard" if diff_routing else "none")
        self.kv_gather = KVGather(mul_weight=mul_weight)
        self.param_attention = param_attention
        if param_attention == "qkvo":
            self.qkv = QKVLinear(dim, self.qk_dim)
            self.wo = nn.Linear(dim, dim)
        elif param_attention == "qkv":
            self.qkv = QKVLinear(dim, self.qk_dim)
            self.wo = nn.Identity()
        else:
            raise ValueError(f"param_attention mode {param_attention} is not supported")
        self.kv_downsample_mode = kv_downsample_mode
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_downsample_kenel = kv_downsample_kernel  # upstream's spelling
        if kv_downsample_mode == "ada_avgpool":
            self.kv_down = nn.AdaptiveAvgPool2d(kv_per_win)
        elif kv_downsample_mode == "ada_maxpool":
            self.kv_down = nn.AdaptiveMaxPool2d(kv_per_win)
        elif kv_downsample_mode == "maxpool":
            self.kv_down = (nn.MaxPool2d(kv_downsample_ratio) if kv_downsample_ratio > 1
                            else nn.Identity())
        elif kv_downsample_mode == "avgpool":
            self.kv_down = (nn.AvgPool2d(kv_downsample_ratio) if kv_downsample_ratio > 1
                            else nn.Identity())
        elif kv_downsample_mode == "identity":
            self.kv_down = nn.Identity()
        elif kv_downsample_mode in ("fracpool", "conv"):
            raise ValueError(f"kv_downsample_mode {kv_downsample_mode!r} is not implemented, "
                             "upstream neither: use identity, avgpool, maxpool, ada_avgpool or "
                             "ada_maxpool")
        else:
            raise ValueError(f"kv_downsample_mode {kv_downsample_mode} is not supported")
        self.attn_act = nn.Softmax(dim=-1)
        self.auto_pad = auto_pad
        self.backend = backend

    # The backend is chosen from Python (its setter also sets the router's and the gather's);
    # a scripted module keeps the one it was scripted with.
    __jit_unused_properties__ = ["backend"]

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self.router.backend = value
        self.kv_gather.backend = value

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """x: ``[N, H, W, C]`` -> ``[N, H, W, C]``.

        With ``ret_attn_mask`` (as upstream) returns ``(out, r_weight, r_idx, attn_weight)``;
        the attention weights only exist on the gather + matmul path, which this then takes.
        That is eager only: a TorchScript method has one return type, so a scripted module
        returns ``out`` and raises if ``ret_attn_mask`` is set.
        """
        out, r_weight, r_idx, attn_weight = self._attend(x, ret_attn_mask)
        if torch.jit.is_scripting():
            if ret_attn_mask:
                raise RuntimeError("BiLevelRoutingAttention: ret_attn_mask=True is not supported "
                                   "in TorchScript (it changes the return type); call the eager "
                                   "module for the routing and attention weights")
            return out
        if ret_attn_mask:
            return out, r_weight, r_idx, attn_weight
        return out

    def _attend(self, x: Tensor, ret_attn_mask: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """The forward pass: ``(out, r_weight, r_idx, attn_weight)``."""
        N, H_in, W_in, C = x.shape
        p = self.n_win
        pad_r = pad_b = 0
        if self.auto_pad:
            pad_r = (p - W_in % p) % p
            pad_b = (p - H_in % p) % p
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        elif H_in % p != 0 or W_in % p != 0:
            raise ValueError(f"BiLevelRoutingAttention: H ({H_in}) and W ({W_in}) must be "
                             f"multiples of n_win ({p}); set auto_pad=True to pad")
        H, W = H_in + pad_b, W_in + pad_r
        h, w = H // p, W // p
        # n (j h) (i w) c -> n (j i) h w c
        x = x.reshape(N, p, h, p, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, p * p, h, w, C)
        q, kv = self.qkv(x)  # [N, P, h, w, qk], [N, P, h, w, qk + C]
        q_pix = q.reshape(N, p * p, h * w, self.qk_dim)
        ckv = kv.shape[-1]
        if isinstance(self.kv_down, nn.Identity):
            kv_pix = kv.reshape(N, p * p, h * w, ckv)
        else:
            kv_pix = self.kv_down(kv.permute(0, 1, 4, 2, 3).reshape(N * p * p, ckv, h, w))
            kv_pix = kv_pix.reshape(N, p * p, ckv, -1).transpose(-1, -2)  # [N, P, w_kv, qk + C]
        q_win = q.mean([2, 3])
        k_win = kv[..., : self.qk_dim].mean([2, 3])
        v = kv[..., self.qk_dim:]
        r_weight, r_idx = self.router(q_win, k_win)

        attn_weight: Optional[Tensor] = None
        # _backend, not the property: TorchScript leaves the property out (see __init__).
        if self._backend == "tokred" and not ret_attn_mask and self.kv_gather.mul_weight == "none":
            out, _ = ops.routed_attention(q_pix, kv_pix[..., : self.qk_dim],
                                          kv_pix[..., self.qk_dim:], r_idx, self.num_heads,
                                          self.scale)
        else:  # upstream's gather + matmul: the reference backend, soft routing, attn weights
            kv_sel = self.kv_gather(r_idx=r_idx, r_weight=r_weight, kv=kv_pix)
            out, attn_weight = _attend_gathered(q_pix, kv_sel, self.qk_dim, self.num_heads,
                                                self.scale)

        # n (j i) (h w) c -> n (j h) (i w) c
        out = out.reshape(N, p, p, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, C)
        if self.lepe is not None:
            # n (j i) h w c -> n c (j h) (i w)
            v_img = v.reshape(N, p, p, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
            out = out + self.lepe(v_img.contiguous()).permute(0, 2, 3, 1)
        out = self.wo(out)
        if pad_r > 0 or pad_b > 0:
            out = out[:, :H_in, :W_in, :].contiguous()
        return out, r_weight, r_idx, attn_weight

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
                f"qk_dim={self.qk_dim}, topk={self.topk}, kv_downsample_mode="
                f"{self.kv_downsample_mode}, backend={self.backend}")
