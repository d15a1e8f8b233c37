"""ONNX export of models that call tokred ops: a translation of each forward op into standard ONNX.

``torch.onnx.export(..., dynamo=True)`` knows no ``tokred::*`` op. ``TRANSLATIONS`` maps each one
to a function of standard ONNX operators (opset 18: TopK, ArgMax, Gather, GatherElements, MatMul,
Softmax, ReduceSum/Max/LogSumExp, Where, ...), with no custom domain, no ScatterElements or
ScatterND (with or without a reduction) and no data-dependent sizes: every k, r and token count
is a constant of the graph, as in the eager model. Any ONNX runtime runs the result, and the
constructs TensorRT rejects are absent. ``docs/export.md`` lists what each op becomes.

    tokred_ext.onnx.export(model, (images,), "model.onnx")       # dynamic batch axis

The exported graph trusts the indices it passes between ops (a plan built inside the graph is
well formed); the eager ops check theirs. Where the eager kernels sum in a fixed order in float32,
the graph sums in the runtime's order in float32: results agree within float32 rounding.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ._batch_axis import dynamic_batch_shapes
from .rules import tome_clamp_r, tome_partition_clamp_r

__all__ = ["TRANSLATIONS", "OPSET", "export"]

OPSET = 18

try:  # onnxscript ships with torch's ONNX exporter; tokred's kernels never need it
    from onnxscript import ir
    from onnxscript import opset18 as op
except ImportError:  # pragma: no cover - reported by export()
    ir = op = None


# ------------------------------------------------------------------------------------ helpers

def _ints(*values: int):
    """A 1-D int64 constant."""
    return op.Constant(value_ints=list(values))


def _int(value: int):
    """A scalar int64 constant."""
    return op.Constant(value_int=value)


def _range(stop):
    """0, 1, ..., stop - 1 (stop an int or a scalar tensor)."""
    return op.Range(_int(0), _int(stop) if isinstance(stop, int) else stop, _int(1))


def _like(value: float, ref):
    """A scalar of ref's dtype."""
    return op.CastLike(op.Constant(value_float=float(value)), ref)


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(
            f"tokred's ONNX translation needs a static {what} (got the symbolic size {dim}): "
            "every k, r and token count is a constant of the graph; only the batch axis may be "
            "dynamic")
    return dim


def _accumulator(x):
    """x in its accumulation dtype: float32 for float16/bfloat16, as the eager kernels."""
    if x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return op.Cast(x, to=ir.DataType.FLOAT)
    return x


def _slice(x, start: int, end: int, axis: int, step: int = 1):
    return op.Slice(x, _ints(start), _ints(end), _ints(axis), _ints(step))


def _expand_rows(index, x):
    """index [B, K] -> [B, K, C] for GatherElements over x's token axis."""
    return op.Expand(op.Unsqueeze(index, _ints(-1)),
                     op.Concat(op.Shape(index), op.Shape(x, start=2, end=3), axis=0))


def _gather_rows(x, index):
    """x [B, N, C], index [B, K] -> x[b, index[b, k], :]."""
    return op.GatherElements(x, _expand_rows(index, x), axis=1)


def _smallest(values, count: int):
    """The `count` smallest entries of each row, ascending, ties to the lower position."""
    return op.TopK(values, _ints(count), axis=-1, largest=0, sorted=1)


# ------------------------------------------------------------------------------------ selection

def topk(scores, k: int, largest: bool = True, lengths=None):
    pad = float("-inf") if largest else float("inf")
    if lengths is not None:  # positions past a row's length never win, and report padding
        n = _static(scores.shape[-1], "row length")
        length = op.Unsqueeze(op.Cast(lengths, to=ir.DataType.INT64), _ints(-1))
        inside = op.Less(_range(n), length)
        scores = op.Where(inside, scores, _like(pad, scores))
    values, indices = op.TopK(scores, _ints(k), axis=-1, largest=int(largest), sorted=1)
    if lengths is not None:
        filled = op.Less(_range(k), length)
        values = op.Where(filled, values, _like(pad, values))
        indices = op.Where(filled, indices, _ints(-1))
    return values, indices


def gather_tokens(x, index):
    """Rows of x by index; -1 (padding) gives a zero row."""
    index = op.Cast(index, to=ir.DataType.INT64)
    valid = op.GreaterOrEqual(index, _int(0))
    rows = _gather_rows(x, op.Where(valid, index, _int(0)))
    return op.Where(op.Unsqueeze(valid, _ints(-1)), rows, _like(0.0, rows))


def _missing(index, n: int, k: int):
    """The n - k positions of [0, n) absent from each row of index [B, k] (distinct), ascending."""
    batch = op.Shape(index, start=0, end=1)
    if k == 0:
        return op.Expand(_range(n), op.Concat(batch, _ints(n), axis=0))
    if k == n:
        return op.Expand(_ints(0), op.Concat(batch, _ints(0), axis=0))
    position = _range(n)               # [n]
    hit = op.Equal(op.Unsqueeze(op.Cast(index, to=ir.DataType.INT64), _ints(-1)), position)
    present = op.Cast(op.ReduceMax(op.Cast(hit, to=ir.DataType.INT32), _ints(1), keepdims=0),
                      to=ir.DataType.BOOL)                                    # [B, n]
    # Present positions sort after every absent one, so the n - k smallest keys are the absent
    # positions in ascending order.
    key = op.Where(present, op.Add(position, _int(n)), position)
    missing, _ = _smallest(key, n - k)
    return missing


def complement(index, n: int):
    return _missing(index, n, _static(index.shape[1], "index count"))


def prune_tokens(x, scores, k: int, fuse: bool = False, num_protected: int = 1,
                 keep_order: bool = False):
    n = _static(scores.shape[1], "token count")
    P = num_protected
    _, index = op.TopK(scores, _ints(k), axis=1, largest=1, sorted=1)
    if keep_order:
        index, _ = _smallest(index, k)
    tokens = _slice(x, P, P + n, axis=1)
    parts = ([_slice(x, 0, P, axis=1)] if P > 0 else []) + [_gather_rows(tokens, index)]
    if fuse:
        parts.append(_fused_token(x, tokens, scores, index, n, k))
    return op.Concat(*parts, axis=1), index


def _fused_token(x, tokens, scores, index, n: int, k: int):
    """EViT's extra token: Σ score·x over the dropped tokens, gathered in ascending order (no
    mask multiply, so a non-finite kept token cannot leak into it)."""
    if k == n:
        shape = op.Concat(op.Shape(x, start=0, end=1), _ints(1), op.Shape(x, start=2, end=3),
                          axis=0)
        return op.Expand(_like(0.0, x), shape)
    dropped = _missing(index, n, k)
    rows = _accumulator(_gather_rows(tokens, dropped))
    weights = op.CastLike(op.GatherElements(scores, dropped, axis=1), rows)
    fused = op.ReduceSum(op.Mul(rows, op.Unsqueeze(weights, _ints(-1))), _ints(1), keepdims=1)
    return op.CastLike(fused, x)


# ------------------------------------------------------------------------------------ ToMe

def _tome_dims(n: int, r: int) -> Tuple[int, int, int, int]:
    na, nb = (n + 1) // 2, n // 2
    return na, nb, na - r, n - r  # |A|, |B|, unmerged A, outputs


def bipartite_match(metric, r: int, num_protected: int = 1):
    n = _static(metric.shape[1], "token count")
    r = tome_clamp_r(r, n, num_protected)  # the kernel's own clamp
    na, nb, u, _ = _tome_dims(n, r)
    batch = op.Shape(metric, start=0, end=1)
    if r == 0:
        unm = op.Expand(_range(na),
                        op.Concat(batch, _ints(na), axis=0))
        empty = op.Expand(_ints(0), op.Concat(batch, _ints(0), axis=0))
        return unm, empty, empty
    m = _accumulator(metric)
    inv = op.Reciprocal(op.Sqrt(op.ReduceSum(op.Mul(m, m), _ints(-1), keepdims=0)))  # [B, n]
    a, b = _slice(m, 0, n, axis=1, step=2), _slice(m, 1, n, axis=1, step=2)
    dots = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))                             # [B, na, nb]
    # dot · (1/|a|) · (1/|b|), in that order, as the kernels (docs/merge.md, tie rule).
    scores = op.Mul(op.Mul(dots, op.Unsqueeze(_slice(inv, 0, n, axis=1, step=2), _ints(-1))),
                    op.Unsqueeze(_slice(inv, 1, n, axis=1, step=2), _ints(1)))
    # The prefix tokens' rows and columns score -inf (tome_excluded).
    row_out = _ints(*[int(2 * a < num_protected) for a in range(na)])
    col_out = _ints(*[int(2 * j + 1 < num_protected) for j in range(nb)])
    excluded = op.Greater(op.Add(op.Unsqueeze(row_out, _ints(-1)), op.Unsqueeze(col_out, _ints(0))),
                          _int(0))
    scores = op.Where(excluded, _like(float("-inf"), scores), scores)
    node_max = op.ReduceMax(scores, _ints(-1), keepdims=0)                         # [B, na]
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)         # first max
    _, ranked = op.TopK(node_max, _ints(na), axis=-1, largest=1, sorted=1)         # ties: lower a
    src = _slice(ranked, 0, r, axis=1)
    unm = _slice(ranked, r, na, axis=1)
    if num_protected > 0:  # upstream sorts the unmerged tokens (with a class token)
        unm, _ = _smallest(unm, u)
    return unm, src, op.GatherElements(node_idx, src, axis=1)


def merge_plan(unm_idx, src_idx, dst_idx, n: int, num_protected: int = 1):
    r = _static(src_idx.shape[1], "r")
    na, nb, u, nout = _tome_dims(n, r)
    batch = op.Shape(src_idx, start=0, end=1)
    if r == 0:  # the identity
        return _identity_plan(src_idx, n)
    unm_idx = op.Cast(unm_idx, to=ir.DataType.INT64)
    src_idx = op.Cast(src_idx, to=ir.DataType.INT64)
    dst_idx = op.Cast(dst_idx, to=ir.DataType.INT64)
    # Output positions (tome_unm_out / tome_dst_out in csrc/common/merge.h): the prefix's
    # pa A and pb B tokens keep their positions, the others follow it.
    p = min(num_protected, n)
    pa, pb = (p + 1) // 2, p // 2
    unm_out = [2 * k if k < pa else k + pb for k in range(u)]
    dst_out = [2 * j + 1 if j < pb else u + j for j in range(nb)]
    listed = op.Concat(unm_idx, src_idx, axis=1)                              # a permutation of A
    listed_out = op.Concat(op.Expand(_ints(*unm_out), op.Concat(batch, _ints(u), axis=0)),
                           op.Gather(_ints(*dst_out), dst_idx, axis=0), axis=1)
    _, inverse = _smallest(listed, na)                                        # argsort = inverse
    dest_a = op.GatherElements(listed_out, inverse, axis=1)                   # [B, na]
    dest_b = op.Expand(_ints(*(dst_out + [0] * (na - nb))), op.Concat(batch, _ints(na), axis=0))
    pairs = op.Concat(op.Unsqueeze(dest_a, _ints(-1)), op.Unsqueeze(dest_b, _ints(-1)), axis=-1)
    dest = _slice(op.Reshape(pairs, op.Concat(batch, _ints(2 * na), axis=0)), 0, n, axis=1)
    return _plan_of_dest(dest, n, nout)


def _plan_of_dest(dest, n: int, nout: int):
    """(dest, offsets, members) of dest [B, n]: members grouped by output, ascending within one."""
    _, members = _smallest(dest, n)
    bounds = _range(nout + 1)
    below = op.Less(op.Unsqueeze(dest, _ints(1)), op.Unsqueeze(bounds, _ints(-1)))  # [B, nout+1, n]
    offsets = op.ReduceSum(op.Cast(below, to=ir.DataType.INT64), _ints(-1), keepdims=0)
    return dest, offsets, members


def _identity_plan(like, n: int):
    batch = op.Shape(like, start=0, end=1)
    ident = op.Expand(_range(n), op.Concat(batch, _ints(n), axis=0))
    offsets = op.Expand(_range(n + 1), op.Concat(batch, _ints(n + 1), axis=0))
    return ident, offsets, ident


def bipartite_match_plan(metric, dst_tokens, r: int):
    n = _static(metric.shape[1], "token count")
    nb = _static(dst_tokens.shape[0], "destination count")
    r = tome_partition_clamp_r(r, n, nb)  # the kernel's own clamp
    if r == 0:
        return _identity_plan(metric, n)
    na, u = n - nb, n - nb - r
    batch = op.Shape(metric, start=0, end=1)
    b_tok = op.Cast(dst_tokens, to=ir.DataType.INT64)
    # The sources: the na smallest of (is destination) * n + position, i.e. the other tokens in order.
    is_b = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(_range(n), _ints(-1)), op.Unsqueeze(b_tok, _ints(0))),
                                to=ir.DataType.INT64), _ints(-1), keepdims=0)            # [n]
    _, a_tok = _smallest(op.Add(op.Mul(is_b, _int(n)), _range(n)), na)
    m = _accumulator(metric)
    inv = op.Reciprocal(op.Sqrt(op.ReduceSum(op.Mul(m, m), _ints(-1), keepdims=0)))  # [B, n]
    dots = op.MatMul(op.Gather(m, a_tok, axis=1),
                     op.Transpose(op.Gather(m, b_tok, axis=1), perm=[0, 2, 1]))     # [B, na, nb]
    scores = op.Mul(op.Mul(dots, op.Unsqueeze(op.Gather(inv, a_tok, axis=1), _ints(-1))),
                    op.Unsqueeze(op.Gather(inv, b_tok, axis=1), _ints(1)))
    node_max = op.ReduceMax(scores, _ints(-1), keepdims=0)
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)
    _, ranked = op.TopK(node_max, _ints(na), axis=-1, largest=1, sorted=1)
    src, unm = _slice(ranked, 0, r, axis=1), _slice(ranked, r, na, axis=1)
    dst = op.GatherElements(node_idx, src, axis=1)
    # dest: unmerged source k -> k, merged source -> u + its partner, destination j -> u + j.
    tokens = op.Concat(op.Gather(a_tok, unm, axis=0), op.Gather(a_tok, src, axis=0),
                       op.Expand(b_tok, op.Concat(batch, _ints(nb), axis=0)), axis=1)
    outputs = op.Concat(op.Expand(_range(u), op.Concat(batch, _ints(u), axis=0)),
                        op.Add(dst, _int(u)),
                        op.Expand(op.Range(_int(u), _int(u + nb), _int(1)),
                                  op.Concat(batch, _ints(nb), axis=0)), axis=1)
    _, inverse = _smallest(tokens, n)  # tokens is a permutation: its argsort is the inverse
    return _plan_of_dest(op.GatherElements(outputs, inverse, axis=1), n, n - r)


def unmerge_by_plan(x, dest, offsets, members):
    """Every token takes its output's value: a gather by dest."""
    return _gather_rows(x, dest)


def _shift_right(t, n: int, s: int, fill):
    """t [B, n, ...] moved s places along the token axis, the first s entries set to fill."""
    pad = op.Expand(fill, op.Concat(op.Shape(t, start=0, end=1), _ints(s),
                                    op.Shape(t, start=2), axis=0))
    return op.Concat(pad, _slice(t, 0, n - s, axis=1), axis=1)


def merge_by_plan(x, size, dest, offsets, members, mode: str = "wavg"):
    return _reduce_plan(x, size, dest, offsets, members, _static(offsets.shape[1], "plan size") - 1,
                        mode)


def _reduce_plan(x, size, dest, offsets, members, nout: int, mode: str):
    """Each of the nout outputs reduces its members: the tokens in members order (grouped by
    output, ascending), an inclusive scan within each output's run by doubling (round s adds the
    value s places back where it belongs to the same output: ceil(log2(r + 1)) rounds, so a dense
    merge of half the tokens stays small), and each output's total at the end of its run."""
    n = _static(x.shape[1], "token count")
    if mode not in ("sum", "mean", "amax", "wavg"):
        raise ValueError(f"merge_by_plan: unknown mode {mode!r}")
    xa = _accumulator(x)
    weight = (op.Squeeze(op.CastLike(size, xa), _ints(-1)) if size is not None
              else op.Expand(_like(1.0, xa), op.Shape(dest)))                # [B, n]
    offsets = op.Cast(offsets, to=ir.DataType.INT64)
    members = op.Cast(members, to=ir.DataType.INT64)
    start = _slice(offsets, 0, nout, axis=1)
    last = op.Sub(_slice(offsets, 1, nout + 1, axis=1), _int(1))
    count = op.Sub(_slice(offsets, 1, nout + 1, axis=1), start)              # [B, nout]
    rows = _gather_rows(xa, members)                                         # [B, n, C]
    w = op.GatherElements(weight, members, axis=1)                           # [B, n]
    run = op.GatherElements(op.Cast(dest, to=ir.DataType.INT64), members, axis=1)  # output ids
    acc = op.Mul(rows, op.Unsqueeze(w, _ints(-1))) if mode == "wavg" else rows
    wscan = w
    s = 1
    while s < n - nout + 1:  # an output has at most r + 1 members
        same = op.Equal(run, _shift_right(run, n, s, _ints(-1)))                # [B, n]
        same3 = op.Unsqueeze(same, _ints(-1))
        prev = _shift_right(acc, n, s, _like(0.0, acc))
        if mode == "amax":  # tome_accumulate: NaN propagates
            take = op.Or(op.IsNaN(prev), op.And(op.Not(op.IsNaN(acc)), op.Greater(prev, acc)))
            acc = op.Where(op.And(same3, take), prev, acc)
        else:
            acc = op.Add(acc, op.Where(same3, prev, _like(0.0, prev)))
        wscan = op.Add(wscan, op.Where(same, _shift_right(wscan, n, s, _like(0.0, wscan)),
                                       _like(0.0, wscan)))
        s *= 2
    acc = _gather_rows(acc, last)                                            # [B, nout, C]
    wsum = op.GatherElements(wscan, last, axis=1)
    if mode == "mean":
        acc = op.Div(acc, op.Unsqueeze(op.CastLike(count, acc), _ints(-1)))
    elif mode == "wavg":
        first_row = _gather_rows(rows, start)
        if nout < n:  # a lone member of finite, non-zero weight is copied, not (w·x)/w
            first_w = op.GatherElements(w, start, axis=1)
            out = op.Div(acc, op.Unsqueeze(wsum, _ints(-1)))
            lone = op.And(op.Equal(count, _int(1)),
                          op.And(op.Not(op.Equal(first_w, _like(0.0, first_w))),
                                 op.Equal(op.Sub(first_w, first_w), _like(0.0, first_w))))
            acc = op.Where(op.Unsqueeze(lone, _ints(-1)), first_row, out)
        else:
            acc = first_row
    return op.CastLike(acc, x), op.CastLike(op.Unsqueeze(wsum, _ints(-1)), x)



def merge_source_by_plan(source, dest, offsets, members):
    """The current token of each original one: dest itself, or dest composed with source."""
    dest = op.Cast(dest, to=ir.DataType.INT64)
    if source is None:
        return dest
    return op.GatherElements(dest, op.Cast(source, to=ir.DataType.INT64), axis=1)


# The one-off ToMe ops are their plan ops on the plan of their match, as in the kernels.

def merge(x, size, unm_idx, src_idx, dst_idx, mode: str = "wavg", num_protected: int = 1):
    n, r = _static(x.shape[1], "token count"), _static(src_idx.shape[1], "r")
    plan = merge_plan(unm_idx, src_idx, dst_idx, n, num_protected)
    return _reduce_plan(x, size, *plan, n - r, mode)


def unmerge(x, unm_idx, src_idx, dst_idx, n: int, num_protected: int = 1):
    return unmerge_by_plan(x, *merge_plan(unm_idx, src_idx, dst_idx, n, num_protected))


def merge_source(source, unm_idx, src_idx, dst_idx, n: int, num_protected: int = 1):
    return merge_source_by_plan(source, *merge_plan(unm_idx, src_idx, dst_idx, n, num_protected))


# ------------------------------------------------------------------------------------ routing

def _region_rows(r_idx, regions: int):
    """Row b·P + r_idx[b, ...] of the windows flattened over (batch, region)."""
    batch = op.Squeeze(op.Shape(r_idx, start=0, end=1), _ints(0))
    base = op.Mul(_range(batch), _int(regions))
    return op.Add(op.Cast(r_idx, to=ir.DataType.INT64), op.Reshape(base, _ints(-1, 1, 1)))


def routed_gather(kv, r_idx, r_weight=None):
    """kv's routed windows [n, P, topk, w2, c], each times its weight when given (in float32,
    float64 for float64 kv, rounded to kv's dtype)."""
    P = _static(kv.shape[1], "region count")
    w2, c = _static(kv.shape[2], "window"), _static(kv.shape[3], "channels")
    picked = op.Gather(op.Reshape(kv, _ints(-1, w2, c)), _region_rows(r_idx, P), axis=0)
    if r_weight is None:
        return picked
    acc = ir.DataType.DOUBLE if kv.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    weight = op.Unsqueeze(op.Cast(r_weight, to=acc), _ints(-1, -2))       # [n, P, topk, 1, 1]
    return op.CastLike(op.Mul(op.Cast(picked, to=acc), weight), kv)


def routed_attention(q, k, v, r_idx, num_heads: int, scale: float):
    P = _static(q.shape[1], "region count")
    wq, wk = _static(q.shape[2], "window"), _static(k.shape[2], "window")
    cqk, cv = _static(q.shape[3], "channels"), _static(v.shape[3], "channels")
    T = _static(r_idx.shape[2], "topk")
    H = num_heads
    lse_type = ir.DataType.DOUBLE if q.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    batch = op.Shape(q, start=0, end=1)
    if T == 0:
        out = op.Expand(_like(0.0, q), op.Concat(batch, _ints(P, wq, cv), axis=0))
        lse = op.Expand(op.Cast(op.Constant(value_float=float("-inf")), to=lse_type),
                        op.Concat(batch, _ints(P, H, wq), axis=0))
        return out, lse
    qa, ka, va = (op.Cast(t, to=lse_type) for t in (q, k, v))
    rows = _region_rows(r_idx, P)

    def routed(t, c):  # [n, P, wk, c] -> [n, P, H, T·wk, c / H]
        flat = op.Reshape(t, _ints(-1, wk, c))
        picked = op.Gather(flat, rows, axis=0)                                 # [n, P, T, wk, c]
        heads = op.Reshape(picked, op.Concat(batch, _ints(P, T * wk, H, c // H), axis=0))
        return op.Transpose(heads, perm=[0, 1, 3, 2, 4])

    qh = op.Transpose(op.Reshape(qa, op.Concat(batch, _ints(P, wq, H, cqk // H), axis=0)),
                      perm=[0, 1, 3, 2, 4])                                    # [n, P, H, wq, d]
    keys, values = routed(ka, cqk), routed(va, cv)
    logits = op.MatMul(op.Mul(qh, op.CastLike(op.Constant(value_float=scale), qh)),
                       op.Transpose(keys, perm=[0, 1, 2, 4, 3]))              # [n, P, H, wq, T·wk]
    lse = op.ReduceLogSumExp(logits, _ints(-1), keepdims=0)                  # [n, P, H, wq]
    out = op.MatMul(op.Softmax(logits, axis=-1), values)                     # [n, P, H, wq, dv]
    out = op.Reshape(op.Transpose(out, perm=[0, 1, 3, 2, 4]),
                     op.Concat(batch, _ints(P, wq, cv), axis=0))
    return op.CastLike(out, q), lse


def _translations() -> Dict[Any, Any]:
    t = torch.ops.tokred
    return {
        t.topk.default: topk,
        t.gather_tokens.default: gather_tokens,
        t.complement.default: complement,
        t.prune_tokens.default: prune_tokens,
        t.bipartite_match.default: bipartite_match,
        t.merge.default: merge,
        t.unmerge.default: unmerge,
        t.merge_source.default: merge_source,
        t.merge_plan.default: merge_plan,
        t.bipartite_match_plan.default: bipartite_match_plan,
        t.merge_by_plan.default: merge_by_plan,
        t.unmerge_by_plan.default: unmerge_by_plan,
        t.merge_source_by_plan.default: merge_source_by_plan,
        t.routed_gather.default: routed_gather,
        t.routed_attention.default: routed_attention,
    }


TRANSLATIONS = _translations()


def export(model: torch.nn.Module, args: Sequence[torch.Tensor], path: Optional[str] = None,
           dynamic_batch: bool = True, **kwargs):
    """``torch.onnx.export(model, args, path, dynamo=True)`` with tokred's translations, opset 18
    and, with ``dynamic_batch``, a dynamic first axis on every input. Returns the ONNXProgram."""
    if op is None:
        raise ImportError("tokred_ext.onnx needs onnxscript (pip install onnxscript onnx)")
    table = {**TRANSLATIONS, **kwargs.pop("custom_translation_table", {})}
    if dynamic_batch and "dynamic_shapes" not in kwargs:
        kwargs["dynamic_shapes"] = dynamic_batch_shapes(model, args)
    return torch.onnx.export(model, tuple(args), path, dynamo=True, opset_version=OPSET,
                             custom_translation_table=table, **kwargs)
