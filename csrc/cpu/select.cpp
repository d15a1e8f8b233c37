// CPU kernels of the selection ops: rows run in parallel (cpu/parallel.h); each row is
// selected under tokred's total order as integer keys (common/rank.h): a bounded heap for small
// k, else a radix select that sorts only the candidates it leaves.
#include <torch/library.h>

#include <algorithm>
#include <bit>
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

// The key select_row sorts a row of scalar_t by: 32 bits for values that are exactly floats
// (float, half, bfloat16), 64 for double.
template <typename scalar_t>
using SelectKey = std::conditional_t<std::is_same_v<scalar_t, double>, uint64_t, uint32_t>;

template <typename scalar_t>
SelectKey<scalar_t> select_key(scalar_t v, bool largest) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return order_key(v, largest);
  } else {
    return order_key32(static_cast<float>(v), largest);
  }
}

// Up to this many candidates are ordered with std::sort; more take the radix sort.
constexpr int64_t kSmallSort = 64;

// One thread's scratch for select_row.
template <typename Key>
struct SelectScratch {
  std::vector<int64_t> count;                       // the histogram of the keys' range
  std::vector<Key> cand_keys, cand_keys_out;        // the row's keys, then the candidates' keys
  std::vector<int64_t> cand_index, cand_index_out;  // the candidates' indices
  // (*_out: the radix sort's second buffers)
  std::vector<std::pair<Key, int64_t>> small;  // the heap, or few candidates for std::sort
};

// Orders the c candidates by (key, index) and leaves the first m's indices first in
// cand_index. Candidates are collected in ascending index, so a stable LSD radix sort (8-bit
// digits; a digit every candidate shares moves nothing and is skipped) keeps ties in index order.
template <typename Key>
void sort_candidates(int64_t c, int64_t m, SelectScratch<Key>& w) {
  if (c <= kSmallSort) {
    w.small.resize(c);
    for (int64_t j = 0; j < c; ++j) w.small[j] = {w.cand_keys[j], w.cand_index[j]};
    std::sort(w.small.begin(), w.small.end());
    for (int64_t j = 0; j < m; ++j) w.cand_index[j] = w.small[j].second;
    return;
  }
  constexpr int kDigits = sizeof(Key);
  int64_t count[kDigits][256] = {};
  for (int64_t j = 0; j < c; ++j) {
    for (int d = 0; d < kDigits; ++d) ++count[d][(w.cand_keys[j] >> (8 * d)) & 255];
  }
  w.cand_keys_out.resize(c), w.cand_index_out.resize(c);
  for (int d = 0; d < kDigits; ++d) {
    const int shift = 8 * d;
    if (count[d][(w.cand_keys[0] >> shift) & 255] == c) continue;
    int64_t start = 0;
    for (int64_t& slots : count[d]) start += std::exchange(slots, start);
    for (int64_t j = 0; j < c; ++j) {
      const int64_t slot = count[d][(w.cand_keys[j] >> shift) & 255]++;
      w.cand_keys_out[slot] = w.cand_keys[j];
      w.cand_index_out[slot] = w.cand_index[j];
    }
    w.cand_keys.swap(w.cand_keys_out);
    w.cand_index.swap(w.cand_index_out);
  }
}

// Rows asking for at most this many entries take heap_select: up to k = 16 it beat the radix
// select on rows of 1024 to 16384 (about 2x at k = 1 to 5), and at k = 16 it is about even.
constexpr int64_t kHeapSelect = 16;

// The first m entries of the keyed row in selection order, left first in cand_index: a max-heap
// of the best m so far, offered the entries in ascending index. A later entry displaces the
// heap's worst only with a smaller key (on a tie its index loses), so a block of entries whose
// least key is no smaller is skipped whole, after a branch-free min: most blocks of most rows.
// (GCC leaves the min scalar; SSE2 vectors of flipped signed keys made float32 rows about 12%
// faster and float64 rows, with no 64-bit compare in SSE2, about 30% slower: not worth a path.)
template <typename Key>
void heap_select(int64_t len, int64_t m, SelectScratch<Key>& w) {
  const Key* keys = w.cand_keys.data();
  auto& heap = w.small;
  heap.resize(m);
  for (int64_t j = 0; j < m; ++j) heap[j] = {keys[j], j};
  std::make_heap(heap.begin(), heap.end());
  auto offer = [&](int64_t j) {
    if (keys[j] >= heap.front().first) return;
    std::pop_heap(heap.begin(), heap.end());
    heap.back() = {keys[j], j};
    std::push_heap(heap.begin(), heap.end());
  };
  constexpr int64_t kBlock = 16;
  int64_t i = m;
  for (; i + kBlock <= len; i += kBlock) {
    Key least = keys[i];
    for (int64_t j = 1; j < kBlock; ++j) least = std::min(least, keys[i + j]);
    if (least >= heap.front().first) continue;
    for (int64_t j = 0; j < kBlock; ++j) offer(i + j);
  }
  for (; i < len; ++i) offer(i);
  std::sort_heap(heap.begin(), heap.end());
  w.cand_index.resize(m);
  for (int64_t j = 0; j < m; ++j) w.cand_index[j] = heap[j].second;
}

// The lowest `bits` bits of a Key set (bits in [0, width of Key]).
template <typename Key>
Key low_bits(int bits) {
  return bits == 0 ? Key(0) : Key(~Key(0)) >> (8 * sizeof(Key) - bits);
}

// The first m entries of the keyed row in selection order, left first in cand_index: a radix
// select. Histograms of the keys' offsets from the row's least key narrow a window of offsets, a
// few bits per pass, down to the bucket that holds the m-th entry. Every entry at or below that
// bucket is a candidate (about m, plus the bucket) and only the candidates are sorted: O(len) per
// pass, and one or two passes at the usual sizes.
template <typename Key>
void radix_select(int64_t len, int64_t m, SelectScratch<Key>& w) {
  Key* keys = w.cand_keys.data();
  w.cand_index.resize(len);
  // Past half the row, narrowing cannot halve the sort, and its passes cost more than they save.
  if (2 * m > len) {
    std::iota(w.cand_index.begin(), w.cand_index.end(), int64_t(0));
    return sort_candidates(len, m, w);
  }
  Key lo = std::numeric_limits<Key>::max(), hi = 0;
  for (int64_t i = 0; i < len; ++i) lo = std::min(lo, keys[i]), hi = std::max(hi, keys[i]);
  // The window is offsets [base, base + 2^width); the `below` entries under it are all selected.
  int width = std::bit_width(hi - lo);
  Key base = 0;
  int64_t below = 0, inside = len;
  while (width > 0 && inside > std::max(kSmallSort, m / 8)) {
    // About one bucket per entry in the window, at most 2048 (16 KiB of counts, in L1).
    const int bits =
        std::min(width, std::clamp(static_cast<int>(std::bit_width(uint64_t(inside))), 4, 11));
    const int shift = width - bits;
    const Key last = low_bits<Key>(width);
    const size_t outside = size_t(1) << bits;  // the slot that counts entries off the window
    w.count.assign(outside + 1, 0);
    for (int64_t i = 0; i < len; ++i) {
      const Key offset = keys[i] - lo - base;  // wraps above `last` for keys under the window
      ++w.count[offset <= last ? size_t(offset >> shift) : outside];
    }
    size_t bucket = 0;
    for (; below + w.count[bucket] < m; ++bucket) below += w.count[bucket];
    inside = w.count[bucket];
    base += Key(bucket) << shift;
    width = shift;
  }
  // Keep the candidates in place, branch-free: write every entry, advance past the kept ones.
  // (Not narrowed, `last` covers the row and every entry is kept.)
  const Key last = base + low_bits<Key>(width);
  int64_t c = 0;
  for (int64_t i = 0; i < len; ++i) {
    const Key key = keys[i];
    keys[c] = key;
    w.cand_index[c] = i;
    c += key - lo <= last;
  }
  sort_candidates(c, m, w);
}

// The first m = min(k, len) entries of row[0..len) in selection order, written to `order`:
// heap_select for small m, else radix_select, over the row's keys (common/rank.h).
template <typename scalar_t>
void select_row(const scalar_t* row, int64_t len, int64_t k, bool largest,
                SelectScratch<SelectKey<scalar_t>>& w, std::vector<int64_t>& order) {
  const int64_t m = std::min(k, len);
  order.resize(m);
  if (m == 0) return;
  w.cand_keys.resize(len);
  for (int64_t i = 0; i < len; ++i) w.cand_keys[i] = select_key(row[i], largest);
  if (m <= kHeapSelect) {
    heap_select(len, m, w);
  } else {
    radix_select(len, m, w);
  }
  std::copy(w.cand_index.begin(), w.cand_index.begin() + m, order.begin());
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
      SelectScratch<SelectKey<scalar_t>> scratch;
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
        SelectScratch<SelectKey<scalar_t>> scratch;
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
