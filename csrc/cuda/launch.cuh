// Launch helpers shared by tokred's CUDA kernels: 1-D grids with grid-stride loops, so any
// element count works with a bounded grid. Kernels include only c10/cuda headers (stream, guard,
// launch check), not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers.
#pragma once

#include <algorithm>
#include <cstdint>

namespace tokred {
namespace cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t total, int threads = kThreads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 20));
}

}  // namespace cuda
}  // namespace tokred

#define TOKRED_GRID_STRIDE(i, total)                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       i < (total); i += static_cast<int64_t>(blockDim.x) * gridDim.x)
