// CPU kernels of the ToMe ops. Matching runs one batch row per task: dot products vectorise over
// set B, the first-maximum, rank and slot rules come from common/merge.h. Merging builds the plan
// (dest, and each output's members in ascending order) and reduces every output token on its own,
// so sums run in a fixed order without atomics.
#include "common/merge.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/merge_args.h"
#include "cpu/copy.h"
#include "cpu/parallel.h"
#include "cpu/segment.h"
#include "cpu/vec.h"

namespace tokred {
namespace {

// 1 / ‖row‖ for n rows of length D (a norm of 0 gives inf, and its scores NaN), with the sum of
// squares in sum_squares's order: bipartite_match's, per batch row while the row is in cache.
template <typename acc_t>
TOKRED_INLINE void inverse_norms_impl(const acc_t* rows, int64_t n, int64_t D, acc_t* inv) {
  for (int64_t t = 0; t < n; ++t) inv[t] = acc_t(1) / std::sqrt(vec::sum_squares(rows + t * D, D));
}
TOKRED_SIMD_CLONES void inverse_norms(const float* rows, int64_t n, int64_t D, float* inv) {
  inverse_norms_impl(rows, n, D, inv);
}
TOKRED_SIMD_CLONES void inverse_norms(const double* rows, int64_t n, int64_t D, double* inv) {
  inverse_norms_impl(rows, n, D, inv);
}

// 1 / ‖mf[b, t]‖ as [B, N] through at::sum, for bipartite_match_plan: its tests pin tomesd's picks
// among duplicated tokens (near-exact cosine ties), and those follow at::sum's rounding (as they
// do not follow linalg_vector_norm's or sum_squares's).
at::Tensor inverse_norms_through_aten(const at::Tensor& mf) {
  return at::reciprocal(at::sqrt(mf.square().sum(-1)));
}

// A row's scores and its first maximum, vectorised. Returns false where the scores hold a NaN
// (whose place in the order tome_argmax_step decides), with the scores written either way.
template <typename acc_t>
TOKRED_INLINE bool score_row_impl(const acc_t* dots, acc_t inv_a, const acc_t* inv_b,
                                  int64_t first_scored, int64_t nb, acc_t* scores, acc_t& best,
                                  int64_t& best_j) {
  std::fill(scores, scores + first_scored, -acc_t(INFINITY));  // tome_score of excluded pairs
  vec::scaled_products(dots + first_scored, inv_a, inv_b + first_scored, nb - first_scored,
                       scores + first_scored);  // tome_score's dot · inv_a · inv_b
  // Without NaN, tome_argmax_step's first maximum is the first column equal to the maximum.
  return vec::first_max_without_nan(scores, nb, best, best_j);
}

// Target clones of score_row_impl (GCC cannot clone templates).
TOKRED_SIMD_CLONES bool score_row(const float* dots, float inv_a, const float* inv_b,
                                  int64_t first_scored, int64_t nb, float* scores, float& best,
                                  int64_t& best_j) {
  return score_row_impl(dots, inv_a, inv_b, first_scored, nb, scores, best, best_j);
}
TOKRED_SIMD_CLONES bool score_row(const double* dots, double inv_a, const double* inv_b,
                                  int64_t first_scored, int64_t nb, double* scores, double& best,
                                  int64_t& best_j) {
  return score_row_impl(dots, inv_a, inv_b, first_scored, nb, scores, best, best_j);
}

// One batch row of the matching. dots_of(a) points to the raw dot products of A row a with every
// B token [nb], and is called for a = 0, 1, ... in order (so a caller may compute them a block at
// a time); inv_a_all[a * stride] and inv_b_all[j * stride] are the inverse norms. Scores follow
// tome_score and tome_excluded.
template <typename acc_t, typename DotsOf>
void match_row(DotsOf&& dots_of, const acc_t* inv_a_all, const acc_t* inv_b_all, int64_t stride,
               const TomeDims& d, int64_t num_protected, int64_t* unm, int64_t* src, int64_t* dst) {
  const int64_t na = d.na, nb = d.nb;
  std::vector<acc_t> node_max(na), inv_b(nb), scores(nb);
  std::vector<int64_t> node_idx(na), rank(na);
  for (int64_t j = 0; j < nb; ++j) inv_b[j] = inv_b_all[j * stride];
  for (int64_t a = 0; a < na; ++a) {
    const acc_t* dots = dots_of(a);
    acc_t best = 0;
    int64_t best_j = -1;
    if (nb > 0 && !score_row(dots, inv_a_all[a * stride], inv_b.data(),
                             tome_first_scored_column(a, nb, num_protected), nb, scores.data(),
                             best, best_j)) {
      for (int64_t j = 0; j < nb; ++j) tome_argmax_step(scores[j], j, best, best_j);
    }
    node_max[a] = best;
    node_idx[a] = best_j;
  }
  // Rank A tokens by best similarity, descending, ties to the lower index: the order of
  // rank_in_row (which the CUDA kernel uses), by a sort instead of O(na^2) counting.
  std::vector<int64_t> order(na);
  for (int64_t a = 0; a < na; ++a) order[a] = a;
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return comes_before(node_max[x], x, node_max[y], y, /*largest=*/true);
  });
  for (int64_t i = 0; i < na; ++i) rank[order[i]] = i;
  // tome_slot's placement as one ascending pass (tome_slot recounts the unmerged tokens before
  // each a, which suits one thread per token on the GPU, not a loop).
  int64_t next_unmerged = 0;
  for (int64_t a = 0; a < na; ++a) {
    if (rank[a] < d.r) {
      src[rank[a]] = a;
      dst[rank[a]] = node_idx[a];
    } else {
      unm[num_protected > 0 ? next_unmerged++ : rank[a] - d.r] = a;
    }
  }
}

TOKRED_VEC_DOT_ROWS(float, TOKRED_SIMD_CLONES)
TOKRED_VEC_DOT_ROWS(double, TOKRED_SIMD_CLONES)

// One batch row's interleaved tokens (A even, B odd) for match_row: their inverse norms, and their
// raw dot products kRows A rows at a time while they are in cache (dots_of). Each product sums
// its D terms in ascending order, so equal tokens give equal products wherever they sit.
template <typename acc_t>
class InterleavedDots {
 public:
  InterleavedDots(const TomeDims& d, int64_t D)
      : d_(d),
        D_(D),
        nbp_(vec::round_up(std::max<int64_t>(d.nb, 1), vec::kLanes<acc_t>)),
        inv_(d.n),
        bT_(D * nbp_, acc_t(0)),
        tail_(vec::kRows * D, acc_t(0)),
        block_(vec::kRows * nbp_) {}

  // Start batch row m [N, D]: inverse norms, and B tokens transposed into zero-padded columns
  // (dot_rows's layout).
  void start(const acc_t* m) {
    m_ = m;
    inverse_norms(m, d_.n, D_, inv_.data());
    for (int64_t j = 0; j < d_.nb; ++j) {
      for (int64_t c = 0; c < D_; ++c) bT_[c * nbp_ + j] = m[(2 * j + 1) * D_ + c];
    }
  }

  const acc_t* operator()(int64_t a) {
    const int64_t a0 = a - a % vec::kRows;
    if (a == a0) {
      const acc_t* rows = m_ + 2 * a0 * D_;
      int64_t lda = 2 * D_;
      if (a0 + vec::kRows > d_.na) {  // dot_rows reads kRows rows: the last ones from a padded copy
        for (int64_t i = 0; i < d_.na - a0; ++i)
          std::copy(rows + i * lda, rows + i * lda + D_, tail_.data() + i * D_);
        rows = tail_.data();
        lda = D_;
      }
      dot_rows(rows, lda, D_, bT_.data(), nbp_, nbp_, block_.data(), nbp_);
    }
    return block_.data() + (a - a0) * nbp_;
  }

  const acc_t* inverse_norms_a() const { return inv_.data(); }      // stride 2
  const acc_t* inverse_norms_b() const { return inv_.data() + 1; }  // stride 2

 private:
  const TomeDims d_;  // a copy, so no caller's dims must outlive the object
  int64_t D_, nbp_;
  std::vector<acc_t> inv_, bT_, tail_, block_;
  const acc_t* m_ = nullptr;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_cpu(const at::Tensor& metric_in,
                                                                   int64_t r_in,
                                                                   int64_t num_protected) {
  const int64_t r = check_bipartite_match(metric_in, r_in, num_protected).expect_int();
  const at::Tensor metric = metric_in.contiguous();
  const int64_t B = metric.size(0), N = metric.size(1);
  const TomeDims d = tome_dims(N, r, num_protected);
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unm = at::empty({B, d.u}, opts);
  at::Tensor src = at::empty({B, r}, opts);
  at::Tensor dst = at::empty({B, r}, opts);
  if (B == 0) return {unm, src, dst};
  if (r == 0) {
    unm.copy_(at::arange(d.na, opts).expand({B, d.na}));
    return {unm, src, dst};
  }
  // The dot products come from our own blocked kernel a few A rows at a time, in cache: at ViT
  // sizes a batched BLAS product spends more on packing, zeroing and the [B, na, nb] round trip
  // through memory than on the products. match_row scales them into cosine scores.
  const at::Tensor mf = metric.to(at::toOpMathType(metric.scalar_type()));
  TOKRED_DISPATCH_FLOATS(metric.scalar_type(), "tokred_bipartite_match_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* m_all = mf.data_ptr<acc_t>();
    const int64_t D = mf.size(2);
    int64_t* up = unm.data_ptr<int64_t>();
    int64_t* sp = src.data_ptr<int64_t>();
    int64_t* dp = dst.data_ptr<int64_t>();
    parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      InterleavedDots<acc_t> dots(d, D);
      for (int64_t b = b0; b < b1; ++b) {
        dots.start(m_all + b * N * D);
        // Tokens interleaved: A at even positions, B at odd.
        match_row(dots, dots.inverse_norms_a(), dots.inverse_norms_b(), 2, d, num_protected,
                  up + b * d.u, sp + b * r, dp + b * r);
      }
    });
  });
  return {unm, src, dst};
}

// ---- the plan

struct Plan {
  at::Tensor dest, offsets, members;  // [B, n], [B, nout + 1], [B, n], int64
  int64_t B, n, nout;
  bool merging() const { return nout < n; }  // r > 0 (r = 0 is upstream's do_nothing)
};

// The plan of a match, from validated indices: dest by tome_unm_out / tome_dst_out at the tokens
// of tok, then the members of each output grouped in ascending order by the segment module.
Plan build_plan(const at::Tensor& unm_in, const at::Tensor& src_in, const at::Tensor& dst_in,
                const TomeDims& d, const TomeTokens& tok, const char* op) {
  const at::Tensor unm = as_int64(unm_in), src = as_int64(src_in), dst = as_int64(dst_in);
  const int64_t B = src.size(0), r = src.size(1), n = d.n;
  at::Tensor dest = at::empty({B, n}, unm.options());
  const int64_t *up = unm.data_ptr<int64_t>(), *sp = src.data_ptr<int64_t>(),
                *dp = dst.data_ptr<int64_t>();
  int64_t* dest_p = dest.data_ptr<int64_t>();
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* de = dest_p + b * n;
      if (r == 0) {  // no merge: the identity, as upstream's do_nothing
        for (int64_t t = 0; t < n; ++t) de[t] = t;
        continue;
      }
      std::fill(de, de + n, int64_t(-1));
      auto place_a = [&](int64_t a, int64_t o, const char* arg, int64_t k) {
        TORCH_CHECK(a >= 0 && a < d.na, "tokred::", op, ": argument '", arg, "' holds ", a, " at [",
                    b, ", ", k, "], expected an index of set A in [0, ", d.na, ")");
        int64_t& slot = de[tok.of_a(a)];
        TORCH_CHECK(slot < 0, "tokred::", op, ": argument '", arg, "' holds A token ", a, " at [",
                    b, ", ", k, "], which unm_idx and src_idx already list: expected each A token ",
                    "once");
        slot = o;
      };
      for (int64_t k = 0; k < d.u; ++k) place_a(up[b * d.u + k], tome_unm_out(k, d), "unm_idx", k);
      for (int64_t k = 0; k < r; ++k) {
        const int64_t j = dp[b * r + k];
        TORCH_CHECK(j >= 0 && j < d.nb, "tokred::", op, ": argument 'dst_idx' holds ", j, " at [",
                    b, ", ", k, "], expected an index of set B in [0, ", d.nb, ")");
        place_a(sp[b * r + k], tome_dst_out(j, d), "src_idx", k);
      }
      for (int64_t j = 0; j < d.nb; ++j) de[tok.of_b(j)] = tome_dst_out(j, d);
    }
  });
  auto [members, offsets] = build_segments_cpu(dest, d.nout, op, "unm_idx");
  return Plan{dest, offsets, members, B, n, d.nout};
}

// The plan of a match over alternating positions with a prefix of num_protected tokens.
Plan build_plan(const at::Tensor& unm, const at::Tensor& src, const at::Tensor& dst, int64_t n,
                int64_t num_protected, const char* op) {
  return build_plan(unm, src, dst, tome_dims(n, src.size(1), num_protected), TomeTokens{}, op);
}

// A plan given as tensors (a public op's arguments): every row must pass tome_plan_fault.
Plan checked_plan(const at::Tensor& dest_in, const at::Tensor& offsets_in,
                  const at::Tensor& members_in, const char* op) {
  Plan p{as_int64(dest_in), as_int64(offsets_in), as_int64(members_in),
         dest_in.size(0),   dest_in.size(1),      offsets_in.size(1) - 1};
  const int64_t *de = p.dest.data_ptr<int64_t>(), *of = p.offsets.data_ptr<int64_t>(),
                *me = p.members.data_ptr<int64_t>();
  parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t o = 0; o < p.nout; ++o) {
        const PlanFault fault =
            tome_plan_fault(of + b * (p.nout + 1), me + b * p.n, de + b * p.n, o, p.n, p.nout);
        TORCH_CHECK(fault == PlanFault::kNone, plan_fault_message(fault, b, o, op));
      }
    }
  });
  return p;
}

// ---- merge: each output token reduces its members

// Output token i = b * nout + o of a plan: its members are me[begin..end), ascending.
struct OutputView {
  int64_t b, begin, end;
  const int64_t* me;
  int64_t count() const { return end - begin; }
};

// A plan's CSR arrays as raw pointers, read once per kernel rather than once per output token.
struct PlanArrays {
  const int64_t *offsets, *members;
  int64_t n, nout;
  explicit PlanArrays(const Plan& p)
      : offsets(p.offsets.data_ptr<int64_t>()),
        members(p.members.data_ptr<int64_t>()),
        n(p.n),
        nout(p.nout) {}
  OutputView output(int64_t i) const {
    const int64_t b = i / nout;
    const int64_t* of = offsets + b * (nout + 1) + i % nout;
    return {b, of[0], of[1], members + b * n};
  }
};

// out [B, nout, C] and the summed sizes [B, nout, 1] (count of members when size is None).
// The loop runs over input tokens in memory order and reduces each output at its first member
// (the members of a valid plan are every token once, so each output is written once, by one
// thread). x is then read front to back, which the hardware prefetchers follow. Visiting the
// outputs in order instead reads ToMe's A tokens (every other row), then its B tokens: at ViT-S,
// B = 64 that took 1.4x a clone of x, against 1.1x in memory order (benchmarks/RESULTS.md).
std::tuple<at::Tensor, at::Tensor> reduce_plan(const at::Tensor& x_in,
                                               const std::optional<at::Tensor>& size_in,
                                               const Plan& p, MergeMode mode) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = p.B, n = p.n, nout = p.nout, C = x.size(2);
  at::Tensor out = at::empty({B, nout, C}, x.options());
  at::Tensor size_out = at::empty({B, nout, 1}, x.options());
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  if (B == 0 || nout == 0) return {out, size_out};
  const PlanArrays plan(p);
  const int64_t* dest = p.dest.data_ptr<int64_t>();
  const bool streaming = use_streaming_stores(out.nbytes());
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_merge_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sz = size.defined() ? size.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* so = size_out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / (C + 1));
    parallel_for(0, B * n, grain, [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> acc(C);
      // Input token k = b * n + t, with b and t stepped rather than divided out for each token.
      for (int64_t k = k0, b = k0 / n, t = k0 % n; k < k1; ++k, ++t) {
        if (t == n) {
          t = 0;
          ++b;
        }
        const int64_t* me = plan.members + b * n;
        const int64_t* offsets = plan.offsets + b * (nout + 1) + dest[k];
        const int64_t of[2] = {offsets[0], offsets[1]}, count = of[1] - of[0];
        if (me[of[0]] != t) continue;          // reduced at its first member
        const int64_t i = b * nout + dest[k];  // k's output token
        acc_t wsum = 0;
        scalar_t* orow = op + i * C;
        bool copied = false;
        for (int64_t m = of[0]; m < of[1]; ++m) {
          const int64_t t = me[m];
          const acc_t w = sz ? static_cast<acc_t>(sz[b * n + t]) : acc_t(1);
          wsum += w;
          if (count == 1 && tome_lone_copies(mode, w, p.merging())) {  // exact, not (w·x)/w
            copy_row(orow, xp + (b * n + t) * C, C, 1, streaming);
            copied = true;
            break;
          }
          const scalar_t* xr = xp + (b * n + t) * C;
          const bool first = m == of[0];
          for (int64_t c = 0; c < C; ++c) {
            tome_accumulate(mode, first, static_cast<acc_t>(xr[c]), w, acc[c]);
          }
        }
        so[i] = static_cast<scalar_t>(wsum);
        if (copied) continue;
        for (int64_t c = 0; c < C; ++c) {
          orow[c] = static_cast<scalar_t>(tome_finish(mode, acc[c], wsum, count));
        }
      }
      if (streaming) finish_streaming_stores();
    });
  });
  return {out, size_out};
}

// The backward of reduce_plan: every input token receives its share of its output's gradient.
at::Tensor spread_plan(const at::Tensor& grad_in, const at::Tensor& x_in,
                       const std::optional<at::Tensor>& size_in, const Plan& p, MergeMode mode) {
  const at::Tensor grad = grad_in.contiguous();
  const int64_t B = p.B, n = p.n, nout = p.nout, C = grad.size(2);
  at::Tensor grad_x = at::empty({B, n, C}, grad.options());
  if (B == 0 || nout == 0) return grad_x;
  const at::Tensor x = mode == MergeMode::kAmax ? x_in.contiguous() : at::Tensor();
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  const PlanArrays plan(p);
  TOKRED_DISPATCH_FLOATS(grad.scalar_type(), "tokred_merge_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.defined() ? x.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sz = size.defined() ? size.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / (C + 1));
    parallel_for(0, B * nout, grain, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> mx(C);
      std::vector<int64_t> ties(C);
      for (int64_t i = i0; i < i1; ++i) {
        const OutputView ov = plan.output(i);
        const int64_t b = ov.b, count = ov.count(), *me = ov.me, of[2] = {ov.begin, ov.end};
        const scalar_t* grow = gp + i * C;
        const acc_t w_lone = sz ? static_cast<acc_t>(sz[b * n + me[of[0]]]) : acc_t(1);
        if (count == 1 && tome_lone_grad_passes(mode, w_lone)) {
          std::copy(grow, grow + C, gx + (b * n + me[of[0]]) * C);
          continue;
        }
        const bool destination = tome_output_is_destination(count, me[of[0]]);
        acc_t wsum = 0;
        for (int64_t m = of[0]; m < of[1]; ++m) {
          wsum += sz ? static_cast<acc_t>(sz[b * n + me[m]]) : acc_t(1);
        }
        if (mode == MergeMode::kAmax) {
          for (int64_t m = of[0]; m < of[1]; ++m) {
            const scalar_t* xr = xp + (b * n + me[m]) * C;
            for (int64_t c = 0; c < C; ++c) {
              tome_accumulate(mode, m == of[0], static_cast<acc_t>(xr[c]), acc_t(1), mx[c]);
            }
          }
          std::fill(ties.begin(), ties.end(), int64_t(0));
          for (int64_t m = of[0]; m < of[1]; ++m) {
            const scalar_t* xr = xp + (b * n + me[m]) * C;
            for (int64_t c = 0; c < C; ++c) ties[c] += static_cast<acc_t>(xr[c]) == mx[c];
          }
        }
        for (int64_t m = of[0]; m < of[1]; ++m) {
          const int64_t t = me[m];
          const acc_t w = sz ? static_cast<acc_t>(sz[b * n + t]) : acc_t(1);
          scalar_t* grow_x = gx + (b * n + t) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = xp ? static_cast<acc_t>(xp[(b * n + t) * C + c]) : acc_t(0);
            const acc_t coef = tome_grad_coef(mode, v, w, mx[c], wsum, count, ties[c], destination);
            grow_x[c] = static_cast<scalar_t>(coef * static_cast<acc_t>(grow[c]));
          }
        }
      }
    });
  });
  return grad_x;
}

// out[b, t] = x[b, dest[b, t]]: unmerge, and the sum-mode backward.
at::Tensor gather_plan(const at::Tensor& x_in, const Plan& p) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = p.B, n = p.n, nout = p.nout, C = x.size(2);
  at::Tensor out = at::empty({B, n, C}, x.options());
  if (B == 0 || n == 0) return out;
  const bool streaming = use_streaming_stores(out.nbytes());
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_unmerge_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* dest = p.dest.data_ptr<int64_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (C + 1));
    parallel_for(0, B * n, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* row = xp + ((i / n) * nout + dest[i]) * C;
        copy_row(op + i * C, row, C, 1, streaming);
      }
      if (streaming) finish_streaming_stores();
    });
  });
  return out;
}

// ---- ops with a plan as a value (merge_plan) and the ops that build one per call

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_plan_cpu(const at::Tensor& unm,
                                                              const at::Tensor& src,
                                                              const at::Tensor& dst, int64_t n,
                                                              int64_t num_protected) {
  check_merge_plan(unm, src, dst, n, num_protected);
  const Plan p = build_plan(unm, src, dst, n, num_protected, "merge_plan");
  return {p.dest, p.offsets, p.members};
}

// bipartite_match_plan: the match over an explicit partition (tomesd's destinations), straight
// to its plan. A = the complement of dst_tokens, in order; then bipartite_match's scoring and
// ranking (match_row) on the gathered rows, and the plan at the partition's tokens.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_plan_cpu(
    const at::Tensor& metric_in, const at::Tensor& dst_tokens, int64_t r_in) {
  const char* op = "bipartite_match_plan";
  const int64_t r = check_bipartite_match_plan(metric_in, dst_tokens, r_in).expect_int();
  const at::Tensor metric = metric_in.contiguous();
  const at::Tensor b_tok = as_int64(dst_tokens).contiguous();
  const int64_t B = metric.size(0), N = metric.size(1), nb = b_tok.size(0);
  const int64_t* bt = b_tok.data_ptr<int64_t>();
  at::Tensor a_tok = at::empty({N - nb}, b_tok.options());
  int64_t* at_p = a_tok.data_ptr<int64_t>();
  // Every entry is checked before the partition: it writes N - nb sources only when dst_tokens
  // is strictly ascending in [0, N) to its end.
  for (int64_t j = 0; j < nb; ++j) {
    TORCH_CHECK(tome_dst_token_ok(bt, j, N), "tokred::", op, ": argument 'dst_tokens' holds ",
                bt[j], " at [", j, "], expected strictly ascending token positions in [0, ", N,
                ")");
  }
  for (int64_t j = 0, a = 0, t = 0; t < N; ++t) {
    if (j < nb && bt[j] == t) {
      ++j;
    } else {
      at_p[a++] = t;
    }
  }
  const TomeDims d = tome_partition_dims(N, nb, r);
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unm = at::empty({B, d.u}, opts), src = at::empty({B, r}, opts),
             dst = at::empty({B, r}, opts);
  if (B > 0 && r > 0) {
    const at::Tensor mf = metric.to(at::toOpMathType(metric.scalar_type()));
    const at::Tensor inv = inverse_norms_through_aten(mf);
    const at::Tensor inv_a = inv.index_select(1, a_tok).contiguous();
    const at::Tensor inv_b = inv.index_select(1, b_tok).contiguous();
    const at::Tensor dots =
        at::bmm(mf.index_select(1, a_tok), mf.index_select(1, b_tok).transpose(1, 2)).contiguous();
    TOKRED_DISPATCH_FLOATS(metric.scalar_type(), "tokred_bipartite_match_plan_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t *dp_all = dots.data_ptr<acc_t>(), *ia = inv_a.data_ptr<acc_t>(),
                  *ib = inv_b.data_ptr<acc_t>();
      int64_t *up = unm.data_ptr<int64_t>(), *sp = src.data_ptr<int64_t>(),
              *dp = dst.data_ptr<int64_t>();
      parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const acc_t* row_dots = dp_all + b * d.na * d.nb;
          match_row([&](int64_t a) { return row_dots + a * d.nb; }, ia + b * d.na, ib + b * d.nb, 1,
                    d, /*num_protected=*/0, up + b * d.u, sp + b * r, dp + b * r);
        }
      });
    });
  }
  const Plan p = build_plan(unm, src, dst, d, TomeTokens{at_p, bt}, op);
  return {p.dest, p.offsets, p.members};
}

// The merge backward over a plan: sum mode and r = 0 (the identity) gather the gradient.
at::Tensor merge_backward_over(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& size, const Plan& p,
                               MergeMode mode) {
  if (mode == MergeMode::kSum || !p.merging()) return gather_plan(grad, p);
  return spread_plan(grad, x, size, p, mode);
}

// Source tracking: the plan's dest, or dest composed with an earlier source map.
at::Tensor source_over(const std::optional<at::Tensor>& source_in, const Plan& p, const char* op) {
  if (!source_in.has_value()) return p.dest;
  const at::Tensor source = as_int64(*source_in);
  const int64_t B = source.size(0), N0 = source.size(1), n = p.n;
  at::Tensor out = at::empty({B, N0}, source.options());
  const int64_t* sp = source.data_ptr<int64_t>();
  const int64_t* dest = p.dest.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * N0; ++i) {
    const int64_t t = sp[i];
    TORCH_CHECK(t >= 0 && t < n, "tokred::", op, ": argument 'source' holds ", t, " at [",
                i / std::max<int64_t>(N0, 1), ", ", i % std::max<int64_t>(N0, 1),
                "], expected a token position in [0, ", n, ")");
    o[i] = dest[(i / N0) * n + t];
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_by_plan_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& dest,
    const at::Tensor& offsets, const at::Tensor& members, c10::string_view mode) {
  const char* op = "merge_by_plan";
  check_merge_by_plan(x, size, dest, offsets, members, mode, op);
  return reduce_plan(x, size, checked_plan(dest, offsets, members, op), parse_merge_mode(mode, op));
}

at::Tensor merge_by_plan_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                      const std::optional<at::Tensor>& size, const at::Tensor& dest,
                                      const at::Tensor& offsets, const at::Tensor& members,
                                      c10::string_view mode) {
  const char* op = "_merge_by_plan_backward";
  const int64_t nout = check_merge_by_plan(x, size, dest, offsets, members, mode, op).expect_int();
  check_merge_backward_grad(grad, x, x.size(1) - nout, op);
  return merge_backward_over(grad, x, size, checked_plan(dest, offsets, members, op),
                             parse_merge_mode(mode, op));
}

at::Tensor unmerge_by_plan_cpu(const at::Tensor& x, const at::Tensor& dest,
                               const at::Tensor& offsets, const at::Tensor& members) {
  const char* op = "unmerge_by_plan";
  check_unmerge_by_plan(x, dest, offsets, members);
  return gather_plan(x, checked_plan(dest, offsets, members, op));
}

at::Tensor merge_source_by_plan_cpu(const std::optional<at::Tensor>& source, const at::Tensor& dest,
                                    const at::Tensor& offsets, const at::Tensor& members) {
  const char* op = "merge_source_by_plan";
  check_merge_source_by_plan(source, dest, offsets, members);
  const Plan p = checked_plan(dest, offsets, members, op);
  // Without a source map the answer is dest itself: a copy, as ops never alias an input.
  return source.has_value() ? source_over(source, p, op) : p.dest.clone();
}

std::tuple<at::Tensor, at::Tensor> merge_cpu(const at::Tensor& x,
                                             const std::optional<at::Tensor>& size,
                                             const at::Tensor& unm, const at::Tensor& src,
                                             const at::Tensor& dst, c10::string_view mode,
                                             int64_t num_protected) {
  const char* op = "merge";
  check_merge(x, size, unm, src, dst, mode, num_protected, op);
  const Plan p = build_plan(unm, src, dst, x.size(1), num_protected, op);
  return reduce_plan(x, size, p, parse_merge_mode(mode, op));
}

at::Tensor merge_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                              const std::optional<at::Tensor>& size, const at::Tensor& unm,
                              const at::Tensor& src, const at::Tensor& dst, c10::string_view mode,
                              int64_t num_protected) {
  const char* op = "_merge_backward";
  const int64_t r = check_merge(x, size, unm, src, dst, mode, num_protected, op).expect_int();
  check_merge_backward_grad(grad, x, r, op);
  const Plan p = build_plan(unm, src, dst, x.size(1), num_protected, op);
  return merge_backward_over(grad, x, size, p, parse_merge_mode(mode, op));
}

at::Tensor unmerge_cpu(const at::Tensor& x, const at::Tensor& unm, const at::Tensor& src,
                       const at::Tensor& dst, int64_t n, int64_t num_protected) {
  const char* op = "unmerge";
  check_unmerge(x, unm, src, dst, n, num_protected, op);
  return gather_plan(x, build_plan(unm, src, dst, n, num_protected, op));
}

at::Tensor unmerge_backward_cpu(const at::Tensor& grad, const at::Tensor& unm,
                                const at::Tensor& src, const at::Tensor& dst,
                                int64_t num_protected) {
  const char* op = "_unmerge_backward";
  check_unmerge_backward(grad, unm, src, dst, num_protected, op);
  const Plan p = build_plan(unm, src, dst, grad.size(1), num_protected, op);
  return std::get<0>(reduce_plan(grad, std::nullopt, p, MergeMode::kSum));
}

at::Tensor merge_source_cpu(const std::optional<at::Tensor>& source, const at::Tensor& unm,
                            const at::Tensor& src, const at::Tensor& dst, int64_t n,
                            int64_t num_protected) {
  const char* op = "merge_source";
  check_merge_source(source, unm, src, dst, n, num_protected);
  return source_over(source, build_plan(unm, src, dst, n, num_protected, op), op);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CPU, m) {
  m.impl("bipartite_match", TORCH_FN(bipartite_match_cpu));
  m.impl("merge", TORCH_FN(merge_cpu));
  m.impl("_merge_backward", TORCH_FN(merge_backward_cpu));
  m.impl("unmerge", TORCH_FN(unmerge_cpu));
  m.impl("_unmerge_backward", TORCH_FN(unmerge_backward_cpu));
  m.impl("merge_source", TORCH_FN(merge_source_cpu));
  m.impl("merge_plan", TORCH_FN(merge_plan_cpu));
  m.impl("bipartite_match_plan", TORCH_FN(bipartite_match_plan_cpu));
  m.impl("merge_by_plan", TORCH_FN(merge_by_plan_cpu));
  m.impl("_merge_by_plan_backward", TORCH_FN(merge_by_plan_backward_cpu));
  m.impl("unmerge_by_plan", TORCH_FN(unmerge_by_plan_cpu));
  m.impl("merge_source_by_plan", TORCH_FN(merge_source_by_plan_cpu));
}

}  // namespace tokred
