// tokred's typed C++ API for LibTorch programs. Each function calls the registered op through
// the dispatcher, so CPU and CUDA tensors both work. Autograd is registered from Python only:
// C++ callers get forward kernels and the explicit *_backward functions.
// The semantics of every op (shapes, tie rule, errors) live in docs/: select.md (topk,
// gather_tokens, complement, prune_tokens), merge.md (ToMe) and routing.md (BiFormer).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace tokred {

// ---- Selection: Top-K pruning and EViT (docs/select.md).

// scores [..., N] -> (values [..., k], indices [..., k] int64).
std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& scores, int64_t k, bool largest = true,
                                        const std::optional<at::Tensor>& lengths = std::nullopt);
at::Tensor topk_backward(const at::Tensor& grad_values, const at::Tensor& indices, int64_t n);

// x [B, N, C], index [B, K] -> [B, K, C].
at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& index);
at::Tensor gather_tokens_backward(const at::Tensor& grad, const at::Tensor& index, int64_t n);

// index [B, K] -> [B, n - K] int64.
at::Tensor complement(const at::Tensor& index, int64_t n);

// x [B, P + N, C], scores [B, N] -> (out [B, P + k + fuse, C], index [B, k]).
std::tuple<at::Tensor, at::Tensor> prune_tokens(const at::Tensor& x, const at::Tensor& scores,
                                                int64_t k, bool fuse = false,
                                                int64_t num_protected = 1, bool keep_order = false);
std::tuple<at::Tensor, at::Tensor> prune_tokens_backward(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& scores,
                                                         const at::Tensor& index, bool fuse,
                                                         int64_t num_protected);

// ---- Merging: ToMe (docs/merge.md).

// metric [B, N, D] -> (unm_idx [B, ceil(N/2) - r], src_idx [B, r], dst_idx [B, r]). The first
// num_protected tokens (the prefix: class, distillation, register tokens) never merge; the ops
// below keep them first in their output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match(const at::Tensor& metric, int64_t r,
                                                               int64_t num_protected = 1);
// x [B, N, C] -> (out [B, N - r, C], size_out [B, N - r, 1]).
std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                         const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                         const at::Tensor& dst_idx,
                                         const std::string& mode = "wavg",
                                         int64_t num_protected = 1);
at::Tensor merge_backward(const at::Tensor& grad_out, const at::Tensor& x,
                          const std::optional<at::Tensor>& size, const at::Tensor& unm_idx,
                          const at::Tensor& src_idx, const at::Tensor& dst_idx,
                          const std::string& mode, int64_t num_protected);
// x [B, n - r, C] -> [B, n, C].
at::Tensor unmerge(const at::Tensor& x, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                   const at::Tensor& dst_idx, int64_t n, int64_t num_protected = 1);
at::Tensor unmerge_backward(const at::Tensor& grad, const at::Tensor& unm_idx,
                            const at::Tensor& src_idx, const at::Tensor& dst_idx,
                            int64_t num_protected);
// source [B, N0] (nullopt: identity of n) -> [B, N0] int64.
at::Tensor merge_source(const std::optional<at::Tensor>& source, const at::Tensor& unm_idx,
                        const at::Tensor& src_idx, const at::Tensor& dst_idx, int64_t n,
                        int64_t num_protected = 1);

// merge_plan: match -> (dest, offsets, members), the plan the *_by_plan functions take.
struct MergePlan {
  at::Tensor dest;     // [B, N]: the output token of every input token
  at::Tensor offsets;  // [B, N - r + 1]: output o reduces members[offsets[o] .. offsets[o + 1])
  at::Tensor members;  // [B, N]: input tokens grouped by output, ascending within each
};
MergePlan merge_plan(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                     const at::Tensor& dst_idx, int64_t n, int64_t num_protected = 1);
// Dense models (tomesd): the match over an explicit partition, destinations = dst_tokens [Nb]
// (strictly ascending), sources = the rest; outputs [unmerged sources (rank order) | destinations].
MergePlan bipartite_match_plan(const at::Tensor& metric, const at::Tensor& dst_tokens, int64_t r);
std::tuple<at::Tensor, at::Tensor> merge_by_plan(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& size,
                                                 const MergePlan& plan,
                                                 const std::string& mode = "wavg");
at::Tensor merge_by_plan_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                  const std::optional<at::Tensor>& size, const MergePlan& plan,
                                  const std::string& mode);
at::Tensor unmerge_by_plan(const at::Tensor& x, const MergePlan& plan);
at::Tensor merge_source_by_plan(const std::optional<at::Tensor>& source, const MergePlan& plan);

// ---- Routing: BiFormer (docs/routing.md).

// kv [n, P, w2, c], r_idx [n, P, topk] -> [n, P, topk, w2, c].
at::Tensor routed_gather(const at::Tensor& kv, const at::Tensor& r_idx,
                         const std::optional<at::Tensor>& r_weight = std::nullopt);
// grad [n, P, topk, w2, c] -> (grad_kv [n, P, w2, c], grad_r_weight [n, P, topk] or [0]).
std::tuple<at::Tensor, at::Tensor> routed_gather_backward(
    const at::Tensor& grad, const at::Tensor& kv, const at::Tensor& r_idx,
    const std::optional<at::Tensor>& r_weight = std::nullopt);

// q [n, P, wq, cqk], k/v [n, P, wk, cqk/cv] -> (out [n, P, wq, cv], lse [n, P, heads, wq]).
std::tuple<at::Tensor, at::Tensor> routed_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& r_idx,
                                                    int64_t num_heads, double scale);
// grad_out [n, P, wq, cv] -> (grad_q, grad_k, grad_v) of q's, k's and v's shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& r_idx, const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
    double scale);

}  // namespace tokred
