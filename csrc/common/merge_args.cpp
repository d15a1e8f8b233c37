#include "common/merge_args.h"

#include "common/checks.h"

namespace tokred {

MergeMode parse_merge_mode(std::string_view mode, const char* op) {
  if (mode == "sum") return MergeMode::kSum;
  if (mode == "mean") return MergeMode::kMean;
  if (mode == "amax") return MergeMode::kAmax;
  if (mode == "wavg") return MergeMode::kWavg;
  TOKRED_CHECK(false, op, "mode", "must be one of 'sum', 'mean', 'amax', 'wavg', got '", mode, "'");
  return MergeMode::kSum;
}

namespace {

// size None or [B, N, 1] of x's dtype and device.
void check_size(const at::Tensor& x, const std::optional<at::Tensor>& size, const char* op) {
  if (!size.has_value()) return;
  const at::Tensor& s = *size;
  TOKRED_CHECK(s.scalar_type() == x.scalar_type(), op, "size", "must have the dtype of x ",
               x.scalar_type(), ", got ", s.scalar_type());
  check_same_device(x, s, op, "x", "size");
  const std::vector<c10::SymInt> want = {x.sym_size(0), x.sym_size(1), c10::SymInt(1)};
  TOKRED_CHECK(s.sym_sizes() == c10::SymIntArrayRef(want), op, "size",
               "must have shape [B, N, 1] = ", c10::SymIntArrayRef(want), ", got ", s.sym_sizes());
}

}  // namespace

c10::SymInt tome_clamped_r(const c10::SymInt& r, const c10::SymInt& n,
                           const c10::SymInt& num_protected) {
  const c10::SymInt cap = ((n - num_protected).max(c10::SymInt(0)) / 2);
  return r.min(cap).max(c10::SymInt(0));
}

void check_num_protected(const c10::SymInt& num_protected, const char* op) {
  TOKRED_SYM_CHECK(num_protected.sym_ge(0), op, "num_protected", "must be >= 0, got ",
                   num_protected);
}

c10::SymInt check_bipartite_match(const at::Tensor& metric, const c10::SymInt& r,
                                  const c10::SymInt& num_protected) {
  const char* op = "bipartite_match";
  check_float(metric, op, "metric");
  check_dim(metric, 3, op, "metric", "[B, N, D]");
  check_num_protected(num_protected, op);
  return tome_clamped_r(r, metric.sym_size(1), num_protected);
}

c10::SymInt check_bipartite_match_plan(const at::Tensor& metric, const at::Tensor& dst_tokens,
                                       const c10::SymInt& r) {
  const char* op = "bipartite_match_plan";
  check_float(metric, op, "metric");
  check_dim(metric, 3, op, "metric", "[B, N, D]");
  check_index(dst_tokens, op, "dst_tokens");
  check_dim(dst_tokens, 1, op, "dst_tokens", "[Nb]");
  check_same_device(metric, dst_tokens, op, "metric", "dst_tokens");
  const c10::SymInt n = metric.sym_size(1), nb = dst_tokens.sym_size(0);
  TOKRED_SYM_CHECK(nb.sym_le(n), op, "dst_tokens", "must list at most N = ", n, " tokens, got ",
                   nb);
  // The partition clamp (rules.tome_partition_clamp_r in Python): at most N - Nb (the A tokens),
  // and 0 without destinations, written as min(N - Nb, Nb * N) to stay one symbolic expression.
  return r.min((n - nb).min(nb * n)).max(c10::SymInt(0));
}

c10::SymInt check_match_indices(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                                const at::Tensor& dst_idx,
                                const std::optional<c10::SymInt>& batch_or_own,
                                const c10::SymInt& n, const c10::SymInt& num_protected,
                                const char* op) {
  check_num_protected(num_protected, op);
  check_index(unm_idx, op, "unm_idx");
  check_index(src_idx, op, "src_idx");
  check_index(dst_idx, op, "dst_idx");
  check_dim(unm_idx, 2, op, "unm_idx", "[B, ceil(N/2) - r]");
  check_dim(src_idx, 2, op, "src_idx", "[B, r]");
  check_dim(dst_idx, 2, op, "dst_idx", "[B, r]");
  check_same_device(unm_idx, src_idx, op, "unm_idx", "src_idx");
  check_same_device(src_idx, dst_idx, op, "src_idx", "dst_idx");
  const c10::SymInt batch = batch_or_own.has_value() ? *batch_or_own : unm_idx.sym_size(0);
  TOKRED_SYM_CHECK(unm_idx.sym_size(0).sym_eq(batch), op, "unm_idx", "must have batch size ", batch,
                   ", got ", unm_idx.sym_size(0));
  TOKRED_CHECK(dst_idx.sym_sizes() == src_idx.sym_sizes(), op, "dst_idx",
               "must have the shape of src_idx ", src_idx.sym_sizes(), ", got ",
               dst_idx.sym_sizes());
  TOKRED_SYM_CHECK(src_idx.sym_size(0).sym_eq(batch), op, "src_idx", "must have batch size ", batch,
                   ", got ", src_idx.sym_size(0));
  const c10::SymInt r = src_idx.sym_size(1);
  const c10::SymInt na = (n + 1) / 2;
  TOKRED_SYM_CHECK((unm_idx.sym_size(1) + r).sym_eq(na), op, "unm_idx",
                   "and src_idx must together list the ceil(N/2) = ", na, " tokens of set A, got ",
                   unm_idx.sym_size(1), " + ", r);
  // The layout gives the prefix's A tokens (the first ceil(min(P, n) / 2) unmerged ones) the even
  // outputs below P; with fewer unmerged tokens, two tokens would share an output.
  const c10::SymInt prefix_a = (num_protected.min(n) + 1) / 2;
  TOKRED_SYM_CHECK(unm_idx.sym_size(1).sym_ge(prefix_a), op, "unm_idx", "must keep at least the ",
                   prefix_a, " prefix tokens of set A with num_protected = ", num_protected,
                   ", got ", unm_idx.sym_size(1));
  return r;
}

c10::SymInt check_merge(const at::Tensor& x, const std::optional<at::Tensor>& size,
                        const at::Tensor& unm_idx, const at::Tensor& src_idx,
                        const at::Tensor& dst_idx, std::string_view mode,
                        const c10::SymInt& num_protected, const char* op) {
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, N, C]");
  parse_merge_mode(mode, op);
  check_size(x, size, op);
  check_same_device(x, unm_idx, op, "x", "unm_idx");
  return check_match_indices(unm_idx, src_idx, dst_idx, x.sym_size(0), x.sym_size(1), num_protected,
                             op);
}

void check_merge_backward_grad(const at::Tensor& grad, const at::Tensor& x, const c10::SymInt& r,
                               const char* op) {
  check_dim(grad, 3, op, "grad_out", "[B, N - r, C]");
  TOKRED_CHECK(grad.scalar_type() == x.scalar_type(), op, "grad_out", "must have the dtype of x ",
               x.scalar_type(), ", got ", grad.scalar_type());
  check_same_device(grad, x, op, "grad_out", "x");
  const std::vector<c10::SymInt> want = {x.sym_size(0), x.sym_size(1) - r, x.sym_size(2)};
  TOKRED_CHECK(grad.sym_sizes() == c10::SymIntArrayRef(want), op, "grad_out",
               "must have shape [B, N - r, C] = ", c10::SymIntArrayRef(want), ", got ",
               grad.sym_sizes());
}

c10::SymInt check_unmerge_backward(const at::Tensor& grad, const at::Tensor& unm_idx,
                                   const at::Tensor& src_idx, const at::Tensor& dst_idx,
                                   const c10::SymInt& num_protected, const char* op) {
  check_float(grad, op, "grad");
  check_dim(grad, 3, op, "grad", "[B, n, C]");
  check_same_device(grad, unm_idx, op, "grad", "unm_idx");
  return check_match_indices(unm_idx, src_idx, dst_idx, grad.sym_size(0), grad.sym_size(1),
                             num_protected, op);
}

c10::SymInt check_unmerge(const at::Tensor& x, const at::Tensor& unm_idx, const at::Tensor& src_idx,
                          const at::Tensor& dst_idx, const c10::SymInt& n,
                          const c10::SymInt& num_protected, const char* op) {
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, n - r, C]");
  check_same_device(x, unm_idx, op, "x", "unm_idx");
  TOKRED_SYM_CHECK(n.sym_ge(0), op, "n", "must be >= 0, got ", n);
  const c10::SymInt r =
      check_match_indices(unm_idx, src_idx, dst_idx, x.sym_size(0), n, num_protected, op);
  TOKRED_SYM_CHECK(x.sym_size(1).sym_eq(n - r), op, "x", "must have n - r = ", n - r,
                   " tokens, got ", x.sym_size(1));
  return r;
}

c10::SymInt check_merge_source(const std::optional<at::Tensor>& source, const at::Tensor& unm_idx,
                               const at::Tensor& src_idx, const at::Tensor& dst_idx,
                               const c10::SymInt& n, const c10::SymInt& num_protected) {
  const char* op = "merge_source";
  TOKRED_SYM_CHECK(n.sym_ge(0), op, "n", "must be >= 0, got ", n);
  if (source.has_value()) {
    check_index(*source, op, "source");
    check_dim(*source, 2, op, "source", "[B, N0]");
    check_same_device(*source, unm_idx, op, "source", "unm_idx");
  }
  // With a source map, the match indices must have its batch: a kernel reads one plan row per
  // source row.
  const std::optional<c10::SymInt> batch =
      source.has_value() ? std::optional<c10::SymInt>(source->sym_size(0)) : std::nullopt;
  return check_match_indices(unm_idx, src_idx, dst_idx, batch, n, num_protected, op);
}

// ---- plans

c10::SymInt check_plan(const at::Tensor& dest, const at::Tensor& offsets, const at::Tensor& members,
                       const char* op) {
  check_index(dest, op, "dest");
  check_index(offsets, op, "offsets");
  check_index(members, op, "members");
  check_dim(dest, 2, op, "dest", "[B, N]");
  check_dim(offsets, 2, op, "offsets", "[B, N - r + 1]");
  check_dim(members, 2, op, "members", "[B, N]");
  check_same_device(dest, offsets, op, "dest", "offsets");
  check_same_device(dest, members, op, "dest", "members");
  TOKRED_CHECK(members.sym_sizes() == dest.sym_sizes(), op, "members",
               "must have the shape of dest ", dest.sym_sizes(), ", got ", members.sym_sizes());
  TOKRED_SYM_CHECK(offsets.sym_size(0).sym_eq(dest.sym_size(0)), op, "offsets",
                   "must have batch size ", dest.sym_size(0), ", got ", offsets.sym_size(0));
  const c10::SymInt n = dest.sym_size(1);
  const c10::SymInt nout = offsets.sym_size(1) - 1;
  TOKRED_SYM_CHECK(nout.sym_ge(0).sym_and(nout.sym_le(n)), op, "offsets",
                   "must have N - r + 1 columns with 0 <= r <= N = ", n, ", got ",
                   offsets.sym_size(1));
  TOKRED_SYM_CHECK(nout.sym_gt(0).sym_or(n.sym_eq(0)), op, "offsets",
                   "must have at least one output for N = ", n, " tokens, got none");
  return nout;
}

c10::SymInt check_merge_plan(const at::Tensor& unm_idx, const at::Tensor& src_idx,
                             const at::Tensor& dst_idx, const c10::SymInt& n,
                             const c10::SymInt& num_protected) {
  const char* op = "merge_plan";
  TOKRED_SYM_CHECK(n.sym_ge(0), op, "n", "must be >= 0, got ", n);
  return check_match_indices(unm_idx, src_idx, dst_idx, std::nullopt, n, num_protected, op);
}

c10::SymInt check_merge_by_plan(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                const at::Tensor& dest, const at::Tensor& offsets,
                                const at::Tensor& members, std::string_view mode, const char* op) {
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, N, C]");
  parse_merge_mode(mode, op);
  const c10::SymInt nout = check_plan(dest, offsets, members, op);
  check_same_device(x, dest, op, "x", "dest");
  const std::vector<c10::SymInt> want = {dest.sym_size(0), dest.sym_size(1)};
  TOKRED_CHECK(x.sym_sizes().slice(0, 2) == c10::SymIntArrayRef(want), op, "x",
               "must have the plan's [B, N] = ", c10::SymIntArrayRef(want), " leading sizes, got ",
               x.sym_sizes());
  check_size(x, size, op);
  return nout;
}

void check_unmerge_by_plan(const at::Tensor& x, const at::Tensor& dest, const at::Tensor& offsets,
                           const at::Tensor& members) {
  const char* op = "unmerge_by_plan";
  check_float(x, op, "x");
  check_dim(x, 3, op, "x", "[B, N - r, C]");
  const c10::SymInt nout = check_plan(dest, offsets, members, op);
  check_same_device(x, dest, op, "x", "dest");
  const std::vector<c10::SymInt> want = {dest.sym_size(0), nout};
  TOKRED_CHECK(x.sym_sizes().slice(0, 2) == c10::SymIntArrayRef(want), op, "x",
               "must have the plan's [B, N - r] = ", c10::SymIntArrayRef(want),
               " leading sizes, got ", x.sym_sizes());
}

void check_merge_source_by_plan(const std::optional<at::Tensor>& source, const at::Tensor& dest,
                                const at::Tensor& offsets, const at::Tensor& members) {
  const char* op = "merge_source_by_plan";
  check_plan(dest, offsets, members, op);
  if (!source.has_value()) return;
  check_index(*source, op, "source");
  check_dim(*source, 2, op, "source", "[B, N0]");
  check_same_device(*source, dest, op, "source", "dest");
  TOKRED_SYM_CHECK(source->sym_size(0).sym_eq(dest.sym_size(0)), op, "source",
                   "must have the plan's batch size ", dest.sym_size(0), ", got ",
                   source->sym_size(0));
}

std::string plan_fault_message(PlanFault fault, int64_t b, int64_t o, const char* op) {
  const char* what = "";
  switch (fault) {
    case PlanFault::kOffsets:
      what = "'offsets' must start at 0, end at N and rise strictly (every output has a member)";
      break;
    case PlanFault::kMemberRange:
      what = "'members' must hold token positions in [0, N)";
      break;
    case PlanFault::kMemberOrder:
      what = "'members' must ascend within each output";
      break;
    case PlanFault::kDest:
      what = "'dest' must map each member to the output that lists it";
      break;
    case PlanFault::kNone:
      break;
  }
  return c10::str("tokred::", op, ": (dest, offsets, members) is not a merge plan at batch row ", b,
                  ", output ", o, ": ", what, " (build plans with tokred::merge_plan)");
}

}  // namespace tokred
