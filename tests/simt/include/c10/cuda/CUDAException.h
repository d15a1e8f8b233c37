// Stand-in for torch's c10/cuda/CUDAException.h under the simt emulator: a failed device assert
// ends the launch, and the launch check raises it as a c10::Error naming the assert's file and
// line.
#pragma once
#include <c10/macros/Macros.h>

#include "simt/simt.h"

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                        \
  do {                                                                  \
    if (!(cond)) ::simt::device_assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)
#define C10_CUDA_CHECK(EXPR) ::simt::check((EXPR), #EXPR, __FILE__, __LINE__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
