// Meta kernels of the ToMe ops: shapes only, with SymInts (r is clamped symbolically), for
// torch.compile, export and C++ callers on the meta device.
#include <torch/library.h>

#include "common/merge_args.h"

namespace tokred {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_meta(const at::Tensor& metric,
                                                                    c10::SymInt r,
                                                                    c10::SymInt num_protected) {
  const c10::SymInt rr = check_bipartite_match(metric, r, num_protected);
  const c10::SymInt B = metric.sym_size(0), na = (metric.sym_size(1) + 1) / 2;
  const auto opts = metric.options().dtype(at::kLong);
  return {at::empty_symint({B, na - rr}, opts), at::empty_symint({B, rr}, opts),
          at::empty_symint({B, rr}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_plan_meta(
    const at::Tensor& metric, const at::Tensor& dst_tokens, c10::SymInt r) {
  const c10::SymInt rr = check_bipartite_match_plan(metric, dst_tokens, r);
  const c10::SymInt B = metric.sym_size(0), n = metric.sym_size(1);
  const auto opts = metric.options().dtype(at::kLong);
  return {at::empty_symint({B, n}, opts), at::empty_symint({B, n - rr + 1}, opts),
          at::empty_symint({B, n}, opts)};
}

std::tuple<at::Tensor, at::Tensor> merge_meta(const at::Tensor& x,
                                              const std::optional<at::Tensor>& size,
                                              const at::Tensor& unm, const at::Tensor& src,
                                              const at::Tensor& dst, c10::string_view mode,
                                              c10::SymInt num_protected) {
  const c10::SymInt r = check_merge(x, size, unm, src, dst, mode, num_protected, "merge");
  const c10::SymInt nout = x.sym_size(1) - r;
  return {at::empty_symint({x.sym_size(0), nout, x.sym_size(2)}, x.options()),
          at::empty_symint({x.sym_size(0), nout, c10::SymInt(1)}, x.options())};
}

at::Tensor merge_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& size, const at::Tensor& unm,
                               const at::Tensor& src, const at::Tensor& dst, c10::string_view mode,
                               c10::SymInt num_protected) {
  const char* op = "_merge_backward";
  const c10::SymInt r = check_merge(x, size, unm, src, dst, mode, num_protected, op);
  check_merge_backward_grad(grad, x, r, op);
  return at::empty_symint(x.sym_sizes(), grad.options());
}

at::Tensor unmerge_meta(const at::Tensor& x, const at::Tensor& unm, const at::Tensor& src,
                        const at::Tensor& dst, c10::SymInt n, c10::SymInt num_protected) {
  check_unmerge(x, unm, src, dst, n, num_protected, "unmerge");
  return at::empty_symint({x.sym_size(0), n, x.sym_size(2)}, x.options());
}

at::Tensor unmerge_backward_meta(const at::Tensor& grad, const at::Tensor& unm,
                                 const at::Tensor& src, const at::Tensor& dst,
                                 c10::SymInt num_protected) {
  const c10::SymInt r =
      check_unmerge_backward(grad, unm, src, dst, num_protected, "_unmerge_backward");
  return at::empty_symint({grad.sym_size(0), grad.sym_size(1) - r, grad.sym_size(2)},
                          grad.options());
}

at::Tensor merge_source_meta(const std::optional<at::Tensor>& source, const at::Tensor& unm,
                             const at::Tensor& src, const at::Tensor& dst, c10::SymInt n,
                             c10::SymInt num_protected) {
  check_merge_source(source, unm, src, dst, n, num_protected);
  if (source.has_value())
    return at::empty_symint(source->sym_sizes(), source->options().dtype(at::kLong));
  return at::empty_symint({unm.sym_size(0), n}, unm.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_plan_meta(const at::Tensor& unm,
                                                               const at::Tensor& src,
                                                               const at::Tensor& dst, c10::SymInt n,
                                                               c10::SymInt num_protected) {
  const c10::SymInt r = check_merge_plan(unm, src, dst, n, num_protected);
  const c10::SymInt B = unm.sym_size(0);
  const auto opts = unm.options().dtype(at::kLong);
  return {at::empty_symint({B, n}, opts), at::empty_symint({B, n - r + 1}, opts),
          at::empty_symint({B, n}, opts)};
}

std::tuple<at::Tensor, at::Tensor> merge_by_plan_meta(
    const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& dest,
    const at::Tensor& offsets, const at::Tensor& members, c10::string_view mode) {
  const c10::SymInt nout =
      check_merge_by_plan(x, size, dest, offsets, members, mode, "merge_by_plan");
  return {at::empty_symint({x.sym_size(0), nout, x.sym_size(2)}, x.options()),
          at::empty_symint({x.sym_size(0), nout, c10::SymInt(1)}, x.options())};
}

at::Tensor merge_by_plan_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                       const std::optional<at::Tensor>& size,
                                       const at::Tensor& dest, const at::Tensor& offsets,
                                       const at::Tensor& members, c10::string_view mode) {
  const char* op = "_merge_by_plan_backward";
  const c10::SymInt nout = check_merge_by_plan(x, size, dest, offsets, members, mode, op);
  check_merge_backward_grad(grad, x, x.sym_size(1) - nout, op);
  return at::empty_symint(x.sym_sizes(), grad.options());
}

at::Tensor unmerge_by_plan_meta(const at::Tensor& x, const at::Tensor& dest,
                                const at::Tensor& offsets, const at::Tensor& members) {
  check_unmerge_by_plan(x, dest, offsets, members);
  return at::empty_symint({x.sym_size(0), dest.sym_size(1), x.sym_size(2)}, x.options());
}

at::Tensor merge_source_by_plan_meta(const std::optional<at::Tensor>& source,
                                     const at::Tensor& dest, const at::Tensor& offsets,
                                     const at::Tensor& members) {
  check_merge_source_by_plan(source, dest, offsets, members);
  if (source.has_value()) {
    return at::empty_symint(source->sym_sizes(), source->options().dtype(at::kLong));
  }
  return at::empty_symint(dest.sym_sizes(), dest.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, Meta, m) {
  m.impl("bipartite_match", TORCH_FN(bipartite_match_meta));
  m.impl("bipartite_match_plan", TORCH_FN(bipartite_match_plan_meta));
  m.impl("merge", TORCH_FN(merge_meta));
  m.impl("_merge_backward", TORCH_FN(merge_backward_meta));
  m.impl("unmerge", TORCH_FN(unmerge_meta));
  m.impl("_unmerge_backward", TORCH_FN(unmerge_backward_meta));
  m.impl("merge_source", TORCH_FN(merge_source_meta));
  m.impl("merge_plan", TORCH_FN(merge_plan_meta));
  m.impl("merge_by_plan", TORCH_FN(merge_by_plan_meta));
  m.impl("_merge_by_plan_backward", TORCH_FN(merge_by_plan_backward_meta));
  m.impl("unmerge_by_plan", TORCH_FN(unmerge_by_plan_meta));
  m.impl("merge_source_by_plan", TORCH_FN(merge_source_by_plan_meta));
}

}  // namespace tokred
