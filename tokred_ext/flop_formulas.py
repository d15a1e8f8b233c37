"""FLOP formulas of every tokred op, for ``torch.utils.flop_counter.FlopCounterMode``.

Without a formula the counter counts an op as 0 and says nothing, so a reduced model looked
cheaper than it is (the EViT fused token, ToMe's matching and merge), and attention on the CPU was
not counted at all (torch has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu``).
Importing ``tokred_ext`` runs this module once, which registers:

* a formula for every ``tokred`` op, backward ops included (:data:`FORMULAS`);
* a formula for SDPA's CPU flash kernel and its backward, only where torch has none: the same
  count as torch's ``sdpa_flop`` for the CUDA kernels (two matmuls forward, five backward).

The counting rules (docs/flops.md): like torch, a multiply-add counts 2 FLOPs. An op counts the
multiply-adds that multiply data by data or by a data-dependent weight: dot products (ToMe's
similarities and norms, attention) and weighted sums (EViT's fused token, ToMe's ``wavg`` merge,
``routed_gather``'s routing weights); a product with no sum after it counts 2 as well, as a matmul
of inner size 1 would. Pure data movement counts 0: gathers, copies, top-k selection,
complements, plan building, source maps, unmerging, and the unweighted ``sum``/``mean``/``amax``
merges (torch counts 0 for indexing, sorting and reductions too), as does a merge of ``r = 0``,
which copies.
"""
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

__all__ = ["FORMULAS", "attention_flops", "attention_backward_flops"]

Shape = Sequence[int]
Args = Mapping[str, Any]  # an op's arguments by schema name: tensors as shapes, None as None


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def attention_flops(batch_heads: int, s_q: int, s_k: int, d_qk: int, d_v: int) -> int:
    """``softmax(q kᵀ) v`` for ``batch_heads`` independent heads: the ``q kᵀ`` and ``p v``
    matmuls, as torch's ``sdpa_flop_count`` (softmax and scaling count 0)."""
    return 2 * batch_heads * s_q * s_k * (d_qk + d_v)


def attention_backward_flops(batch_heads: int, s_q: int, s_k: int, d_qk: int, d_v: int) -> int:
    """The backward of :func:`attention_flops`, as torch's ``sdpa_backward_flop_count``: the
    scores recomputed (``q kᵀ``), ``dP = dO vᵀ``, ``dV = Pᵀ dO``, ``dQ = dS k``, ``dK = dSᵀ q``."""
    return 2 * batch_heads * s_q * s_k * (3 * d_qk + 2 * d_v)


def _zero(a: Args, out: Any) -> int:
    return 0


# --------------------------------------------------------------------------- selection

def _prune_tokens(a: Args, out: Any) -> int:
    # EViT's fused token: each dropped token times its score, summed (a [1, N - k] @ [N - k, C]
    # product per batch row). Top-K pruning (fuse=False) only copies rows.
    if not a["fuse"]:
        return 0
    b, n = a["scores"]
    k = out[1][1]
    return 2 * b * (n - k) * a["x"][2]


def _prune_tokens_backward(a: Args, out: Any) -> int:
    # The transpose of the fused token's product (dropped rows get score * grad_fused) and the
    # score gradient (<grad_fused, x_i> per dropped token): twice the forward, as for a matmul.
    if not a["fuse"]:
        return 0
    b, n = a["scores"]
    k = a["index"][1]
    return 4 * b * (n - k) * a["x"][2]


# --------------------------------------------------------------------------- merging

def _bipartite_match(a: Args, out: Any) -> int:
    # The cosine similarity of every A/B pair: na·nb dot products of length D, plus the norms
    # (one dot product per token). After the clamp, r = 0 computes nothing (no merge).
    b, n, d = a["metric"]
    r = out[1][1]
    if r == 0:
        return 0
    na, nb = (n + 1) // 2, n // 2
    return 2 * b * (na * nb + n) * d


def _bipartite_match_plan(a: Args, out: Any) -> int:
    # The same count over the partition: (N - Nb)·Nb similarities and the N norms; r = 0 (an
    # offsets row of N + 1 entries) computes nothing.
    b, n, d = a["metric"]
    nb = a["dst_tokens"][0]
    if out[1][1] == n + 1:
        return 0
    return 2 * b * ((n - nb) * nb + n) * d


def _weighted(mode: str, size: Optional[Shape], x: Shape, merged: bool) -> int:
    """A merge of ``x [B, N, C]``: ``wavg`` with sizes multiplies every token by its size and sums
    (N·C multiply-adds per batch row); the division by the summed size, like ``sum``, ``mean``
    and ``amax`` (and ``wavg`` without sizes, which is the mean), counts 0, as torch counts
    elementwise ops and reductions. Its backward scales every token's gradient by its weight,
    the transposed product: the same count. ``r = 0`` copies."""
    if not merged or mode != "wavg" or size is None:
        return 0
    return 2 * _numel(x)


def _merge(a: Args, out: Any) -> int:
    return _weighted(a["mode"], a["size"], a["x"], out[0][1] < a["x"][1])


def _merge_backward(a: Args, out: Any) -> int:
    return _weighted(a["mode"], a["size"], a["x"], a["grad_out"][1] < a["x"][1])


# --------------------------------------------------------------------------- routing

def _routed_gather(a: Args, out: Any) -> int:
    # With soft routing every gathered value is multiplied by its window's weight.
    return 0 if a["r_weight"] is None else 2 * _numel(out)


def _routed_gather_backward(a: Args, out: Any) -> int:
    # grad_kv sums weight * grad over the routed copies, grad_r_weight is <grad, kv window>: two
    # products per gathered value. Unweighted, the backward is a segmented sum of copies: 0.
    return 0 if a["r_weight"] is None else 4 * _numel(a["grad"])


def _routed_dims(a: Args):
    """Routed attention as ``n·P·heads`` independent attentions of ``wq`` queries over the
    ``topk·wk`` routed keys."""
    n, p, wq, cqk = a["q"]
    wk, cv = a["k"][2], a["v"][3]
    heads = a["num_heads"]
    return n * p * heads, wq, a["r_idx"][2] * wk, cqk // heads, cv // heads


def _routed_attention(a: Args, out: Any) -> int:
    return attention_flops(*_routed_dims(a))


def _routed_attention_backward(a: Args, out: Any) -> int:
    return attention_backward_flops(*_routed_dims(a))


Formula = Callable[[Args, Any], int]

# Every op of csrc/registration.cpp (tests/test_flops.py checks that none is missing).
FORMULAS: Dict[str, Formula] = {
    "topk": _zero, "_topk_backward": _zero,
    "gather_tokens": _zero, "_gather_tokens_backward": _zero,
    "complement": _zero,
    "prune_tokens": _prune_tokens, "_prune_tokens_backward": _prune_tokens_backward,
    "bipartite_match": _bipartite_match,
    "merge": _merge, "_merge_backward": _merge_backward,
    "unmerge": _zero, "_unmerge_backward": _zero,
    "merge_source": _zero,
    "merge_plan": _zero,
    "bipartite_match_plan": _bipartite_match_plan,
    "merge_by_plan": _merge, "_merge_by_plan_backward": _merge_backward,
    "unmerge_by_plan": _zero,
    "merge_source_by_plan": _zero,
    "routed_gather": _routed_gather, "_routed_gather_backward": _routed_gather_backward,
    "routed_attention": _routed_attention,
    "_routed_attention_backward": _routed_attention_backward,
}


def _bind(schema: torch.FunctionSchema, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict:
    """The op's arguments by name. The dispatcher drops trailing arguments left at their
    defaults, so the defaults are read back from the schema (registration.cpp stays their one
    owner)."""
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise TypeError(f"{schema.name}: argument '{arg.name}' missing from the call")
    return bound


def _counter(schema: torch.FunctionSchema, formula: Formula):
    # register_flop_formula wraps this so that tensors arrive as shapes, the outputs' shapes as
    # out_shape.
    def count(*args, out_shape=None, **kwargs) -> int:
        return int(formula(_bind(schema, args, kwargs), out_shape))

    count.__name__ = f"{formula.__name__}_flops"
    return count


def _register(packet, formula: Formula) -> None:
    # A second import (importlib.reload) would register twice, which torch refuses.
    if packet not in flop_registry:
        register_flop_formula(packet)(_counter(packet.default._schema, formula))


for _name, _formula in FORMULAS.items():
    _register(getattr(torch.ops.tokred, _name), _formula)


# --------------------------------------------------------------------------- SDPA on the CPU

def _sdpa_dims(a: Args):
    """``query [B, Hq, Sq, Dqk]``, ``key [B, Hkv, Sk, Dqk]``, ``value [B, Hkv, Sk, Dv]``; with
    grouped-query attention every query head attends (``Hkv`` divides ``Hq``). Causal masks are
    not discounted, as torch's own formulas do not."""
    b, hq, sq, dqk = a["query"]
    return b * hq, sq, a["key"][2], dqk, a["value"][3]


def _sdpa_cpu(a: Args, out: Any) -> int:
    return attention_flops(*_sdpa_dims(a))


def _sdpa_cpu_backward(a: Args, out: Any) -> int:
    return attention_backward_flops(*_sdpa_dims(a))


# Registered only where this torch lacks them, so a formula torch adds later wins.
for _name, _formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward)):
    if hasattr(torch.ops.aten, _name):
        _register(getattr(torch.ops.aten, _name), _formula)
