// TOKRED_HD marks the inline functions written once for the CPU and the CUDA kernels: __host__
// __device__ under nvcc, plain inline for the host compiler.
#pragma once

#if defined(__CUDACC__)
#define TOKRED_HD __host__ __device__ __forceinline__
#else
#define TOKRED_HD inline
#endif
