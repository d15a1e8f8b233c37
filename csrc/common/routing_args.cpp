#include "common/routing_args.h"

#include "common/checks.h"

namespace tokred {

namespace {

void check_r_idx(const at::Tensor& r_idx, const at::Tensor& like, const char* op,
                 const char* like_name) {
  check_index(r_idx, op, "r_idx");
  check_dim(r_idx, 3, op, "r_idx", "[n, P, topk]");
  check_same_device(like, r_idx, op, like_name, "r_idx");
  TOKRED_SYM_CHECK(r_idx.sym_size(0).sym_eq(like.sym_size(0)), op, "r_idx", "must have batch size ",
                   like_name, ".size(0) = ", like.sym_size(0), ", got ", r_idx.sym_size(0));
  TOKRED_SYM_CHECK(r_idx.sym_size(1).sym_eq(like.sym_size(1)), op, "r_idx",
                   "must have one row per region, ", like_name, ".size(1) = ", like.sym_size(1),
                   ", got ", r_idx.sym_size(1));
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* op, const char* arg,
                      const char* like_name) {
  TOKRED_CHECK(t.scalar_type() == like.scalar_type(), op, arg, "must have the dtype of ", like_name,
               " (", like.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace

routing::Dims dims_of(const at::Tensor& q, const at::Tensor& v, const at::Tensor& r_idx,
                      int64_t num_heads) {
  routing::Dims d;
  d.n = q.size(0);
  d.P = q.size(1);
  d.WQ = q.size(2);
  d.WK = v.size(2);
  d.T = r_idx.size(2);
  d.H = num_heads;
  d.CQ = q.size(3);
  d.CV = v.size(3);
  d.DQ = d.CQ / num_heads;
  d.DV = d.CV / num_heads;
  return d;
}

at::ScalarType routing_lse_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<c10::SymInt> check_routed_gather(const at::Tensor& kv, const at::Tensor& r_idx,
                                             const std::optional<at::Tensor>& r_weight) {
  const char* op = "routed_gather";
  check_float(kv, op, "kv");
  check_dim(kv, 4, op, "kv", "[n, P, w2, c]");
  check_r_idx(r_idx, kv, op, "kv");
  if (r_weight.has_value()) {
    const at::Tensor& w = *r_weight;
    check_float(w, op, "r_weight");
    check_same_device(kv, w, op, "kv", "r_weight");
    TOKRED_CHECK(w.sym_sizes() == r_idx.sym_sizes(), op, "r_weight",
                 "must have the shape of r_idx ", r_idx.sym_sizes(), ", got ", w.sym_sizes());
  }
  return {kv.sym_size(0), kv.sym_size(1), r_idx.sym_size(2), kv.sym_size(2), kv.sym_size(3)};
}

void check_routed_gather_backward(const at::Tensor& grad, const at::Tensor& kv,
                                  const at::Tensor& r_idx,
                                  const std::optional<at::Tensor>& r_weight) {
  const char* op = "_routed_gather_backward";
  check_float(grad, op, "grad");
  check_dim(grad, 5, op, "grad", "[n, P, topk, w2, c]");
  check_float(kv, op, "kv");
  check_dim(kv, 4, op, "kv", "[n, P, w2, c]");
  check_same_dtype(kv, grad, op, "kv", "grad");
  check_same_device(grad, kv, op, "grad", "kv");
  check_r_idx(r_idx, kv, op, "kv");
  const std::vector<c10::SymInt> expected = {kv.sym_size(0), kv.sym_size(1), r_idx.sym_size(2),
                                             kv.sym_size(2), kv.sym_size(3)};
  TOKRED_CHECK(grad.sym_sizes() == c10::SymIntArrayRef(expected), op, "grad",
               "must have the routed_gather output shape ", c10::SymIntArrayRef(expected), ", got ",
               grad.sym_sizes());
  if (r_weight.has_value()) {
    check_float(*r_weight, op, "r_weight");
    check_same_device(kv, *r_weight, op, "kv", "r_weight");
    TOKRED_CHECK(r_weight->sym_sizes() == r_idx.sym_sizes(), op, "r_weight",
                 "must have the shape of r_idx ", r_idx.sym_sizes(), ", got ",
                 r_weight->sym_sizes());
  }
}

std::pair<std::vector<c10::SymInt>, std::vector<c10::SymInt>> check_routed_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r_idx,
    const c10::SymInt& num_heads, const char* op) {
  check_float(q, op, "q");
  check_dim(q, 4, op, "q", "[n, P, wq, cqk]");
  check_dim(k, 4, op, "k", "[n, P, wk, cqk]");
  check_dim(v, 4, op, "v", "[n, P, wk, cv]");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, v, op, "q", "v");
  TOKRED_SYM_CHECK(k.sym_size(0).sym_eq(q.sym_size(0)), op, "k",
                   "must have batch size q.size(0) = ", q.sym_size(0), ", got ", k.sym_size(0));
  TOKRED_SYM_CHECK(k.sym_size(1).sym_eq(q.sym_size(1)), op, "k",
                   "must have the region count of q, q.size(1) = ", q.sym_size(1), ", got ",
                   k.sym_size(1));
  TOKRED_SYM_CHECK(k.sym_size(3).sym_eq(q.sym_size(3)), op, "k",
                   "must have the channels of q, q.size(3) = ", q.sym_size(3), ", got ",
                   k.sym_size(3));
  TOKRED_CHECK(v.sym_sizes().slice(0, 3) == k.sym_sizes().slice(0, 3), op, "v",
               "must match k in [n, P, wk] = ", k.sym_sizes().slice(0, 3), ", got ",
               v.sym_sizes().slice(0, 3));
  check_r_idx(r_idx, q, op, "q");
  TOKRED_SYM_CHECK(num_heads.sym_ge(1), op, "num_heads", "must be >= 1, got ", num_heads);
  TOKRED_SYM_CHECK((q.sym_size(3) % num_heads).sym_eq(0), op, "num_heads",
                   "must divide the q/k channels ", q.sym_size(3), ", got ", num_heads);
  TOKRED_SYM_CHECK((v.sym_size(3) % num_heads).sym_eq(0), op, "num_heads",
                   "must divide the v channels ", v.sym_size(3), ", got ", num_heads);
  return {{q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(3)},
          {q.sym_size(0), q.sym_size(1), num_heads, q.sym_size(2)}};
}

void check_routed_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& r_idx, const at::Tensor& out,
                                     const at::Tensor& lse, const c10::SymInt& num_heads) {
  const char* op = "_routed_attention_backward";
  const auto shapes = check_routed_attention(q, k, v, r_idx, num_heads, op);
  const c10::SymIntArrayRef out_shape(shapes.first);
  const c10::SymIntArrayRef lse_shape(shapes.second);
  check_same_dtype(grad_out, q, op, "grad_out", "q");
  check_same_dtype(out, q, op, "out", "q");
  check_same_device(q, grad_out, op, "q", "grad_out");
  check_same_device(q, out, op, "q", "out");
  check_same_device(q, lse, op, "q", "lse");
  TOKRED_CHECK(grad_out.sym_sizes() == out_shape, op, "grad_out", "must have shape ", out_shape,
               ", got ", grad_out.sym_sizes());
  TOKRED_CHECK(out.sym_sizes() == out_shape, op, "out", "must have shape ", out_shape, ", got ",
               out.sym_sizes());
  TOKRED_CHECK(lse.sym_sizes() == lse_shape, op, "lse", "must have shape ", lse_shape, ", got ",
               lse.sym_sizes());
  TOKRED_CHECK(lse.scalar_type() == routing_lse_dtype(q.scalar_type()), op, "lse", "must be ",
               routing_lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
}

}  // namespace tokred
