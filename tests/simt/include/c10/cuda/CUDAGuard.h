// Stand-in for torch's c10/cuda/CUDAGuard.h under the simt emulator: there is one device, so the
// guards do nothing.
#pragma once
#include "simt/simt.h"

namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  template <typename T>
  explicit OptionalCUDAGuard(const T&) {}
};
struct CUDAGuard {
  template <typename T>
  explicit CUDAGuard(const T&) {}
};
}  // namespace cuda
}  // namespace c10
