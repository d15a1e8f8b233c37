"""ONNX translations of ``bipartite_match_plan`` and ``unmerge_by_plan``, for the export test of
tests/test_diffusers_patch.py.

PROPOSED for ``tokred_ext/onnx.py`` (its owner adds them to ``TRANSLATIONS`` and to the table of
docs/export.md; the test then drops its ``custom_translation_table``). Standard opset-18
operators only, no ScatterElements/ScatterND/NonZero, no data-dependent sizes, as the rest of
``tokred_ext.onnx``:

- ``bipartite_match_plan``: Equal/ReduceMax (destination mask), Less/ReduceSum (destinations
  before each token), TopK (A's positions ascending), Gather, ReduceSum/Sqrt/Reciprocal, MatMul,
  Mul (``dot·(1/|a|)·(1/|b|)``), ReduceMax, ArgMax (first maximum), TopK (ranking, ties to the
  lower index; and its inverse), Where (each token's output), TopK (members), Less/ReduceSum
  (offsets).
- ``unmerge_by_plan``: one GatherElements by ``dest``.
"""
import torch

from tokred_ext.onnx import (_accumulator, _gather_rows, _int, _ints, _range, _smallest, _static,
                             ir, op)


def bipartite_match_plan(metric, dst_tokens, r: int):
    n = _static(metric.shape[1], "token count")
    nb = _static(dst_tokens.shape[0], "destination count")
    na = n - nb
    r = max(0, min(r, na))  # the kernel's own clamp
    batch = op.Shape(metric, start=0, end=1)
    if r == 0:  # the identity plan
        ident = op.Expand(_range(n), op.Concat(batch, _ints(n), axis=0))
        offsets = op.Expand(_range(n + 1), op.Concat(batch, _ints(n + 1), axis=0))
        return ident, offsets, ident
    u, nout = na - r, n - r
    i64 = ir.DataType.INT64
    dst = op.Cast(dst_tokens, to=i64)
    tokens = _range(n)
    is_dst = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(tokens, _ints(-1)),
                                           op.Unsqueeze(dst, _ints(0))), to=i64),
                          _ints(-1), keepdims=0)                                   # [n] 0/1
    before = op.ReduceSum(op.Cast(op.Less(op.Unsqueeze(dst, _ints(0)),
                                          op.Unsqueeze(tokens, _ints(-1))), to=i64),
                          _ints(-1), keepdims=0)                                   # [n]
    a_pos, _ = _smallest(op.Add(tokens, op.Mul(is_dst, _int(n))), na)            # A ascending
    m = _accumulator(metric)
    inv = op.Reciprocal(op.Sqrt(op.ReduceSum(op.Mul(m, m), _ints(-1), keepdims=0)))  # [B, n]
    dots = op.MatMul(op.Gather(m, a_pos, axis=1),
                     op.Transpose(op.Gather(m, dst, axis=1), perm=[0, 2, 1]))     # [B, na, nb]
    # dot · (1/|a|) · (1/|b|), in that order, as the kernels (docs/merge.md, tie rule).
    scores = op.Mul(op.Mul(dots, op.Unsqueeze(op.Gather(inv, a_pos, axis=1), _ints(-1))),
                    op.Unsqueeze(op.Gather(inv, dst, axis=1), _ints(1)))
    node_max = op.ReduceMax(scores, _ints(-1), keepdims=0)                         # [B, na]
    node_idx = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)         # first max
    _, ranked = op.TopK(node_max, _ints(na), axis=-1, largest=1, sorted=1)         # ties: lower
    _, rank = _smallest(ranked, na)                                                # inverse
    out_a = op.Where(op.Less(rank, _int(r)), op.Add(node_idx, _int(u)),
                     op.Sub(rank, _int(r)))                                        # [B, na]
    a_index = op.Min(op.Sub(tokens, before), _int(na - 1))   # a token's place in A (clamped)
    dest = op.Where(op.Cast(is_dst, to=ir.DataType.BOOL), op.Add(before, _int(u)),
                    op.Gather(out_a, a_index, axis=1))                             # [B, n]
    _, members = _smallest(dest, n)            # grouped by output, ascending within one
    below = op.Less(op.Unsqueeze(dest, _ints(1)), op.Unsqueeze(_range(nout + 1), _ints(-1)))
    offsets = op.ReduceSum(op.Cast(below, to=i64), _ints(-1), keepdims=0)
    return dest, offsets, members


def unmerge_by_plan(x, dest, offsets, members):
    return _gather_rows(x, op.Cast(dest, to=ir.DataType.INT64))


def translations():
    t = torch.ops.tokred
    return {t.bipartite_match_plan.default: bipartite_match_plan,
            t.unmerge_by_plan.default: unmerge_by_plan}
