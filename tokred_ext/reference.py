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
