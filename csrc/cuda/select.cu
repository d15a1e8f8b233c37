// CUDA kernels of the selection ops. Rows of up to kMaxRankRow entries are ranked by counting in
// shared memory (common/rank.h: one thread per entry, no sort); longer rows use a stable radix
// sort. Both give tokred's order exactly: by value, NaN above +inf, ties to the lower index.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/rank.h"
#include "common/select_args.h"
#include "cuda/launch.cuh"
#include "cuda/segment.h"

namespace tokred {
namespace {

constexpr int64_t kMaxRankRow = 2048;
constexpr int kRankThreads = 256;

// One block per row: load the row into shared memory, rank each entry by counting, and write
// the entries of rank < k to their slot. Slots past a short row's length get index -1.
template <typename scalar_t>
__global__ void topk_rank_kernel(const scalar_t* __restrict__ scores,
                                 const int64_t* __restrict__ lengths, int64_t rows, int64_t n,
                                 int64_t k, bool largest, scalar_t pad,
                                 scalar_t* __restrict__ values, int64_t* __restrict__ indices) {
  using acc_t = at::opmath_type<scalar_t>;  // exact for every dtype: the order is unchanged
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* row = reinterpret_cast<acc_t*>(smem_raw);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t len = lengths ? lengths[r] : n;
    CUDA_KERNEL_ASSERT(len >= 0 && len <= n && "tokred::topk: lengths out of [0, n]");
    len = len < 0 ? 0 : (len > n ? n : len);
    const scalar_t* src = scores + r * n;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) row[i] = static_cast<acc_t>(src[i]);
    __syncthreads();
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
      const int64_t rank = rank_in_row(row, len, i, largest);
      if (rank < k) {
        values[r * k + rank] = src[i];
        indices[r * k + rank] = i;
      }
    }
    for (int64_t j = len + threadIdx.x; j < k; j += blockDim.x) {
      values[r * k + j] = pad;
      indices[r * k + j] = -1;
    }
    __syncthreads();
  }
}

// The sort path's check of lengths (the rank kernel asserts them itself): in-kernel, no host sync.
__global__ void check_lengths_kernel(const int64_t* __restrict__ lengths, int64_t rows, int64_t n) {
  TOKRED_GRID_STRIDE(r, rows) {
    CUDA_KERNEL_ASSERT(lengths[r] >= 0 && lengths[r] <= n && "tokred::topk: lengths out of [0, n]");
  }
}

// Rows longer than kMaxRankRow: a stable sort keeps the lower index first among equal values.
// Padding past a row's length sorts last: -inf when largest (stability keeps real -inf first),
// NaN when smallest (NaN ranks above +inf). CUB's radix sort orders a NaN by its bits, so one with
// the sign bit set (0/0 on x86, or -x of a NaN) would sort below -inf (pytorch/pytorch#190781):
// the sort sees every NaN as the positive quiet NaN, and the values are read back from scores.
std::tuple<at::Tensor, at::Tensor> topk_by_sort(const at::Tensor& scores, int64_t k, bool largest,
                                                const at::Tensor& lengths) {
  at::Tensor s = at::where(scores.isnan(), std::numeric_limits<double>::quiet_NaN(), scores);
  const int64_t n = scores.size(-1);
  at::Tensor len;
  if (lengths.defined()) {
    const int64_t rows = lengths.numel();
    if (rows > 0) {
      check_lengths_kernel<<<cuda::blocks_for(rows), cuda::kThreads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(lengths.data_ptr<int64_t>(), rows,
                                                                  n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    len = lengths.unsqueeze(
        -1);  // a bad length only masks the wrong entries: nothing is out of bounds
    const at::Tensor pos = at::arange(n, lengths.options());
    s = s.masked_fill(pos.ge(len), largest ? -std::numeric_limits<double>::infinity()
                                           : std::numeric_limits<double>::quiet_NaN());
  }
  auto sorted = at::sort(s, /*stable=*/true, /*dim=*/-1, /*descending=*/largest);
  at::Tensor indices = std::get<1>(sorted).narrow(-1, 0, k).contiguous();
  at::Tensor values = scores.gather(-1, indices);
  if (lengths.defined()) {
    const at::Tensor empty = at::arange(k, lengths.options()).ge(len);
    values.masked_fill_(empty, largest ? -std::numeric_limits<double>::infinity()
                                       : std::numeric_limits<double>::infinity());
    indices.masked_fill_(empty, -1);
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& scores_in, int64_t k, bool largest,
                                             const std::optional<at::Tensor>& lengths_in) {
  check_topk(scores_in, k, lengths_in);
  const c10::cuda::OptionalCUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t n = scores.size(-1);
  const int64_t rows = leading_rows(scores);
  const at::Tensor lengths = lengths_in.has_value() ? as_int64(*lengths_in) : at::Tensor();
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().end());
  out_shape.back() = k;
  if (n > kMaxRankRow && rows > 0 && k > 0) {
    auto sorted = topk_by_sort(scores.reshape({rows, n}), k, largest,
                               lengths.defined() ? lengths.reshape({rows}) : lengths);
    return {std::get<0>(sorted).view(out_shape), std::get<1>(sorted).view(out_shape)};
  }
  at::Tensor values = at::empty(out_shape, scores.options());
  at::Tensor indices = at::empty(out_shape, scores.options().dtype(at::kLong));
  if (rows == 0 || k == 0) return {values, indices};
  auto stream = c10::cuda::getCurrentCUDAStream();
  TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t pad = largest ? -std::numeric_limits<scalar_t>::infinity()
                                 : std::numeric_limits<scalar_t>::infinity();
    const int blocks = static_cast<int>(std::min<int64_t>(rows, 65535));
    const size_t smem = static_cast<size_t>(n) * sizeof(acc_t);
    topk_rank_kernel<scalar_t><<<blocks, kRankThreads, smem, stream>>>(
        scores.data_ptr<scalar_t>(), lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr,
        rows, n, k, largest, pad, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

at::Tensor topk_backward_cuda(const at::Tensor& grad, const at::Tensor& indices, int64_t n) {
  check_topk_backward(grad, indices, n);
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const int64_t k = grad.size(-1);
  const int64_t rows = leading_rows(grad);
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape.back() = n;
  return scatter_sum_rows_cuda(grad.reshape({rows, k, 1}), indices.reshape({rows, k}), n,
                               "_topk_backward", "indices")
      .view(shape);
}

// One warp per output row; index -1 writes a zero row.
template <typename scalar_t>
__global__ void gather_tokens_kernel(const scalar_t* __restrict__ x,
                                     const int64_t* __restrict__ index, int64_t B, int64_t N,
                                     int64_t K, int64_t C, int64_t s0, int64_t s1, int64_t s2,
                                     bool vec, scalar_t* __restrict__ out) {
  TOKRED_WARP_STRIDE(row, B * K) {
    const int64_t b = row / K, i = index[row];
    CUDA_KERNEL_ASSERT(i >= -1 && i < N && "tokred::gather_tokens: index out of range");
    const scalar_t* src = (i >= 0 && i < N) ? x + b * s0 + i * s1 : nullptr;
    cuda::warp_copy_row(out + row * C, src, C, s2, vec);
  }
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index_in) {
  check_gather_tokens(x, index_in);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor index = as_int64(index_in);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, C}, x.options());
  if (out.numel() == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_gather_tokens_cuda", [&] {
    const bool vec = x.stride(2) == 1 && cuda::rows_vectorizable(x.data_ptr(), C, x.element_size(),
                                                                 {x.stride(0), x.stride(1)});
    gather_tokens_kernel<scalar_t>
        <<<cuda::blocks_for(B * K * cuda::kWarp), cuda::kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), B, N, K, C, x.stride(0), x.stride(1),
            x.stride(2), vec, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t n) {
  check_gather_tokens_backward(grad, index, n);
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  return scatter_sum_rows_cuda(grad, index, n, "_gather_tokens_backward", "index");
}

// pos[b, i] = the slot k of row b's index that names token i, or -1 where none does. A token
// listed twice keeps one of its slots, so check_kept_distinct_kernel then finds the other.
__global__ void mark_kept_kernel(const int64_t* __restrict__ index, int64_t B, int64_t k, int64_t N,
                                 int64_t* __restrict__ pos) {
  TOKRED_GRID_STRIDE(t, B * k) {
    const int64_t b = t / k, i = index[t];
    CUDA_KERNEL_ASSERT(i >= 0 && i < N && "tokred: kept index out of range");
    if (i >= 0 && i < N) pos[b * N + i] = t % k;
  }
}

at::Tensor kept_positions(const at::Tensor& index, int64_t N, cudaStream_t stream) {
  const int64_t B = index.size(0), k = index.size(1);
  at::Tensor pos = at::full({B, N}, -1, index.options());
  if (B * k > 0) {
    mark_kept_kernel<<<cuda::blocks_for(B * k), cuda::kThreads, 0, stream>>>(
        index.data_ptr<int64_t>(), B, k, N, pos.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return pos;
}

// Which op's duplicate-index assert check_kept_distinct_kernel raises.
enum class DistinctFor { kComplement, kPruneBackward };

// After kept_positions: an entry whose token kept another slot is a duplicate (a user's index;
// the forward's own are distinct). O(B · k), where counting per token would be O(B · N · k).
__global__ void check_kept_distinct_kernel(const int64_t* __restrict__ index, int64_t B, int64_t k,
                                           int64_t N, const int64_t* __restrict__ pos,
                                           DistinctFor op) {
  TOKRED_GRID_STRIDE(t, B * k) {
    const int64_t b = t / k, i = index[t];
    const bool distinct = i < 0 || i >= N || pos[b * N + i] == t % k;
    CUDA_KERNEL_ASSERT((distinct || op != DistinctFor::kComplement) &&
                       "tokred::complement: duplicate index");
    CUDA_KERNEL_ASSERT((distinct || op != DistinctFor::kPruneBackward) &&
                       "tokred::_prune_tokens_backward: duplicate index");
  }
}

void check_kept_distinct(const at::Tensor& index, int64_t N, const at::Tensor& pos, DistinctFor op,
                         cudaStream_t stream) {
  const int64_t B = index.size(0), k = index.size(1);
  if (B * k == 0) return;
  check_kept_distinct_kernel<<<cuda::blocks_for(B * k), cuda::kThreads, 0, stream>>>(
      index.data_ptr<int64_t>(), B, k, N, pos.data_ptr<int64_t>(), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__global__ void check_range_kernel(const int64_t* __restrict__ index, int64_t total, int64_t n) {
  TOKRED_GRID_STRIDE(t, total) {
    CUDA_KERNEL_ASSERT(index[t] >= 0 && index[t] < n && "tokred::complement: index out of range");
  }
}

// absent_upto[b, i] counts the absent tokens in [0, i]; absent i goes to slot that count - 1.
__global__ void write_complement_kernel(const int64_t* __restrict__ pos,
                                        const int64_t* __restrict__ absent_upto, int64_t B,
                                        int64_t n, int64_t m, int64_t* __restrict__ out) {
  TOKRED_GRID_STRIDE(t, B * n) {
    const int64_t b = t / n, i = t % n;
    const int64_t slot = absent_upto[t] - 1;
    if (pos[t] < 0 && slot >= 0 && slot < m) out[b * m + slot] = i;
  }
}

at::Tensor complement_cuda(const at::Tensor& index_in, int64_t n) {
  check_complement(index_in, n);
  const c10::cuda::OptionalCUDAGuard guard(index_in.device());
  const at::Tensor index = as_int64(index_in);
  const int64_t B = index.size(0), K = index.size(1), m = n - K;
  at::Tensor out = at::empty({B, m}, index.options());
  if (B == 0 || n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (K > 0) {  // first, so a bad entry fails with complement's own message
    check_range_kernel<<<cuda::blocks_for(B * K), cuda::kThreads, 0, stream>>>(
        index.data_ptr<int64_t>(), B * K, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor pos = kept_positions(index, n, stream);
  check_kept_distinct(index, n, pos, DistinctFor::kComplement, stream);
  const at::Tensor absent_upto = at::cumsum(pos.lt(0), 1, at::kLong);
  if (m > 0) {
    write_complement_kernel<<<cuda::blocks_for(B * n), cuda::kThreads, 0, stream>>>(
        pos.data_ptr<int64_t>(), absent_upto.data_ptr<int64_t>(), B, n, m, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// Kept positions of each row (largest scores first), ranked by counting in shared memory.
// With keep_order a kept entry's slot is the number of kept entries before it instead.
template <typename score_t>
__global__ void select_kept_kernel(const score_t* __restrict__ scores, int64_t B, int64_t N,
                                   int64_t k, bool keep_order, int64_t* __restrict__ index) {
  using acc_t = at::opmath_type<score_t>;
  // int64 ranks first: the float row after them stays aligned whatever N is.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* rank = reinterpret_cast<int64_t*>(smem_raw);
  acc_t* row = reinterpret_cast<acc_t*>(rank + N);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      row[i] = static_cast<acc_t>(scores[b * N + i]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      rank[i] = rank_in_row(row, N, i, /*largest=*/true);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      if (rank[i] >= k) continue;
      int64_t slot = rank[i];
      if (keep_order) {
        slot = 0;
        for (int64_t j = 0; j < i; ++j) slot += rank[j] < k ? 1 : 0;
      }
      index[b * k + slot] = i;
    }
    __syncthreads();
  }
}

// One warp per kept output row: the protected tokens, then the kept ones.
template <typename x_t>
__global__ void prune_rows_kernel(const x_t* __restrict__ x, const int64_t* __restrict__ index,
                                  int64_t B, int64_t P, int64_t k, int64_t C, int64_t rows_out,
                                  int64_t s0, int64_t s1, int64_t s2, bool vec,
                                  x_t* __restrict__ out) {
  TOKRED_WARP_STRIDE(row, B * (P + k)) {
    const int64_t b = row / (P + k), r = row % (P + k);
    const int64_t src = r < P ? r : P + index[b * k + (r - P)];
    cuda::warp_copy_row(out + (b * rows_out + r) * C, x + b * s0 + src * s1, C, s2, vec);
  }
}

// EViT's extra token: one thread per (b, c) sums score·x over dropped tokens in ascending order.
template <typename x_t, typename score_t>
__global__ void fuse_dropped_kernel(const x_t* __restrict__ x, const score_t* __restrict__ scores,
                                    const int64_t* __restrict__ pos, int64_t B, int64_t P,
                                    int64_t N, int64_t k, int64_t C, int64_t rows_out, int64_t s0,
                                    int64_t s1, int64_t s2, x_t* __restrict__ out) {
  using acc_t = at::opmath_type<x_t>;
  TOKRED_GRID_STRIDE(t, B * C) {
    const int64_t b = t / C, c = t % C;
    acc_t acc = acc_t(0);
    for (int64_t i = 0; i < N; ++i) {
      if (pos[b * N + i] >= 0) continue;
      acc += static_cast<acc_t>(scores[b * N + i]) *
             static_cast<acc_t>(x[b * s0 + (P + i) * s1 + c * s2]);
    }
    out[(b * rows_out + P + k) * C + c] = static_cast<x_t>(acc);
  }
}

at::Tensor select_kept(const at::Tensor& scores, int64_t k, bool keep_order, cudaStream_t stream) {
  const int64_t B = scores.size(0), N = scores.size(1);
  if (N > kMaxRankRow) {
    at::Tensor index = std::get<1>(topk_by_sort(scores, k, /*largest=*/true, at::Tensor()));
    return keep_order ? std::get<0>(at::sort(index, -1)) : index;
  }
  at::Tensor index = at::empty({B, k}, scores.options().dtype(at::kLong));
  if (B == 0 || k == 0) return index;
  TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_select_kept_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = static_cast<size_t>(N) * (sizeof(acc_t) + sizeof(int64_t));
    const int blocks = static_cast<int>(std::min<int64_t>(B, 65535));
    select_kept_kernel<scalar_t><<<blocks, kRankThreads, smem, stream>>>(
        scores.data_ptr<scalar_t>(), B, N, k, keep_order, index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return index;
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_cuda(const at::Tensor& x,
                                                     const at::Tensor& scores_in, int64_t k,
                                                     bool fuse, int64_t P, bool keep_order) {
  check_prune_tokens(x, scores_in, k, fuse, P);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = x.size(0), C = x.size(2), N = scores.size(1);
  const int64_t rows_out = P + k + (fuse ? 1 : 0);
  at::Tensor out = at::empty({B, rows_out, C}, x.options());
  at::Tensor index = select_kept(scores, k, keep_order, stream);
  if (out.numel() == 0) return {out, index};
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_prune_tokens_cuda", [&] {
    using x_t = scalar_t;
    if (P + k > 0) {
      const bool vec =
          x.stride(2) == 1 &&
          cuda::rows_vectorizable(x.data_ptr(), C, x.element_size(), {x.stride(0), x.stride(1)});
      prune_rows_kernel<x_t>
          <<<cuda::blocks_for(B * (P + k) * cuda::kWarp), cuda::kThreads, 0, stream>>>(
              x.data_ptr<x_t>(), index.data_ptr<int64_t>(), B, P, k, C, rows_out, x.stride(0),
              x.stride(1), x.stride(2), vec, out.data_ptr<x_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!fuse) return;
    const at::Tensor pos = kept_positions(index, N, stream);
    TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_prune_tokens_cuda_fuse", [&] {
      fuse_dropped_kernel<x_t, scalar_t><<<cuda::blocks_for(B * C), cuda::kThreads, 0, stream>>>(
          x.data_ptr<x_t>(), scores.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), B, P, N, k, C,
          rows_out, x.stride(0), x.stride(1), x.stride(2), out.data_ptr<x_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, index};
}

template <typename g_t, typename score_t>
__global__ void prune_grad_x_kernel(const g_t* __restrict__ grad,
                                    const score_t* __restrict__ scores,
                                    const int64_t* __restrict__ pos, int64_t B, int64_t P,
                                    int64_t N, int64_t k, int64_t C, int64_t rows_out, bool fuse,
                                    g_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<g_t>;
  TOKRED_GRID_STRIDE(t, B * (P + N) * C) {
    const int64_t c = t % C, bt = t / C, b = bt / (P + N), r = bt % (P + N);
    const g_t* gb = grad + b * rows_out * C;
    g_t value = g_t(0);
    if (r < P) {
      value = gb[r * C + c];
    } else {
      const int64_t i = r - P, slot = pos[b * N + i];
      if (slot >= 0) {
        value = gb[(P + slot) * C + c];
      } else if (fuse) {
        value = static_cast<g_t>(static_cast<acc_t>(scores[b * N + i]) *
                                 static_cast<acc_t>(gb[(P + k) * C + c]));
      }
    }
    grad_x[t] = value;
  }
}

// One warp per (b, i): the score gradient of a fused token is <grad of the fused row, x_i>.
// Lanes stride over C and reduce with shuffles in a fixed pattern, so the sum is deterministic.
template <typename g_t, typename score_t>
__global__ void prune_grad_scores_kernel(const g_t* __restrict__ grad, const g_t* __restrict__ x,
                                         const int64_t* __restrict__ pos, int64_t B, int64_t P,
                                         int64_t N, int64_t k, int64_t C, int64_t rows_out,
                                         int64_t s0, int64_t s1, int64_t s2, bool fuse,
                                         score_t* __restrict__ grad_scores) {
  using acc_t = at::opmath_type<g_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  TOKRED_WARP_STRIDE(w, B * N) {
    const int64_t b = w / N, i = w % N;
    acc_t dot = acc_t(0);
    if (fuse && pos[w] < 0) {
      const g_t* gf = grad + (b * rows_out + P + k) * C;
      const g_t* xi = x + b * s0 + (P + i) * s1;
      for (int64_t c = lane; c < C; c += cuda::kWarp) {
        dot += static_cast<acc_t>(gf[c]) * static_cast<acc_t>(xi[c * s2]);
      }
      dot = cuda::warp_reduce_sum(dot);  // the condition is uniform over the warp (one w per warp)
    }
    if (lane == 0) grad_scores[w] = static_cast<score_t>(dot);
  }
}

std::tuple<at::Tensor, at::Tensor> prune_tokens_backward_cuda(const at::Tensor& grad_in,
                                                              const at::Tensor& x,
                                                              const at::Tensor& scores_in,
                                                              const at::Tensor& index_in, bool fuse,
                                                              int64_t P) {
  check_prune_tokens_backward(grad_in, x, scores_in, index_in, fuse, P);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor index = as_int64(index_in);
  const int64_t B = x.size(0), C = x.size(2), N = scores.size(1), k = index.size(1);
  const int64_t rows_out = grad.size(1);
  at::Tensor grad_x = at::empty({B, P + N, C}, grad.options());
  at::Tensor grad_s = at::empty({B, N}, scores.options());
  if (B == 0) return {grad_x, grad_s};
  const at::Tensor pos = kept_positions(index, N, stream);
  check_kept_distinct(index, N, pos, DistinctFor::kPruneBackward, stream);
  TOKRED_DISPATCH_FLOATS(grad.scalar_type(), "tokred_prune_tokens_backward_cuda", [&] {
    using g_t = scalar_t;
    TOKRED_DISPATCH_FLOATS(scores.scalar_type(), "tokred_prune_tokens_backward_cuda_s", [&] {
      if (grad_x.numel() > 0) {
        prune_grad_x_kernel<g_t, scalar_t>
            <<<cuda::blocks_for(B * (P + N) * C), cuda::kThreads, 0, stream>>>(
                grad.data_ptr<g_t>(), scores.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), B, P, N,
                k, C, rows_out, fuse, grad_x.data_ptr<g_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (N > 0) {
        prune_grad_scores_kernel<g_t, scalar_t>
            <<<cuda::blocks_for(B * N * cuda::kWarp), cuda::kThreads, 0, stream>>>(
                grad.data_ptr<g_t>(), x.data_ptr<g_t>(), pos.data_ptr<int64_t>(), B, P, N, k, C,
                rows_out, x.stride(0), x.stride(1), x.stride(2), fuse, grad_s.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CUDA, m) {
  m.impl("topk", TORCH_FN(topk_cuda));
  m.impl("_topk_backward", TORCH_FN(topk_backward_cuda));
  m.impl("gather_tokens", TORCH_FN(gather_tokens_cuda));
  m.impl("_gather_tokens_backward", TORCH_FN(gather_tokens_backward_cuda));
  m.impl("complement", TORCH_FN(complement_cuda));
  m.impl("prune_tokens", TORCH_FN(prune_tokens_cuda));
  m.impl("_prune_tokens_backward", TORCH_FN(prune_tokens_backward_cuda));
}

}  // namespace tokred
