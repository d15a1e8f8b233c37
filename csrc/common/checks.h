// Argument checks shared by every backend. Messages name the op, the argument, what was
// expected and what came, so a user can fix the call without reading kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>

#define TOKRED_CHECK(cond, op, arg, ...) \
  TORCH_CHECK(cond, "tokred::", op, ": argument '", arg, "' ", __VA_ARGS__)

// For conditions on SymInts: expect_true records the fact under torch.compile instead of
// guarding on a concrete size, so checks never cause recompiles.
#define TOKRED_SYM_CHECK(cond, op, arg, ...) \
  TORCH_SYM_CHECK(cond, "tokred::", op, ": argument '", arg, "' ", __VA_ARGS__)

namespace tokred {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* op, const char* arg) {
  TOKRED_CHECK(is_supported_float(t.scalar_type()), op, arg,
               "must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* op, const char* arg) {
  TOKRED_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, arg,
               "must be an int64 or int32 index tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg,
                      const char* layout) {
  TOKRED_CHECK(t.dim() == dim, op, arg, "must be ", dim, "-D ", layout, ", got shape ",
               t.sym_sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), "tokred::", op, ": arguments '", arg_a, "' and '", arg_b,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

// Index tensors are accepted as int32 or int64; kernels read int64.
inline at::Tensor as_int64(const at::Tensor& t) {
  return t.scalar_type() == at::kLong ? t.contiguous() : t.to(at::kLong).contiguous();
}

}  // namespace tokred
