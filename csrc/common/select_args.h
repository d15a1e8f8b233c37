// Validation and output shapes of the selection ops, shared by the CPU, CUDA and Meta kernels so
// every backend rejects the same inputs with the same message.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace tokred {

// Rows of a segmented op: the product of every dim but the last (1 for a 1-D tensor).
int64_t leading_rows(const at::Tensor& t);

// scores [..., N]; returns the output shape [..., k].
std::vector<c10::SymInt> check_topk(const at::Tensor& scores, const c10::SymInt& k,
                                    const std::optional<at::Tensor>& lengths);
void check_topk_backward(const at::Tensor& grad, const at::Tensor& indices, const c10::SymInt& n);

// x [B, N, C], index [B, K].
void check_gather_tokens(const at::Tensor& x, const at::Tensor& index);
void check_gather_tokens_backward(const at::Tensor& grad, const at::Tensor& index,
                                  const c10::SymInt& n);

// index [B, K] -> [B, n - K].
void check_complement(const at::Tensor& index, const c10::SymInt& n);

// x [B, P + N, C], scores [B, N]; returns the output shape [B, P + k + fuse, C].
std::vector<c10::SymInt> check_prune_tokens(const at::Tensor& x, const at::Tensor& scores,
                                            const c10::SymInt& k, bool fuse,
                                            const c10::SymInt& num_protected);
void check_prune_tokens_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& scores, const at::Tensor& index, bool fuse,
                                 const c10::SymInt& num_protected);

}  // namespace tokred
