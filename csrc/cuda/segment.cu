// Mᵀ as a deterministic segmented sum. A CSR plan sorts each row's entries by target (ties by
// position, computed by counting, so no sort library and no atomics); each output element then
// sums its run in that fixed order.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/launch.cuh"
#include "cuda/segment.h"

namespace tokred {
namespace {

// order[b, rank] = k, with rank = #{j : (index_j, j) < (index_k, k)}.
__global__ void segment_order_kernel(const int64_t* __restrict__ index, int64_t B, int64_t K,
                                     int64_t n, int64_t* __restrict__ order) {
  TOKRED_GRID_STRIDE(t, B * K) {
    const int64_t b = t / K, k = t % K;
    const int64_t* row = index + b * K;
    const int64_t v = row[k];
    CUDA_KERNEL_ASSERT(
        v >= -1 && v < n &&
        "tokred: index out of range [-1, n) ('indices' of _topk_backward, 'index' of _gather_tokens_backward)");
    int64_t rank = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t u = row[j];
      rank += (u < v || (u == v && j < k)) ? 1 : 0;
    }
    order[b * K + rank] = k;  // rank < K always
  }
}

// offsets[b, i] = #{j : index_j < i}: the run of target i is order[offsets[i], offsets[i+1]).
__global__ void segment_offsets_kernel(const int64_t* __restrict__ index, int64_t B, int64_t K,
                                       int64_t n, int64_t* __restrict__ offsets) {
  TOKRED_GRID_STRIDE(t, B * (n + 1)) {
    const int64_t b = t / (n + 1), i = t % (n + 1);
    const int64_t* row = index + b * K;
    int64_t count = 0;
    for (int64_t j = 0; j < K; ++j) count += row[j] < i ? 1 : 0;
    offsets[t] = count;
  }
}

template <typename scalar_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ src,
                                   const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ offsets, int64_t B, int64_t K,
                                   int64_t n, int64_t C, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  TOKRED_GRID_STRIDE(t, B * n * C) {
    const int64_t c = t % C, bi = t / C, b = bi / n, i = bi % n;
    const int64_t* off = offsets + b * (n + 1);
    const int64_t start = off[i], end = off[i + 1];
    acc_t acc = acc_t(0);
    for (int64_t r = start; r < end; ++r) {
      const int64_t k = order[b * K + r];
      acc += static_cast<acc_t>(src[(b * K + k) * C + c]);
    }
    out[t] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> build_segments_cuda(const at::Tensor& index_in, int64_t n) {
  const at::Tensor index = as_int64(index_in);
  const int64_t B = index.size(0), K = index.size(1);
  at::Tensor order = at::empty({B, K}, index.options());
  at::Tensor offsets = at::empty({B, n + 1}, index.options());
  if (B == 0) return {order, offsets};
  const c10::cuda::OptionalCUDAGuard guard(index.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (K > 0) {
    segment_order_kernel<<<cuda::blocks_for(B * K), cuda::kThreads, 0, stream>>>(
        index.data_ptr<int64_t>(), B, K, n, order.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  segment_offsets_kernel<<<cuda::blocks_for(B * (n + 1)), cuda::kThreads, 0, stream>>>(
      index.data_ptr<int64_t>(), B, K, n, offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, offsets};
}

at::Tensor scatter_sum_rows_cuda(const at::Tensor& src_in, const at::Tensor& index, int64_t n,
                                 const char* op, const char* arg) {
  TORCH_CHECK(src_in.dim() == 3 && index.dim() == 2, "tokred::", op,
              ": expected src [B, K, C] and argument '", arg, "' [B, K]");
  const at::Tensor src = src_in.contiguous();
  const int64_t B = src.size(0), K = src.size(1), C = src.size(2);
  at::Tensor out = at::empty({B, n, C}, src.options());
  if (out.numel() == 0) return out;
  const c10::cuda::OptionalCUDAGuard guard(src.device());
  const auto plan = build_segments_cuda(index, n);
  const at::Tensor& order = std::get<0>(plan);
  const at::Tensor& offsets = std::get<1>(plan);
  auto stream = c10::cuda::getCurrentCUDAStream();
  TOKRED_DISPATCH_FLOATS(src.scalar_type(), "tokred_scatter_sum_rows_cuda", [&] {
    segment_sum_kernel<scalar_t><<<cuda::blocks_for(B * n * C), cuda::kThreads, 0, stream>>>(
        src.data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), B, K, n,
        C, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace tokred
