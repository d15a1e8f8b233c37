// Meta kernels of the selection ops: shapes only, with SymInts, for torch.compile, export and
// C++ callers on the meta device.
#include <torch/library.h>

#include "common/select_args.h"

namespace tokred {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_meta(const at::Tensor& scores, c10::SymInt k, bool,
                                             const std::optional<at::Tensor>& lengths) {
  const auto shape = check_topk(scores, k, lengths);
  return {at::empty_symint(shape, scores.options()),
          at::empty_symint(shape, scores.options().dtype(at::kLong))};
}

at::Tensor topk_backward_meta(const at::Tensor& grad, const at::Tensor& indices, c10::SymInt n) {
  check_topk_backward(grad, indices, n);
  std::vector<c10::SymInt> shape(grad.sym_sizes().begin(), grad.sym_sizes().end());
  shape.back() = n;
  return at::empty_symint(shape, grad.options());
}

at::Tensor gather_tokens_meta(const at::Tensor& x, const at::Tensor& index) {
  check_gather_tokens(x, index);
  return at::empty_symint({x.sym_size(0), index.sym_size(1), x.sym_size(2)}, x.options());
}

at::Tensor gather_tokens_backward_meta(const at::Tensor& grad, const at::Tensor& index,
                                       c10::SymInt n) {
  check_gather_tokens_backward(grad, index, n);
  return at::empty_symint({grad.sym_size(0), n, grad.sym_size(2)}, grad.options());
}

at::Tensor complement_meta(const at::Tensor& index, c10::SymInt n) {
  check_complement(index, n);
  return at::empty_symint({index.sym_size(0), n - index.sym_size(1)},
                          index.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_meta(const at::Tensor& x, const at::Tensor& scores,
                                                     c10::SymInt k, bool fuse,
                                                     c10::SymInt num_protected, bool) {
  const auto shape = check_prune_tokens(x, scores, k, fuse, num_protected);
  return {at::empty_symint(shape, x.options()),
          at::empty_symint({x.sym_size(0), k}, x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_backward_meta(const at::Tensor& grad_out,
                                                              const at::Tensor& x,
                                                              const at::Tensor& scores,
                                                              const at::Tensor& index, bool fuse,
                                                              c10::SymInt num_protected) {
  check_prune_tokens_backward(grad_out, x, scores, index, fuse, num_protected);
  return {at::empty_symint(x.sym_sizes(), grad_out.options()),
          at::empty_symint(scores.sym_sizes(), scores.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, Meta, m) {
  m.impl("topk", TORCH_FN(topk_meta));
  m.impl("_topk_backward", TORCH_FN(topk_backward_meta));
  m.impl("gather_tokens", TORCH_FN(gather_tokens_meta));
  m.impl("_gather_tokens_backward", TORCH_FN(gather_tokens_backward_meta));
  m.impl("complement", TORCH_FN(complement_meta));
  m.impl("prune_tokens", TORCH_FN(prune_tokens_meta));
  m.impl("_prune_tokens_backward", TORCH_FN(prune_tokens_backward_meta));
}

}  // namespace tokred
