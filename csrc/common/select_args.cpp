#include "common/select_args.h"

#include "common/checks.h"

namespace tokred {

int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

std::vector<c10::SymInt> check_topk(const at::Tensor& scores, const c10::SymInt& k,
                                    const std::optional<at::Tensor>& lengths) {
  const char* op = "topk";
  check_float(scores, op, "scores");
  TOKRED_CHECK(scores.dim() >= 1, op, "scores", "must have at least 1 dimension, got a scalar");
  const c10::SymInt n = scores.sym_size(-1);
  TOKRED_SYM_CHECK(k.sym_ge(0), op, "k", "must be >= 0, got ", k);
  TOKRED_SYM_CHECK(k.sym_le(n), op, "k", "must be <= scores.size(-1) = ", n, ", got ", k);
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    check_index(len, op, "lengths");
    check_same_device(scores, len, op, "scores", "lengths");
    const auto lead = scores.sym_sizes().slice(0, scores.dim() - 1);
    TOKRED_CHECK(len.sym_sizes() == lead, op, "lengths",
                 "must have the leading shape of scores (one length per row) ", lead, ", got ",
                 len.sym_sizes());
  }
  std::vector<c10::SymInt> out(scores.sym_sizes().begin(), scores.sym_sizes().end());
  out.back() = k;
  return out;
}

void check_topk_backward(const at::Tensor& grad, const at::Tensor& indices, const c10::SymInt& n) {
  const char* op = "_topk_backward";
  check_float(grad, op, "grad_values");
  check_index(indices, op, "indices");
  check_same_device(grad, indices, op, "grad_values", "indices");
  TOKRED_CHECK(grad.sym_sizes() == indices.sym_sizes(), op, "indices",
               "must have the shape of grad_values ", grad.sym_sizes(), ", got ",
               indices.sym_sizes());
  TOKRED_CHECK(grad.dim() >= 1, op, "grad_values", "must have at least 1 dimension");
  TOKRED_SYM_CHECK(grad.sym_size(-1).sym_le(n), op, "n", "must be >= k = ", grad.sym_size(-1),
                   ", got ", n);
}

void check_gather_tokens(const at::Tensor& x, const at::Tensor& index) {
  const char* op = "gather_tokens";
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, N, C]");
  check_index(index, op, "index");
  check_dim(index, 2, op, "index", "[B, K]");
  check_same_device(x, index, op, "x", "index");
  TOKRED_SYM_CHECK(index.sym_size(0).sym_eq(x.sym_size(0)), op, "index",
                   "must have batch size x.size(0) = ", x.sym_size(0), ", got ", index.sym_size(0));
}

void check_gather_tokens_backward(const at::Tensor& grad, const at::Tensor& index,
                                  const c10::SymInt& n) {
  const char* op = "_gather_tokens_backward";
  check_float(grad, op, "grad");
  check_dim(grad, 3, op, "grad", "[B, K, C]");
  check_index(index, op, "index");
  check_dim(index, 2, op, "index", "[B, K]");
  check_same_device(grad, index, op, "grad", "index");
  TOKRED_CHECK(grad.sym_sizes().slice(0, 2) == index.sym_sizes(), op, "index",
               "must have the shape of grad[:, :, 0] ", grad.sym_sizes().slice(0, 2), ", got ",
               index.sym_sizes());
  TOKRED_SYM_CHECK(n.sym_ge(0), op, "n", "must be >= 0, got ", n);
}

void check_complement(const at::Tensor& index, const c10::SymInt& n) {
  const char* op = "complement";
  check_index(index, op, "index");
  check_dim(index, 2, op, "index", "[B, K]");
  TOKRED_SYM_CHECK(index.sym_size(1).sym_le(n), op, "n",
                   "must be >= index.size(1) = ", index.sym_size(1), ", got ", n);
}

std::vector<c10::SymInt> check_prune_tokens(const at::Tensor& x, const at::Tensor& scores,
                                            const c10::SymInt& k, bool fuse,
                                            const c10::SymInt& num_protected) {
  const char* op = "prune_tokens";
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, P + N, C]");
  check_float(scores, op, "scores");
  check_dim(scores, 2, op, "scores", "[B, N]");
  check_same_device(x, scores, op, "x", "scores");
  TOKRED_SYM_CHECK(num_protected.sym_ge(0), op, "num_protected", "must be >= 0, got ",
                   num_protected);
  TOKRED_SYM_CHECK(scores.sym_size(0).sym_eq(x.sym_size(0)), op, "scores",
                   "must have batch size x.size(0) = ", x.sym_size(0), ", got ",
                   scores.sym_size(0));
  const c10::SymInt n = scores.sym_size(1);
  TOKRED_SYM_CHECK((num_protected + n).sym_eq(x.sym_size(1)), op, "scores",
                   "must score every unprotected token: x.size(1) - num_protected = ",
                   x.sym_size(1) - num_protected, ", got scores.size(1) = ", n);
  TOKRED_SYM_CHECK(k.sym_ge(0), op, "k", "must be >= 0, got ", k);
  TOKRED_SYM_CHECK(k.sym_le(n), op, "k", "must be <= the number of scored tokens ", n, ", got ", k);
  return {x.sym_size(0), num_protected + k + (fuse ? 1 : 0), x.sym_size(2)};
}

void check_prune_tokens_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& scores, const at::Tensor& index, bool fuse,
                                 const c10::SymInt& num_protected) {
  const char* op = "_prune_tokens_backward";
  check_float(grad_out, op, "grad_out");
  check_dim(grad_out, 3, op, "grad_out", "[B, P + k + fuse, C]");
  check_dim(x, 3, op, "x", "[B, P + N, C]");
  TOKRED_CHECK(x.scalar_type() == grad_out.scalar_type(), op, "x",
               "must have the dtype of grad_out ", grad_out.scalar_type(), ", got ",
               x.scalar_type());
  check_float(scores, op, "scores");
  check_dim(scores, 2, op, "scores", "[B, N]");
  check_index(index, op, "index");
  check_dim(index, 2, op, "index", "[B, k]");
  check_same_device(grad_out, x, op, "grad_out", "x");
  check_same_device(grad_out, scores, op, "grad_out", "scores");
  check_same_device(grad_out, index, op, "grad_out", "index");
  TOKRED_SYM_CHECK(num_protected.sym_ge(0), op, "num_protected", "must be >= 0, got ",
                   num_protected);
  const c10::SymInt B = grad_out.sym_size(0);
  TOKRED_SYM_CHECK(x.sym_size(0).sym_eq(B), op, "x", "must have batch size grad_out.size(0) = ", B,
                   ", got ", x.sym_size(0));
  TOKRED_SYM_CHECK(x.sym_size(2).sym_eq(grad_out.sym_size(2)), op, "x",
                   "must have the channels of grad_out, grad_out.size(2) = ", grad_out.sym_size(2),
                   ", got ", x.sym_size(2));
  TOKRED_SYM_CHECK(scores.sym_size(0).sym_eq(B), op, "scores",
                   "must have batch size grad_out.size(0) = ", B, ", got ", scores.sym_size(0));
  TOKRED_SYM_CHECK(index.sym_size(0).sym_eq(B), op, "index",
                   "must have batch size grad_out.size(0) = ", B, ", got ", index.sym_size(0));
  TOKRED_SYM_CHECK(index.sym_size(1).sym_le(scores.sym_size(1)), op, "index",
                   "must keep at most the N = ", scores.sym_size(1),
                   " scored tokens, got k = ", index.sym_size(1));
  const c10::SymInt rows = num_protected + index.sym_size(1) + (fuse ? 1 : 0);
  TOKRED_SYM_CHECK(grad_out.sym_size(1).sym_eq(rows), op, "grad_out",
                   "must have num_protected + k + fuse = ", rows, " rows, got ",
                   grad_out.sym_size(1));
  TOKRED_SYM_CHECK((num_protected + scores.sym_size(1)).sym_eq(x.sym_size(1)), op, "x",
                   "must have num_protected + scores.size(1) = ",
                   num_protected + scores.sym_size(1), " rows, got ", x.sym_size(1));
}

}  // namespace tokred
