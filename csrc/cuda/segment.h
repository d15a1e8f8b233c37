// Mᵀ on CUDA: the deterministic segmented sum behind ToMe's plan and the topk, gather_tokens,
// routed_gather and routed_attention backwards (not prune_tokens' backward).
#pragma once

#include <ATen/ATen.h>

namespace tokred {

// out[b, i, :] = Σ over k with index[b, k] == i of src[b, k, :], summed in ascending k with a
// float32 (or wider) accumulator, without atomics: a CSR plan groups each row's k by target.
// src [B, K, C] (any float dtype), index [B, K] int64 with entries in [-1, n); -1 is padding.
// Returns [B, n, C] in src's dtype. Runs on the current stream. op and arg name the calling op and
// its index argument in error messages.
at::Tensor scatter_sum_rows_cuda(const at::Tensor& src, const at::Tensor& index, int64_t n,
                                 const char* op, const char* arg);

// The CSR plan alone: order [B, K] lists each row's k sorted by (index, k); offsets [B, n + 1]
// delimits the run of each target i. Padding (-1) sorts first and is skipped by offsets. A
// counting sort with one block per row: O(K + n) memory traffic and O(K · 256) shared-memory
// compares per row, so long rows cost linear time.
std::tuple<at::Tensor, at::Tensor> build_segments_cuda(const at::Tensor& index, int64_t n);

}  // namespace tokred
