// Validation and output shapes of the BiFormer routing ops, shared by the CPU, CUDA and Meta
// kernels so every backend rejects the same inputs with the same message. The values of r_idx
// are each backend's own check: the CPU kernels TORCH_CHECK them (naming the first bad entry),
// the CUDA kernels assert them on the device without a host sync, Meta sees no values.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/routing.h"

namespace tokred {

// kv [n, P, w2, c], r_idx [n, P, T], r_weight [n, P, T] -> [n, P, T, w2, c].
std::vector<c10::SymInt> check_routed_gather(const at::Tensor& kv, const at::Tensor& r_idx,
                                             const std::optional<at::Tensor>& r_weight);
void check_routed_gather_backward(const at::Tensor& grad, const at::Tensor& kv,
                                  const at::Tensor& r_idx,
                                  const std::optional<at::Tensor>& r_weight);

// q [n, P, wq, cqk], k [n, P, wk, cqk], v [n, P, wk, cv], r_idx [n, P, T].
// Returns the shapes of out [n, P, wq, cv] and lse [n, P, heads, wq].
std::pair<std::vector<c10::SymInt>, std::vector<c10::SymInt>> check_routed_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r_idx,
    const c10::SymInt& num_heads, const char* op = "routed_attention");
void check_routed_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& r_idx, const at::Tensor& out,
                                     const at::Tensor& lse, const c10::SymInt& num_heads);

// The sizes of a routed_attention call with q [n, P, wq, cqk], v [n, P, wk, cv], r_idx [n, P, T]
// (already checked by check_routed_attention).
routing::Dims dims_of(const at::Tensor& q, const at::Tensor& v, const at::Tensor& r_idx,
                      int64_t num_heads);

// The dtype of lse: float64 for float64 inputs, float32 otherwise.
at::ScalarType routing_lse_dtype(at::ScalarType t);

}  // namespace tokred
