// The launch and warp toolkit of tokred's CUDA kernels: 1-D grids with grid-stride loops (any
// element count works with a bounded grid), warp-per-row loops, row copies, and warp reductions in
// a fixed order (bitwise repeatable). Kernels include only c10/cuda headers (stream, guard, launch
// check), not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace tokred {
namespace cuda {

constexpr int kThreads = 256;

// Lets `kernel` launch with `dynamic_bytes` of dynamic shared memory, for kernels without static
// __shared__ arrays (which count against the same per-block budget). Past 48 KB a launch needs
// the opt-in; it is set to everything the device allows, one value on every call, so threads
// launching different sizes never lower it under one another.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t dynamic_bytes, int device) {
  if (dynamic_bytes <= 48 * 1024) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int blocks_for(int64_t total, int threads = kThreads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

}  // namespace cuda
}  // namespace tokred

#define TOKRED_GRID_STRIDE(i, total)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

namespace tokred {
namespace cuda {

constexpr int kWarp = 32;

// True if rows of C elements at these strides can be moved as 16-byte vectors.
inline bool rows_vectorizable(const void* base, int64_t C, int64_t elem_size,
                              std::initializer_list<int64_t> row_strides) {
  if ((reinterpret_cast<uintptr_t>(base) % 16) != 0 || (C * elem_size) % 16 != 0) return false;
  for (int64_t s : row_strides) {
    if ((s * elem_size) % 16 != 0) return false;
  }
  return true;
}

// One warp copies one row of C elements (src elements `src_stride` apart, dst contiguous);
// 16-byte vectors when `vec`, else one element per lane. A null src writes zeros.
template <typename T>
__device__ __forceinline__ void warp_copy_row(T* __restrict__ dst, const T* __restrict__ src,
                                              int64_t C, int64_t src_stride, bool vec) {
  const int lane = threadIdx.x % kWarp;
  if (vec) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    const int64_t n = C * static_cast<int64_t>(sizeof(T)) / 16;
    for (int64_t v = lane; v < n; v += kWarp) d[v] = src ? s[v] : make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t c = lane; c < C; c += kWarp) dst[c] = src ? src[c * src_stride] : T(0);
  }
}

// Sum over the warp in a fixed tree (__shfl_down_sync at offsets 16, 8, 4, 2, 1): lane 0 holds the
// sum, the other lanes partial sums. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// warp_reduce_sum with lane 0's bits broadcast, so every lane goes on with the same value.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  return __shfl_sync(0xffffffffu, warp_reduce_sum(x), 0);
}

// op over the warp with an xor butterfly; every lane gets the result. op must be associative and
// commutative in value (max, min, routing::NanMax, which propagates NaN).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T x, Op op) {
  for (int o = kWarp / 2; o > 0; o /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

}  // namespace cuda
}  // namespace tokred

// Each warp takes rows warp, warp + total_warps, ...
#define TOKRED_WARP_STRIDE(row, total)                                                          \
  for (int64_t row =                                                                            \
           (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / tokred::cuda::kWarp; \
       row < (total); row += static_cast<int64_t>(gridDim.x) * blockDim.x / tokred::cuda::kWarp)
