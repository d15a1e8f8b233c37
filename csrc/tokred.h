// tokred's typed C++ API for LibTorch programs. Each function calls the registered op through
// the dispatcher, so CPU and CUDA tensors both work. Autograd is registered from Python only:
// C++ callers get forward kernels and the explicit *_backward functions.
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/ATen.h>

namespace tokred {

// Segmented top-k over the last dim. Ties go to the lower index; NaN ranks above +inf.
// Returns (values [..., k], indices [..., k] int64). With lengths, row r looks at its first
// lengths[r] entries; missing slots hold index -1 and value -inf (+inf when !largest).
std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& scores, int64_t k, bool largest = true,
                                        const std::optional<at::Tensor>& lengths = std::nullopt);
at::Tensor topk_backward(const at::Tensor& grad_values, const at::Tensor& indices, int64_t n);

// x [B, N, C], index [B, K] -> [B, K, C]. Index -1 gives a zero row.
at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& index);
at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& index, int64_t n);

// index [B, K] (distinct, in [0, n)) -> the other n - K indices of each row, ascending.
at::Tensor complement(const at::Tensor& index, int64_t n);

// Top-K (fuse=false) or EViT (fuse=true) pruning of x [B, P + N, C] by scores [B, N].
// Returns (out [B, P + k + fuse, C], index [B, k]).
std::tuple<at::Tensor, at::Tensor> prune_tokens(const at::Tensor& x, const at::Tensor& scores,
                                                int64_t k, bool fuse = false,
                                                int64_t num_protected = 1,
                                                bool keep_order = false);
std::tuple<at::Tensor, at::Tensor> prune_tokens_backward(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& scores,
                                                         const at::Tensor& index, bool fuse,
                                                         int64_t num_protected);

// ToMe. bipartite_match: metric [B, N, D] -> (unm_idx [B, ceil(N/2) - r], src_idx [B, r],
// dst_idx [B, r]), r clamped to (N - protected) / 2; ties to the lower index.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match(const at::Tensor& metric,
                                                               int64_t r, bool class_token = true,
                                                               bool distill_token = false);
// x [B, N, C] -> (out [B, N - r, C], summed sizes [B, N - r, 1]); mode sum | mean | amax | wavg.
std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                         const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                         const at::Tensor& dst_idx,
                                         const std::string& mode = "wavg",
                                         bool distill_token = false);
at::Tensor merge_backward(const at::Tensor& grad_out, const at::Tensor& x,
                          const std::optional<at::Tensor>& size, const at::Tensor& unm_idx,
                          const at::Tensor& src_idx, const at::Tensor& dst_idx,
                          const std::string& mode, bool distill_token);
// x [B, n - r, C] -> [B, n, C]; merged sources get a copy of their destination.
at::Tensor unmerge(const at::Tensor& x, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                   const at::Tensor& dst_idx, int64_t n, bool distill_token = false);
at::Tensor unmerge_backward(const at::Tensor& grad, const at::Tensor& unm_idx,
                            const at::Tensor& src_idx, const at::Tensor& dst_idx,
                            bool distill_token);
// source [B, N0] (current token of each original patch; nullopt = identity of n) -> updated map.
at::Tensor merge_source(const std::optional<at::Tensor>& source, const at::Tensor& unm_idx,
                        const at::Tensor& src_idx, const at::Tensor& dst_idx, int64_t n,
                        bool distill_token = false);

// The merge plan as a value (docs/merge.md): built once per ToMe step, then passed to the
// merge, the unmerge, source tracking and the backward, which check it instead of rebuilding it.
struct MergePlan {
  at::Tensor dest;     // [B, N]: the output token of every input token
  at::Tensor offsets;  // [B, N - r + 1]: output o reduces members[offsets[o] .. offsets[o + 1])
  at::Tensor members;  // [B, N]: input tokens grouped by output, ascending within each
};
MergePlan merge_plan(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                     const at::Tensor& dst_idx, int64_t n, bool distill_token = false);
std::tuple<at::Tensor, at::Tensor> merge_by_plan(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& size,
                                                 const MergePlan& plan,
                                                 const std::string& mode = "wavg");
at::Tensor merge_by_plan_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const std::optional<at::Tensor>& size, const MergePlan& plan,
                                  const std::string& mode);
at::Tensor unmerge_by_plan(const at::Tensor& x, const MergePlan& plan);
at::Tensor merge_source_by_plan(const std::optional<at::Tensor>& source, const MergePlan& plan);

// ---- Routing: BiFormer.

// kv [n, P, w2, c], r_idx [n, P, topk] (int64/int32, values in [0, P)) -> [n, P, topk, w2, c]:
// out[b, i, t] = kv[b, r_idx[b, i, t]], times r_weight[b, i, t] when given (BiFormer "soft").
at::Tensor routed_gather(const at::Tensor& kv, const at::Tensor& r_idx,
                         const std::optional<at::Tensor>& r_weight = std::nullopt);
// Returns (grad_kv, grad_r_weight); grad_r_weight is empty ([0]) without r_weight.
std::tuple<at::Tensor, at::Tensor> routed_gather_backward(
    const at::Tensor& grad, const at::Tensor& kv, const at::Tensor& r_idx,
    const std::optional<at::Tensor>& r_weight = std::nullopt);

// Fused bi-level routing attention. q [n, P, wq, cqk], k [n, P, wk, cqk], v [n, P, wk, cv],
// r_idx [n, P, topk]. Query window i attends, per head (contiguous channel chunks), to the
// topk·wk keys of its routed windows in routing order: softmax(scale · q kᵀ) v.
// Returns (out [n, P, wq, cv], lse [n, P, num_heads, wq] float32, float64 for float64 input).
std::tuple<at::Tensor, at::Tensor> routed_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& r_idx,
                                                    int64_t num_heads, double scale);
// Returns (grad_q, grad_k, grad_v), deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& r_idx, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    double scale);

}  // namespace tokred
