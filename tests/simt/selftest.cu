// Kernels that test the emulator itself (test_emulator.py): correct CUDA that must give CUDA's
// answer under every schedule, and broken CUDA that the emulator must report. Built only into the
// emulated library, as the ops selftest_simt::run(kernel name, input).
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstring>

namespace {

// Correct: reverse a block's values through shared memory.
__global__ void reverse_kernel(const float* in, int n, float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  s[t] = in[t];
  __syncthreads();
  out[t] = s[n - 1 - t];
}

// Broken: the same without the barrier.
__global__ void reverse_no_barrier_kernel(const float* in, int n, float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  s[t] = in[t];
  out[t] = s[n - 1 - t];
}

// Correct: each shuffle kind at each width. in[0] = lane value, out [4 ops][3 widths][32].
__global__ void shuffle_kernel(const float* in, int param, float* out) {
  const int lane = threadIdx.x;
  const float v = in[lane];
  const int widths[3] = {32, 16, 8};
  for (int w = 0; w < 3; ++w) {
    out[(0 * 3 + w) * 32 + lane] = __shfl_sync(0xffffffffu, v, param, widths[w]);
    out[(1 * 3 + w) * 32 + lane] = __shfl_down_sync(0xffffffffu, v, param, widths[w]);
    out[(2 * 3 + w) * 32 + lane] = __shfl_up_sync(0xffffffffu, v, param, widths[w]);
    out[(3 * 3 + w) * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, param, widths[w]);
  }
}

// Correct: a butterfly sum over a warp, every lane gets the total.
__global__ void warp_sum_kernel(const float* in, float* out) {
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Correct: two half-warps synchronise separately with their own masks.
__global__ void half_warp_sync_kernel(const float* in, float* out) {
  const int lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const float v = __shfl_sync(mask, in[lane], lane < 16 ? 0 : 16);
  __syncwarp(mask);
  out[lane] = v;
}

// Broken: a barrier that only the first half of the block reaches.
__global__ void barrier_in_branch_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Broken: each half of the block waits at a different __syncthreads.
__global__ void two_barriers_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Broken: half the warp has returned when the other half shuffles with the full mask.
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Broken: half the warp skips the shuffle that the other half takes with the full mask.
__global__ void shuffle_in_branch_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Broken: the full mask in a block of 16 threads names lanes that do not exist.
__global__ void mask_past_block_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Broken: lane 3 reads lane 20, outside the 16-lane mask.
__global__ void shuffle_outside_mask_kernel(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

// Broken: dynamic shared memory one element short (written past its end, or before its start).
__global__ void smem_overflow_kernel(float* out, int offset) {
  extern __shared__ float s[];
  s[static_cast<int>(threadIdx.x) + offset] = 1.0f;
  out[threadIdx.x] = 0.0f;
}

// Static tiles and dynamic shared memory share one budget: 32 KiB of tiles leave 16 KiB of
// dynamic shared memory without cudaFuncSetAttribute. One instantiation per case, because the
// attribute, once set, stays with the kernel.
template <int kCase>
__global__ void static_and_dynamic_smem_kernel(float* out) {
  __shared__ float tile[8192];
  extern __shared__ float s[];
  tile[threadIdx.x] = 1.0f;
  s[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x] + s[threadIdx.x];
}

// Broken: reads static shared memory that no thread of this block wrote.
__global__ void stale_static_smem_kernel(float* out) {
  __shared__ float cache[64];
  if (blockIdx.x == 0) cache[threadIdx.x] = 1.0f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = cache[threadIdx.x];
}

// Broken: an index check that fails.
__global__ void assert_kernel(const float* in, float* out) {
  CUDA_KERNEL_ASSERT(in[threadIdx.x] >= 0 && "selftest: negative input");
  out[threadIdx.x] = in[threadIdx.x];
}

// Broken: 256 threads per block against __launch_bounds__(128).
__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

// Broken: reads one element past the input (AddressSanitizer reports it).
__global__ void global_overread_kernel(const float* in, int n, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];
  (void)n;
}

at::Tensor run(c10::string_view kernel_name, const at::Tensor& in_tensor) {
  const at::Tensor in = in_tensor.to(at::kFloat).contiguous();
  const int n = static_cast<int>(in.numel());
  const std::string kernel(kernel_name);
  const float* x = in.data_ptr<float>();
  at::Tensor out = at::full({n}, -7.0, in.options());
  float* y = out.data_ptr<float>();
  const size_t smem = n * sizeof(float);
  if (kernel == "reverse") {
    reverse_kernel<<<1, n, smem>>>(x, n, y);
  } else if (kernel == "reverse_no_barrier") {
    reverse_no_barrier_kernel<<<1, n, smem>>>(x, n, y);
  } else if (kernel.rfind("shuffle_", 0) == 0 && kernel.size() > 8 && isdigit(kernel[8])) {
    out = at::full({4 * 3 * 32}, -7.0, in.options());
    shuffle_kernel<<<1, 32>>>(x, std::atoi(kernel.c_str() + 8), out.data_ptr<float>());
  } else if (kernel == "warp_sum") {
    warp_sum_kernel<<<n / 64, 64>>>(x, y);
  } else if (kernel == "half_warp_sync") {
    half_warp_sync_kernel<<<1, 32>>>(x, y);
  } else if (kernel == "barrier_in_branch") {
    barrier_in_branch_kernel<<<1, n>>>(y);
  } else if (kernel == "two_barriers") {
    two_barriers_kernel<<<1, n>>>(y);
  } else if (kernel == "shuffle_after_exit") {
    shuffle_after_exit_kernel<<<1, 32>>>(y);
  } else if (kernel == "shuffle_in_branch") {
    shuffle_in_branch_kernel<<<1, 32>>>(y);
  } else if (kernel == "mask_past_block") {
    mask_past_block_kernel<<<1, 16>>>(y);
  } else if (kernel == "shuffle_outside_mask") {
    shuffle_outside_mask_kernel<<<1, 32>>>(y);
  } else if (kernel == "smem_write_past_end") {
    smem_overflow_kernel<<<1, n, smem>>>(y, 1);
  } else if (kernel == "smem_write_before_start") {
    smem_overflow_kernel<<<1, n, smem>>>(y, -1);
  } else if (kernel == "smem_over_default_limit") {
    smem_overflow_kernel<<<1, n, 64 * 1024>>>(y, 0);
  } else if (kernel == "static_plus_dynamic_over_default") {
    static_and_dynamic_smem_kernel<0><<<1, n, 20 * 1024>>>(y);
  } else if (kernel == "static_plus_dynamic_opted_in") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(static_and_dynamic_smem_kernel<1>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, 20 * 1024));
    static_and_dynamic_smem_kernel<1><<<1, n, 20 * 1024>>>(y);
  } else if (kernel == "opt_in_past_device_limit") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(static_and_dynamic_smem_kernel<2>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    static_and_dynamic_smem_kernel<2><<<1, n, 20 * 1024>>>(y);
  } else if (kernel == "block_too_large") {
    smem_overflow_kernel<<<1, 2048, smem>>>(y, 0);
  } else if (kernel == "stale_static_smem") {
    stale_static_smem_kernel<<<n / 64, 64>>>(y);
  } else if (kernel == "assert") {
    assert_kernel<<<1, n>>>(x, y);
  } else if (kernel == "launch_bounds") {
    bounded_kernel<<<1, 256>>>(y);
  } else if (kernel == "global_overread") {
    global_overread_kernel<<<1, n>>>(x, n, y);
  } else {
    TORCH_CHECK(false, "selftest: no kernel named ", kernel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY(selftest_simt, m) { m.def("run(str kernel, Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(selftest, CUDA, m) { m.impl("run", TORCH_FN(run)); }
