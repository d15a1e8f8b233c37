// Stand-in for torch's c10/cuda/CUDAStream.h under the simt emulator: launches run at once on the
// calling thread, so there is one (null) stream.
#pragma once
#include "simt/simt.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
