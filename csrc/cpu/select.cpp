// CPU kernels of the selection ops: rows run in parallel (cpu/parallel.h); each row is
// selected under tokred's total order as integer keys (common/rank.h): a radix sort for short
// rows of float values, else nth_element and a sort of the kept prefix.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rank.h"
#include "common/select_args.h"
#include "cpu/copy.h"
#include "cpu/parallel.h"
#include "cpu/segment.h"
#include "cpu/vec.h"

namespace tokred {
namespace {

struct Entry {
  uint64_t key;  // order_key of the value: the selection order as an integer
  int64_t index;
};

// Rows up to this length whose values are exactly floats take the radix path of select_row.
constexpr int64_t kRadixRow = 4096;

// One thread's scratch for select_row.
struct SelectScratch {
  std::vector<Entry> entries;                              // the nth_element path
  std::vector<uint32_t> keys, keys_out, index, index_out;  // the radix path
};

// Sorts a row by order_key32 with a stable LSD radix sort (8-bit digits; a digit every entry
// shares moves nothing and is skipped), so equal keys keep ascending index: tokred's order in
// O(len) without data-dependent branches, about 3x nth_element + sort at DeiT sizes.
template <typename scalar_t>
void radix_sort_row(const scalar_t* row, int64_t len, bool largest, SelectScratch& w) {
  w.keys.resize(len), w.keys_out.resize(len), w.index.resize(len), w.index_out.resize(len);
  uint32_t count[4][256] = {};
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t key = order_key32(static_cast<float>(row[i]), largest);
    w.keys[i] = key;
    w.index[i] = static_cast<uint32_t>(i);
    for (int d = 0; d < 4; ++d) ++count[d][(key >> (8 * d)) & 255];
  }
  for (int d = 0; d < 4; ++d) {
    const int shift = 8 * d;
    if (count[d][(w.keys[0] >> shift) & 255] == static_cast<uint32_t>(len)) continue;
    uint32_t start = 0;
    for (uint32_t& c : count[d]) start += std::exchange(c, start);
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t slot = count[d][(w.keys[i] >> shift) & 255]++;
      w.keys_out[slot] = w.keys[i];
      w.index_out[slot] = w.index[i];
    }
    w.keys.swap(w.keys_out);
    w.index.swap(w.index_out);
  }
}

// The first min(k, len) entries of row[0..len) in selection order, written to `order`: the radix
// sort above for short float rows, else nth_element then a sort of the kept prefix (O(len +
// k log k), fast also when k is close to len).
template <typename scalar_t>
void select_row(const scalar_t* row, int64_t len, int64_t k, bool largest, SelectScratch& w,
                std::vector<int64_t>& order) {
  const int64_t m = std::min(k, len);
  order.resize(m);
  if (!std::is_same_v<scalar_t, double> && len > 0 && len <= kRadixRow) {
    radix_sort_row(row, len, largest, w);
    for (int64_t j = 0; j < m; ++j) order[j] = w.index[j];
    return;
  }
  std::vector<Entry>& entries = w.entries;
  entries.resize(len);
  for (int64_t i = 0; i < len; ++i) {
    entries[i] = {order_key(static_cast<double>(row[i]), largest), i};
  }
  auto before = [](const Entry& a, const Entry& b) {
    return a.key < b.key || (a.key == b.key && a.index < b.index);
  };
  if (m < len) std::nth_element(entries.begin(), entries.begin() + m, entries.end(), before);
  std::sort(entries.begin(), entries.begin() + m, before);
  for (int64_t j = 0; j < m; ++j) order[j] = entries[j].index;
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& scores_in, int64_t k, bool largest,
                                            const std::optional<at::Tensor>& lengths_in) {
  const auto shape = check_topk(scores_in, k, lengths_in);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t n = scores.size(-1);
  const int64_t rows = leading_rows(scores);
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().end());
  out_shape.back() = k;
  at::Tensor values = at::empty(out_shape, scores.options());
  at::Tensor indices = at::empty(out_shape, scores.options().dtype(at::kLong));
  const at::Tensor lengths = lengths_in.has_value() ? as_int64(*lengths_in) : at::Tensor();
  const int64_t* len_p = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_topk_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    scalar_t* v = values.data_ptr<scalar_t>();
    int64_t* ix = indices.data_ptr<int64_t>();
    const scalar_t pad = largest ? -std::numeric_limits<scalar_t>::infinity()
                                 : std::numeric_limits<scalar_t>::infinity();
    const int64_t grain = std::max<int64_t>(1, 4096 / (n + 1));
    parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      SelectScratch scratch;
      std::vector<int64_t> order;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t len = len_p ? len_p[r] : n;
        TORCH_CHECK(len >= 0 && len <= n,
                    "tokred::topk: argument 'lengths' must hold values in [0, ", n, "], got ", len,
                    " for row ", r);
        select_row(s + r * n, len, k, largest, scratch, order);
        const int64_t m = static_cast<int64_t>(order.size());
        for (int64_t j = 0; j < m; ++j) {
          v[r * k + j] = s[r * n + order[j]];
          ix[r * k + j] = order[j];
        }
        for (int64_t j = m; j < k; ++j) {
          v[r * k + j] = pad;
          ix[r * k + j] = -1;
        }
      }
    });
  });
  return {values, indices};
}

at::Tensor topk_backward_cpu(const at::Tensor& grad, const at::Tensor& indices, int64_t n) {
  check_topk_backward(grad, indices, n);
  const int64_t k = grad.size(-1);
  const int64_t rows = leading_rows(grad);
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape.back() = n;
  const at::Tensor summed = scatter_sum_rows_cpu(
      grad.reshape({rows, k, 1}), indices.reshape({rows, k}), n, "_topk_backward", "indices");
  return summed.view(shape);
}

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index_in) {
  check_gather_tokens(x, index_in);
  const at::Tensor index = as_int64(index_in);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, C}, x.options());
  const bool streaming = use_streaming_stores(out.nbytes());
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_gather_tokens_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
    const int64_t grain = std::max<int64_t>(1, 32768 / (C + 1));
    parallel_for(0, B * K, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / K, i = ip[r];
        TORCH_CHECK(i >= -1 && i < N, "tokred::gather_tokens: argument 'index' holds ", i, " at [",
                    b, ", ", r % K, "], expected values in [0, ", N, ") or -1 for padding");
        if (i < 0) {
          std::fill(op + r * C, op + (r + 1) * C, scalar_t(0));
        } else {
          copy_row(op + r * C, xp + b * s0 + i * s1, C, s2, streaming);
        }
      }
      if (streaming) finish_streaming_stores();
    });
  });
  return out;
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t n) {
  check_gather_tokens_backward(grad, index, n);
  return scatter_sum_rows_cpu(grad, index, n, "_gather_tokens_backward", "index");
}

at::Tensor complement_cpu(const at::Tensor& index_in, int64_t n) {
  check_complement(index_in, n);
  const at::Tensor index = as_int64(index_in);
  const int64_t B = index.size(0), K = index.size(1);
  at::Tensor out = at::empty({B, n - K}, index.options());
  const int64_t* ip = index.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<char> seen;
    for (int64_t b = b0; b < b1; ++b) {
      seen.assign(n, 0);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = ip[b * K + k];
        TORCH_CHECK(i >= 0 && i < n, "tokred::complement: argument 'index' holds ", i, " at [", b,
                    ", ", k, "], expected values in [0, ", n, ")");
        TORCH_CHECK(!seen[i], "tokred::complement: argument 'index' holds ", i, " twice in row ", b,
                    ", expected distinct indices");
        seen[i] = 1;
      }
      int64_t j = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (!seen[i]) op[b * (n - K) + j++] = i;
      }
    }
  });
  return out;
}

// EViT's fused token for float and double rows of unit stride: acc[c] += Σ_x w[x]·rows[x][c],
// x ascending, four rows per pass over acc (vec.h). Each lane does the scalar loop's operations in
// its order, so every clone gives the scalar loop's bits.
#define TOKRED_FUSE_KERNEL(T)                                                                      \
  TOKRED_SIMD_CLONES void add_weighted_rows(T* acc, const T* w, const T* const* rows, int64_t X,   \
                                            int64_t C) {                                           \
    for (int64_t x0 = 0; x0 < X; x0 += vec::kRows) {                                               \
      vec::axpy_rows_impl<T, 1>(w + x0, 0, 1, rows + x0, std::min(vec::kRows, X - x0), C, acc, C); \
    }                                                                                              \
  }
TOKRED_FUSE_KERNEL(float)
TOKRED_FUSE_KERNEL(double)

// acc[c] += Σ_x w[x]·rows[x][c·stride], x ascending: the cloned kernel where it applies.
template <typename x_t, typename acc_t>
void add_weighted_tokens(acc_t* acc, const acc_t* w, const x_t* const* rows, int64_t X, int64_t C,
                         int64_t stride) {
  if constexpr (std::is_same_v<x_t, acc_t>) {
    if (stride == 1) return add_weighted_rows(acc, w, rows, X, C);
  }
  for (int64_t x = 0; x < X; ++x) {
    for (int64_t c = 0; c < C; ++c) acc[c] += w[x] * static_cast<acc_t>(rows[x][c * stride]);
  }
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_cpu(const at::Tensor& x,
                                                    const at::Tensor& scores_in, int64_t k,
                                                    bool fuse, int64_t P, bool keep_order) {
  check_prune_tokens(x, scores_in, k, fuse, P);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = x.size(0), C = x.size(2), N = scores.size(1);
  const int64_t rows_out = P + k + (fuse ? 1 : 0);
  at::Tensor out = at::empty({B, rows_out, C}, x.options());
  at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
  const bool streaming = use_streaming_stores(out.nbytes());
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_prune_tokens_cpu", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_prune_tokens_cpu_scores", [&] {
      const scalar_t* sp = scores.data_ptr<scalar_t>();
      const x_t* xp = x.data_ptr<x_t>();
      x_t* op = out.data_ptr<x_t>();
      int64_t* ip = index.data_ptr<int64_t>();
      const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
      parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        SelectScratch scratch;
        std::vector<int64_t> order;
        std::vector<char> kept;
        std::vector<const x_t*> dropped;
        std::vector<acc_t> weights, acc;
        for (int64_t b = b0; b < b1; ++b) {
          select_row(sp + b * N, N, k, /*largest=*/true, scratch, order);
          if (keep_order) std::sort(order.begin(), order.end());
          const x_t* xb = xp + b * s0;
          x_t* ob = op + b * rows_out * C;
          for (int64_t r = 0; r < P; ++r) copy_row(ob + r * C, xb + r * s1, C, s2, streaming);
          for (int64_t j = 0; j < k; ++j) {
            ip[b * k + j] = order[j];
            copy_row(ob + (P + j) * C, xb + (P + order[j]) * s1, C, s2, streaming);
          }
          if (!fuse) continue;
          // EViT's extra token: Σ over dropped tokens of score·x, in ascending token order.
          kept.assign(N, 0);
          for (int64_t j = 0; j < k; ++j) kept[order[j]] = 1;
          dropped.clear();
          weights.clear();
          for (int64_t i = 0; i < N; ++i) {
            if (kept[i]) continue;
            dropped.push_back(xb + (P + i) * s1);
            weights.push_back(static_cast<acc_t>(sp[b * N + i]));
          }
          acc.assign(C, acc_t(0));
          add_weighted_tokens(acc.data(), weights.data(), dropped.data(),
                              static_cast<int64_t>(dropped.size()), C, s2);
          x_t* fused = ob + (P + k) * C;
          for (int64_t c = 0; c < C; ++c) fused[c] = static_cast<x_t>(acc[c]);
        }
        if (streaming) finish_streaming_stores();
      });
    });
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_backward_cpu(const at::Tensor& grad_in,
                                                             const at::Tensor& x,
                                                             const at::Tensor& scores_in,
                                                             const at::Tensor& index_in, bool fuse,
                                                             int64_t P) {
  check_prune_tokens_backward(grad_in, x, scores_in, index_in, fuse, P);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor index = as_int64(index_in);
  const int64_t B = x.size(0), C = x.size(2), N = scores.size(1), k = index.size(1);
  const int64_t rows_out = grad.size(1);
  at::Tensor grad_x = at::empty({B, P + N, C}, grad.options());
  at::Tensor grad_s = at::empty({B, N}, scores.options());
  TOKRED_DISPATCH_FLOATS(grad.scalar_type(), "tokred_prune_tokens_backward_cpu", [&] {
    using g_t = scalar_t;
    using acc_t = at::opmath_type<g_t>;
    TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_prune_tokens_backward_cpu_scores", [&] {
      const g_t* gp = grad.data_ptr<g_t>();
      const g_t* xp = x.data_ptr<g_t>();
      const scalar_t* sp = scores.data_ptr<scalar_t>();
      const int64_t* ip = index.data_ptr<int64_t>();
      g_t* gx = grad_x.data_ptr<g_t>();
      scalar_t* gs = grad_s.data_ptr<scalar_t>();
      parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<int64_t> pos;
        for (int64_t b = b0; b < b1; ++b) {
          const g_t* gb = gp + b * rows_out * C;
          const g_t* gfused = gb + (P + k) * C;
          g_t* gxb = gx + b * (P + N) * C;
          const g_t* xb = xp + b * x.stride(0);
          pos.assign(N, -1);
          for (int64_t j = 0; j < k; ++j) {
            const int64_t i = ip[b * k + j];
            TORCH_CHECK(i >= 0 && i < N, "tokred::_prune_tokens_backward: argument 'index' holds ",
                        i, ", expected values in [0, ", N, ")");
            // A token kept twice would take one of its two gradient rows only.
            TORCH_CHECK(pos[i] < 0, "tokred::_prune_tokens_backward: argument 'index' holds ", i,
                        " twice in row ", b, ", expected distinct token positions");
            pos[i] = j;
          }
          std::copy(gb, gb + P * C, gxb);
          for (int64_t i = 0; i < N; ++i) {
            g_t* dst = gxb + (P + i) * C;
            if (pos[i] >= 0) {
              std::copy(gb + (P + pos[i]) * C, gb + (P + pos[i] + 1) * C, dst);
              gs[b * N + i] = scalar_t(0);
            } else if (fuse) {
              const acc_t w = static_cast<acc_t>(sp[b * N + i]);
              double dot = 0;
              for (int64_t c = 0; c < C; ++c) {
                dst[c] = static_cast<g_t>(w * static_cast<acc_t>(gfused[c]));
                dot += static_cast<double>(gfused[c]) *
                       static_cast<double>(xb[(P + i) * x.stride(1) + c * x.stride(2)]);
              }
              gs[b * N + i] = static_cast<scalar_t>(dot);
            } else {
              std::fill(dst, dst + C, g_t(0));
              gs[b * N + i] = scalar_t(0);
            }
          }
        }
      });
    });
  });
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CPU, m) {
  m.impl("topk", TORCH_FN(topk_cpu));
  m.impl("_topk_backward", TORCH_FN(topk_backward_cpu));
  m.impl("gather_tokens", TORCH_FN(gather_tokens_cpu));
  m.impl("_gather_tokens_backward", TORCH_FN(gather_tokens_backward_cpu));
  m.impl("complement", TORCH_FN(complement_cpu));
  m.impl("prune_tokens", TORCH_FN(prune_tokens_cpu));
  m.impl("_prune_tokens_backward", TORCH_FN(prune_tokens_backward_cpu));
}

}  // namespace tokred
