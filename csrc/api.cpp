// tokred.h: typed calls into the dispatcher. Looking ops up by name keeps this file free of
// kernel symbols, so the same header serves CPU and CUDA builds.
#include <ATen/core/dispatch/Dispatcher.h>

#include "tokred.h"

namespace tokred {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

}  // namespace

TensorPair topk(const at::Tensor& scores, int64_t k, bool largest, const OptTensor& lengths) {
  static auto h =
      op<TensorPair(const at::Tensor&, c10::SymInt, bool, const OptTensor&)>("tokred::topk");
  return h.call(scores, k, largest, lengths);
}

at::Tensor topk_backward(const at::Tensor& grad_values, const at::Tensor& indices, int64_t n) {
  static auto h =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>("tokred::_topk_backward");
  return h.call(grad_values, indices, n);
}

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& index) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("tokred::gather_tokens");
  return h.call(x, index);
}

at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& index, int64_t n) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>(
      "tokred::_gather_tokens_backward");
  return h.call(grad, index, n);
}

at::Tensor complement(const at::Tensor& index, int64_t n) {
  static auto h = op<at::Tensor(const at::Tensor&, c10::SymInt)>("tokred::complement");
  return h.call(index, n);
}

TensorPair prune_tokens(const at::Tensor& x, const at::Tensor& scores, int64_t k, bool fuse,
                        int64_t num_protected, bool keep_order) {
  static auto h =
      op<TensorPair(const at::Tensor&, const at::Tensor&, c10::SymInt, bool, c10::SymInt, bool)>(
          "tokred::prune_tokens");
  return h.call(x, scores, k, fuse, num_protected, keep_order);
}

TensorPair prune_tokens_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& scores, const at::Tensor& index, bool fuse,
                                 int64_t num_protected) {
  static auto h =
      op<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    bool, c10::SymInt)>("tokred::_prune_tokens_backward");
  return h.call(grad_out, x, scores, index, fuse, num_protected);
}

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T = const at::Tensor&;

TensorTriple bipartite_match(T metric, int64_t r, int64_t num_protected) {
  static auto h = op<TensorTriple(T, c10::SymInt, c10::SymInt)>("tokred::bipartite_match");
  return h.call(metric, r, num_protected);
}

TensorPair merge(T x, const OptTensor& size, T unm_idx, T src_idx, T dst_idx,
                 const std::string& mode, int64_t num_protected) {
  static auto h =
      op<TensorPair(T, const OptTensor&, T, T, T, c10::string_view, c10::SymInt)>("tokred::merge");
  return h.call(x, size, unm_idx, src_idx, dst_idx, mode, num_protected);
}

at::Tensor merge_backward(T grad_out, T x, const OptTensor& size, T unm_idx, T src_idx, T dst_idx,
                          const std::string& mode, int64_t num_protected) {
  static auto h = op<at::Tensor(T, T, const OptTensor&, T, T, T, c10::string_view, c10::SymInt)>(
      "tokred::_merge_backward");
  return h.call(grad_out, x, size, unm_idx, src_idx, dst_idx, mode, num_protected);
}

at::Tensor unmerge(T x, T unm_idx, T src_idx, T dst_idx, int64_t n, int64_t num_protected) {
  static auto h = op<at::Tensor(T, T, T, T, c10::SymInt, c10::SymInt)>("tokred::unmerge");
  return h.call(x, unm_idx, src_idx, dst_idx, n, num_protected);
}

at::Tensor unmerge_backward(T grad, T unm_idx, T src_idx, T dst_idx, int64_t num_protected) {
  static auto h = op<at::Tensor(T, T, T, T, c10::SymInt)>("tokred::_unmerge_backward");
  return h.call(grad, unm_idx, src_idx, dst_idx, num_protected);
}

at::Tensor merge_source(const OptTensor& source, T unm_idx, T src_idx, T dst_idx, int64_t n,
                        int64_t num_protected) {
  static auto h =
      op<at::Tensor(const OptTensor&, T, T, T, c10::SymInt, c10::SymInt)>("tokred::merge_source");
  return h.call(source, unm_idx, src_idx, dst_idx, n, num_protected);
}

MergePlan merge_plan(T unm_idx, T src_idx, T dst_idx, int64_t n, int64_t num_protected) {
  static auto h = op<TensorTriple(T, T, T, c10::SymInt, c10::SymInt)>("tokred::merge_plan");
  auto [dest, offsets, members] = h.call(unm_idx, src_idx, dst_idx, n, num_protected);
  return MergePlan{dest, offsets, members};
}

MergePlan bipartite_match_plan(T metric, T dst_tokens, int64_t r) {
  static auto h = op<TensorTriple(T, T, c10::SymInt)>("tokred::bipartite_match_plan");
  auto [dest, offsets, members] = h.call(metric, dst_tokens, r);
  return MergePlan{dest, offsets, members};
}

TensorPair merge_by_plan(T x, const OptTensor& size, const MergePlan& plan,
                         const std::string& mode) {
  static auto h =
      op<TensorPair(T, const OptTensor&, T, T, T, c10::string_view)>("tokred::merge_by_plan");
  return h.call(x, size, plan.dest, plan.offsets, plan.members, mode);
}

at::Tensor merge_by_plan_backward(T grad_out, T x, const OptTensor& size, const MergePlan& plan,
                                  const std::string& mode) {
  static auto h = op<at::Tensor(T, T, const OptTensor&, T, T, T, c10::string_view)>(
      "tokred::_merge_by_plan_backward");
  return h.call(grad_out, x, size, plan.dest, plan.offsets, plan.members, mode);
}

at::Tensor unmerge_by_plan(T x, const MergePlan& plan) {
  static auto h = op<at::Tensor(T, T, T, T)>("tokred::unmerge_by_plan");
  return h.call(x, plan.dest, plan.offsets, plan.members);
}

at::Tensor merge_source_by_plan(const OptTensor& source, const MergePlan& plan) {
  static auto h = op<at::Tensor(const OptTensor&, T, T, T)>("tokred::merge_source_by_plan");
  return h.call(source, plan.dest, plan.offsets, plan.members);
}

// ---- Routing: BiFormer.

at::Tensor routed_gather(const at::Tensor& kv, const at::Tensor& r_idx, const OptTensor& r_weight) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>(
      "tokred::routed_gather");
  return h.call(kv, r_idx, r_weight);
}

TensorPair routed_gather_backward(const at::Tensor& grad, const at::Tensor& kv,
                                  const at::Tensor& r_idx, const OptTensor& r_weight) {
  static auto h =
      op<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>(
          "tokred::_routed_gather_backward");
  return h.call(grad, kv, r_idx, r_weight);
}

TensorPair routed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& r_idx, int64_t num_heads, double scale) {
  static auto h =
      op<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    c10::SymInt, double)>("tokred::routed_attention");
  return h.call(q, k, v, r_idx, num_heads, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& r_idx, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    double scale) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, c10::SymInt, double)>(
      "tokred::_routed_attention_backward");
  return h.call(grad_out, q, k, v, r_idx, out, lse, num_heads, scale);
}

}  // namespace tokred
