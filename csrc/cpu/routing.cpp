// CPU kernels of the BiFormer routing ops.
//
// routed_attention is fused: no gathered K/V buffer and no attention matrix. Each task (batch,
// query window, head) streams its routed keys in tiles of up to kTile keys, keeps an online
// softmax per query row (common/routing.h) and writes out and lse. The backward recomputes the
// scores: dq per (batch, query window, head); dk, dv per (batch, key window, head) by walking,
// in a fixed order, the (query window, slot) pairs that routed to that key window (a CSR plan per
// batch). No atomics and no shared accumulators, so results are bitwise repeatable.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/routing.h"
#include "common/routing_args.h"

namespace tokred {
namespace {

using routing::OnlineSoftmax;

constexpr int64_t kTile = 64;  // keys per tile

// For each batch b and key window j, the (query window i, slot t) pairs with r_idx[b, i, t] == j
// in ascending (i, t): entries[b][offsets[b][j] .. offsets[b][j + 1]) hold i * T + t.
struct RoutingPlan {
  std::vector<int64_t> offsets;  // [n, P + 1]
  std::vector<int64_t> entries;  // [n, P * T]
};

RoutingPlan build_plan(const int64_t* idx, int64_t n, int64_t P, int64_t T) {
  RoutingPlan plan;
  plan.offsets.assign(n * (P + 1), 0);
  plan.entries.resize(n * P * T);
  at::parallel_for(0, n, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cursor;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* row = idx + b * P * T;
      int64_t* off = plan.offsets.data() + b * (P + 1);
      for (int64_t e = 0; e < P * T; ++e) off[row[e] + 1] += 1;
      for (int64_t j = 0; j < P; ++j) off[j + 1] += off[j];
      cursor.assign(off, off + P);
      int64_t* ent = plan.entries.data() + b * P * T;
      for (int64_t e = 0; e < P * T; ++e) ent[cursor[row[e]]++] = e;
    }
  });
  return plan;
}

// ------------------------------------------------------------------------ routed_gather

at::Tensor routed_gather_cpu(const at::Tensor& kv_in, const at::Tensor& r_idx_in,
                             const std::optional<at::Tensor>& r_weight_in) {
  const char* op = "routed_gather";
  check_routed_gather(kv_in, r_idx_in, r_weight_in);
  const at::Tensor kv = kv_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const int64_t n = kv.size(0), P = kv.size(1), W = kv.size(2), C = kv.size(3), T = idx.size(2);
  check_routing_index_values(idx, P, op);
  at::Tensor out = at::empty({n, P, T, W, C}, kv.options());
  if (out.numel() == 0) return out;
  const int64_t row = W * C;
  const at::Tensor weight =
      r_weight_in.has_value() ? r_weight_in->to(at::kDouble).contiguous() : at::Tensor();
  const double* wp = weight.defined() ? weight.data_ptr<double>() : nullptr;
  const int64_t* ip = idx.data_ptr<int64_t>();
  TOKRED_DISPATCH_FLOATS(kv.scalar_type(), "tokred_routed_gather_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = kv.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / (row + 1));
    at::parallel_for(0, n * P * T, grain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t b = e / (P * T);
        const scalar_t* s = src + routing::window_row(b, ip[e], 0, P, W) * C;
        scalar_t* d = dst + e * row;
        if (wp == nullptr) {
          std::copy(s, s + row, d);
        } else {
          const acc_t w = static_cast<acc_t>(wp[e]);
          for (int64_t c = 0; c < row; ++c) d[c] = static_cast<scalar_t>(w * static_cast<acc_t>(s[c]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> routed_gather_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& kv_in, const at::Tensor& r_idx_in,
    const std::optional<at::Tensor>& r_weight_in) {
  const char* op = "_routed_gather_backward";
  check_routed_gather_backward(grad_in, kv_in, r_idx_in, r_weight_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor kv = kv_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const int64_t n = kv.size(0), P = kv.size(1), W = kv.size(2), C = kv.size(3), T = idx.size(2);
  check_routing_index_values(idx, P, op);
  const bool weighted = r_weight_in.has_value();
  at::Tensor grad_kv = at::empty_like(kv);
  at::Tensor grad_w = weighted ? at::empty_like(*r_weight_in, at::MemoryFormat::Contiguous)
                               : at::empty({0}, kv.options());
  if (kv.numel() == 0) {
    if (weighted) grad_w.zero_();
    return {grad_kv, grad_w};
  }
  const int64_t row = W * C;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const RoutingPlan plan = build_plan(ip, n, P, T);
  const at::Tensor weight = weighted ? r_weight_in->to(at::kDouble).contiguous() : at::Tensor();
  const double* wp = weighted ? weight.data_ptr<double>() : nullptr;
  TOKRED_DISPATCH_FLOATS(kv.scalar_type(), "tokred_routed_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x = kv.data_ptr<scalar_t>();
    scalar_t* gx = grad_kv.data_ptr<scalar_t>();
    // grad_kv[b, j] = Σ over the pairs routed to j, in ascending (i, t), of w · grad[b, i, t].
    at::parallel_for(0, n * P, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(row);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / P, j = r % P;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t* off = plan.offsets.data() + b * (P + 1);
        for (int64_t s = off[j]; s < off[j + 1]; ++s) {
          const int64_t e = b * P * T + plan.entries[b * P * T + s];
          const scalar_t* ge = g + e * row;
          const acc_t w = wp ? static_cast<acc_t>(wp[e]) : acc_t(1);
          for (int64_t c = 0; c < row; ++c) acc[c] += w * static_cast<acc_t>(ge[c]);
        }
        scalar_t* d = gx + r * row;
        for (int64_t c = 0; c < row; ++c) d[c] = static_cast<scalar_t>(acc[c]);
      }
    });
    if (!weighted) return;
    // grad_w[b, i, t] = <grad[b, i, t], kv[b, r_idx[b, i, t]]>, summed in double.
    TOKRED_DISPATCH_FLOATS(grad_w.scalar_type(), "tokred_routed_gather_backward_cpu_w", [&] {
      scalar_t* gw = grad_w.data_ptr<scalar_t>();
      using g_t = std::remove_const_t<std::remove_pointer_t<decltype(g)>>;
      at::parallel_for(0, n * P * T, 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t b = e / (P * T);
          const g_t* ge = g + e * row;
          const g_t* xe = x + routing::window_row(b, ip[e], 0, P, W) * C;
          double dot = 0;
          for (int64_t c = 0; c < row; ++c)
            dot += static_cast<double>(ge[c]) * static_cast<double>(xe[c]);
          gw[e] = static_cast<scalar_t>(dot);
        }
      });
    });
  });
  return {grad_kv, grad_w};
}

// ------------------------------------------------------------------------ routed_attention

// Sizes of one routed_attention call.
struct Dims {
  int64_t n, P, WQ, WK, T, H, CQ, CV, DQ, DV;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& v, const at::Tensor& idx, int64_t H) {
  Dims d;
  d.n = q.size(0);
  d.P = q.size(1);
  d.WQ = q.size(2);
  d.CQ = q.size(3);
  d.WK = v.size(2);
  d.CV = v.size(3);
  d.T = idx.size(2);
  d.H = H;
  d.DQ = d.CQ / H;
  d.DV = d.CV / H;
  return d;
}

// A read-only [n, P, w, c] tensor whose last dim is contiguous; other strides are arbitrary, so
// slices of a fused projection (the module's q, k, v) are read in place, without a copy.
template <typename T>
struct Rows {
  const T* p;
  int64_t s0, s1, s2;
  const T* at(int64_t b, int64_t j, int64_t r) const { return p + b * s0 + j * s1 + r * s2; }
};

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Loads a tile of routed keys [kk0, kk0 + kt) of query window (b, i), head h: kT as
// [DQ][kTile] (transposed, so score rows are axpy loops) and vals as [kt][DV].
template <typename scalar_t, typename acc_t>
void load_key_tile(const Rows<scalar_t>& k, const Rows<scalar_t>& v, const int64_t* ridx,
                   const Dims& d, int64_t b, int64_t h, int64_t kk0, int64_t kt, acc_t* kT,
                   acc_t* vals, acc_t* krows) {
  for (int64_t x = 0; x < kt; ++x) {
    int64_t slot, row;
    routing::split_routed_key(kk0 + x, d.WK, slot, row);
    const scalar_t* kr = k.at(b, ridx[slot], row) + h * d.DQ;
    const scalar_t* vr = v.at(b, ridx[slot], row) + h * d.DV;
    for (int64_t c = 0; c < d.DQ; ++c) kT[c * kTile + x] = static_cast<acc_t>(kr[c]);
    if (krows != nullptr) {
      for (int64_t c = 0; c < d.DQ; ++c) krows[x * d.DQ + c] = static_cast<acc_t>(kr[c]);
    }
    for (int64_t c = 0; c < d.DV; ++c) vals[x * d.DV + c] = static_cast<acc_t>(vr[c]);
  }
}

// Σ a[c]·b[c] with 8 independent partial sums combined in a fixed order: vectorisable without
// reassociation, so the result does not depend on the compiler or the thread count.
template <typename acc_t>
inline acc_t dot_fixed(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int u = 0; u < 8; ++u) part[u] += a[c + u] * b[c + u];
  }
  for (; c < n; ++c) part[c % 8] += a[c] * b[c];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Query rows processed together: each K / V element loaded from the tile serves kRows rows. Every
// row still sums in the same order as alone, so blocking changes no bits.
constexpr int64_t kRows = 4;

// The two inner loops of the forward, for kRows query rows at once. On x86 they are also
// compiled for AVX2 and picked at load time (ifunc). AVX2 is used without FMA, and every lane does
// the same element-wise multiply and add as the scalar code in the same order, so all builds
// produce identical bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TOKRED_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TOKRED_SIMD_CLONES
#endif

// s[r][0..kt) = scale · (q[r] · kT[:, 0..kt)) for kRows rows q [kRows][DQ]; s is [kRows][kTile].
#define TOKRED_TILE_SCORES_ROWS(acc_t)                                                         \
  TOKRED_SIMD_CLONES void tile_scores_rows(const acc_t* __restrict__ q, int64_t DQ,            \
                                           const acc_t* __restrict__ kT, int64_t kt,           \
                                           acc_t scale, acc_t* __restrict__ s) {               \
    acc_t* __restrict__ s0 = s;                                                                \
    acc_t* __restrict__ s1 = s + kTile;                                                        \
    acc_t* __restrict__ s2 = s + 2 * kTile;                                                    \
    acc_t* __restrict__ s3 = s + 3 * kTile;                                                    \
    for (int64_t x = 0; x < kt; ++x) s0[x] = s1[x] = s2[x] = s3[x] = acc_t(0);                 \
    for (int64_t c = 0; c < DQ; ++c) {                                                         \
      const acc_t q0 = q[c], q1 = q[DQ + c], q2 = q[2 * DQ + c], q3 = q[3 * DQ + c];           \
      const acc_t* __restrict__ kc = kT + c * kTile;                                           \
      for (int64_t x = 0; x < kt; ++x) {                                                       \
        const acc_t kx = kc[x];                                                                \
        s0[x] += q0 * kx;                                                                      \
        s1[x] += q1 * kx;                                                                      \
        s2[x] += q2 * kx;                                                                      \
        s3[x] += q3 * kx;                                                                      \
      }                                                                                        \
    }                                                                                          \
    for (int64_t x = 0; x < kt; ++x) {                                                         \
      s0[x] *= scale;                                                                          \
      s1[x] *= scale;                                                                          \
      s2[x] *= scale;                                                                          \
      s3[x] *= scale;                                                                          \
    }                                                                                          \
  }

// a[r][0..DV) += Σ_x p[r][x] · vals[x][0..DV) for kRows rows, x ascending; p is [kRows][kTile].
#define TOKRED_ACCUMULATE_ROWS(acc_t)                                                          \
  TOKRED_SIMD_CLONES void accumulate_rows(const acc_t* __restrict__ p,                         \
                                          const acc_t* __restrict__ vals, int64_t kt,          \
                                          int64_t DV, acc_t* __restrict__ a) {                 \
    acc_t* __restrict__ a0 = a;                                                                \
    acc_t* __restrict__ a1 = a + DV;                                                           \
    acc_t* __restrict__ a2 = a + 2 * DV;                                                       \
    acc_t* __restrict__ a3 = a + 3 * DV;                                                       \
    for (int64_t x = 0; x < kt; ++x) {                                                         \
      const acc_t p0 = p[x], p1 = p[kTile + x], p2 = p[2 * kTile + x], p3 = p[3 * kTile + x];  \
      const acc_t* __restrict__ vx = vals + x * DV;                                            \
      for (int64_t c = 0; c < DV; ++c) {                                                       \
        const acc_t v = vx[c];                                                                 \
        a0[c] += p0 * v;                                                                       \
        a1[c] += p1 * v;                                                                       \
        a2[c] += p2 * v;                                                                       \
        a3[c] += p3 * v;                                                                       \
      }                                                                                        \
    }                                                                                          \
  }

TOKRED_TILE_SCORES_ROWS(float)
TOKRED_TILE_SCORES_ROWS(double)
TOKRED_ACCUMULATE_ROWS(float)
TOKRED_ACCUMULATE_ROWS(double)

// accumulate_rows with p's columns starting at col: a[r] += Σ_{x<kt} p[r][col + x] · vals[x].
template <typename acc_t>
inline void accumulate_rows_offset(const acc_t* p, int64_t col, const acc_t* vals, int64_t kt,
                                   int64_t DV, acc_t* a) {
  accumulate_rows(p + col, vals, kt, DV, a);
}

std::tuple<at::Tensor, at::Tensor> routed_attention_cpu(const at::Tensor& q_in,
                                                        const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const at::Tensor& r_idx_in,
                                                        int64_t num_heads, double scale_d) {
  const char* op = "routed_attention";
  check_routed_attention(q_in, k_in, v_in, r_idx_in, num_heads);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor idx = as_int64(r_idx_in);
  const Dims d = dims_of(q, v, idx, num_heads);
  check_routing_index_values(idx, d.P, op);
  at::Tensor out = at::empty({d.n, d.P, d.WQ, d.CV}, q.options());
  at::Tensor lse =
      at::empty({d.n, d.P, d.H, d.WQ}, q.options().dtype(routing_lse_dtype(q.scalar_type())));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const int64_t* ip = idx.data_ptr<int64_t>();
  TOKRED_DISPATCH_FLOATS(q.scalar_type(), "tokred_routed_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(scale_d);
    const Rows<scalar_t> qr_ = rows_of<scalar_t>(q), kr_ = rows_of<scalar_t>(k),
                         vr_ = rows_of<scalar_t>(v);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    const int64_t keys = d.T * d.WK;
    // Query rows padded to a multiple of kRows with zero rows (computed, never written).
    const int64_t WQp = (d.WQ + kRows - 1) / kRows * kRows;
    at::parallel_for(0, d.n * d.P * d.H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> qf(WQp * d.DQ, acc_t(0)), acc(WQp * d.DV), kT(d.DQ * kTile),
          vals(kTile * d.DV), s(kRows * kTile);
      std::vector<OnlineSoftmax<acc_t>> st(WQp);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t h = task % d.H, bi = task / d.H, b = bi / d.P, i = bi % d.P;
        const int64_t* ridx = ip + bi * d.T;
        for (int64_t r = 0; r < d.WQ; ++r) {
          const scalar_t* qr = qr_.at(b, i, r) + h * d.DQ;
          for (int64_t c = 0; c < d.DQ; ++c) qf[r * d.DQ + c] = static_cast<acc_t>(qr[c]);
        }
        for (int64_t r = 0; r < WQp; ++r) st[r].init();
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t kk0 = 0; kk0 < keys; kk0 += kTile) {
          const int64_t kt = std::min(kTile, keys - kk0);
          load_key_tile<scalar_t, acc_t>(kr_, vr_, ridx, d, b, h, kk0, kt, kT.data(),
                                         vals.data(), nullptr);
          for (int64_t r0 = 0; r0 < WQp; r0 += kRows) {
            tile_scores_rows(qf.data() + r0 * d.DQ, d.DQ, kT.data(), kt, scale, s.data());
            for (int64_t rr = 0; rr < kRows; ++rr) {
              // Scores become unnormalised probabilities in place; the accumulator is rescaled.
              acc_t* sr = s.data() + rr * kTile;
              OnlineSoftmax<acc_t>& sm = st[r0 + rr];
              acc_t mt = sr[0];
              for (int64_t x = 1; x < kt; ++x) mt = sr[x] > mt ? sr[x] : mt;
              const acc_t alpha = sm.rescale(mt);
              acc_t* ar = acc.data() + (r0 + rr) * d.DV;
              if (alpha != acc_t(1)) {
                for (int64_t c = 0; c < d.DV; ++c) ar[c] *= alpha;
              }
              acc_t sum = 0;
              for (int64_t x = 0; x < kt; ++x) {
                sr[x] = sm.weight(sr[x]);
                sum += sr[x];
              }
              sm.l += sum;
            }
            accumulate_rows(s.data(), vals.data(), kt, d.DV, acc.data() + r0 * d.DV);
          }
        }
        for (int64_t r = 0; r < d.WQ; ++r) {
          const acc_t inv = st[r].inv_sum();
          scalar_t* orow = op_ + (bi * d.WQ + r) * d.CV + h * d.DV;
          const acc_t* ar = acc.data() + r * d.DV;
          for (int64_t c = 0; c < d.DV; ++c) orow[c] = static_cast<scalar_t>(ar[c] * inv);
          lp[task * d.WQ + r] = st[r].lse();
        }
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& r_idx_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t num_heads, double scale_d) {
  const char* op = "_routed_attention_backward";
  check_routed_attention_backward(grad_in, q_in, k_in, v_in, r_idx_in, out_in, lse_in, num_heads);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  const at::Tensor go = last_dim_contiguous(grad_in), o = last_dim_contiguous(out_in),
                   lse = lse_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const Dims d = dims_of(q, v, idx, num_heads);
  check_routing_index_values(idx, d.P, op);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() + k.numel() + v.numel() == 0) return {dq, dk, dv};
  const int64_t* ip = idx.data_ptr<int64_t>();
  const RoutingPlan plan = build_plan(ip, d.n, d.P, d.T);
  at::Tensor Dbuf = at::empty_like(lse);
  TOKRED_DISPATCH_FLOATS(q.scalar_type(), "tokred_routed_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(scale_d);
    const Rows<scalar_t> qr_ = rows_of<scalar_t>(q), kr_ = rows_of<scalar_t>(k),
                         vr_ = rows_of<scalar_t>(v), gr_ = rows_of<scalar_t>(go),
                         or_ = rows_of<scalar_t>(o);
    const acc_t* lp = lse.data_ptr<acc_t>();
    acc_t* Dp = Dbuf.data_ptr<acc_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    const int64_t keys = d.T * d.WK;

    // D = rowsum(dO · O) per (query row, head).
    at::parallel_for(0, d.n * d.P * d.H, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t h = task % d.H, bi = task / d.H, b = bi / d.P, i = bi % d.P;
        for (int64_t r = 0; r < d.WQ; ++r) {
          const scalar_t* gr = gr_.at(b, i, r) + h * d.DV;
          const scalar_t* orow = or_.at(b, i, r) + h * d.DV;
          acc_t sum = 0;
          for (int64_t c = 0; c < d.DV; ++c)
            sum += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(orow[c]);
          Dp[task * d.WQ + r] = sum;
        }
      }
    });

    // dq per (batch, query window, head), kRows query rows at a time (rows padded with zeros).
    const int64_t WQp = (d.WQ + kRows - 1) / kRows * kRows;
    at::parallel_for(0, d.n * d.P * d.H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> qf(WQp * d.DQ, acc_t(0)), gf(WQp * d.DV, acc_t(0)), kT(d.DQ * kTile),
          vT(d.DV * kTile), vals(kTile * d.DV), krows(kTile * d.DQ), s(kRows * kTile),
          dp(kRows * kTile), accs(WQp * d.DQ);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t h = task % d.H, bi = task / d.H, b = bi / d.P, i = bi % d.P;
        const int64_t* ridx = ip + bi * d.T;
        for (int64_t r = 0; r < d.WQ; ++r) {
          const scalar_t* qr = qr_.at(b, i, r) + h * d.DQ;
          const scalar_t* gr = gr_.at(b, i, r) + h * d.DV;
          for (int64_t c = 0; c < d.DQ; ++c) qf[r * d.DQ + c] = static_cast<acc_t>(qr[c]);
          for (int64_t c = 0; c < d.DV; ++c) gf[r * d.DV + c] = static_cast<acc_t>(gr[c]);
        }
        std::fill(accs.begin(), accs.end(), acc_t(0));
        for (int64_t kk0 = 0; kk0 < keys; kk0 += kTile) {
          const int64_t kt = std::min(kTile, keys - kk0);
          load_key_tile<scalar_t, acc_t>(kr_, vr_, ridx, d, b, h, kk0, kt, kT.data(),
                                         vals.data(), krows.data());
          for (int64_t x = 0; x < kt; ++x)
            for (int64_t c = 0; c < d.DV; ++c) vT[c * kTile + x] = vals[x * d.DV + c];
          for (int64_t r0 = 0; r0 < WQp; r0 += kRows) {
            tile_scores_rows(qf.data() + r0 * d.DQ, d.DQ, kT.data(), kt, scale, s.data());
            tile_scores_rows(gf.data() + r0 * d.DV, d.DV, vT.data(), kt, acc_t(1), dp.data());
            for (int64_t rr = 0; rr < kRows; ++rr) {
              const int64_t r = r0 + rr;
              // Padded rows get dS = 0 (their lse / D are never read).
              const acc_t l = r < d.WQ ? lp[task * d.WQ + r] : routing::neg_inf<acc_t>();
              const acc_t D = r < d.WQ ? Dp[task * d.WQ + r] : acc_t(0);
              acc_t* sr = s.data() + rr * kTile;
              const acc_t* dpr = dp.data() + rr * kTile;
              for (int64_t x = 0; x < kt; ++x)
                sr[x] = routing::score_grad(routing::prob_from_lse(sr[x], l), dpr[x], D) * scale;
            }
            accumulate_rows(s.data(), krows.data(), kt, d.DQ, accs.data() + r0 * d.DQ);
          }
        }
        for (int64_t r = 0; r < d.WQ; ++r) {
          scalar_t* dst = dqp + (bi * d.WQ + r) * d.CQ + h * d.DQ;
          for (int64_t c = 0; c < d.DQ; ++c) dst[c] = static_cast<scalar_t>(accs[r * d.DQ + c]);
        }
      }
    });

    // dk, dv per (batch, key window, head): walk the pairs routed to this window in order.
    // Keys of the window go in chunks of up to kTile (padded to kRows), query rows of each routed
    // window in blocks of kRows; for every key the sum runs over (pair, query row) ascending.
    at::parallel_for(0, d.n * d.P * d.H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> kT(d.DQ * kTile), vT(d.DV * kTile), qf(WQp * d.DQ, acc_t(0)),
          gf(WQp * d.DV, acc_t(0)), s(kRows * kTile), dp(kRows * kTile), pt(kRows * kTile),
          dst(kRows * kTile), dka(kTile * d.DQ), dva(kTile * d.DV);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t h = task % d.H, bj = task / d.H, b = bj / d.P, j = bj % d.P;
        const int64_t* off = plan.offsets.data() + b * (d.P + 1);
        for (int64_t x0 = 0; x0 < d.WK; x0 += kTile) {
          const int64_t kx = std::min(kTile, d.WK - x0);
          const int64_t kxp = (kx + kRows - 1) / kRows * kRows;
          std::fill(kT.begin(), kT.end(), acc_t(0));
          std::fill(vT.begin(), vT.end(), acc_t(0));
          for (int64_t x = 0; x < kx; ++x) {
            const scalar_t* kr = kr_.at(b, j, x0 + x) + h * d.DQ;
            const scalar_t* vr = vr_.at(b, j, x0 + x) + h * d.DV;
            for (int64_t c = 0; c < d.DQ; ++c) kT[c * kTile + x] = static_cast<acc_t>(kr[c]);
            for (int64_t c = 0; c < d.DV; ++c) vT[c * kTile + x] = static_cast<acc_t>(vr[c]);
          }
          std::fill(dka.begin(), dka.begin() + kxp * d.DQ, acc_t(0));
          std::fill(dva.begin(), dva.begin() + kxp * d.DV, acc_t(0));
          for (int64_t e = off[j]; e < off[j + 1]; ++e) {
            const int64_t i = plan.entries[b * d.P * d.T + e] / d.T;
            const int64_t bi = b * d.P + i;
            for (int64_t r = 0; r < d.WQ; ++r) {
              const scalar_t* qr = qr_.at(b, i, r) + h * d.DQ;
              const scalar_t* gr = gr_.at(b, i, r) + h * d.DV;
              for (int64_t c = 0; c < d.DQ; ++c) qf[r * d.DQ + c] = static_cast<acc_t>(qr[c]);
              for (int64_t c = 0; c < d.DV; ++c) gf[r * d.DV + c] = static_cast<acc_t>(gr[c]);
            }
            for (int64_t r0 = 0; r0 < WQp; r0 += kRows) {
              tile_scores_rows(qf.data() + r0 * d.DQ, d.DQ, kT.data(), kx, scale, s.data());
              tile_scores_rows(gf.data() + r0 * d.DV, d.DV, vT.data(), kx, acc_t(1), dp.data());
              // P and dS of the block, transposed to key-major [key][query row in block].
              for (int64_t rr = 0; rr < kRows; ++rr) {
                const int64_t r = r0 + rr;
                const int64_t lrow = (bi * d.H + h) * d.WQ + r;
                const acc_t l = r < d.WQ ? lp[lrow] : routing::neg_inf<acc_t>();
                const acc_t D = r < d.WQ ? Dp[lrow] : acc_t(0);
                for (int64_t x = 0; x < kx; ++x) {
                  const acc_t p = routing::prob_from_lse(s[rr * kTile + x], l);
                  pt[(x % kRows) * kTile + (x / kRows) * kRows + rr] = p;
                  dst[(x % kRows) * kTile + (x / kRows) * kRows + rr] =
                      routing::score_grad(p, dp[rr * kTile + x], D) * scale;
                }
                for (int64_t x = kx; x < kxp; ++x) {
                  pt[(x % kRows) * kTile + (x / kRows) * kRows + rr] = acc_t(0);
                  dst[(x % kRows) * kTile + (x / kRows) * kRows + rr] = acc_t(0);
                }
              }
              // For each group of kRows keys: dv[x] += Σ_rr P[rr][x] dO[rr], dk[x] += Σ_rr dS q.
              for (int64_t xg = 0; xg < kxp; xg += kRows) {
                const int64_t col = (xg / kRows) * kRows;
                accumulate_rows_offset(pt.data(), col, gf.data() + r0 * d.DV, kRows, d.DV,
                                       dva.data() + xg * d.DV);
                accumulate_rows_offset(dst.data(), col, qf.data() + r0 * d.DQ, kRows, d.DQ,
                                       dka.data() + xg * d.DQ);
              }
            }
          }
          for (int64_t x = 0; x < kx; ++x) {
            scalar_t* dkr = dkp + (bj * d.WK + x0 + x) * d.CQ + h * d.DQ;
            scalar_t* dvr = dvp + (bj * d.WK + x0 + x) * d.CV + h * d.DV;
            for (int64_t c = 0; c < d.DQ; ++c) dkr[c] = static_cast<scalar_t>(dka[x * d.DQ + c]);
            for (int64_t c = 0; c < d.DV; ++c) dvr[c] = static_cast<scalar_t>(dva[x * d.DV + c]);
          }
        }
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CPU, m) {
  m.impl("routed_gather", TORCH_FN(routed_gather_cpu));
  m.impl("_routed_gather_backward", TORCH_FN(routed_gather_backward_cpu));
  m.impl("routed_attention", TORCH_FN(routed_attention_cpu));
  m.impl("_routed_attention_backward", TORCH_FN(routed_attention_backward_cpu));
}

}  // namespace tokred
