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

}  // namespace tokred
