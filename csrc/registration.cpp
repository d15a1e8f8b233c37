// The one place every tokred schema is declared. Kernels register per backend with
// TORCH_LIBRARY_IMPL in cpu/, cuda/ and meta/; autograd is registered from tokred_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(tokred, m) {
  // One schema per line, past the column limit, so that the block reads as a table.
  // clang-format off
  // Selection: Top-K pruning and EViT.
  m.def("topk(Tensor scores, SymInt k, bool largest=True, Tensor? lengths=None) -> (Tensor values, Tensor indices)");
  m.def("_topk_backward(Tensor grad_values, Tensor indices, SymInt n) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor");
  m.def("_gather_tokens_backward(Tensor grad, Tensor index, SymInt n) -> Tensor");
  m.def("complement(Tensor index, SymInt n) -> Tensor");
  m.def("prune_tokens(Tensor x, Tensor scores, SymInt k, bool fuse=False, SymInt num_protected=1, bool keep_order=False) -> (Tensor out, Tensor index)");
  m.def("_prune_tokens_backward(Tensor grad_out, Tensor x, Tensor scores, Tensor index, bool fuse, SymInt num_protected) -> (Tensor grad_x, Tensor grad_scores)");

  // Merging: ToMe.
  m.def("bipartite_match(Tensor metric, SymInt r, SymInt num_protected=1) -> (Tensor unm_idx, Tensor src_idx, Tensor dst_idx)");
  m.def("merge(Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, str mode=\"wavg\", SymInt num_protected=1) -> (Tensor out, Tensor size_out)");
  m.def("_merge_backward(Tensor grad_out, Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, str mode, SymInt num_protected) -> Tensor");
  m.def("unmerge(Tensor x, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, SymInt n, SymInt num_protected=1) -> Tensor");
  m.def("_unmerge_backward(Tensor grad, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, SymInt num_protected) -> Tensor");
  m.def("merge_source(Tensor? source, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, SymInt n, SymInt num_protected=1) -> Tensor");
  // The merge plan as a value: built once per ToMe step by merge_plan, then passed to the merge,
  // the unmerge, source tracking and the backward (the ops above build it again on every call).
  m.def("merge_plan(Tensor unm_idx, Tensor src_idx, Tensor dst_idx, SymInt n, SymInt num_protected=1) -> (Tensor dest, Tensor offsets, Tensor members)");
  // ToMe for dense models (tomesd): the match over an explicit partition (destinations =
  // dst_tokens, sources = the rest), returned as its plan; merge_by_plan / unmerge_by_plan apply it.
  m.def("bipartite_match_plan(Tensor metric, Tensor dst_tokens, SymInt r) -> (Tensor dest, Tensor offsets, Tensor members)");
  m.def("merge_by_plan(Tensor x, Tensor? size, Tensor dest, Tensor offsets, Tensor members, str mode=\"wavg\") -> (Tensor out, Tensor size_out)");
  m.def("_merge_by_plan_backward(Tensor grad_out, Tensor x, Tensor? size, Tensor dest, Tensor offsets, Tensor members, str mode) -> Tensor");
  m.def("unmerge_by_plan(Tensor x, Tensor dest, Tensor offsets, Tensor members) -> Tensor");
  m.def("merge_source_by_plan(Tensor? source, Tensor dest, Tensor offsets, Tensor members) -> Tensor");

  // Routing: BiFormer.
  m.def("routed_gather(Tensor kv, Tensor r_idx, Tensor? r_weight=None) -> Tensor");
  m.def("_routed_gather_backward(Tensor grad, Tensor kv, Tensor r_idx, Tensor? r_weight=None) -> (Tensor grad_kv, Tensor grad_r_weight)");
  m.def("routed_attention(Tensor q, Tensor k, Tensor v, Tensor r_idx, SymInt num_heads, float scale) -> (Tensor out, Tensor lse)");
  m.def("_routed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor r_idx, Tensor out, Tensor lse, SymInt num_heads, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // clang-format on
}
