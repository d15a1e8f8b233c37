// Mᵀ on the CPU: the deterministic segmented sum and its CSR plan. Its users: the topk and
// gather_tokens backwards (scatter_sum_rows_cpu), ToMe's plan and the routed_gather backward
// (build_segments_cpu). The routed_attention and prune_tokens backwards do not use it.
#pragma once

#include <ATen/ATen.h>

namespace tokred {

// out[b, index[b, k], :] = Σ_k src[b, k, :], summed in ascending k with a float32 (or wider)
// accumulator. src [B, K, C], index [B, K] int64 with entries in [-1, n); -1 marks padding and
// contributes nothing. Returns [B, n, C] in src's dtype.
at::Tensor scatter_sum_rows_cpu(const at::Tensor& src, const at::Tensor& index, int64_t n,
                                const char* op, const char* arg);

// The CSR plan alone, as build_segments_cuda (cuda/segment.h) builds it: order [B, K] lists each
// row's k sorted by (index, k); offsets [B, n + 1] delimits the run of each target i, so target i
// sums order[b, offsets[b, i] .. offsets[b, i + 1]). Padding (-1) sorts first and is skipped by
// offsets. A counting sort, O(K + n) per row, rows in parallel. Entries outside [-1, n) fail a
// TORCH_CHECK that names op and arg.
std::tuple<at::Tensor, at::Tensor> build_segments_cpu(const at::Tensor& index, int64_t n,
                                                      const char* op, const char* arg);

}  // namespace tokred
