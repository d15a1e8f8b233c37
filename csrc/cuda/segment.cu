// Mᵀ as a deterministic segmented sum. A CSR plan sorts each row's entries by target (ties by
// position) with a counting sort, one block per row, so no sort library and no atomics; each
// output element then sums its run in that fixed order.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/launch.cuh"
#include "cuda/segment.h"

namespace tokred {
namespace {

// The plan's block: a power of two from a warp up to kPlanThreads, the smallest that covers a
// row's K entries and n + 1 counts in one chunk, so short rows leave no idle threads.
constexpr int kPlanThreads = 256;

int plan_threads(int64_t K, int64_t n) {
  int threads = cuda::kWarp;
  while (threads < kPlanThreads && (threads < K || threads < n + 1)) threads *= 2;
  return threads;
}

// Sorts below every valid entry of a row's index (valid ones lie in [-1, n)): the key of a slot
// past the row's end, or of an out-of-range entry (after its assert), which takes no part.
constexpr int64_t kNoKey = -2;

// Among a chunk of blockDim.x entries whose keys are in `keys`, this thread's: how many entries
// before it share its key, and whether it is the chunk's last entry with that key. O(chunk) per
// thread, so a row costs O(K · blockDim.x) compares, spread over the block, whatever its keys.
struct ChunkRank {
  int64_t before;
  bool last;
};

__device__ __forceinline__ ChunkRank chunk_rank(const int64_t* keys, int64_t key) {
  ChunkRank rank{0, true};
  for (int t = 0; t < static_cast<int>(blockDim.x); ++t) {
    if (keys[t] != key) continue;
    if (t < static_cast<int>(threadIdx.x)) ++rank.before;
    if (t > static_cast<int>(threadIdx.x)) rank.last = false;
  }
  return rank;
}

// One pass over the row in chunks, in order. Each key's run in `next` (indexed key + 1) advances by
// its count in the chunk, moved by the chunk's last entry with that key, so no two threads write
// one slot and no atomics are needed. With `order`, each entry is first written to its slot:
// next[key + 1] + the entries before it in the chunk with its key, which keeps ties in k order.
__device__ void stable_pass(const int64_t* __restrict__ row, int64_t K, int64_t n,
                            int64_t* __restrict__ next, int64_t* __restrict__ order,
                            int64_t* keys) {
  for (int64_t base = 0; base < K; base += blockDim.x) {
    const int64_t k = base + threadIdx.x;
    int64_t key = kNoKey;
    if (k < K) {
      key = row[k];
      CUDA_KERNEL_ASSERT(
          key >= -1 && key < n &&
          "tokred: index out of range [-1, n) ('indices' of _topk_backward, 'index' of _gather_tokens_backward)");
      if (key < -1 || key >= n) key = kNoKey;
    }
    keys[threadIdx.x] = key;
    __syncthreads();
    const ChunkRank rank = chunk_rank(keys, key);
    if (order && key != kNoKey) order[next[key + 1] + rank.before] = k;
    __syncthreads();  // every slot is read before its run advances
    if (key != kNoKey && rank.last) next[key + 1] += rank.before + 1;
    __syncthreads();  // keys and next are settled for the next chunk
  }
}

// The CSR plan of rows of index, one block per row: count each key (next[key + 1]), prefix-sum
// the counts into offsets (offsets[i] = #{k : index_k < i}) with next turned into each run's
// first slot, then place every k in a second stable pass. O(K + n) memory traffic per row.
__global__ void __launch_bounds__(kPlanThreads)
    segment_plan_kernel(const int64_t* __restrict__ index, int64_t B, int64_t K, int64_t n,
                        int64_t* __restrict__ next_all, int64_t* __restrict__ order,
                        int64_t* __restrict__ offsets) {
  __shared__ int64_t keys[kPlanThreads];
  __shared__ int64_t scan[kPlanThreads];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t* row = index + b * K;
    int64_t* next = next_all + b * (n + 1);
    int64_t* off = offsets + b * (n + 1);
    for (int64_t i = threadIdx.x; i <= n; i += blockDim.x) next[i] = 0;
    __syncthreads();
    stable_pass(row, K, n, next, nullptr, keys);  // next[key + 1] = count of key
    // Inclusive scan of [count(-1), count(0), ..., count(n - 1)] in chunks (Hillis-Steele within
    // one): offsets[i] = #{k : index_k <= i - 1}, next[i] = where run i - 1 starts.
    int64_t carry = 0;
    for (int64_t base = 0; base <= n; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const int64_t count = i <= n ? next[i] : 0;
      scan[threadIdx.x] = count;
      __syncthreads();
      for (int d = 1; d < static_cast<int>(blockDim.x); d *= 2) {
        const int64_t add = static_cast<int>(threadIdx.x) >= d ? scan[threadIdx.x - d] : 0;
        __syncthreads();
        scan[threadIdx.x] += add;
        __syncthreads();
      }
      if (i <= n) {
        off[i] = carry + scan[threadIdx.x];
        next[i] = off[i] - count;
      }
      carry += scan[blockDim.x - 1];
      __syncthreads();  // scan is rewritten by the next chunk
    }
    stable_pass(row, K, n, next, order + b * K, keys);
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
  at::Tensor next = at::empty({B, n + 1}, index.options());  // the kernel's per-row cursors
  segment_plan_kernel<<<cuda::blocks_for(B, 1), plan_threads(K, n), 0,
                        c10::cuda::getCurrentCUDAStream()>>>(
      index.data_ptr<int64_t>(), B, K, n, next.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
      offsets.data_ptr<int64_t>());
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
