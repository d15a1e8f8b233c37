// Validation and output shapes of the ToMe ops, shared by the CPU, CUDA and Meta kernels so every
// backend rejects the same inputs with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

#include "common/merge.h"

namespace tokred {

// "sum" | "mean" | "amax" | "wavg"; anything else is an error naming op.
MergeMode parse_merge_mode(std::string_view mode, const char* op);

// The clamped r of bipartite_match as a SymInt: max(0, min(r, (N - num_protected) // 2)).
c10::SymInt tome_clamped_r(const c10::SymInt& r, const c10::SymInt& n,
                           const c10::SymInt& num_protected);

// num_protected >= 0: the prefix tokens that never merge.
void check_num_protected(const c10::SymInt& num_protected, const char* op);

// metric [B, N, D]; returns the clamped r.
c10::SymInt check_bipartite_match(const at::Tensor& metric, const c10::SymInt& r,
                                  const c10::SymInt& num_protected);

// bipartite_match_plan: metric [B, N, D] and dst_tokens [Nb] (an index tensor on metric's device,
// Nb <= N; its values are checked by the backends with tome_dst_token_ok). Returns the clamped r.
c10::SymInt check_bipartite_match_plan(const at::Tensor& metric, const at::Tensor& dst_tokens,
                                       const c10::SymInt& r);

// The three index tensors of a match for a sequence of n tokens: unm_idx [B, ceil(n/2) - r],
// src_idx [B, r], dst_idx [B, r], and num_protected >= 0. unm_idx keeps at least the prefix's A
// tokens (the layout puts them first). batch: the batch size the match must have; nullopt when
// the op has no other tensor to take it from (the match's own, read after its ranks are checked).
// Returns r.
c10::SymInt check_match_indices(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                const at::Tensor& dst_idx, const std::optional<c10::SymInt>& batch,
                                const c10::SymInt& n, const c10::SymInt& num_protected,
                                const char* op);

// x [B, N, C], size None or [B, N, 1] of x's dtype. Returns r.
c10::SymInt check_merge(const at::Tensor& x, const std::optional<at::Tensor>& size,
                        const at::Tensor& unm_idx, const at::Tensor& src_idx,
                        const at::Tensor& dst_idx, std::string_view mode,
                        const c10::SymInt& num_protected, const char* op);

// grad_out [B, N - r, C] of x's dtype and batch, for a merge of x [B, N, C].
void check_merge_backward_grad(const at::Tensor& grad, const at::Tensor& x, const c10::SymInt& r,
                               const char* op);

// grad [B, n, C], the gradient of an unmerge to n tokens. Returns r.
c10::SymInt check_unmerge_backward(const at::Tensor& grad, const at::Tensor& unm_idx,
                                   const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                   const c10::SymInt& num_protected, const char* op);

// x [B, n - r, C]. Returns r.
c10::SymInt check_unmerge(const at::Tensor& x, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                          const at::Tensor& dst_idx, const c10::SymInt& n,
                          const c10::SymInt& num_protected, const char* op);

// source None or [B, N0] int of token positions in [0, n). Returns r.
c10::SymInt check_merge_source(const std::optional<at::Tensor>& source, const at::Tensor& unm_idx,
                               const at::Tensor& src_idx, const at::Tensor& dst_idx,
                               const c10::SymInt& n, const c10::SymInt& num_protected);

// ---- ops that take a plan (dest, offsets, members) from merge_plan

// The shapes of a plan: dest [B, n], offsets [B, nout + 1], members [B, n], index dtypes on one
// device, with 0 < nout <= n (nout = 0 only for n = 0). Returns nout. Values are checked by the
// backends with tome_plan_fault (common/merge.h).
c10::SymInt check_plan(const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& members,
                       const char* op);

// merge_plan: the match indices for n tokens. Returns r.
c10::SymInt check_merge_plan(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                             const at::Tensor& dst_idx, const c10::SymInt& n,
                             const c10::SymInt& num_protected);

// x [B, n, C] and size None or [B, n, 1] for a plan of n tokens. Returns nout.
c10::SymInt check_merge_by_plan(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                const at::Tensor& dest, const at::Tensor& offsets,
                                const at::Tensor& members, std::string_view mode, const char* op);

// x [B, nout, C] for a plan of nout outputs.
void check_unmerge_by_plan(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
                           const at::Tensor& members);

// source None or [B, N0] int of token positions, B the plan's.
void check_merge_source_by_plan(const std::optional<at::Tensor>& source, const at::Tensor& dest,
                                const at::Tensor& offsets, const at::Tensor& members);

// The message of a plan row that tome_plan_fault rejects.
std::string plan_fault_message(PlanFault fault, int64_t b, int64_t o, const char* op);

}  // namespace tokred
