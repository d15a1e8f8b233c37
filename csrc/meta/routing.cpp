// Meta kernels of the BiFormer routing ops: shapes only, with SymInts.
#include <torch/library.h>

#include "common/routing_args.h"

namespace tokred {
namespace {

at::Tensor routed_gather_meta(const at::Tensor& kv, const at::Tensor& r_idx,
                              const std::optional<at::Tensor>& r_weight) {
  return at::empty_symint(check_routed_gather(kv, r_idx, r_weight), kv.options());
}

std::tuple<at::Tensor, at::Tensor> routed_gather_backward_meta(
    const at::Tensor& grad, const at::Tensor& kv, const at::Tensor& r_idx,
    const std::optional<at::Tensor>& r_weight) {
  check_routed_gather_backward(grad, kv, r_idx, r_weight);
  at::Tensor grad_w = r_weight.has_value()
                          ? at::empty_symint(r_weight->sym_sizes(), r_weight->options())
                          : at::empty({0}, kv.options());
  return {at::empty_symint(kv.sym_sizes(), kv.options()), grad_w};
}

std::tuple<at::Tensor, at::Tensor> routed_attention_meta(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& r_idx,
                                                         c10::SymInt num_heads, double) {
  const auto shapes = check_routed_attention(q, k, v, r_idx, num_heads);
  return {at::empty_symint(shapes.first, q.options()),
          at::empty_symint(shapes.second, q.options().dtype(routing_lse_dtype(q.scalar_type())))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& r_idx, const at::Tensor& out, const at::Tensor& lse, c10::SymInt num_heads,
    double) {
  check_routed_attention_backward(grad_out, q, k, v, r_idx, out, lse, num_heads);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, Meta, m) {
  m.impl("routed_gather", TORCH_FN(routed_gather_meta));
  m.impl("_routed_gather_backward", TORCH_FN(routed_gather_backward_meta));
  m.impl("routed_attention", TORCH_FN(routed_attention_meta));
  m.impl("_routed_attention_backward", TORCH_FN(routed_attention_backward_meta));
}

}  // namespace tokred
