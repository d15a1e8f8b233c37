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


# --------------------------------------------------------------------------- merging: ToMe
# Upstream ToMe (facebookresearch/ToMe, tome/merge.py) re-expressed with explicit index tensors.
# One change: the A tokens are ranked with a stable argsort, so ties go to the lower index.

def tome_clamp_r(r: int, n: int, class_token: bool = True, distill_token: bool = False) -> int:
    """Upstream's clamp: at most half of the unprotected tokens merge; r <= 0 means no merge."""
    protected = int(class_token) + int(distill_token)
    return max(0, min(r, (n - protected) // 2))


def bipartite_match(metric: Tensor, r: int, class_token: bool = True,
                    distill_token: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """tokred::bipartite_match as upstream's bipartite_soft_matching (its index tensors)."""
    b, n, _ = metric.shape
    r = tome_clamp_r(r, n, class_token, distill_token)
    na = (n + 1) // 2
    if r == 0:
        none = torch.empty(b, 0, dtype=torch.long, device=metric.device)
        return torch.arange(na, device=metric.device).expand(b, na).clone(), none, none.clone()
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        unm_idx, src_idx = edge_idx[..., r:], edge_idx[..., :r]
        dst_idx = node_idx.gather(-1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, dst_idx


def _tome_apply(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, mode: str,
                distill_token: bool) -> Tensor:
    """Upstream's merge(x, mode): gather the A tokens, scatter_reduce (include_self) into B."""
    b, _, c = x.shape
    u, r = unm_idx.shape[1], src_idx.shape[1]
    a_tok, b_tok = x[:, ::2], x[:, 1::2]
    unm = a_tok.gather(1, unm_idx.long()[..., None].expand(b, u, c))
    src = a_tok.gather(1, src_idx.long()[..., None].expand(b, r, c))
    dst = b_tok.scatter_reduce(1, dst_idx.long()[..., None].expand(b, r, c), src, reduce=mode)
    if distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def merge(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
          mode: str = "wavg", distill_token: bool = False) -> Tuple[Tensor, Tensor]:
    """tokred::merge: upstream merge (sum, mean, amax) or merge_wavg; also the summed sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    if src_idx.shape[1] == 0:
        return x.clone(), size.clone()
    size_out = _tome_apply(size, unm_idx, src_idx, dst_idx, "sum", distill_token)
    if mode == "wavg":
        out = _tome_apply(x * size, unm_idx, src_idx, dst_idx, "sum", distill_token) / size_out
    else:
        out = _tome_apply(x, unm_idx, src_idx, dst_idx, mode, distill_token)
    return out, size_out


def unmerge(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
            distill_token: bool = False) -> Tensor:
    """tokred::unmerge: upstream unmerge; every merged source gets a copy of its destination.

    Upstream assumes the layout without distillation token; with ``distill_token`` the interleave
    is undone first.
    """
    u, r = unm_idx.shape[1], src_idx.shape[1]
    if r == 0:
        return x.clone()
    b, _, c = x.shape
    if distill_token:
        unm = torch.cat([x[:, :1], x[:, 2:u + 1]], dim=1)
        dst = torch.cat([x[:, 1:2], x[:, u + 1:]], dim=1)
    else:
        unm, dst = x[:, :u], x[:, u:]
    src = dst.gather(1, dst_idx.long()[..., None].expand(b, r, c))
    out = x.new_zeros(b, n, c)
    out[:, 1::2] = dst
    out = out.scatter(1, (2 * unm_idx.long())[..., None].expand(b, u, c), unm)
    return out.scatter(1, (2 * src_idx.long())[..., None].expand(b, r, c), src)


def merge_source(source: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
                 n: int, distill_token: bool = False) -> Tensor:
    """tokred::merge_source: the output token of each original patch, as unmerge of positions."""
    b, r = src_idx.shape
    pos = torch.arange(n - r, device=src_idx.device, dtype=torch.float64)
    dest = unmerge(pos.expand(b, n - r)[..., None], unm_idx, src_idx, dst_idx, n,
                   distill_token)[..., 0].long()
    return dest if source is None else dest.gather(1, source.long())


def merge_source_onehot(source: Optional[Tensor], x: Tensor, unm_idx: Tensor, src_idx: Tensor,
                        dst_idx: Tensor, distill_token: bool = False) -> Tensor:
    """Upstream merge_source: the [B, N, N0] 0/1 matrix merged with mode amax."""
    if source is None:
        b, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None].expand(b, t, t)
    if src_idx.shape[1] == 0:
        return source
    return _tome_apply(source, unm_idx, src_idx, dst_idx, "amax", distill_token)


def tome_step(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None,
              class_token: bool = True, distill_token: bool = False) -> Tuple[Tensor, Tensor]:
    """One upstream ToMe step: bipartite_soft_matching, then merge_wavg."""
    unm_idx, src_idx, dst_idx = bipartite_match(metric, r, class_token, distill_token)
    return merge(x, size, unm_idx, src_idx, dst_idx, "wavg", distill_token)
