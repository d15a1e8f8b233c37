// CUDA kernels of the ToMe ops.
//
// bipartite_match: four kernels. Inverse norms; each A token's first most similar B token, one
// block per (batch row, chunk of A tokens), similarities computed tile by tile (A rows x B rows x
// channels in shared memory) and never written to global memory; ranks by count (common/rank.h),
// so no sort is needed and ties go to the lower index; then each A token's slot.
//
// merge family: a plan kernel writes dest (the output token of every input token, as on the CPU);
// build_segments_cuda groups each row's tokens by destination in ascending order (CSR); every
// output element then reduces its members in that fixed order, without atomics. merge_plan
// returns that plan; the *_by_plan ops take it back and check it with plan_check_kernel. Index
// values are bounds-checked: a bad one trips CUDA_KERNEL_ASSERT and is skipped, nothing is read
// or written out of bounds.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/merge.h"
#include "common/merge_args.h"
#include "cuda/launch.cuh"
#include "cuda/segment.h"

namespace tokred {
namespace {

constexpr int kRows = 128;  // A tokens per chunk: one per thread
constexpr int kTileJ = 32;  // B tokens per tile
constexpr int kTileK = 16;  // channels per tile
using cuda::blocks_for;
using cuda::kThreads;

// A token position read from a partition's list (tok.of_a / of_b) is used only inside [0, n): a
// bad list trips partition_kernel's assert, and its entries read token 0 instead of out of bounds.
__device__ __forceinline__ int64_t in_row(int64_t t, int64_t n) {
  return (t >= 0 && t < n) ? t : 0;
}

// 1. inv [B * n]: the inverse norm of every token, one warp per token.
template <typename scalar_t, typename acc_t>
__global__ void inv_norm_kernel(const scalar_t* __restrict__ metric, int64_t tokens, int64_t D,
                                acc_t* __restrict__ inv) {
  const int lane = threadIdx.x % cuda::kWarp;
  TOKRED_WARP_STRIDE(t, tokens) {
    acc_t ss = 0;
    for (int64_t k = lane; k < D; k += cuda::kWarp) {
      const acc_t v = static_cast<acc_t>(metric[t * D + k]);
      ss += v * v;
    }
    ss = cuda::warp_reduce_sum(ss);
    if (lane == 0) inv[t] = acc_t(1) / ::sqrt(ss);
  }
}

// 2. node_max, node_idx [B, na]: each A token's best similarity and its first B token with it.
// One block per (batch row, chunk of kRows A tokens), one thread per A token; similarities are
// computed tile by tile (A rows x B rows x channels in shared memory) and never stored.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRows)
    best_match_kernel(const scalar_t* __restrict__ metric, const acc_t* __restrict__ inv_all,
                      TomeDims d, TomeTokens tok, int64_t D, int64_t num_protected, int64_t chunks,
                      acc_t* __restrict__ node_max, int64_t* __restrict__ node_idx) {
  __shared__ acc_t As[kRows][kTileK + 1];  // + 1: no bank conflicts between A rows
  __shared__ acc_t Bs[kTileJ][kTileK];
  const int64_t n = d.n;
  const int64_t b = blockIdx.x / chunks, a0 = (blockIdx.x % chunks) * kRows;
  const int tid = threadIdx.x;
  const int64_t a = a0 + tid;
  const scalar_t* m = metric + b * n * D;
  const acc_t* inv = inv_all + b * n;
  acc_t best = 0;
  int64_t best_j = -1;
  for (int64_t j0 = 0; j0 < d.nb; j0 += kTileJ) {
    acc_t acc[kTileJ];
#pragma unroll
    for (int jj = 0; jj < kTileJ; ++jj) acc[jj] = 0;
    for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
      for (int i = tid; i < kRows * kTileK; i += kRows) {
        const int64_t row = a0 + i / kTileK, k = k0 + i % kTileK;
        As[i / kTileK][i % kTileK] = (row < d.na && k < D)
                                         ? static_cast<acc_t>(m[in_row(tok.of_a(row), n) * D + k])
                                         : acc_t(0);
      }
      for (int i = tid; i < kTileJ * kTileK; i += kRows) {
        const int64_t j = j0 + i / kTileK, k = k0 + i % kTileK;
        Bs[i / kTileK][i % kTileK] =
            (j < d.nb && k < D) ? static_cast<acc_t>(m[in_row(tok.of_b(j), n) * D + k]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int jj = 0; jj < kTileJ; ++jj) {
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk) acc[jj] += As[tid][kk] * Bs[jj][kk];
      }
      __syncthreads();
    }
    if (a < d.na) {
#pragma unroll
      for (int jj = 0; jj < kTileJ; ++jj) {
        const int64_t j = j0 + jj;
        if (j >= d.nb) break;
        const acc_t v = tome_score(acc[jj], inv[in_row(tok.of_a(a), n)],
                                   inv[in_row(tok.of_b(j), n)], tome_excluded(a, j, num_protected));
        tome_argmax_step(v, j, best, best_j);
      }
    }
  }
  if (a < d.na) {
    node_max[b * d.na + a] = best;
    node_idx[b * d.na + a] = best_j;
  }
}

// 3. rank [B, na]: each A token's place by descending best similarity, ties to the lower index
// (a count, common/rank.h, so no sort).
template <typename acc_t>
__global__ void match_rank_kernel(const acc_t* __restrict__ node_max, int64_t B, int64_t na,
                                  int64_t* __restrict__ rank) {
  TOKRED_GRID_STRIDE(t, B * na) {
    const int64_t b = t / na;
    rank[t] = rank_in_row(node_max + b * na, na, t % na, /*largest=*/true);
  }
}

// 4. every A token to its source or unmerged slot (tome_slot).
__global__ void match_place_kernel(const int64_t* __restrict__ rank,
                                   const int64_t* __restrict__ node_idx, int64_t B, TomeDims d,
                                   bool ascending, int64_t* __restrict__ unm,
                                   int64_t* __restrict__ src, int64_t* __restrict__ dst) {
  const int64_t r = d.r;
  TOKRED_GRID_STRIDE(t, B * d.na) {
    const int64_t b = t / d.na, a = t % d.na;
    const int64_t slot = tome_slot(rank + b * d.na, a, r, ascending);
    if (slot < 0) {
      src[b * r + (-1 - slot)] = a;
      dst[b * r + (-1 - slot)] = node_idx[t];
    } else {
      unm[b * d.u + slot] = a;
    }
  }
}

// unm [B, u], src [B, r], dst [B, r] of a match with r > 0 over the tokens of tok. The row is
// split over blocks of kRows A tokens, so a small batch of long rows (tomesd: B = 2, N = 4096)
// fills the GPU, and no row has to fit in shared memory.
void launch_match(const at::Tensor& metric, const TomeDims& d, const TomeTokens& tok,
                  int64_t num_protected, at::Tensor& unm, at::Tensor& src, at::Tensor& dst,
                  const char* op) {
  const int64_t B = metric.size(0), N = metric.size(1), D = metric.size(2);
  const int64_t chunks = cuda::ceil_div(d.na, kRows);
  TORCH_CHECK(B * chunks <= std::numeric_limits<int32_t>::max(), "tokred::", op,
              ": argument 'metric' has too many tokens for the CUDA grid, got B = ", B,
              " rows of N = ", N);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = metric.options().dtype(at::toOpMathType(metric.scalar_type()));
  const at::Tensor inv = at::empty({B, N}, acc_opts), node_max = at::empty({B, d.na}, acc_opts);
  const at::Tensor node_idx = at::empty({B, d.na}, unm.options());
  const at::Tensor rank = at::empty({B, d.na}, unm.options());
  TOKRED_DISPATCH_FLOATS(metric.scalar_type(), "tokred_match_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    inv_norm_kernel<scalar_t, acc_t><<<blocks_for(B * N * cuda::kWarp), kThreads, 0, stream>>>(
        metric.data_ptr<scalar_t>(), B * N, D, inv.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    best_match_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * chunks), kRows, 0, stream>>>(
        metric.data_ptr<scalar_t>(), inv.data_ptr<acc_t>(), d, tok, D, num_protected, chunks,
        node_max.data_ptr<acc_t>(), node_idx.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    match_rank_kernel<acc_t><<<blocks_for(B * d.na), kThreads, 0, stream>>>(
        node_max.data_ptr<acc_t>(), B, d.na, rank.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  match_place_kernel<<<blocks_for(B * d.na), kThreads, 0, stream>>>(
      rank.data_ptr<int64_t>(), node_idx.data_ptr<int64_t>(), B, d, num_protected > 0,
      unm.data_ptr<int64_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_cuda(const at::Tensor& metric_in,
                                                                    int64_t r_in,
                                                                    int64_t num_protected) {
  const int64_t r = check_bipartite_match(metric_in, r_in, num_protected).expect_int();
  const c10::cuda::OptionalCUDAGuard guard(metric_in.device());
  const at::Tensor metric = metric_in.contiguous();
  const int64_t B = metric.size(0), N = metric.size(1);
  const TomeDims d = tome_dims(N, r, num_protected);
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unm = at::empty({B, d.u}, opts);
  at::Tensor src = at::empty({B, r}, opts);
  at::Tensor dst = at::empty({B, r}, opts);
  if (B == 0) return {unm, src, dst};
  if (r == 0) {
    unm.copy_(at::arange(d.na, opts).expand({B, d.na}));
    return {unm, src, dst};
  }
  launch_match(metric, d, TomeTokens{}, num_protected, unm, src, dst, "bipartite_match");
  return {unm, src, dst};
}

// ---- the plan

__global__ void plan_kernel(const int64_t* __restrict__ unm, const int64_t* __restrict__ src,
                            const int64_t* __restrict__ dst, int64_t B, TomeDims d, TomeTokens tok,
                            int64_t* __restrict__ dest) {
  const int64_t per_row = d.u + d.r + d.nb;
  TOKRED_GRID_STRIDE(i, B * per_row) {
    const int64_t b = i / per_row, e = i % per_row;
    int64_t a = -1, t, o;
    if (e < d.u) {  // unmerged A token
      a = unm[b * d.u + e];
      o = tome_unm_out(e, d);
    } else if (e < d.u + d.r) {  // merged A token and its destination
      const int64_t k = e - d.u, j = dst[b * d.r + k];
      CUDA_KERNEL_ASSERT(j >= 0 && j < d.nb && "tokred::merge: dst_idx out of range");
      if (j < 0 || j >= d.nb) continue;
      a = src[b * d.r + k];
      o = tome_dst_out(j, d);
    } else {  // B token
      const int64_t j = e - d.u - d.r;
      t = tok.of_b(j);
      o = tome_dst_out(j, d);
    }
    if (e < d.u + d.r) {
      CUDA_KERNEL_ASSERT(a >= 0 && a < d.na && "tokred::merge: unm_idx or src_idx out of range");
      if (a < 0 || a >= d.na) continue;
      t = tok.of_a(a);
    }
    if (t < 0 || t >= d.n) continue;  // a bad partition list (partition_kernel asserts)
    dest[b * d.n + t] = o;
  }
}

// Every token must have an output. unm_idx and src_idx list na A tokens between them, so one
// listed twice leaves another at -1; the CPU plan rejects that, and so must every CUDA consumer
// of the plan (merge_source would otherwise return the -1 as a token id).
__global__ void plan_complete_kernel(const int64_t* __restrict__ dest, int64_t total) {
  TOKRED_GRID_STRIDE(i, total) {
    CUDA_KERNEL_ASSERT(dest[i] >= 0 && "tokred: unm_idx or src_idx lists an A token twice");
  }
}

struct PlanCuda {
  at::Tensor dest, order, offsets;  // [B, n], [B, n] (the members), [B, nout + 1]
  int64_t B, n, nout;
  bool merging() const { return nout < n; }  // r > 0 (r = 0 is upstream's do_nothing)
};

// The plan of a match over the tokens of tok; segments=false skips the CSR grouping (gathers
// need dest only).
PlanCuda build_plan(const at::Tensor& unm_in, const at::Tensor& src_in, const at::Tensor& dst_in,
                    const TomeDims& d, const TomeTokens& tok, bool segments = true) {
  const at::Tensor unm = as_int64(unm_in), src = as_int64(src_in), dst = as_int64(dst_in);
  const int64_t B = src.size(0), r = src.size(1), n = d.n;
  PlanCuda p{at::Tensor(), at::Tensor(), at::Tensor(), B, n, d.nout};
  if (r == 0) {  // no merge: the identity, as upstream's do_nothing
    p.dest = at::arange(n, unm.options()).expand({B, n}).contiguous();
  } else {
    // Tokens start at -1: plan_complete_kernel then rejects a plan that left one without output.
    p.dest = at::full({B, n}, -1, unm.options());
    const int64_t total = B * (d.u + d.r + d.nb);
    if (total > 0) {
      plan_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          unm.data_ptr<int64_t>(), src.data_ptr<int64_t>(), dst.data_ptr<int64_t>(), B, d, tok,
          p.dest.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (B * n > 0) {
      plan_complete_kernel<<<blocks_for(B * n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          p.dest.data_ptr<int64_t>(), B * n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (segments) std::tie(p.order, p.offsets) = build_segments_cuda(p.dest, p.nout);
  return p;
}

// The plan of a match over alternating positions with a prefix of num_protected tokens.
PlanCuda build_plan(const at::Tensor& unm, const at::Tensor& src, const at::Tensor& dst, int64_t n,
                    int64_t num_protected, bool segments = true) {
  return build_plan(unm, src, dst, tome_dims(n, src.size(1), num_protected), TomeTokens{},
                    segments);
}

// A partition's A tokens, the complement of its destination list b_tok in ascending order:
// token t that is not in b_tok is A token t - #(b_tok < t). A bad list (tome_dst_token_ok) trips
// the assert; a_tok then keeps zeros where nothing landed, and no write leaves it.
__global__ void partition_kernel(const int64_t* __restrict__ b_tok, int64_t nb, int64_t n,
                                 int64_t* __restrict__ a_tok) {
  TOKRED_GRID_STRIDE(t, n) {
    if (t < nb) {
      CUDA_KERNEL_ASSERT(
          tome_dst_token_ok(b_tok, t, n) &&
          "tokred::bipartite_match_plan: 'dst_tokens' must ascend strictly in [0, N)");
    }
    int64_t lo = 0, hi = nb;  // lower bound of t in b_tok
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (b_tok[mid] < t) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t slot = t - lo;
    if (!(lo < nb && b_tok[lo] == t) && slot >= 0 && slot < n - nb) a_tok[slot] = t;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_match_plan_cuda(
    const at::Tensor& metric_in, const at::Tensor& dst_tokens, int64_t r_in) {
  const int64_t r = check_bipartite_match_plan(metric_in, dst_tokens, r_in).expect_int();
  const c10::cuda::OptionalCUDAGuard guard(metric_in.device());
  const at::Tensor metric = metric_in.contiguous();
  const at::Tensor b_tok = as_int64(dst_tokens).contiguous();
  const int64_t B = metric.size(0), N = metric.size(1), nb = b_tok.size(0);
  at::Tensor a_tok = at::zeros({N - nb}, b_tok.options());
  if (N > 0) {
    partition_kernel<<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        b_tok.data_ptr<int64_t>(), nb, N, a_tok.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const TomeDims d = tome_partition_dims(N, nb, r);
  const TomeTokens tok{a_tok.data_ptr<int64_t>(), b_tok.data_ptr<int64_t>()};
  const auto opts = metric.options().dtype(at::kLong);
  at::Tensor unm = at::empty({B, d.u}, opts), src = at::empty({B, r}, opts),
             dst = at::empty({B, r}, opts);
  if (B > 0 && r > 0) {
    launch_match(metric, d, tok, /*num_protected=*/0, unm, src, dst, "bipartite_match_plan");
  }
  const PlanCuda p = build_plan(unm, src, dst, d, tok);
  return {p.dest, p.offsets, p.order};
}

// Every output of a plan given as tensors must pass tome_plan_fault (common/merge.h); the
// kernels that read the plan also guard each index, so a bad plan trips the assert and nothing
// is read or written out of bounds.
__global__ void plan_check_kernel(const int64_t* __restrict__ dest,
                                  const int64_t* __restrict__ offsets,
                                  const int64_t* __restrict__ members, int64_t B, int64_t n,
                                  int64_t nout) {
  TOKRED_GRID_STRIDE(i, B * nout) {
    const int64_t b = i / nout, o = i % nout;
    const PlanFault fault =
        tome_plan_fault(offsets + b * (nout + 1), members + b * n, dest + b * n, o, n, nout);
    // One assert per fault, worded as plan_fault_message (common/merge_args.cpp) words it.
    CUDA_KERNEL_ASSERT(
        fault != PlanFault::kOffsets &&
        "tokred: (dest, offsets, members) is not a merge plan: 'offsets' must start at 0, end at N and rise strictly");
    CUDA_KERNEL_ASSERT(
        fault != PlanFault::kMemberRange &&
        "tokred: (dest, offsets, members) is not a merge plan: 'members' must hold token positions in [0, N)");
    CUDA_KERNEL_ASSERT(
        fault != PlanFault::kMemberOrder &&
        "tokred: (dest, offsets, members) is not a merge plan: 'members' must ascend within each output");
    CUDA_KERNEL_ASSERT(
        fault != PlanFault::kDest &&
        "tokred: (dest, offsets, members) is not a merge plan: 'dest' must map each member to the output that lists it");
  }
}

PlanCuda checked_plan(const at::Tensor& dest, const at::Tensor& offsets,
                      const at::Tensor& members) {
  PlanCuda p{as_int64(dest), as_int64(members), as_int64(offsets),
             dest.size(0),   dest.size(1),      offsets.size(1) - 1};
  if (p.B * p.nout > 0) {
    plan_check_kernel<<<blocks_for(p.B * p.nout), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        p.dest.data_ptr<int64_t>(), p.offsets.data_ptr<int64_t>(), p.order.data_ptr<int64_t>(), p.B,
        p.n, p.nout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return p;
}

// ---- reductions over a plan: one thread per output element, members in ascending order

template <typename scalar_t>
__global__ void reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ size,
                              const int64_t* __restrict__ order,
                              const int64_t* __restrict__ offsets, int64_t B, int64_t n,
                              int64_t nout, int64_t C, MergeMode mode, scalar_t* __restrict__ out,
                              scalar_t* __restrict__ size_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // With C == 0 one thread per output token still sums its size.
  const int64_t lanes = C > 0 ? C : 1;
  TOKRED_GRID_STRIDE(i, B * nout * lanes) {
    const int64_t c = i % lanes, bo = i / lanes, b = bo / nout, o = bo % nout;
    const int64_t begin = std::max<int64_t>(offsets[b * (nout + 1) + o], 0);
    const int64_t end = std::min<int64_t>(offsets[b * (nout + 1) + o + 1], n);
    CUDA_KERNEL_ASSERT(begin < end && "tokred::merge: an output token has no member");
    acc_t acc = 0, wsum = 0;
    bool lone_copy = false;
    for (int64_t m = begin; m < end; ++m) {
      const int64_t t = order[b * n + m];
      if (t < 0 || t >= n) continue;
      const acc_t w = size ? static_cast<acc_t>(size[b * n + t]) : acc_t(1);
      wsum += w;
      if (C == 0) continue;
      tome_accumulate(mode, m == begin, static_cast<acc_t>(x[(b * n + t) * C + c]), w, acc);
      if (end - begin == 1 && tome_lone_copies(mode, w, /*merging=*/nout < n)) {  // exact
        acc = static_cast<acc_t>(x[(b * n + t) * C + c]);
        lone_copy = true;
      }
    }
    if (C > 0) {
      out[i] = static_cast<scalar_t>(lone_copy ? acc : tome_finish(mode, acc, wsum, end - begin));
    }
    if (c == 0 && size_out) size_out[bo] = static_cast<scalar_t>(wsum);
  }
}

// grad_x[b, t, c]: t's share of the gradient of its output dest[b, t].
template <typename scalar_t>
__global__ void spread_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ size, const int64_t* __restrict__ dest,
                              const int64_t* __restrict__ order,
                              const int64_t* __restrict__ offsets, int64_t B, int64_t n,
                              int64_t nout, int64_t C, MergeMode mode,
                              scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  TOKRED_GRID_STRIDE(i, B * n * C) {
    const int64_t c = i % C, bt = i / C, b = bt / n;
    const int64_t o = dest[bt];
    CUDA_KERNEL_ASSERT(o >= 0 && o < nout && "tokred::_merge_backward: token without output");
    if (o < 0 || o >= nout) {
      grad_x[i] = scalar_t(0);
      continue;
    }
    const int64_t begin = std::max<int64_t>(offsets[b * (nout + 1) + o], 0);
    const int64_t end = std::min<int64_t>(offsets[b * (nout + 1) + o + 1], n);
    if (begin >= end) {  // not a plan: plan_check_kernel asserts
      grad_x[i] = scalar_t(0);
      continue;
    }
    const acc_t g = static_cast<acc_t>(grad[(b * nout + o) * C + c]);
    const acc_t w_self = size ? static_cast<acc_t>(size[bt]) : acc_t(1);
    if (end - begin == 1 && tome_lone_grad_passes(mode, w_self)) {
      grad_x[i] = static_cast<scalar_t>(g);
      continue;
    }
    acc_t wsum = 0, mx = 0;
    int64_t ties = 0;
    for (int64_t m = begin; m < end; ++m) {
      const int64_t s = order[b * n + m];
      if (s < 0 || s >= n) continue;  // not a plan: plan_check_kernel asserts
      wsum += size ? static_cast<acc_t>(size[b * n + s]) : acc_t(1);
      if (mode == MergeMode::kAmax) {
        tome_accumulate(mode, m == begin, static_cast<acc_t>(x[(b * n + s) * C + c]), acc_t(1), mx);
      }
    }
    if (mode == MergeMode::kAmax) {
      for (int64_t m = begin; m < end; ++m) {
        const int64_t s = order[b * n + m];
        if (s < 0 || s >= n) continue;
        ties += static_cast<acc_t>(x[(b * n + s) * C + c]) == mx ? 1 : 0;
      }
    }
    const acc_t v = x ? static_cast<acc_t>(x[i]) : acc_t(0);
    const acc_t coef =
        tome_grad_coef(mode, v, w_self, mx, wsum, end - begin, ties,
                       tome_output_is_destination(end - begin, order[b * n + begin]));
    grad_x[i] = static_cast<scalar_t>(coef * g);
  }
}

// out[b, t, c] = x[b, dest[b, t], c]; also the sum-mode backward.
template <typename scalar_t>
__global__ void gather_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ dest,
                              int64_t B, int64_t n, int64_t nout, int64_t C,
                              scalar_t* __restrict__ out) {
  TOKRED_GRID_STRIDE(i, B * n * C) {
    const int64_t bt = i / C, o = dest[bt];
    CUDA_KERNEL_ASSERT(o >= 0 && o < nout && "tokred::unmerge: token without output");
    out[i] = (o >= 0 && o < nout) ? x[((bt / n) * nout + o) * C + i % C] : scalar_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor> reduce_plan(const at::Tensor& x_in,
                                               const std::optional<at::Tensor>& size_in,
                                               const PlanCuda& p, MergeMode mode) {
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(2), total = p.B * p.nout * std::max<int64_t>(C, 1);
  at::Tensor out = at::empty({p.B, p.nout, C}, x.options());
  at::Tensor size_out = at::empty({p.B, p.nout, 1}, x.options());
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  if (total == 0) return {out, size_out};  // no output token: C == 0 still sums the sizes
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_merge_cuda", [&] {
    reduce_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), size.defined() ? size.data_ptr<scalar_t>() : nullptr,
        p.order.data_ptr<int64_t>(), p.offsets.data_ptr<int64_t>(), p.B, p.n, p.nout, C, mode,
        out.data_ptr<scalar_t>(), size_out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, size_out};
}

at::Tensor gather_plan(const at::Tensor& x_in, const PlanCuda& p) {
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(2), total = p.B * p.n * C;
  at::Tensor out = at::empty({p.B, p.n, C}, x.options());
  if (total == 0) return out;
  TOKRED_DISPATCH_FLOATS(x.scalar_type(), "tokred_unmerge_cuda", [&] {
    gather_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), p.dest.data_ptr<int64_t>(), p.B, p.n, p.nout, C,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The merge backward over a plan: sum mode and r = 0 (the identity) gather the gradient.
at::Tensor merge_backward_over(const at::Tensor& grad_in, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& size_in, const PlanCuda& p,
                               MergeMode mode) {
  if (mode == MergeMode::kSum || !p.merging()) return gather_plan(grad_in, p);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor size = size_in.has_value() ? size_in->contiguous() : at::Tensor();
  const int64_t C = x.size(2), total = p.B * p.n * C;
  at::Tensor grad_x = at::empty({p.B, p.n, C}, grad.options());
  if (total == 0) return grad_x;
  TOKRED_DISPATCH_FLOATS(grad.scalar_type(), "tokred_merge_backward_cuda", [&] {
    spread_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        size.defined() ? size.data_ptr<scalar_t>() : nullptr, p.dest.data_ptr<int64_t>(),
        p.order.data_ptr<int64_t>(), p.offsets.data_ptr<int64_t>(), p.B, p.n, p.nout, C, mode,
        grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

__global__ void source_kernel(const int64_t* __restrict__ source, const int64_t* __restrict__ dest,
                              int64_t B, int64_t N0, int64_t n, int64_t* __restrict__ out) {
  TOKRED_GRID_STRIDE(i, B * N0) {
    const int64_t t = source[i];
    CUDA_KERNEL_ASSERT(t >= 0 && t < n && "tokred::merge_source: source out of range");
    out[i] = (t >= 0 && t < n) ? dest[(i / N0) * n + t] : int64_t(-1);
  }
}

// Source tracking: the plan's dest, or dest composed with an earlier source map.
at::Tensor source_over(const std::optional<at::Tensor>& source_in, const PlanCuda& p) {
  if (!source_in.has_value()) return p.dest;
  const at::Tensor source = as_int64(*source_in);
  const int64_t B = source.size(0), N0 = source.size(1);  // B is the plan's (checked)
  at::Tensor out = at::empty({B, N0}, source.options());
  if (B * N0 == 0) return out;
  source_kernel<<<blocks_for(B * N0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      source.data_ptr<int64_t>(), p.dest.data_ptr<int64_t>(), B, N0, p.n, out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- ops with a plan as a value (merge_plan) and the ops that build one per call

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_plan_cuda(const at::Tensor& unm,
                                                               const at::Tensor& src,
                                                               const at::Tensor& dst, int64_t n,
                                                               int64_t num_protected) {
  check_merge_plan(unm, src, dst, n, num_protected);
  const c10::cuda::OptionalCUDAGuard guard(unm.device());
  const PlanCuda p = build_plan(unm, src, dst, n, num_protected);
  return {p.dest, p.offsets, p.order};
}

std::tuple<at::Tensor, at::Tensor> merge_by_plan_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& size, const at::Tensor& dest,
    const at::Tensor& offsets, const at::Tensor& members, c10::string_view mode) {
  const char* op = "merge_by_plan";
  check_merge_by_plan(x, size, dest, offsets, members, mode, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return reduce_plan(x, size, checked_plan(dest, offsets, members), parse_merge_mode(mode, op));
}

at::Tensor merge_by_plan_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                       const std::optional<at::Tensor>& size,
                                       const at::Tensor& dest, const at::Tensor& offsets,
                                       const at::Tensor& members, c10::string_view mode) {
  const char* op = "_merge_by_plan_backward";
  const int64_t nout = check_merge_by_plan(x, size, dest, offsets, members, mode, op).expect_int();
  check_merge_backward_grad(grad, x, x.size(1) - nout, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return merge_backward_over(grad, x, size, checked_plan(dest, offsets, members),
                             parse_merge_mode(mode, op));
}

at::Tensor unmerge_by_plan_cuda(const at::Tensor& x, const at::Tensor& dest,
                                const at::Tensor& offsets, const at::Tensor& members) {
  check_unmerge_by_plan(x, dest, offsets, members);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return gather_plan(x, checked_plan(dest, offsets, members));
}

at::Tensor merge_source_by_plan_cuda(const std::optional<at::Tensor>& source,
                                     const at::Tensor& dest, const at::Tensor& offsets,
                                     const at::Tensor& members) {
  check_merge_source_by_plan(source, dest, offsets, members);
  const c10::cuda::OptionalCUDAGuard guard(dest.device());
  const PlanCuda p = checked_plan(dest, offsets, members);
  // Without a source map the answer is dest itself: a copy, as ops never alias an input.
  return source.has_value() ? source_over(source, p) : p.dest.clone();
}

std::tuple<at::Tensor, at::Tensor> merge_cuda(const at::Tensor& x,
                                              const std::optional<at::Tensor>& size,
                                              const at::Tensor& unm, const at::Tensor& src,
                                              const at::Tensor& dst, c10::string_view mode,
                                              int64_t num_protected) {
  const char* op = "merge";
  check_merge(x, size, unm, src, dst, mode, num_protected, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const PlanCuda p = build_plan(unm, src, dst, x.size(1), num_protected);
  return reduce_plan(x, size, p, parse_merge_mode(mode, op));
}

at::Tensor merge_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& size, const at::Tensor& unm,
                               const at::Tensor& src, const at::Tensor& dst,
                               c10::string_view mode_s, int64_t num_protected) {
  const char* op = "_merge_backward";
  const int64_t r = check_merge(x, size, unm, src, dst, mode_s, num_protected, op).expect_int();
  check_merge_backward_grad(grad, x, r, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const MergeMode mode = parse_merge_mode(mode_s, op);
  const bool gathers = mode == MergeMode::kSum || r == 0;  // needs dest only
  const PlanCuda p = build_plan(unm, src, dst, x.size(1), num_protected, /*segments=*/!gathers);
  return merge_backward_over(grad, x, size, p, mode);
}

at::Tensor unmerge_cuda(const at::Tensor& x, const at::Tensor& unm, const at::Tensor& src,
                        const at::Tensor& dst, int64_t n, int64_t num_protected) {
  check_unmerge(x, unm, src, dst, n, num_protected, "unmerge");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return gather_plan(x, build_plan(unm, src, dst, n, num_protected, /*segments=*/false));
}

at::Tensor unmerge_backward_cuda(const at::Tensor& grad, const at::Tensor& unm,
                                 const at::Tensor& src, const at::Tensor& dst,
                                 int64_t num_protected) {
  check_unmerge_backward(grad, unm, src, dst, num_protected, "_unmerge_backward");
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  const PlanCuda p = build_plan(unm, src, dst, grad.size(1), num_protected);
  return std::get<0>(reduce_plan(grad, std::nullopt, p, MergeMode::kSum));
}

at::Tensor merge_source_cuda(const std::optional<at::Tensor>& source, const at::Tensor& unm,
                             const at::Tensor& src, const at::Tensor& dst, int64_t n,
                             int64_t num_protected) {
  check_merge_source(source, unm, src, dst, n, num_protected);
  const c10::cuda::OptionalCUDAGuard guard(unm.device());
  return source_over(source, build_plan(unm, src, dst, n, num_protected, /*segments=*/false));
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CUDA, m) {
  m.impl("bipartite_match", TORCH_FN(bipartite_match_cuda));
  m.impl("merge", TORCH_FN(merge_cuda));
  m.impl("_merge_backward", TORCH_FN(merge_backward_cuda));
  m.impl("unmerge", TORCH_FN(unmerge_cuda));
  m.impl("_unmerge_backward", TORCH_FN(unmerge_backward_cuda));
  m.impl("merge_source", TORCH_FN(merge_source_cuda));
  m.impl("merge_plan", TORCH_FN(merge_plan_cuda));
  m.impl("bipartite_match_plan", TORCH_FN(bipartite_match_plan_cuda));
  m.impl("merge_by_plan", TORCH_FN(merge_by_plan_cuda));
  m.impl("_merge_by_plan_backward", TORCH_FN(merge_by_plan_backward_cuda));
  m.impl("unmerge_by_plan", TORCH_FN(unmerge_by_plan_cuda));
  m.impl("merge_source_by_plan", TORCH_FN(merge_source_by_plan_cuda));
}

}  // namespace tokred
