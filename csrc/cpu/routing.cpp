// CPU kernels of the BiFormer routing ops.
//
// routed_attention is fused: no gathered K/V buffer and no attention matrix. A forward task is a
// (batch, head) and a range of query windows: it stages the batch's keys of that head once (as
// columns), then for each query window streams its routed keys in tiles of up to kTile keys,
// keeps an online softmax per query row (common/routing.h) and writes out and lse. A backward
// task is a whole (batch, head): for each query window and key tile it recomputes P and dS once,
// adds into the window's dq and into the task's dk / dv accumulators in ascending (query window,
// slot, row) order. No atomics and no shared accumulators, so results are bitwise repeatable for
// any thread count. The vector code is cpu/vec.h; routed_gather's backward sums each window's
// gradient over the segment module's plan (cpu/segment.h). r_idx values are TORCH_CHECKed.
#include "common/routing.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/routing_args.h"
#include "cpu/fma.h"
#include "cpu/parallel.h"
#include "cpu/segment.h"
#include "cpu/vec.h"

namespace tokred {
namespace {

using routing::Dims;
using routing::OnlineSoftmax;
using namespace vec;  // the SIMD toolkit (cpu/vec.h)

// Every r_idx entry in [0, P), or a TORCH_CHECK naming the first bad entry and its position.
void check_routing_index_values(const at::Tensor& idx, int64_t P, const char* op) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t R = idx.size(1), T = idx.size(2), total = idx.numel();
  for (int64_t e = 0; e < total; ++e) {
    TOKRED_CHECK(routing::region_in_range(p[e], P), op, "r_idx", "must hold region indices in [0, ",
                 P, "), got ", p[e], " at [", e / (R * T), ", ", (e / T) % R, ", ", e % T, "]");
  }
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
    parallel_for(0, n * P * T, grain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t b = e / (P * T);
        const scalar_t* s = src + routing::window_row(b, ip[e], 0, P, W) * C;
        scalar_t* d = dst + e * row;
        if (wp == nullptr) {
          std::copy(s, s + row, d);
        } else {
          const acc_t w = static_cast<acc_t>(wp[e]);
          for (int64_t c = 0; c < row; ++c)
            d[c] = static_cast<scalar_t>(w * static_cast<acc_t>(s[c]));
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
  // For each batch b and window j, the flattened entries e = i·T + t with r_idx[b, i, t] == j in
  // ascending order: order[b, offsets[b, j] .. offsets[b, j + 1]) (the segment module's plan).
  const auto plan = build_segments_cpu(idx.view({n, P * T}), P, op, "r_idx");
  const int64_t* order = std::get<0>(plan).data_ptr<int64_t>();
  const int64_t* offsets = std::get<1>(plan).data_ptr<int64_t>();
  const at::Tensor weight = weighted ? r_weight_in->to(at::kDouble).contiguous() : at::Tensor();
  const double* wp = weighted ? weight.data_ptr<double>() : nullptr;
  TOKRED_DISPATCH_FLOATS(kv.scalar_type(), "tokred_routed_gather_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* x = kv.data_ptr<scalar_t>();
    scalar_t* gx = grad_kv.data_ptr<scalar_t>();
    // grad_kv[b, j] = Σ over the pairs routed to j, in ascending (i, t), of w · grad[b, i, t].
    parallel_for(0, n * P, 1, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> acc(row);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / P, j = r % P;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t* off = offsets + b * (P + 1);
        for (int64_t s = off[j]; s < off[j + 1]; ++s) {
          const int64_t e = b * P * T + order[b * P * T + s];
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
      parallel_for(0, n * P * T, 1, [&](int64_t e0, int64_t e1) {
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

// ---------------------------------------------------------------------- softmax tiles
//
// The vector code (cpu/vec.h) works in the scalar order on every target clone and thread count.

constexpr int64_t kTile = 128;  // routed keys per tile (a multiple of both lane counts)

// Forward: turns one row of scores s[0, kt) of a tile into exp(s - m) under the row's new running
// max (the padding [kt, ktp) becomes 0), adds their sum (lanes, then a fixed tree) to the state
// and returns the factor the row's accumulator must be multiplied by.
template <typename T>
TOKRED_INLINE T softmax_tile_row_impl(T* s, int64_t kt, int64_t ktp, OnlineSoftmax<T>& sm) {
  using V = Vec<T>;
  for (int64_t x = kt; x < ktp; ++x) s[x] = routing::neg_inf<T>();
  V mv = vsplat(routing::neg_inf<T>());
  for (int64_t x = 0; x < ktp; x += kLanes<T>) {
    const V v = vload(s + x);
    mv = (v > mv) | (v != v) ? v : mv;  // NaN propagates (routing::nan_max, lane-wise)
  }
  const T alpha = sm.rescale(vmax<T>(mv));
  if (sm.m == routing::neg_inf<T>()) {
    std::fill(s, s + ktp, T(0));
    return alpha;
  }
  V sum = {};
  for (int64_t x = 0; x < ktp; x += kLanes<T>) {
    const V p = vexp(vload(s + x) - sm.m);
    vstore(s + x, p);
    sum += p;
  }
  sm.l += vsum<T>(sum);
  return alpha;
}

// Backward: s[x] becomes P = exp(s - lse) and ds[x] = P (dP - D), for x < ktp (padding of
// s must be -inf so that P = 0 there). lse = -inf: every score of the row was -inf, the forward's
// softmax was NaN (prob_from_lse), and so are P and dS.
template <typename T>
TOKRED_INLINE void probs_grads_row_impl(T* s, const T* dp, int64_t ktp, T lse, T D, T* ds) {
  using V = Vec<T>;
  if (lse == routing::neg_inf<T>()) {
    std::fill(s, s + ktp, std::numeric_limits<T>::quiet_NaN());
    std::fill(ds, ds + ktp, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  for (int64_t x = 0; x < ktp; x += kLanes<T>) {
    const V p = vexp(vload(s + x) - lse);
    vstore(s + x, p);
    vstore(ds + x, p * (vload(dp + x) - D));
  }
}

// Entry points per accumulator type (GCC cannot clone templates), in two variants: `plain`
// (cloned for AVX-512, AVX2 and the baseline) and `fused` (TOKRED_FMA_TARGET: the products' and
// the exp's multiply-adds fused, for CPUs with FMA). Each gives the same bits on every clone and
// thread count; the two differ in the last bits. routing_kernels() picks one for the process.
#define TOKRED_ROUTING_KERNELS(T, ATTRS)                                          \
  TOKRED_VEC_DOT_ROWS(T, ATTRS)                                                   \
  TOKRED_VEC_AXPY_ROWS(T, ATTRS)                                                  \
  ATTRS T softmax_tile_row(T* s, int64_t kt, int64_t ktp, OnlineSoftmax<T>& sm) { \
    return softmax_tile_row_impl<T>(s, kt, ktp, sm);                              \
  }                                                                               \
  ATTRS void probs_grads_row(T* s, const T* dp, int64_t ktp, T lse, T D, T* ds) { \
    probs_grads_row_impl<T>(s, dp, ktp, lse, D, ds);                              \
  }

namespace plain {
TOKRED_ROUTING_KERNELS(float, TOKRED_SIMD_CLONES)
TOKRED_ROUTING_KERNELS(double, TOKRED_SIMD_CLONES)
}  // namespace plain
namespace fused {
TOKRED_ROUTING_KERNELS(float, TOKRED_FMA_TARGET)
TOKRED_ROUTING_KERNELS(double, TOKRED_FMA_TARGET)
}  // namespace fused

template <typename T>
struct RoutingKernels {
  void (*dot_rows)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, T*, int64_t);
  void (*axpy_rows)(const T*, int64_t, int64_t, const T* const*, int64_t, int64_t, int64_t, T*,
                    int64_t);
  T (*softmax_tile_row)(T*, int64_t, int64_t, OnlineSoftmax<T>&);
  void (*probs_grads_row)(T*, const T*, int64_t, T, T, T*);
};

template <typename T>
RoutingKernels<T> routing_kernels() {
  if (fused_multiply_add())
    return {fused::dot_rows, fused::axpy_rows, fused::softmax_tile_row, fused::probs_grads_row};
  return {plain::dot_rows, plain::axpy_rows, plain::softmax_tile_row, plain::probs_grads_row};
}

// ---------------------------------------------------------------------- staging

// Row stride of staged key columns: padded so that the C rows do not share cache sets (a stride
// of a multiple of 4 KiB would, for P·WK = 1024, 4096, ...).
inline int64_t staged_ld(int64_t nk) { return round_up(nk, 16) + 16; }

// The keys of one (batch, head) converted to the accumulator type: as columns cols [C][ldc] (so
// score rows are vector loops over keys) and / or as rows [P·WK][C], at their place among all
// P·WK keys. With `routed` (one flag per window), only the 16-key groups that hold a key of a
// flagged window are staged, and the rest keep whatever they held. The transpose goes 16 keys at
// a time so that each store fills a cache line.
template <typename scalar_t, typename acc_t>
void stage_keys(const Rows<scalar_t>& k, int64_t b, int64_t c0, int64_t C, const Dims& d,
                acc_t* cols, int64_t ldc, acc_t* rows, const char* routed = nullptr) {
  constexpr int64_t kB = 16;
  const int64_t NK = d.P * d.WK;
  const scalar_t* src[kB];
  for (int64_t k0 = 0; k0 < NK; k0 += kB) {
    const int64_t nb = std::min(kB, NK - k0);
    if (routed != nullptr) {  // the flags of the windows keys [k0, k0 + nb) belong to
      const char *first = routed + k0 / d.WK, *last = routed + (k0 + nb - 1) / d.WK;
      if (std::none_of(first, last + 1, [](char f) { return f != 0; })) continue;
    }
    for (int64_t e = 0; e < nb; ++e) src[e] = k.at(b, (k0 + e) / d.WK, (k0 + e) % d.WK) + c0;
    if (cols != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t* dst = cols + c * ldc + k0;
        for (int64_t e = 0; e < nb; ++e) dst[e] = static_cast<acc_t>(src[e][c]);
      }
    }
    if (rows != nullptr) {
      for (int64_t e = 0; e < nb; ++e) {
        acc_t* dst = rows + (k0 + e) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<acc_t>(src[e][c]);
      }
    }
  }
}

// One slot's run of a key tile: tile columns [x, x + len) are rows [y, y + len) of window j.
struct KeyRun {
  int64_t x, len, j, y;
};

// Splits the routed keys [kk0, kk0 + kt) of a query window (routing row ridx) into runs.
inline int64_t key_runs(const int64_t* ridx, int64_t WK, int64_t kk0, int64_t kt, KeyRun* runs) {
  int64_t nr = 0;
  for (int64_t x = 0; x < kt;) {
    int64_t slot, row;
    routing::split_routed_key(kk0 + x, WK, slot, row);
    const int64_t len = std::min(WK - row, kt - x);
    runs[nr++] = {x, len, ridx[slot], row};
    x += len;
  }
  return nr;
}

// dst[c][run.x + e] = src[c][run.j·WK + run.y + e]: the tile's keys in column layout, copied from
// the staged columns in runs (4 values at a time). Loop distribution off: GCC may otherwise turn
// a run's copy into a call to memcpy, which costs more than the copy of a run's 4 to 16 keys.
template <typename T>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void gather_cols(
    const T* src, int64_t lds, int64_t C, const KeyRun* runs, int64_t nr, int64_t WK, T* dst,
    int64_t ldd) {
  for (int64_t u = 0; u < nr; ++u) {
    const KeyRun& q = runs[u];
    const T* s = src + q.j * WK + q.y;
    T* t = dst + q.x;
    for (int64_t c = 0; c < C; ++c) {
      const T* sc = s + c * lds;
      T* tc = t + c * ldd;
      int64_t e = 0;
      for (; e + 4 <= q.len; e += 4) __builtin_memcpy(tc + e, sc + e, 4 * sizeof(T));
      for (; e < q.len; ++e) tc[e] = sc[e];
    }
  }
}

// Row pointers of the tile's keys into staged rows [P·WK][C].
template <typename T>
void key_row_ptrs(const T* rows, int64_t C, const KeyRun* runs, int64_t nr, int64_t WK,
                  const T** ptr) {
  for (int64_t u = 0; u < nr; ++u) {
    for (int64_t e = 0; e < runs[u].len; ++e)
      ptr[runs[u].x + e] = rows + (runs[u].j * WK + runs[u].y + e) * C;
  }
}

// Row pointers of the tile's keys read in place, channels [c0, ...) of [n, P, w, c] rows of batch
// b (keys already in the accumulator type need no staged copy).
template <typename T>
void key_row_ptrs(const Rows<T>& rows, int64_t b, int64_t c0, const KeyRun* runs, int64_t nr,
                  const T** ptr) {
  for (int64_t u = 0; u < nr; ++u) {
    for (int64_t e = 0; e < runs[u].len; ++e)
      ptr[runs[u].x + e] = rows.at(b, runs[u].j, runs[u].y + e) + c0;
  }
}

// Values already in the accumulator type (float32, float64) are read in place; others are
// staged as rows of acc_t per (batch, head).
template <typename scalar_t, typename acc_t>
constexpr bool kValuesInPlace = std::is_same_v<scalar_t, acc_t>;

// Row pointers of the tile's values: into v (kValuesInPlace) or into the staged rows.
template <typename scalar_t, typename acc_t>
void value_row_ptrs(const Rows<scalar_t>& v, int64_t b, int64_t c0, const acc_t* staged, int64_t C,
                    const KeyRun* runs, int64_t nr, int64_t WK, const acc_t** ptr) {
  if constexpr (kValuesInPlace<scalar_t, acc_t>) {
    key_row_ptrs(v, b, c0, runs, nr, ptr);
  } else {
    key_row_ptrs(staged, C, runs, nr, WK, ptr);
  }
}

// Σ a[c]·b[c] with 8 independent partial sums combined in a fixed order.
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

// ---------------------------------------------------------------------- routed_attention

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
    const int64_t keys = d.T * d.WK, NK = d.P * d.WK, ldk = staged_ld(NK);
    const int64_t WQp = round_up(d.WQ, kRows);
    // A task is (batch, head, range of query windows): it stages that batch's keys of the head
    // once and serves every window of the range from them. Ranges are split only to give each
    // thread work; a window's result does not depend on the split.
    const int64_t units = d.n * d.H;
    const int64_t split =
        std::min(d.P, std::max<int64_t>(1, (4 * at::get_num_threads() + units - 1) / units));
    const int64_t per = (d.P + split - 1) / split, parts = (d.P + per - 1) / per;
    const RoutingKernels<acc_t> kern = routing_kernels<acc_t>();
    parallel_for(0, units * parts, 1, [&](int64_t t0, int64_t t1) {
      constexpr bool stage_values = !kValuesInPlace<scalar_t, acc_t>;
      std::vector<acc_t> kT(d.DQ * ldk), vrow(stage_values ? NK * d.DV : 0),
          qf(WQp * d.DQ, acc_t(0)), acc(WQp * d.DV), kc(d.DQ * kTile, acc_t(0)), s(kRows * kTile);
      std::vector<const acc_t*> vptr(kTile);
      std::vector<KeyRun> runs(kTile + 1);
      std::vector<OnlineSoftmax<acc_t>> st(WQp);
      std::vector<char> routed(d.P);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t unit = task / parts, part = task % parts;
        const int64_t b = unit / d.H, h = unit % d.H;
        // Only the windows this task's query windows route to are read.
        const int64_t i0 = part * per, i1 = std::min(d.P, (part + 1) * per);
        std::fill(routed.begin(), routed.end(), char(0));
        for (const int64_t* j = ip + (b * d.P + i0) * d.T; j < ip + (b * d.P + i1) * d.T; ++j)
          routed[*j] = 1;
        stage_keys<scalar_t, acc_t>(kr_, b, h * d.DQ, d.DQ, d, kT.data(), ldk, nullptr,
                                    routed.data());
        if (stage_values)
          stage_keys<scalar_t, acc_t>(vr_, b, h * d.DV, d.DV, d, nullptr, 0, vrow.data(),
                                      routed.data());
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t bi = b * d.P + i;
          const int64_t* ridx = ip + bi * d.T;
          // Scores are (q·scale)·k, upstream's order: scaling q first keeps a score finite
          // where q·k alone would overflow.
          for (int64_t r = 0; r < d.WQ; ++r) {
            const scalar_t* qr = qr_.at(b, i, r) + h * d.DQ;
            for (int64_t c = 0; c < d.DQ; ++c) qf[r * d.DQ + c] = static_cast<acc_t>(qr[c]) * scale;
          }
          for (int64_t r = 0; r < WQp; ++r) st[r].init();
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t kk0 = 0; kk0 < keys; kk0 += kTile) {
            const int64_t kt = std::min(kTile, keys - kk0), ktp = round_up(kt, kLanes<acc_t>);
            const int64_t nr = key_runs(ridx, d.WK, kk0, kt, runs.data());
            // A tile of one run (a whole window, as at topk 1) is read from the staged columns
            // in place; the padding columns [kt, ktp) read further keys of the staged row (ldk
            // leaves room) and score -inf in softmax_tile_row either way.
            const acc_t* cols = kc.data();
            int64_t ldc = kTile;
            if (nr == 1) {
              cols = kT.data() + runs[0].j * d.WK + runs[0].y;
              ldc = ldk;
            } else {
              gather_cols(kT.data(), ldk, d.DQ, runs.data(), nr, d.WK, kc.data(), kTile);
            }
            value_row_ptrs(vr_, b, h * d.DV, vrow.data(), d.DV, runs.data(), nr, d.WK, vptr.data());
            for (int64_t r0 = 0; r0 < d.WQ; r0 += kRows) {
              const int64_t rows = std::min(kRows, d.WQ - r0);
              kern.dot_rows(qf.data() + r0 * d.DQ, d.DQ, d.DQ, cols, ldc, ktp, s.data(), kTile);
              for (int64_t rr = 0; rr < rows; ++rr) {
                // Scores become unnormalised probabilities in place; the accumulator rescales
                // (not at the first tile: it is still zero, and a NaN row stays NaN through the
                // probabilities).
                const acc_t alpha =
                    kern.softmax_tile_row(s.data() + rr * kTile, kt, ktp, st[r0 + rr]);
                if (kk0 > 0 && alpha != acc_t(1)) {
                  acc_t* ar = acc.data() + (r0 + rr) * d.DV;
                  for (int64_t c = 0; c < d.DV; ++c) ar[c] *= alpha;
                }
              }
              kern.axpy_rows(s.data(), kTile, 1, vptr.data(), kt, d.DV, rows,
                             acc.data() + r0 * d.DV, d.DV);
            }
          }
          for (int64_t r = 0; r < d.WQ; ++r) {
            const acc_t inv = st[r].inv_sum();
            scalar_t* orow = op_ + (bi * d.WQ + r) * d.CV + h * d.DV;
            const acc_t* ar = acc.data() + r * d.DV;
            for (int64_t c = 0; c < d.DV; ++c) orow[c] = static_cast<scalar_t>(ar[c] * inv);
            lp[(bi * d.H + h) * d.WQ + r] = st[r].lse();
          }
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
  TOKRED_DISPATCH_FLOATS(q.scalar_type(), "tokred_routed_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(scale_d);
    const Rows<scalar_t> qr_ = rows_of<scalar_t>(q), kr_ = rows_of<scalar_t>(k),
                         vr_ = rows_of<scalar_t>(v), gr_ = rows_of<scalar_t>(go),
                         or_ = rows_of<scalar_t>(o);
    const acc_t* lp = lse.data_ptr<acc_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    const int64_t keys = d.T * d.WK, NK = d.P * d.WK, ldk = staged_ld(NK);
    const int64_t WQp = round_up(d.WQ, kRows);
    // One task per (batch, head): P and dS of each (query window, key tile) are computed once and
    // feed dq of the window and the dk / dv accumulators of the batch's keys of that head. A key
    // row sums its terms in ascending (query window, slot, query row) order within one task, so
    // results do not depend on the thread count.
    const RoutingKernels<acc_t> kern = routing_kernels<acc_t>();
    parallel_for(0, d.n * d.H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> kT(d.DQ * ldk), vT(d.DV * ldk), krow(NK * d.DQ), dka(NK * d.DQ),
          dva(NK * d.DV), qf(WQp * d.DQ, acc_t(0)), gf(WQp * d.DV, acc_t(0)), lr(WQp), Dr(WQp),
          dqa(WQp * d.DQ), kc(d.DQ * kTile, acc_t(0)), vc(d.DV * kTile, acc_t(0)), pb(WQp * kTile),
          dsb(WQp * kTile), dpb(kRows * kTile), of(d.DV);
      std::vector<const acc_t*> kptr(kTile), qptr(d.WQ), gptr(d.WQ);
      for (int64_t r = 0; r < d.WQ; ++r) {
        qptr[r] = qf.data() + r * d.DQ;
        gptr[r] = gf.data() + r * d.DV;
      }
      std::vector<KeyRun> runs(kTile + 1);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t b = task / d.H, h = task % d.H;
        stage_keys<scalar_t, acc_t>(kr_, b, h * d.DQ, d.DQ, d, kT.data(), ldk, krow.data());
        stage_keys<scalar_t, acc_t>(vr_, b, h * d.DV, d.DV, d, vT.data(), ldk, nullptr);
        std::fill(dka.begin(), dka.end(), acc_t(0));
        std::fill(dva.begin(), dva.end(), acc_t(0));
        for (int64_t i = 0; i < d.P; ++i) {
          const int64_t bi = b * d.P + i;
          const int64_t* ridx = ip + bi * d.T;
          // Padded rows (zero q and dO): lse +inf gives P = 0 and dS = 0.
          std::fill(lr.begin(), lr.end(), std::numeric_limits<acc_t>::infinity());
          std::fill(Dr.begin(), Dr.end(), acc_t(0));
          for (int64_t r = 0; r < d.WQ; ++r) {
            const scalar_t* qrow = qr_.at(b, i, r) + h * d.DQ;
            const scalar_t* grow = gr_.at(b, i, r) + h * d.DV;
            const scalar_t* orow = or_.at(b, i, r) + h * d.DV;
            acc_t* gfr = gf.data() + r * d.DV;
            for (int64_t c = 0; c < d.DQ; ++c)
              qf[r * d.DQ + c] = static_cast<acc_t>(qrow[c]) * scale;
            for (int64_t c = 0; c < d.DV; ++c) gfr[c] = static_cast<acc_t>(grow[c]);
            for (int64_t c = 0; c < d.DV; ++c) of[c] = static_cast<acc_t>(orow[c]);
            Dr[r] = dot_fixed(gfr, of.data(), d.DV);  // D = rowsum(dO · O)
            lr[r] = lp[(bi * d.H + h) * d.WQ + r];
          }
          std::fill(dqa.begin(), dqa.end(), acc_t(0));
          for (int64_t kk0 = 0; kk0 < keys; kk0 += kTile) {
            const int64_t kt = std::min(kTile, keys - kk0), ktp = round_up(kt, kLanes<acc_t>);
            const int64_t nr = key_runs(ridx, d.WK, kk0, kt, runs.data());
            gather_cols(kT.data(), ldk, d.DQ, runs.data(), nr, d.WK, kc.data(), kTile);
            gather_cols(vT.data(), ldk, d.DV, runs.data(), nr, d.WK, vc.data(), kTile);
            key_row_ptrs(krow.data(), d.DQ, runs.data(), nr, d.WK, kptr.data());
            for (int64_t r0 = 0; r0 < d.WQ; r0 += kRows) {
              acc_t* pr = pb.data() + r0 * kTile;
              kern.dot_rows(qf.data() + r0 * d.DQ, d.DQ, d.DQ, kc.data(), kTile, ktp, pr, kTile);
              kern.dot_rows(gf.data() + r0 * d.DV, d.DV, d.DV, vc.data(), kTile, ktp, dpb.data(),
                            kTile);
              for (int64_t rr = 0; rr < kRows; ++rr) {
                acc_t* srow = pr + rr * kTile;
                for (int64_t x = kt; x < ktp; ++x) srow[x] = routing::neg_inf<acc_t>();
                kern.probs_grads_row(srow, dpb.data() + rr * kTile, ktp, lr[r0 + rr], Dr[r0 + rr],
                                     dsb.data() + (r0 + rr) * kTile);
              }
            }
            // With s = (q·scale)·k and dS = P (dP - D): dq[r] = scale · Σ_x dS[r][x] k[x] (the
            // scale at the end); for each slot's keys, dk[x] += Σ_r dS[r][x] (q·scale)[r] and
            // dv[x] += Σ_r P[r][x] dO[r].
            kern.axpy_rows(dsb.data(), kTile, 1, kptr.data(), kt, d.DQ, d.WQ, dqa.data(), d.DQ);
            for (int64_t u = 0; u < nr; ++u) {
              const KeyRun& run = runs[u];
              const int64_t row0 = run.j * d.WK + run.y;
              kern.axpy_rows(dsb.data() + run.x, 1, kTile, qptr.data(), d.WQ, d.DQ, run.len,
                             dka.data() + row0 * d.DQ, d.DQ);
              kern.axpy_rows(pb.data() + run.x, 1, kTile, gptr.data(), d.WQ, d.DV, run.len,
                             dva.data() + row0 * d.DV, d.DV);
            }
          }
          for (int64_t r = 0; r < d.WQ; ++r) {
            scalar_t* dst = dqp + (bi * d.WQ + r) * d.CQ + h * d.DQ;
            for (int64_t c = 0; c < d.DQ; ++c)
              dst[c] = static_cast<scalar_t>(dqa[r * d.DQ + c] * scale);
          }
        }
        for (int64_t kx = 0; kx < NK; ++kx) {
          scalar_t* dkr = dkp + (b * NK + kx) * d.CQ + h * d.DQ;
          scalar_t* dvr = dvp + (b * NK + kx) * d.CV + h * d.DV;
          for (int64_t c = 0; c < d.DQ; ++c) dkr[c] = static_cast<scalar_t>(dka[kx * d.DQ + c]);
          for (int64_t c = 0; c < d.DV; ++c) dvr[c] = static_cast<scalar_t>(dva[kx * d.DV + c]);
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
