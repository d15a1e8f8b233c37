"""Multi-head self-attention with timm's parameter names, on ``F.scaled_dot_product_attention``.

Besides the attention output it can return what a reduction policy needs, without ever forming
the ``[B, H, N, N]`` attention map:

* class-attention scores: the softmax of the class token's row only, per head, averaged over
  heads, over the keys after the ``P`` protected tokens; equal to ``attn[:, :, 0, P:].mean(1)``;
* in a model with no class token, the attention each token receives instead: the full softmax
  map averaged over heads and queries, ``attn[:, :, :, P:].mean((1, 2))``
  (``functional.mean_attention``; this one path forms the ``[B, H, N, N]`` map);
* ToMe's metric: the keys averaged over heads ``[B, N, head_dim]``;
* ToMe's proportional attention: an additive ``log(size)`` bias on every key.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import mean_attention

__all__ = ["Attention", "attention_forward", "size_bias"]


def size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """ToMe's proportional-attention bias ``log(size)`` as an SDPA mask ``[B, 1, 1, N]``."""
    return size.reshape(size.shape[0], 1, 1, size.shape[1]).log().to(dtype)  # B = 0 works too


class Attention(nn.Module):
    """timm-compatible attention (``qkv``, ``q_norm``, ``k_norm``, ``proj``) that can also return
    class-attention scores, ToMe's metric, and apply proportional attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, size: Optional[Tensor] = None, need_scores: bool = False,
                num_protected: int = 1, need_metric: bool = False, class_token: bool = True
                ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The forward pass of this or any module with timm ``Attention``'s attributes (as
        :func:`attention_forward`, the timm patch runs it on timm's attention).

        Uses ``qkv``, ``num_heads``, ``proj`` and, where the module has them, ``q_norm``,
        ``k_norm``, ``attn_drop``, ``norm`` (timm's scale norm) and ``proj_drop``. Returns ``(out,
        scores, metric)``: ``scores`` ``[B, N - num_protected]`` when ``need_scores``, ``metric``
        ``[B, N, head_dim]`` when ``need_metric``, else None. ``size`` ``[B, N]`` or
        ``[B, N, 1]`` turns on proportional attention. ``class_token`` False (a model without
        one): the scores are the mean attention each token receives over all queries and heads.
        """
        b, n, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x)
        head_dim = qkv.shape[-1] // (3 * heads)
        q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # Older timm attention lacks q_norm/k_norm and only newer has the scale norm `norm`.
        # hasattr, not getattr(..., None): TorchScript resolves hasattr on a module statically.
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
        if hasattr(self, "k_norm"):
            k = self.k_norm(k)
        bias = size_bias(size, q.dtype) if size is not None else None
        p = 0.0
        if hasattr(self, "attn_drop") and self.training:
            p = self.attn_drop.p
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

        scores: Optional[Tensor] = None
        if need_scores:
            # The class token's query row only ([B, H, 1, N] logits), or every row when there is
            # no class token; softmax in float32 or wider.
            acc = torch.promote_types(q.dtype, torch.float32)
            rows = q[:, :, :1] if class_token else q
            logits = rows.to(acc) @ k.to(acc).transpose(-2, -1) * (head_dim ** -0.5)
            if bias is not None:
                logits = logits + bias.to(acc)
            if class_token:
                scores = logits.softmax(dim=-1)[:, :, 0, num_protected:].mean(dim=1)
            else:
                scores = mean_attention(logits.softmax(dim=-1), num_protected)
        metric = k.mean(dim=1) if need_metric else None

        out = out.transpose(1, 2)
        if not torch.jit.is_scripting():  # TorchScript cannot compile is_exporting; never exports
            if torch.compiler.is_exporting():
                # The CPU SDPA output is laid out [B, N, H, D], so export records the reshape
                # below as a view; the ONNX exporter then re-traces SDPA as [B, H, N, D] and that
                # view fails. A copy in the exported graph only; eager keeps the free reshape.
                out = out.clone(memory_format=torch.contiguous_format)
        out = out.reshape(b, n, heads * head_dim)
        if hasattr(self, "norm"):
            out = self.norm(out)
        out = self.proj(out)
        if hasattr(self, "proj_drop"):
            out = self.proj_drop(out)
        return out, scores, metric


# The same function on any module with timm Attention's attributes: the timm patch runs it on
# timm's attention, whose own forward does not return scores or the metric.
attention_forward = Attention.forward
