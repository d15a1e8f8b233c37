"""Typed wrappers of ``torch.ops.tokred.*`` and their autograd formulas.

Every op is deterministic (ties go to the lower index), takes float32/float16/bfloat16/float64
data and int64 or int32 indices, and returns int64 indices. The semantics of each op live in one
place, its family's page: docs/select.md, docs/merge.md and docs/routing.md.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.tokred


# --------------------------------------------------------------------------- selection

def topk(scores: Tensor, k: int, largest: bool = True,
         lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Segmented top-k over the last dim: ``scores [..., N] -> (values, indices) [..., k]``.

    Ties go to the lower index; ``lengths`` makes rows ragged (padding: index -1).
    Semantics: docs/select.md#semantics (topk).
    """
    return _ops.topk(scores, k, largest, lengths)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Gathers tokens: ``x [B, N, C], index [B, K] -> [B, K, C]``; index -1 gives a zero row.

    Semantics: docs/select.md#semantics (gather_tokens).
    """
    return _ops.gather_tokens(x, index)


def complement(index: Tensor, n: int) -> Tensor:
    """The indices in ``[0, n)`` missing from each row: ``index [B, K] -> [B, n - K]`` int64.

    Semantics: docs/select.md#semantics (complement).
    """
    return _ops.complement(index, n)


def prune_tokens(x: Tensor, scores: Tensor, k: int, fuse: bool = False, num_protected: int = 1,
                 keep_order: bool = False) -> Tuple[Tensor, Tensor]:
    """Keeps the ``P = num_protected`` and the ``k`` best-scored tokens; ``fuse`` adds EViT's token.

    ``x [B, P + N, C], scores [B, N] -> (out [B, P + k + fuse, C], index [B, k])``.
    Semantics: docs/select.md#semantics (prune_tokens).
    """
    return _ops.prune_tokens(x, scores, k, fuse, num_protected, keep_order)


def _topk_setup(ctx, inputs, output):
    scores = inputs[0]
    ctx.n = scores.shape[-1]
    ctx.save_for_backward(output[1])


def _topk_backward(ctx, grad_values, grad_indices):
    (indices,) = ctx.saved_tensors
    return _ops._topk_backward(grad_values.contiguous(), indices, ctx.n), None, None, None


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.n = x.shape[1]
    ctx.save_for_backward(index)


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _ops._gather_tokens_backward(grad.contiguous(), index, ctx.n), None


def _prune_setup(ctx, inputs, output):
    x, scores, k, fuse, num_protected, keep_order = inputs
    ctx.fuse = fuse
    ctx.num_protected = num_protected
    ctx.save_for_backward(x, scores, output[1])


def _prune_backward(ctx, grad_out, grad_index):
    x, scores, index = ctx.saved_tensors
    grad_x, grad_scores = _ops._prune_tokens_backward(
        grad_out.contiguous(), x, scores, index, ctx.fuse, ctx.num_protected)
    return grad_x, grad_scores, None, None, None, None


torch.library.register_autograd("tokred::topk", _topk_backward, setup_context=_topk_setup)
torch.library.register_autograd("tokred::gather_tokens", _gather_backward,
                                setup_context=_gather_setup)
torch.library.register_autograd("tokred::prune_tokens", _prune_backward,
                                setup_context=_prune_setup)


# --------------------------------------------------------------------------- merging

def bipartite_match(metric: Tensor, r: int, num_protected: int = 1
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching: ``metric [B, N, D] -> (unm_idx, src_idx, dst_idx)``.

    ``unm_idx [B, ceil(N/2) - r]``, ``src_idx [B, r]``, ``dst_idx [B, r]``; ``r`` is clamped.
    The first ``num_protected`` tokens (the prefix: class, distillation, register tokens) never
    merge. Semantics: docs/merge.md#semantics (matching, tie rule).
    """
    return _ops.bipartite_match(metric, r, num_protected)


def merge(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
          mode: str = "wavg", num_protected: int = 1) -> Tuple[Tensor, Tensor]:
    """Merges by a match: ``x [B, N, C] -> (out [B, N - r, C], size_out [B, N - r, 1])``.

    ``mode``: ``"sum"``, ``"mean"``, ``"amax"`` or ``"wavg"``; to reuse a match, :func:`merge_plan`.
    Semantics: docs/merge.md#semantics (merge).
    """
    return _ops.merge(x, size, unm_idx, src_idx, dst_idx, mode, num_protected)


def unmerge(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
            num_protected: int = 1) -> Tensor:
    """The inverse layout of :func:`merge`: ``[B, n - r, C] -> [B, n, C]``.

    Merged sources receive a copy of their destination.
    Semantics: docs/merge.md#semantics (unmerge).
    """
    return _ops.unmerge(x, unm_idx, src_idx, dst_idx, n, num_protected)


def merge_source(source: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
                 n: int, num_protected: int = 1) -> Tensor:
    """Source tracking: the map ``source [B, N0]`` (None: identity of ``n``) after the merge, int64.

    Semantics: docs/merge.md#semantics (source tracking).
    """
    return _ops.merge_source(source, unm_idx, src_idx, dst_idx, n, num_protected)


def source_onehot(source: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Upstream ToMe's ``source`` matrix ``[B, n, N0]`` from a source map ``[B, N0]``.

    ``out[b, i, p] = 1`` if original patch ``p`` is in current token ``i``.
    Semantics: docs/merge.md#semantics (source tracking).
    """
    return torch.nn.functional.one_hot(source.long(), n).transpose(1, 2).to(dtype)


class MergePlan(NamedTuple):
    """A ToMe merge plan from :func:`merge_plan`.

    ``dest [B, N]``, ``offsets [B, N - r + 1]``, ``members [B, N]`` (CSR, one row per batch).

    Semantics: docs/merge.md#semantics (the plan as a value).
    """
    dest: Tensor
    offsets: Tensor
    members: Tensor


def merge_plan(unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
               num_protected: int = 1) -> MergePlan:
    """The merge plan of a match of ``n`` tokens, built once per step for the ``*_by_plan`` ops.

    Semantics: docs/merge.md#semantics (the plan as a value).
    """
    dest, offsets, members = _ops.merge_plan(unm_idx, src_idx, dst_idx, n, num_protected)
    return MergePlan(dest, offsets, members)


def bipartite_match_plan(metric: Tensor, dst_tokens: Tensor, r: int) -> MergePlan:
    """ToMe's matching over an explicit partition (tomesd's, for dense models), as its plan.

    Destinations are the tokens ``dst_tokens [Nb]`` (strictly ascending positions, shared by the
    batch), sources every other token; ``r`` is clamped to the sources. The plan's outputs are
    ``[unmerged sources (rank order) | destinations]``; ``merge_by_plan(x, None, plan, "mean")``
    merges and ``unmerge_by_plan`` gives every token its output back.
    Semantics: docs/merge.md#semantics (dense partitions).
    """
    dest, offsets, members = _ops.bipartite_match_plan(metric, dst_tokens, r)
    return MergePlan(dest, offsets, members)


def merge_by_plan(x: Tensor, size: Optional[Tensor], plan: MergePlan,
                  mode: str = "wavg") -> Tuple[Tensor, Tensor]:
    """:func:`merge` with a plan from :func:`merge_plan`: ``[B, N, C] -> [B, N - r, C]``.

    Semantics: docs/merge.md#semantics (the plan as a value).
    """
    return _ops.merge_by_plan(x, size, plan.dest, plan.offsets, plan.members, mode)


def unmerge_by_plan(x: Tensor, plan: MergePlan) -> Tensor:
    """:func:`unmerge` with a plan from :func:`merge_plan`: ``[B, N - r, C] -> [B, N, C]``.

    Semantics: docs/merge.md#semantics (the plan as a value).
    """
    return _ops.unmerge_by_plan(x, plan.dest, plan.offsets, plan.members)


def merge_source_by_plan(source: Optional[Tensor], plan: MergePlan) -> Tensor:
    """:func:`merge_source` with a plan from :func:`merge_plan` (None: a copy of ``plan.dest``).

    Semantics: docs/merge.md#semantics (the plan as a value).
    """
    return _ops.merge_source_by_plan(source, plan.dest, plan.offsets, plan.members)


def _merge_by_plan_setup(ctx, inputs, output):
    x, size, dest, offsets, members, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(x, size, dest, offsets, members)


def _merge_by_plan_backward(ctx, grad_out, grad_size):
    x, size, dest, offsets, members = ctx.saved_tensors
    grad_x = _ops._merge_by_plan_backward(grad_out.contiguous(), x, size, dest, offsets, members,
                                          ctx.mode)
    return grad_x, None, None, None, None, None


def _unmerge_by_plan_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _unmerge_by_plan_backward(ctx, grad):
    # unmerge is a gather by dest, so its transpose is the plan's segmented sum.
    dest, offsets, members = ctx.saved_tensors
    grad_x, _ = _ops.merge_by_plan(grad.contiguous(), None, dest, offsets, members, "sum")
    return grad_x, None, None, None


def _merge_setup(ctx, inputs, output):
    x, size, unm_idx, src_idx, dst_idx, mode, num_protected = inputs
    ctx.mode = mode
    ctx.num_protected = num_protected
    ctx.save_for_backward(x, size, unm_idx, src_idx, dst_idx)


def _merge_backward(ctx, grad_out, grad_size):
    x, size, unm_idx, src_idx, dst_idx = ctx.saved_tensors
    grad_x = _ops._merge_backward(grad_out.contiguous(), x, size, unm_idx, src_idx, dst_idx,
                                  ctx.mode, ctx.num_protected)
    return grad_x, None, None, None, None, None, None


def _unmerge_setup(ctx, inputs, output):
    x, unm_idx, src_idx, dst_idx, n, num_protected = inputs
    ctx.num_protected = num_protected
    ctx.save_for_backward(unm_idx, src_idx, dst_idx)


def _unmerge_backward(ctx, grad):
    unm_idx, src_idx, dst_idx = ctx.saved_tensors
    grad_x = _ops._unmerge_backward(grad.contiguous(), unm_idx, src_idx, dst_idx,
                                    ctx.num_protected)
    return grad_x, None, None, None, None, None


torch.library.register_autograd("tokred::merge", _merge_backward, setup_context=_merge_setup)
torch.library.register_autograd("tokred::unmerge", _unmerge_backward,
                                setup_context=_unmerge_setup)
torch.library.register_autograd("tokred::merge_by_plan", _merge_by_plan_backward,
                                setup_context=_merge_by_plan_setup)
torch.library.register_autograd("tokred::unmerge_by_plan", _unmerge_by_plan_backward,
                                setup_context=_unmerge_by_plan_setup)

# --------------------------------------------------------------------------- routing

def routed_gather(kv: Tensor, r_idx: Tensor, r_weight: Optional[Tensor] = None) -> Tensor:
    """BiFormer's K/V gather: ``kv [n, P, w2, c], r_idx [n, P, topk] -> [n, P, topk, w2, c]``.

    ``out[b, i, t] = kv[b, r_idx[b, i, t]]``, times ``r_weight`` when given.
    Semantics: docs/routing.md#routed_gather.
    """
    return _ops.routed_gather(kv, r_idx, r_weight)


def routed_attention(q: Tensor, k: Tensor, v: Tensor, r_idx: Tensor, num_heads: int,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """Fused bi-level routing attention (BiFormer), forward and backward.

    ``q [n, P, wq, cqk], k [n, P, wk, cqk], v [n, P, wk, cv], r_idx [n, P, topk]`` ->
    ``(out [n, P, wq, cv], lse [n, P, num_heads, wq])``.
    Semantics: docs/routing.md#routed_attention.
    """
    return _ops.routed_attention(q, k, v, r_idx, num_heads, scale)


def _routed_gather_setup(ctx, inputs, output):
    kv, r_idx, r_weight = inputs
    ctx.weighted = r_weight is not None
    ctx.save_for_backward(kv, r_idx, r_weight)


def _routed_gather_backward(ctx, grad):
    kv, r_idx, r_weight = ctx.saved_tensors
    grad_kv, grad_w = _ops._routed_gather_backward(grad.contiguous(), kv, r_idx,
                                                   r_weight if ctx.weighted else None)
    return grad_kv, None, (grad_w if ctx.weighted else None)


def _routed_attention_setup(ctx, inputs, output):
    q, k, v, r_idx, num_heads, scale = inputs
    out, lse = output
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, r_idx, out, lse)


def _routed_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, r_idx, out, lse = ctx.saved_tensors
    dq, dk, dv = _ops._routed_attention_backward(grad_out.contiguous(), q, k, v, r_idx, out, lse,
                                                 ctx.num_heads, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("tokred::routed_gather", _routed_gather_backward,
                                setup_context=_routed_gather_setup)
torch.library.register_autograd("tokred::routed_attention", _routed_attention_backward,
                                setup_context=_routed_attention_setup)


# --------------------------------------------------------------------------- second order

# The backward ops compute first-order gradients only. Without an autograd formula a gradient of
# a gradient (create_graph=True, then backward again) would treat them as constants and be
# silently wrong, so differentiating one raises instead.
BACKWARD_OPS = ("_topk_backward", "_gather_tokens_backward", "_prune_tokens_backward",
                "_merge_backward", "_unmerge_backward", "_merge_by_plan_backward",
                "_routed_gather_backward", "_routed_attention_backward")


def _refuse_double_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"tokred::{name}: tokred's ops have first-order gradients only; a gradient of their "
            "gradient (double backward, e.g. a gradient penalty) is not supported")
    return backward


for _name in BACKWARD_OPS:
    torch.library.register_autograd(f"tokred::{_name}", _refuse_double_backward(_name))
