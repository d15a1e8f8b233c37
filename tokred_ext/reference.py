"""Pure-PyTorch semantics of every tokred op and method.

These are the specifications the kernels are tested against, and the compositions the
benchmarks time them against. They follow upstream code (EViT, Haurum's Top-K, ToMe, BiFormer)
except where tokred pins down what upstream leaves open: ties go to the lower index.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor


# --------------------------------------------------------------------------- selection

def topk(scores: Tensor, k: int, largest: bool = True,
         lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """tokred::topk: a stable sort keeps the lower index first among equal scores."""
    if lengths is None:
        values, indices = torch.sort(scores, dim=-1, descending=largest, stable=True)
        return values[..., :k], indices[..., :k]
    n = scores.shape[-1]
    lengths = lengths.long().unsqueeze(-1)
    valid = torch.arange(n, device=scores.device) < lengths
    # Padding must sort after every valid entry: -inf when largest (valid -inf entries stay
    # first because the sort is stable), NaN when smallest (NaN ranks above +inf).
    fill = float("-inf") if largest else float("nan")
    values, indices = torch.sort(scores.masked_fill(~valid, fill), dim=-1, descending=largest,
                                 stable=True)
    values, indices = values[..., :k], indices[..., :k]
    filled = torch.arange(k, device=scores.device) < lengths
    values = values.masked_fill(~filled, float("-inf") if largest else float("inf"))
    return values, indices.masked_fill(~filled, -1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """tokred::gather_tokens: torch.gather along tokens; index -1 gives a zero row."""
    index = index.long()
    out = torch.gather(x, 1, index.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.masked_fill((index < 0).unsqueeze(-1), 0)


def complement(index: Tensor, n: int) -> Tensor:
    """tokred::complement: the indices of [0, n) missing from each row, ascending."""
    b, k = index.shape
    present = torch.zeros(b, n, dtype=torch.bool, device=index.device)
    present.scatter_(1, index.long(), True)
    return torch.arange(n, device=index.device).expand(b, n)[~present].view(b, n - k)


def prune_tokens(x: Tensor, scores: Tensor, k: int, fuse: bool = False, num_protected: int = 1,
                 keep_order: bool = False) -> Tuple[Tensor, Tensor]:
    """tokred::prune_tokens as EViT's glue code: topk, gather, complement, weighted sum."""
    p, n = num_protected, scores.shape[1]
    _, index = topk(scores, k)
    if keep_order:
        index = index.sort(dim=-1).values
    tokens = x[:, p:]
    parts = [x[:, :p], gather_tokens(tokens, index)]
    if fuse:
        dropped = complement(index, n)
        weights = scores.gather(1, dropped).to(x.dtype)
        parts.append((gather_tokens(tokens, dropped) * weights.unsqueeze(-1)).sum(1, keepdim=True))
    return torch.cat(parts, dim=1), index


# --------------------------------------------------------------------------- methods

def class_attention(attn: Tensor, num_protected: int = 1) -> Tensor:
    """EViT/Top-K scores: the class token's attention to the other tokens, mean over heads."""
    return attn[:, :, 0, num_protected:].mean(dim=1)


def evit_keep_count(keep_rate: float, n_scored: int) -> int:
    """EViT's rule: ceil(keep_rate * (N - 1)), relative to the current token count."""
    return math.ceil(keep_rate * n_scored)


def topk_keep_count(keep_rate: float, n_initial: int) -> int:
    """Haurum et al.'s Top-K rule: int(keep_rate * N0), relative to the initial patch count."""
    return int(keep_rate * n_initial)


# --------------------------------------------------------------------------- BiFormer routing
# Upstream: rayleizhu/BiFormer ops/bra_legacy.py (KVGather L61-93, token attention L256-268).

def routed_gather(kv: Tensor, r_idx: Tensor, r_weight: Optional[Tensor] = None) -> Tensor:
    """tokred::routed_gather as upstream's KVGather: expand over query regions, then gather.

    kv ``[n, P, w2, c]``, r_idx ``[n, P, topk]`` -> ``[n, P, topk, w2, c]``; with r_weight the
    gathered windows are scaled by it (``mul_weight='soft'``), the result cast to kv's dtype.
    """
    n, p2, w2, c = kv.shape
    topk = r_idx.shape[-1]
    out = torch.gather(kv.view(n, 1, p2, w2, c).expand(-1, p2, -1, -1, -1), 2,
                       r_idx.long().view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c))
    if r_weight is not None:
        out = (r_weight.view(n, p2, topk, 1, 1) * out).to(kv.dtype)
    return out


def routed_attention(q: Tensor, k: Tensor, v: Tensor, r_idx: Tensor, num_heads: int,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """tokred::routed_attention as upstream: gather K/V (topk x their memory), then matmuls.

    Returns ``(out [n, P, wq, cv], lse [n, P, num_heads, wq])``; lse is the log-sum-exp of the
    scaled scores, in float32 (float64 for float64 inputs).
    """
    n, p2, wq, cqk = q.shape
    wk, cv = v.shape[2], v.shape[3]
    topk = r_idx.shape[-1]
    m = num_heads
    sel = routed_gather(torch.cat([k, v], dim=-1), r_idx)  # [n, P, topk, wk, cqk + cv]
    k_sel, v_sel = sel.split([cqk, cv], dim=-1)
    k_sel = k_sel.reshape(n * p2, topk * wk, m, cqk // m).permute(0, 2, 3, 1)  # (n P) m c (k w)
    v_sel = v_sel.reshape(n * p2, topk * wk, m, cv // m).permute(0, 2, 1, 3)  # (n P) m (k w) c
    q_pix = q.reshape(n * p2, wq, m, cqk // m).permute(0, 2, 1, 3)  # (n P) m w c
    logits = (q_pix * scale) @ k_sel  # (n P) m wq (k wk)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(logits.to(lse_dtype), dim=-1).view(n, p2, m, wq)
    out = torch.softmax(logits, dim=-1) @ v_sel  # (n P) m wq c
    return out.permute(0, 2, 1, 3).reshape(n, p2, wq, cv), lse


def routing_logits(q_win: Tensor, k_win: Tensor, scale: float) -> Tensor:
    """Upstream TopkRouting's region-to-region logits ``(q_win * scale) @ k_win^T``."""
    return (q_win * scale) @ k_win.transpose(-2, -1)
