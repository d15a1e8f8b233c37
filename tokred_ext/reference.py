"""Pure-PyTorch semantics of every tokred op and method.

These are the specifications the kernels are tested against, and the compositions the
benchmarks time them against. They follow upstream code (EViT, Haurum's Top-K, ToMe, BiFormer)
except where tokred pins down what upstream leaves open: ties go to the lower index.
"""
import math
from typing import List, Optional, Tuple, Union

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
    if x.shape[1] == 0:  # nothing to gather from: every index must be -1
        return x.new_zeros(x.shape[0], index.shape[1], x.shape[2])
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

# The counting rules below are the oracle's own copies, written plainly; production's live in
# tokred_ext/rules.py and functional.py. Nothing here imports tokred_ext.

def class_attention(attn: Tensor, num_protected: int = 1) -> Tensor:
    """EViT/Top-K scores: the class token's attention to the other tokens, mean over heads."""
    return attn.mean(dim=1)[:, 0, num_protected:]


def mean_attention(attn: Tensor, num_protected: int = 0) -> Tensor:
    """Scores in a model without a class token: the attention each token receives, averaged over
    the heads and then over every query."""
    return attn.mean(dim=1).mean(dim=1)[:, num_protected:]


def evit_keep_count(keep_rate: float, n_scored: int) -> int:
    """EViT's rule: ceil(keep_rate * (N - 1)), relative to the current token count."""
    exact = keep_rate * n_scored
    count = int(exact)
    if count < exact:
        count += 1
    return count


def topk_keep_count(keep_rate: float, n_initial: int) -> int:
    """Haurum et al.'s Top-K rule: int(keep_rate * N0), relative to the initial patch count."""
    return math.floor(keep_rate * n_initial)


# --------------------------------------------------------------------------- merging: ToMe
# Upstream ToMe (facebookresearch/ToMe, tome/merge.py) re-expressed with explicit index tensors.
# One change: the A tokens are ranked with a stable argsort, so ties go to the lower index.

def parse_r(num_layers: int, r: Union[int, List[int], Tuple[int, float]]) -> List[int]:
    """Upstream ToMe's parse_r: tokens merged in each of ``num_layers`` layers.

    An int is constant; a list is padded with zeros; ``(r, inflection)`` is a line from
    ``int(r * (1 - inflection))`` to ``2 r`` minus that, each value truncated with ``int``.
    """
    if isinstance(r, list):
        schedule = list(r)
        while len(schedule) < num_layers:
            schedule.append(0)
        return schedule
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = 0.0
    if num_layers > 1:
        step = (max_val - min_val) / (num_layers - 1)
    schedule = []
    for i in range(num_layers):
        schedule.append(int(min_val + step * i))
    return schedule


def tome_clamp_r(r: int, n: int, num_protected: int = 1) -> int:
    """Upstream's clamp: at most half of the unprotected tokens merge; r <= 0 means no merge."""
    limit = max(n - num_protected, 0) // 2
    if r > limit:
        r = limit
    return r if r > 0 else 0


def _cosine_scores(metric: Tensor, a_rows: Tensor, b_rows: Tensor) -> Tensor:
    """Cosine similarity of every A/B pair ``[B, na, nb]`` as dot * (1/|a|) * (1/|b|) in the
    op-math dtype, the kernels' formula, so ties that are exact in it (integer-valued metrics)
    stay ties. The sums inside the dots and norms may round in another order than a kernel's."""
    m = metric.to(torch.float32 if metric.dtype in (torch.float16, torch.bfloat16) else metric.dtype)
    inv = m.square().sum(-1).sqrt().reciprocal()
    return (m[:, a_rows] @ m[:, b_rows].transpose(-1, -2)) * inv[:, a_rows, None] \
        * inv[:, None, b_rows]


def _rank_matches(scores: Tensor, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(unm_idx, src_idx, dst_idx) by the tie rule. Partner: the lowest-index B token of largest
    similarity, NaN counting as the largest. Ranking: by that similarity, descending, NaN first,
    ties to the lower A index. Unmerged A tokens in rank order."""
    node_max = scores.max(dim=-1).values
    best = (scores == node_max[..., None]) | (scores.isnan() & node_max.isnan()[..., None])
    j = torch.arange(scores.shape[-1], device=scores.device)
    node_idx = torch.where(best, j, scores.shape[-1]).min(dim=-1).values
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx = edge_idx[..., :r]
    return edge_idx[..., r:], src_idx, node_idx.gather(-1, src_idx)


def bipartite_match(metric: Tensor, r: int, num_protected: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """tokred::bipartite_match as upstream's bipartite_soft_matching (its index tensors), with
    upstream's class-token row and distillation-token column generalised to a prefix of
    ``num_protected`` tokens: the rows and columns of every prefix token score -inf."""
    b, n, _ = metric.shape
    r = tome_clamp_r(r, n, num_protected)
    na = (n + 1) // 2
    if r == 0:
        none = torch.empty(b, 0, dtype=torch.long, device=metric.device)
        return torch.arange(na, device=metric.device).expand(b, na).clone(), none, none.clone()
    with torch.no_grad():
        tokens = torch.arange(n, device=metric.device)
        scores = _cosine_scores(metric, tokens[::2], tokens[1::2])
        # Prefix token t is A[t // 2] (t even) or B[t // 2] (t odd).
        scores[..., :(num_protected + 1) // 2, :] = -math.inf
        scores[..., :, :num_protected // 2] = -math.inf
        unm_idx, src_idx, dst_idx = _rank_matches(scores, r)
        if num_protected > 0:
            unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, dst_idx


def _plan_of_dest(dest: Tensor, nout: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dest, offsets, members): each output's members in ascending order (a stable sort by dest)
    and where each output's run starts (a running count)."""
    b = dest.shape[0]
    members = dest.argsort(dim=1, stable=True)
    counts = torch.zeros(b, nout, dtype=torch.long, device=dest.device)
    counts.scatter_add_(1, dest, torch.ones_like(dest))
    offsets = torch.cat([counts.new_zeros(b, 1), counts.cumsum(1)], dim=1)
    return dest, offsets, members


def bipartite_match_plan(metric: Tensor, dst_tokens: Tensor, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """tokred::bipartite_match_plan: tomesd's matching (destinations ``dst_tokens``, sources the
    other tokens, each ascending) by the tie rule, as the plan of the layout
    ``[unmerged sources (rank order) | destinations]``."""
    b, n, _ = metric.shape
    dst_rows = dst_tokens.long().to(metric.device)
    nb = dst_rows.shape[0]
    is_src = torch.ones(n, dtype=torch.bool, device=metric.device)
    is_src[dst_rows] = False
    src_rows = is_src.nonzero()[:, 0]
    r = max(0, min(r, n - nb if nb > 0 else 0))
    if r == 0:
        return _plan_of_dest(torch.arange(n, device=metric.device).expand(b, n).clone(), n)
    with torch.no_grad():
        unm_idx, src_idx, dst_idx = _rank_matches(_cosine_scores(metric, src_rows, dst_rows), r)
    u = unm_idx.shape[1]
    dest = torch.empty(b, n, dtype=torch.long, device=metric.device)
    dest[:, dst_rows] = u + torch.arange(nb, device=metric.device)
    dest.scatter_(1, src_rows[unm_idx], torch.arange(u, device=metric.device).expand(b, u))
    dest.scatter_(1, src_rows[src_idx], u + dst_idx)
    return _plan_of_dest(dest, n - r)


def _prefix_split(n: int, num_protected: int) -> Tuple[int, int]:
    """How many of the prefix's tokens are in set A (even positions) and in set B (odd)."""
    p = min(num_protected, n)
    return (p + 1) // 2, p // 2


def _tome_apply(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, mode: str,
                num_protected: int) -> Tensor:
    """Upstream's merge(x, mode): gather the A tokens, scatter_reduce (include_self) into B; then
    the prefix tokens (the first unmerged A and B tokens) go back to the front, in order."""
    b, n, c = x.shape
    u, r = unm_idx.shape[1], src_idx.shape[1]
    a_tok, b_tok = x[:, ::2], x[:, 1::2]
    unm = a_tok.gather(1, unm_idx.long()[..., None].expand(b, u, c))
    src = a_tok.gather(1, src_idx.long()[..., None].expand(b, r, c))
    dst = b_tok.scatter_reduce(1, dst_idx.long()[..., None].expand(b, r, c), src, reduce=mode)
    pa, pb = _prefix_split(n, num_protected)
    prefix = x.new_empty(b, pa + pb, c)
    prefix[:, 0::2] = unm[:, :pa]
    prefix[:, 1::2] = dst[:, :pb]
    return torch.cat([prefix, unm[:, pa:], dst[:, pb:]], dim=1)


def merge(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
          mode: str = "wavg", num_protected: int = 1) -> Tuple[Tensor, Tensor]:
    """tokred::merge: upstream merge (sum, mean, amax) or merge_wavg; also the summed sizes."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    if src_idx.shape[1] == 0:  # no merge: upstream's blocks skip merge_wavg, so x is unchanged
        return x.clone(), size.clone()
    size_out = _tome_apply(size, unm_idx, src_idx, dst_idx, "sum", num_protected)
    if mode == "wavg":
        out = _tome_apply(x * size, unm_idx, src_idx, dst_idx, "sum", num_protected) / size_out
    else:
        out = _tome_apply(x, unm_idx, src_idx, dst_idx, mode, num_protected)
    return out, size_out


def unmerge(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
            num_protected: int = 1) -> Tensor:
    """tokred::unmerge: upstream unmerge; every merged source gets a copy of its destination.

    Upstream assumes the layout ``[unm | B]``; the prefix moved to the front is put back first.
    """
    u, r = unm_idx.shape[1], src_idx.shape[1]
    if r == 0:
        return x.clone()
    b, _, c = x.shape
    pa, pb = _prefix_split(n, num_protected)
    p = pa + pb
    unm = torch.cat([x[:, 0:p:2], x[:, p:p + u - pa]], dim=1)
    dst = torch.cat([x[:, 1:p:2], x[:, p + u - pa:]], dim=1)
    src = dst.gather(1, dst_idx.long()[..., None].expand(b, r, c))
    out = x.new_zeros(b, n, c)
    out[:, 1::2] = dst
    out = out.scatter(1, (2 * unm_idx.long())[..., None].expand(b, u, c), unm)
    return out.scatter(1, (2 * src_idx.long())[..., None].expand(b, r, c), src)


def merge_source(source: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
                 n: int, num_protected: int = 1) -> Tensor:
    """tokred::merge_source: the output token of each original patch, as unmerge of positions."""
    b, r = src_idx.shape
    pos = torch.arange(n - r, device=src_idx.device, dtype=torch.float64)
    dest = unmerge(pos.expand(b, n - r)[..., None], unm_idx, src_idx, dst_idx, n,
                   num_protected)[..., 0].long()
    return dest if source is None else dest.gather(1, source.long())


def merge_plan(unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
               num_protected: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
    """tokred::merge_plan: dest (merge_source's map), then its members and offsets."""
    dest = merge_source(None, unm_idx, src_idx, dst_idx, n, num_protected)
    return _plan_of_dest(dest, n - src_idx.shape[1])


def merge_source_onehot(source: Optional[Tensor], x: Tensor, unm_idx: Tensor, src_idx: Tensor,
                        dst_idx: Tensor, num_protected: int = 1) -> Tensor:
    """Upstream merge_source: the [B, N, N0] 0/1 matrix merged with mode amax."""
    if source is None:
        b, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None].expand(b, t, t)
    if src_idx.shape[1] == 0:
        return source
    return _tome_apply(source, unm_idx, src_idx, dst_idx, "amax", num_protected)


def tome_step(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None,
              num_protected: int = 1) -> Tuple[Tensor, Tensor]:
    """One upstream ToMe step: bipartite_soft_matching, then merge_wavg."""
    unm_idx, src_idx, dst_idx = bipartite_match(metric, r, num_protected)
    return merge(x, size, unm_idx, src_idx, dst_idx, "wavg", num_protected)

# --------------------------------------------------------------------------- models

class ReferenceViT(torch.nn.Module):
    """A ViT forward written the way upstream writes it, on the weights of ``model``.

    ``model`` is any module with timm ``VisionTransformer``'s names (a tokred model or a timm
    one); its parameters are shared, not copied. Attention is computed as a full ``[B, H, N, N]``
    map; Top-K (Haurum et al.), EViT and ToMe use ``torch.topk``/``gather``/``scatter_reduce``
    glue as upstream does. ``policy`` is read by its attributes only (``name``, ``keep_rate``,
    ``locs``, ``fuse``, ``r``, ``prop_attn``), so any object carrying them works.

    Layouts as timm's: the prefix is the class token (``cls_token``, may be None), a
    distillation token (``dist_token``) and register tokens (``reg_token``), in that order; the
    position embedding covers the prefix unless ``no_embed_class``. Prefix tokens are never
    reduced. Pruning scores are the class token's attention or, with no class token, the mean
    attention each token receives. The head follows ``global_pool``: ``token``, ``avg`` (ToMe's
    sizes weight the mean once tokens merged), ``map`` (the attention pool ``attn_pool`` over the
    tokens after the prefix) or ``''``. ``token_counts`` lists the tokens leaving each block, as
    on tokred's models.
    """

    def __init__(self, model: torch.nn.Module, policy=None):
        super().__init__()
        self.model = model
        self.policy = policy
        self.token_counts = []

    def _schedule(self, depth: int, num_patches: int):
        policy = self.policy
        plan = [None] * depth
        if policy is None or policy.name == "none":
            return plan
        if policy.name == "tome":
            return [r if r > 0 else None for r in parse_r(depth, policy.r)]
        rates = policy.keep_rate
        if isinstance(rates, (int, float)):
            n = len(policy.locs)
            rates = ([rates ** (i + 1) for i in range(n)] if policy.name == "topk"
                     else [rates] * n)
        for loc, rate in zip(policy.locs, rates):
            plan[loc] = topk_keep_count(rate, num_patches) if policy.name == "topk" else rate
        return plan

    def _embed(self, images: Tensor) -> Tuple[Tensor, int]:
        m = self.model
        x = m.patch_embed.proj(images).flatten(2).transpose(1, 2)
        b = x.shape[0]
        prefix = [getattr(m, name, None) for name in ("cls_token", "dist_token", "reg_token")]
        prefix = [t.expand(b, -1, -1) for t in prefix if t is not None]
        pos = getattr(m, "pos_embed", None)
        if pos is not None and getattr(m, "no_embed_class", False):
            x = x + pos
        x = torch.cat(prefix + [x], dim=1)
        if pos is not None and not getattr(m, "no_embed_class", False):
            x = x + pos
        if hasattr(m, "norm_pre"):
            x = m.norm_pre(x)
        return x, sum(t.shape[1] for t in prefix)

    def forward(self, images: Tensor) -> Tensor:
        m = self.model
        x, p = self._embed(images)
        num_patches = x.shape[1] - p
        has_cls = getattr(m, "cls_token", None) is not None
        dist = getattr(m, "dist_token", None)
        plan = self._schedule(len(m.blocks), num_patches)
        name = getattr(self.policy, "name", "none")
        size = torch.ones_like(x[..., :1]) if name == "tome" else None
        prop_attn = name == "tome" and self.policy.prop_attn
        self.token_counts = []
        for blk, amount in zip(m.blocks, plan):
            y, attn, metric = _attention(blk.attn, blk.norm1(x), size if prop_attn else None)
            x = x + blk.ls1(y)
            if amount is not None and name in ("topk", "evit"):
                scores = class_attention(attn, p) if has_cls else mean_attention(attn, p)
                if name == "topk":
                    x = _topk_step(x, scores, amount, p)
                else:
                    x = _evit_step(x, scores, amount, p, self.policy.fuse)
            elif amount is not None and name == "tome":
                x, size = tome_step(x, metric, amount, size, p)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            self.token_counts.append(x.shape[1])
        x = m.norm(x)
        if dist is not None:
            return (m.head(x[:, 0]) + m.head_dist(x[:, 1])) / 2
        pool = getattr(m, "global_pool", "token")
        if pool == "token":
            x = x[:, 0]
        elif pool == "avg":
            tokens = x[:, p:]
            if size is not None and x.shape[1] < p + num_patches:  # tokens merged
                w = size[:, p:]
                x = (tokens * w).sum(dim=1) / w.sum(dim=1)
            else:
                x = tokens.mean(dim=1)
        elif pool == "map":
            x = _attention_pool(m.attn_pool, x[:, p:])
        elif pool not in ("", "none"):
            raise ValueError(f"ReferenceViT: global_pool {pool!r} is not one it computes")
        return m.head(m.fc_norm(x))


def _attention_pool(pool, x: Tensor) -> Tensor:
    """timm's AttentionPoolLatent (one latent query): explicit softmax attention, proj, MLP."""
    b, n, c = x.shape
    h = pool.num_heads
    d = c // h
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, -1, h, d).transpose(1, 2)
    k, v = pool.kv(x).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = pool.proj((attn @ v).transpose(1, 2).reshape(b, -1, c))
    out = out + pool.mlp(pool.norm(out))
    return out[:, 0]


def _attention(attn_mod, x: Tensor, size: Optional[Tensor]):
    """timm attention with the explicit map; ToMe's prop-attn bias and metric (keys' mean)."""
    b, n, _ = x.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(x)
    d = qkv.shape[-1] // (3 * h)
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    if hasattr(attn_mod, "q_norm"):
        q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    if size is not None:
        attn = attn + size.log()[:, None, None, :, 0]
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, h * d)
    if hasattr(attn_mod, "norm"):
        out = attn_mod.norm(out)
    return attn_mod.proj(out), attn, k.mean(dim=1)


def _topk_step(x: Tensor, scores: Tensor, left: int, p: int) -> Tensor:
    """Haurum et al.'s Top-K: keep the ``left`` best-scored tokens, score order."""
    if left >= x.shape[1] - p:
        return x
    _, idx = torch.topk(scores, left, dim=1, largest=True, sorted=True)
    kept = x[:, p:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :p], kept], dim=1)


def _evit_step(x: Tensor, cls_attn: Tensor, rate: float, p: int, fuse: bool) -> Tensor:
    """EViT: keep ceil(rate * (N - P)) tokens, fuse the rest weighted by their scores."""
    n = x.shape[1] - p
    left = evit_keep_count(rate, n)
    if left >= n:
        return x
    _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
    c = x.shape[-1]
    tokens = x[:, p:]
    parts = [x[:, :p], tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))]
    if fuse:
        compl = complement(idx, n)
        non_topk = tokens.gather(1, compl.unsqueeze(-1).expand(-1, -1, c))
        weights = cls_attn.gather(1, compl).unsqueeze(-1)
        parts.append((weights * non_topk).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


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


# --------------------------------------------------------------------------- dense ToMe (ToMe-SD)

def grid_destinations(h: int, w: int, sx: int, sy: int,
                      choice: Optional[Tensor] = None) -> Tensor:
    """tomesd's destination set, as ascending token positions: mark the chosen token of every
    ``sx × sy`` cell (``choice [h // sy, w // sx]``, ``c = iy * sx + ix``; None = top-left) with
    -1 in an ``h × w`` buffer, leftover rows and columns 0, and argsort (tomesd's ``idx_buffer``)."""
    hsy, wsx = h // sy, w // sx
    if choice is None:
        choice = torch.zeros(hsy, wsx, dtype=torch.long)
    cell = torch.zeros(hsy, wsx, sy * sx, dtype=torch.long)
    cell.scatter_(2, choice.long().reshape(hsy, wsx, 1), -1)
    buf = torch.zeros(h, w, dtype=torch.long)
    buf[:hsy * sy, :wsx * sx] = cell.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    order = buf.flatten().argsort(stable=True)
    return order[:hsy * wsx].sort().values


def tomesd_match(metric: Tensor, dst_tokens: Tensor, r: int):
    """tomesd's ``bipartite_soft_matching_random2d`` for a given destination set, with tokred's
    tie rule. Returns ``(merge, unmerge, index)``: ``merge(x, mode="mean")`` and ``unmerge(x)``
    closures and the matching ``dict(a=..., unm=..., src=..., dst=...)`` (set A's positions, then
    ranks into A and partners into the destinations).

    Set B = ``dst_tokens`` (ascending), set A = every other token, ascending; ``r`` is clamped to
    ``|A|`` (no destinations: no merge). Scores and tie rule as :func:`bipartite_match`
    (``_cosine_scores``, ``_rank_matches``). Merge = tomesd's gather + scatter_reduce
    (``include_self``), layout ``[unmerged A in rank order | destinations]``; unmerge gives every
    token its output's value."""
    b, n, _ = metric.shape
    dst_pos = dst_tokens.long().to(metric.device)
    is_dst = torch.zeros(n, dtype=torch.bool, device=metric.device)
    is_dst[dst_pos] = True
    a_pos = (~is_dst).nonzero().flatten()
    r = min(r, a_pos.numel()) if dst_pos.numel() else 0
    if r <= 0:
        return (lambda x, mode="mean": x), (lambda x: x), None
    with torch.no_grad():
        unm_idx, src_idx, dst_idx = _rank_matches(_cosine_scores(metric, a_pos, dst_pos), r)

    def rows(idx: Tensor, c: int) -> Tensor:
        return idx[..., None].expand(*idx.shape, c)

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        c = x.shape[-1]
        src_all, dst = x[:, a_pos], x[:, dst_pos]
        unm = src_all.gather(1, rows(unm_idx, c))
        src = src_all.gather(1, rows(src_idx, c))
        return torch.cat([unm, dst.scatter_reduce(1, rows(dst_idx, c), src, reduce=mode)], dim=1)

    def unmerge(x: Tensor) -> Tensor:
        c, u = x.shape[-1], unm_idx.shape[1]
        unm, dst = x[:, :u], x[:, u:]
        out = x.new_zeros(b, n, c)
        out[:, dst_pos] = dst
        out.scatter_(1, rows(a_pos[unm_idx], c), unm)
        out.scatter_(1, rows(a_pos[src_idx], c), dst.gather(1, rows(dst_idx, c)))
        return out

    return merge, unmerge, dict(a=a_pos, unm=unm_idx, src=src_idx, dst=dst_idx)


def tomesd_block(blk, hidden_states: Tensor, merge, unmerge, attn: bool = True,
                 cross_attn: bool = False, mlp: bool = False,
                 encoder_hidden_states: Optional[Tensor] = None, timestep=None,
                 class_labels=None, encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
    """tomesd's patched diffusers ``BasicTransformerBlock`` (norm types "layer_norm" and
    "ada_norm_zero", no positional embedding): each chosen sub-layer runs on merged tokens and its
    output is unmerged before the residual add. ``merge``/``unmerge`` from :func:`tomesd_match`."""
    def keep(x):
        return x
    m_a, u_a = (merge, unmerge) if attn else (keep, keep)
    m_c, u_c = (merge, unmerge) if cross_attn else (keep, keep)
    m_m, u_m = (merge, unmerge) if mlp else (keep, keep)
    zero = blk.norm_type == "ada_norm_zero"
    if zero:
        norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
    else:
        norm_hs = blk.norm1(hidden_states)
    out = blk.attn1(m_a(norm_hs),
                    encoder_hidden_states=encoder_hidden_states if blk.only_cross_attention else None)
    if zero:
        out = gate_msa.unsqueeze(1) * out
    hidden_states = u_a(out) + hidden_states
    if blk.attn2 is not None:
        out = blk.attn2(m_c(blk.norm2(hidden_states)), encoder_hidden_states=encoder_hidden_states,
                        attention_mask=encoder_attention_mask)
        hidden_states = u_c(out) + hidden_states
    norm_hs = blk.norm3(hidden_states)
    if zero:
        norm_hs = norm_hs * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    out = blk.ff(m_m(norm_hs))
    if zero:
        out = gate_mlp.unsqueeze(1) * out
    return u_m(out) + hidden_states


def tomesd_patch(model, ratio: float, sx: int = 2, sy: int = 2, seed: Optional[int] = None,
                 attn: bool = True, cross_attn: bool = False, mlp: bool = False,
                 max_downsample: int = 1):
    """tomesd's ``apply_patch`` for a diffusers UNet or DiT, on ``model`` in place (pass a copy):
    a forward pre-hook records the input grid (the latent over a DiT's ``patch_size``), and every
    ``BasicTransformerBlock`` runs :func:`tomesd_block` with its own matching per call: downsample
    ``ceil(sqrt(N0 // N))`` up to ``max_downsample``, ``r = int(N * ratio)``, destinations from
    :func:`grid_destinations`, drawn as tomesd draws (``randint(sx*sy, (h//sy, w//sx, 1))`` from a
    CPU generator seeded with ``seed``, one draw per merging call; None: top-left)."""
    p = getattr(getattr(model, "config", None), "patch_size", None) or 1
    state = dict(gen=None if seed is None else torch.Generator().manual_seed(seed))

    def record(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        state["size"] = (x.shape[2] // p, x.shape[3] // p)

    def block_forward(blk, hidden_states, attention_mask=None, encoder_hidden_states=None,
                      encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                      class_labels=None, added_cond_kwargs=None):
        (h0, w0), n = state["size"], hidden_states.shape[1]
        ds = int(math.ceil(math.sqrt(h0 * w0 // n)))
        h, w, r = math.ceil(h0 / ds), math.ceil(w0 / ds), int(n * ratio)
        merge = unmerge = None
        if ds <= max_downsample and r > 0 and h >= sy and w >= sx:
            choice = None
            if state["gen"] is not None:
                choice = torch.randint(sx * sy, (h // sy, w // sx, 1), generator=state["gen"])[..., 0]
            merge, unmerge, _ = tomesd_match(hidden_states, grid_destinations(h, w, sx, sy, choice), r)
        if merge is None:
            merge = unmerge = (lambda x: x)
        return tomesd_block(blk, hidden_states, merge, unmerge, attn, cross_attn, mlp,
                            encoder_hidden_states, timestep, class_labels, encoder_attention_mask)

    model.register_forward_pre_hook(record, with_kwargs=True)
    for m in model.modules():
        if type(m).__name__ == "BasicTransformerBlock":
            m.forward = block_forward.__get__(m)
    return model
