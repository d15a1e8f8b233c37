"""Typed wrappers of ``torch.ops.tokred.*`` and their autograd formulas.

Conventions shared by every op:

* Results are deterministic and bitwise repeatable. Ties go to the lower index. ``torch.topk`` and
  ``torch.argsort`` leave tie order unspecified, so they can disagree with tokred on ties.
* Floating dtypes float32, float16, bfloat16 and float64; accumulation in float32 or wider.
* Index inputs may be int64 or int32; index outputs are int64.
* Backward passes are ops of their own (``tokred::_<name>_backward``), computed as deterministic
  segmented sums, never with atomics.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.tokred


# --------------------------------------------------------------------------- selection

def topk(scores: Tensor, k: int, largest: bool = True,
         lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Segmented top-k over the last dimension.

    Every leading index is one row (segment) of ``N = scores.shape[-1]`` entries. Returns
    ``(values, indices)`` of shape ``[..., k]``, sorted by score (descending if ``largest``).
    Ties go to the lower index and NaN ranks above +inf, as in ``torch.topk``; unlike
    ``torch.topk`` the order of tied entries is fixed.

    ``lengths`` (int, shape ``scores.shape[:-1]``) makes rows ragged: row ``r`` considers only its
    first ``lengths[r]`` entries, and slots past a short row's length hold index -1 and value
    -inf (+inf when ``largest=False``). Requires ``0 <= k <= N``. ``values`` is differentiable
    with respect to ``scores``; ``indices`` is not.
    """
    return _ops.topk(scores, k, largest, lengths)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Gathers tokens: ``out[b, j] = x[b, index[b, j]]``.

    ``x`` is ``[B, N, C]`` with any strides, ``index`` is ``[B, K]`` (int64 or int32) with values
    in ``[0, N)``, or -1 for padding (a zero row). Returns ``[B, K, C]``. The gradient with
    respect to ``x`` sums duplicate indices in a fixed order.
    """
    return _ops.gather_tokens(x, index)


def complement(index: Tensor, n: int) -> Tensor:
    """The indices in ``[0, n)`` missing from each row of ``index`` ``[B, K]``, ascending.

    Returns int64 ``[B, n - K]``. Duplicate or out-of-range indices are an error.
    """
    return _ops.complement(index, n)


def prune_tokens(x: Tensor, scores: Tensor, k: int, fuse: bool = False, num_protected: int = 1,
                 keep_order: bool = False) -> Tuple[Tensor, Tensor]:
    """Keeps the ``k`` best-scored tokens; with ``fuse``, adds EViT's fused token.

    ``x`` is ``[B, P + N, C]`` whose first ``P = num_protected`` tokens (class, distillation) are
    always kept; ``scores`` ``[B, N]`` rank the other ``N`` tokens. Returns
    ``out = [protected | k kept | fused if fuse]`` of shape ``[B, P + k + fuse, C]`` and
    ``index`` ``[B, k]``, the kept positions among the ``N`` scored tokens in the order of ``out``.

    Kept tokens come in descending score order (ties: lower index first), or in ascending
    position order with ``keep_order``. The fused token is ``sum(scores[i] * x[P + i])`` over the
    dropped tokens, unnormalised, exactly as EViT. ``fuse=False`` is Top-K pruning. Gradients
    flow to ``x`` and, through the fused token, to ``scores``.
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

def bipartite_match(metric: Tensor, r: int, class_token: bool = True,
                    distill_token: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching on ``metric`` ``[B, N, D]``.

    Set A is the even positions of the sequence, set B the odd ones. Each A token's partner is
    its most cosine-similar B token (the first maximum); the ``r`` A tokens with the most similar
    partners merge. The class token's row (A[0]) and the distillation token's column (B[0]) are
    excluded, and ``r`` is clamped to ``(N - protected) // 2`` as upstream; ``r <= 0`` (after
    clamping) is no merge. A tokens are ranked by descending similarity with ties to the lower
    index (upstream's ``argsort`` leaves ties unspecified).

    Returns int64 ``unm_idx`` ``[B, ceil(N/2) - r]`` (unmerged A tokens: ascending with a class
    token, else by rank; ascending when ``r == 0``), ``src_idx`` ``[B, r]`` (merged A tokens, by
    rank) and ``dst_idx`` ``[B, r]`` (their B partners). Not differentiable.
    """
    return _ops.bipartite_match(metric, r, class_token, distill_token)


def merge(x: Tensor, size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
          mode: str = "wavg", distill_token: bool = False) -> Tuple[Tensor, Tensor]:
    """Merges ``x`` ``[B, N, C]`` by a match: ``[B, N - r, C]`` laid out ``[unmerged A | B]``.

    With ``distill_token`` the layout is upstream's ``[unm[0], B[0], unm[1:], B[1:]]``. Each B
    token reduces itself and its sources (``include_self`` as upstream): ``mode`` ``"sum"``,
    ``"mean"``, ``"amax"``, or ``"wavg"``, the ``size``-weighted average of upstream
    ``merge_wavg`` (``size`` ``[B, N, 1]`` in x's dtype; None means ones). Returns the merged
    tokens and the summed sizes ``[B, N - r, 1]`` (in every mode). ``r == 0`` returns copies.
    Sums run in ascending token order in float32 or wider, never with atomics. Differentiable
    with respect to ``x``; ``size`` carries no gradient. Builds the merge plan on every call (and
    again in the backward): where one match feeds several ops, build it once with
    :func:`merge_plan` and use :func:`merge_by_plan`.
    """
    return _ops.merge(x, size, unm_idx, src_idx, dst_idx, mode, distill_token)


def unmerge(x: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
            distill_token: bool = False) -> Tensor:
    """The inverse layout of :func:`merge`: ``[B, n - r, C] -> [B, n, C]``.

    Every token goes back to its original position and every merged source receives a copy of
    its destination (ToMe for Stable Diffusion, dense outputs). Differentiable with respect to
    ``x``.
    """
    return _ops.unmerge(x, unm_idx, src_idx, dst_idx, n, distill_token)


def merge_source(source: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor,
                 n: int, distill_token: bool = False) -> Tensor:
    """Source tracking: updates the map from original patches to current tokens.

    ``source`` ``[B, N0]`` (int) holds, for every original patch, the position of the token that
    contains it among the current ``n`` tokens; None stands for the identity ``[B, n]``. Returns
    the int64 map after the merge, positions in ``[0, n - r)``. Use :func:`source_onehot` for
    upstream's ``[B, N, N0]`` layout.
    """
    return _ops.merge_source(source, unm_idx, src_idx, dst_idx, n, distill_token)


def source_onehot(source: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Upstream ToMe's ``source`` matrix ``[B, n, N0]`` from a source map ``[B, N0]``.

    ``out[b, i, p] = 1`` if original patch ``p`` is in current token ``i``.
    """
    return torch.nn.functional.one_hot(source.long(), n).transpose(1, 2).to(dtype)


class MergePlan(NamedTuple):
    """A ToMe merge plan, built once per step by :func:`merge_plan` (CSR, one row per batch).

    ``dest`` ``[B, N]``: the output token of every input token. ``offsets`` ``[B, N - r + 1]``
    and ``members`` ``[B, N]``: output ``o`` reduces ``members[b, offsets[b, o]:offsets[b, o + 1]]``,
    ascending. Ops that take a plan check that it is one (any other tensors are an error).
    """
    dest: Tensor
    offsets: Tensor
    members: Tensor


def merge_plan(unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, n: int,
               distill_token: bool = False) -> MergePlan:
    """The merge plan of a match of ``n`` tokens (from :func:`bipartite_match`).

    Build it once per ToMe step and pass it to :func:`merge_by_plan`, :func:`unmerge_by_plan`
    and :func:`merge_source_by_plan`: the indices are validated and grouped once, and the
    backward passes reuse the plan. Not differentiable.
    """
    dest, offsets, members = _ops.merge_plan(unm_idx, src_idx, dst_idx, n, distill_token)
    return MergePlan(dest, offsets, members)


def merge_by_plan(x: Tensor, size: Optional[Tensor], plan: MergePlan,
                  mode: str = "wavg") -> Tuple[Tensor, Tensor]:
    """:func:`merge` with a plan from :func:`merge_plan`: ``[B, N, C] -> [B, N - r, C]``."""
    return _ops.merge_by_plan(x, size, plan.dest, plan.offsets, plan.members, mode)


def unmerge_by_plan(x: Tensor, plan: MergePlan) -> Tensor:
    """:func:`unmerge` with a plan from :func:`merge_plan`: ``[B, N - r, C] -> [B, N, C]``."""
    return _ops.unmerge_by_plan(x, plan.dest, plan.offsets, plan.members)


def merge_source_by_plan(source: Optional[Tensor], plan: MergePlan) -> Tensor:
    """:func:`merge_source` with a plan from :func:`merge_plan` (None: a copy of ``plan.dest``)."""
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
    x, size, unm_idx, src_idx, dst_idx, mode, distill_token = inputs
    ctx.mode = mode
    ctx.distill_token = distill_token
    ctx.save_for_backward(x, size, unm_idx, src_idx, dst_idx)


def _merge_backward(ctx, grad_out, grad_size):
    x, size, unm_idx, src_idx, dst_idx = ctx.saved_tensors
    grad_x = _ops._merge_backward(grad_out.contiguous(), x, size, unm_idx, src_idx, dst_idx,
                                  ctx.mode, ctx.distill_token)
    return grad_x, None, None, None, None, None, None


def _unmerge_setup(ctx, inputs, output):
    x, unm_idx, src_idx, dst_idx, n, distill_token = inputs
    ctx.distill_token = distill_token
    ctx.save_for_backward(unm_idx, src_idx, dst_idx)


def _unmerge_backward(ctx, grad):
    unm_idx, src_idx, dst_idx = ctx.saved_tensors
    grad_x = _ops._unmerge_backward(grad.contiguous(), unm_idx, src_idx, dst_idx,
                                    ctx.distill_token)
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
    """BiFormer's K/V gather: ``out[b, i, t] = kv[b, r_idx[b, i, t]]`` (times ``r_weight``).

    ``kv`` is ``[n, P, w2, c]`` (P regions of w2 tokens), ``r_idx`` ``[n, P, topk]`` (int64 or
    int32, values in ``[0, P)``), ``r_weight`` optional ``[n, P, topk]`` (upstream's
    ``mul_weight='soft'``). Returns ``[n, P, topk, w2, c]`` in kv's dtype. Gradients flow to
    ``kv`` and ``r_weight`` as deterministic segmented sums (no atomics). This materialises
    topk copies of kv, as upstream does; :func:`routed_attention` avoids it.
    """
    return _ops.routed_gather(kv, r_idx, r_weight)


def routed_attention(q: Tensor, k: Tensor, v: Tensor, r_idx: Tensor, num_heads: int,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """Fused bi-level routing attention (BiFormer), forward and backward.

    ``q`` ``[n, P, wq, cqk]``, ``k`` ``[n, P, wk, cqk]``, ``v`` ``[n, P, wk, cv]``, ``r_idx``
    ``[n, P, topk]``. Query window ``i`` attends, per head (heads are contiguous channel chunks
    of size ``cqk / num_heads`` and ``cv / num_heads``), to the ``topk * wk`` keys of windows
    ``r_idx[b, i, :]`` in routing order: ``softmax(scale * q k^T) v``, exactly upstream's
    gather + matmul result, without the gathered K/V buffer or the attention matrix.

    Returns ``(out [n, P, wq, cv], lse [n, P, num_heads, wq])``; ``lse`` (float32, float64 for
    float64 inputs) is the log-sum-exp of the scaled scores and is not differentiable.
    Gradients flow to q, k and v; dk and dv are deterministic reductions over the query windows
    that routed to each key window.
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
