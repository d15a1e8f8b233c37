"""Token-reduction methods built from tokred ops: Top-K pruning, EViT and ToMe.

Each pruning function takes either the attention map ``[B, H, N, N]`` or the scores
``[B, N - P]`` (the class token's attention; in a model without a class token, the mean attention
each token receives), and a keep count (int) or rate (float). The counting rules themselves
(keep counts, ToMe's schedule and clamp) live in :mod:`tokred_ext.rules`; this module only
imports ``ops`` and ``rules``.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .rules import evit_keep_count, parse_r, topk_keep_count

__all__ = ["class_attention", "mean_attention", "scores_from", "topk_prune", "evit_prune",
           "tome_merge", "parse_r", "grid_choice", "grid_destinations", "dense_merge_plan"]


def class_attention(attn: Tensor, num_protected: int = 1) -> Tensor:
    """EViT/Top-K scores ``[B, N - P]``: the class token's attention to the other tokens, mean
    over heads."""
    return attn[:, :, 0, num_protected:].mean(dim=1)


def mean_attention(attn: Tensor, num_protected: int = 0) -> Tensor:
    """Scores ``[B, N - P]`` for a model without a class token: the attention each token after
    the ``P`` prefix tokens receives, mean over all queries and heads (following the literature:
    with no class token to ask, a token's importance is the attention the others pay it)."""
    return attn[:, :, :, num_protected:].mean(dim=(1, 2))


def scores_from(attn_or_scores: Tensor, num_protected: int = 1, class_token: bool = True) -> Tensor:
    """Scores ``[B, N - P]`` from an attention map (:func:`class_attention`, or
    :func:`mean_attention` when ``class_token`` is False), or the scores unchanged."""
    if attn_or_scores.dim() == 4:
        if class_token:
            return class_attention(attn_or_scores, num_protected)
        return mean_attention(attn_or_scores, num_protected)
    if attn_or_scores.dim() != 2:
        raise ValueError("expected the attention map [B, H, N, N] or scores [B, N - P], got shape "
                         f"{list(attn_or_scores.shape)}")
    return attn_or_scores


def _identity_index(x: Tensor, n: int) -> Tensor:
    return torch.arange(n, device=x.device).expand(x.shape[0], n)


def topk_prune(x: Tensor, attn_or_scores: Tensor, keep: Union[int, float], num_protected: int = 1,
               n_initial: Optional[int] = None, keep_order: bool = False,
               class_token: bool = True) -> Tuple[Tensor, Tensor]:
    """Top-K pruning (Haurum et al.): keeps the best-scored tokens, drops the rest.

    ``keep`` is a token count (int) or a rate (float) turned into ``int(keep * n_initial)``, with
    ``n_initial`` the initial number of scored tokens (default: the current number). Returns the
    reduced tokens ``[B, P + k, C]`` and the kept positions ``[B, k]``; keeping every token
    returns ``x`` itself. With an attention map, ``class_token`` picks the scores
    (:func:`scores_from`).
    """
    scores = scores_from(attn_or_scores, num_protected, class_token)
    n = scores.shape[1]
    if isinstance(keep, int):
        k = keep
    elif n_initial is None or n_initial == 0:
        k = topk_keep_count(keep, n)
    else:
        k = topk_keep_count(keep, n_initial)
    if k >= n:
        return x, _identity_index(x, n)
    return ops.prune_tokens(x, scores, k, fuse=False, num_protected=num_protected,
                            keep_order=keep_order)


def evit_prune(x: Tensor, attn_or_scores: Tensor, keep: Union[int, float], num_protected: int = 1,
               fuse: bool = True, keep_order: bool = False,
               class_token: bool = True) -> Tuple[Tensor, Tensor]:
    """EViT: keeps the most attended tokens and fuses the rest into one extra token.

    ``keep`` is a token count (int) or a rate (float) turned into ``ceil(keep * N)`` with ``N``
    the current number of scored tokens. Returns ``[B, P + k + 1, C]`` (without the extra token
    when ``fuse=False``) and the kept positions; keeping every token returns ``x`` itself.
    """
    scores = scores_from(attn_or_scores, num_protected, class_token)
    n = scores.shape[1]
    if isinstance(keep, int):
        k = keep
    else:
        k = evit_keep_count(keep, n)
    if k >= n:
        return x, _identity_index(x, n)
    # Scores keep their own dtype (e.g. float32 attention under autocast): the op accumulates in
    # float32 and rounding them to x's dtype would only create ties.
    return ops.prune_tokens(x, scores, k, fuse=fuse, num_protected=num_protected,
                            keep_order=keep_order)


def tome_merge(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor] = None,
               num_protected: int = 1,
               source: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One ToMe step: bipartite matching on ``metric``, then the size-weighted merge of ``x``.

    Upstream's ``bipartite_soft_matching`` followed by ``merge_wavg`` (and ``merge_source`` when
    tracing sources): ``x`` ``[B, N, C]``, ``metric`` ``[B, N, D]`` (ToMe uses the keys averaged
    over heads), ``size`` ``[B, N, 1]`` (None: every token has size 1). The merge plan is built
    once and serves the merge, its backward and the source map. The first ``num_protected``
    tokens (the model's prefix: class, distillation, register tokens) never merge and stay first.
    Returns the merged tokens ``[B, N - r, C]``, their sizes ``[B, N - r, 1]`` and, when
    ``source`` (``[B, N0]`` int64) is given, the updated map (None otherwise, as upstream skips
    ``merge_source`` unless tracing).
    Semantics of the ops it runs (the clamp of ``r``, the source map): docs/merge.md.
    """
    if metric.dim() != 3 or x.dim() != 3 or metric.shape[:2] != x.shape[:2]:
        # The ops would accept both and fail later on the plan, naming neither.
        raise ValueError(f"tome_merge: metric [B, N, D] must score x's [B, N] = {list(x.shape[:2])} "
                         f"tokens, got metric of shape {list(metric.shape)}")
    unm_idx, src_idx, dst_idx = ops.bipartite_match(metric, r, num_protected)
    plan = ops.merge_plan(unm_idx, src_idx, dst_idx, x.shape[1], num_protected)
    out, size = ops.merge_by_plan(x, size, plan, "wavg")
    if source is not None:
        source = ops.merge_source_by_plan(source, plan)
    return out, size, source


# --------------------------------------------------------------------------- dense ToMe (ToMe-SD)

def grid_choice(h: int, w: int, sx: int, sy: int, generator: torch.Generator) -> Tensor:
    """Draws the destination of every ``sx × sy`` cell of an ``h × w`` token grid: an int64
    ``[h // sy, w // sx]`` of values in ``[0, sx * sy)``, from ``generator`` (on its device; the
    diffusers patch keeps a CPU one, so the draw is the same on every device). One
    ``torch.randint`` call, so a generator seeded alike gives tomesd's draw."""
    return torch.randint(sx * sy, (h // sy, w // sx), generator=generator,
                         device=generator.device)


def grid_destinations(h: int, w: int, sx: int, sy: int, choice: Optional[Tensor] = None,
                      device: Optional[torch.device] = None) -> Tensor:
    """The destination set of dense ToMe (tomesd's 2D partition): one token per ``sx × sy`` cell
    of the row-major ``h × w`` token grid, as ascending int64 token positions
    ``[(h // sy) * (w // sx)]``.

    ``choice`` ``[h // sy, w // sx]`` picks the token within each cell, ``c = iy * sx + ix``
    (None: the top-left token of every cell, tomesd's ``use_rand=False``). The rows and columns
    left over when ``sy`` does not divide ``h`` or ``sx`` does not divide ``w`` hold no
    destination, as in tomesd.
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"grid_destinations: the strides sx, sy must be positive, got {sx}, {sy}")
    hc, wc = h // sy, w // sx
    if choice is None:
        # No value check here: nothing data-dependent, so export traces it with symbolic sizes.
        choice = torch.zeros(hc, wc, dtype=torch.long, device=device)
    else:
        if tuple(choice.shape) != (hc, wc):
            raise ValueError(f"grid_destinations: choice must have shape [{hc}, {wc}] (one entry "
                             f"per {sx}x{sy} cell of a {h}x{w} grid), got {list(choice.shape)}")
        if choice.numel() and (bool((choice < 0).any()) or bool((choice >= sx * sy).any())):
            raise ValueError(f"grid_destinations: choice values must lie in [0, {sx * sy}), got "
                             f"{int(choice.min())}..{int(choice.max())}")
        choice = choice.to(device=device if device is not None else choice.device, dtype=torch.long)
    cy = torch.arange(hc, device=choice.device)[:, None]
    cx = torch.arange(wc, device=choice.device)[None, :]
    rows = cy * sy + torch.div(choice, sx, rounding_mode="floor")
    cols = cx * sx + choice % sx
    return (rows * w + cols).flatten().sort().values


def dense_merge_plan(metric: Tensor, dst_tokens: Tensor, r: int) -> ops.MergePlan:
    """Dense ToMe's matching (tomesd's ``bipartite_soft_matching_random2d``) as a merge plan:
    ``dst_tokens`` (ascending positions, e.g. from :func:`grid_destinations`) is set B, every
    other token is set A, and the ``r`` best-matched A tokens (``r`` clamped to ``|A|``) merge
    into their most similar destination. The plan serves ``ops.merge_by_plan(x, None, plan,
    "mean")`` (layout ``[unmerged A in rank order | destinations ascending]``) and
    ``ops.unmerge_by_plan``. Semantics and tie rule: docs/merge.md."""
    return ops.bipartite_match_plan(metric, dst_tokens, r)
