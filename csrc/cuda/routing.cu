// CUDA kernels of the BiFormer routing ops.
//
// routed_attention is flash-style: a block takes one (batch, query window, head) and up to
// kRowsPerBlock query rows (one warp per row, kRowsPerWarp rows per warp); the routed keys stream
// through shared memory in tiles of kKeyTile keys (lane = key for scores, lane = channel for the
// output accumulator); the softmax is online (common/routing.h, the same steps as the CPU
// kernel). The backward recomputes scores: dq per (batch, query window, head) like the forward;
// dk, dv per (batch, key window, head) by walking, in a fixed order, the (query window, slot)
// pairs routed to that window (the CSR plan of the segment module, cuda/segment.h, built without
// atomics). Warp reductions come from cuda/launch.cuh: fixed trees, with lane 0's value broadcast,
// so every result is bitwise repeatable.
//
// r_idx is checked on the device, never with a host sync: every kernel that reads an entry asserts
// it lies in [0, P) (CUDA_KERNEL_ASSERT, raised at the next synchronisation) and reads nothing
// for a bad one; the backward ops assert all of r_idx before they build a plan from it.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/routing.h"
#include "common/routing_args.h"
#include "cuda/launch.cuh"
#include "cuda/segment.h"

namespace tokred {
namespace {

using cuda::ceil_div;
using cuda::kWarp;
using routing::Dims;
using routing::OnlineSoftmax;

// An r_idx entry must name a window of its batch; a bad one fails the launch (device assert).
#define TOKRED_ASSERT_REGION(j, P)                     \
  CUDA_KERNEL_ASSERT(routing::region_in_range(j, P) && \
                     "tokred: argument 'r_idx' must hold region indices in [0, P)")

constexpr int kWarps = 4;
constexpr int kAttnThreads = kWarp * kWarps;  // the attention kernels' blocks
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeyTile = kWarp;
constexpr int kMaxPerLane = 8;  // head dims up to kWarp * kMaxPerLane = 256
constexpr int64_t kMaxHeadDim = kWarp * kMaxPerLane;

// A warp's row accumulator, lane-strided over channels c = lane + kWarp·u < D:
// acc[u] = acc[u]·alpha + Σ_{x<n} w[x]·M[x·ld + c]. Forward P·V (alpha: the online-softmax
// rescale), dq = dS·K, dv = Pᵀ·dO and dk = dSᵀ·(Q·scale) (alpha = 1, exact) all take this form.
// Every kernel stages q·scale, so scores are (q·scale)·k, upstream's order.
template <typename acc_t>
__device__ __forceinline__ void lane_accumulate(acc_t (&acc)[kMaxPerLane], acc_t alpha,
                                                const acc_t* w, const acc_t* M, int64_t n,
                                                int64_t ld, int64_t D, int lane) {
#pragma unroll
  for (int u = 0; u < kMaxPerLane; ++u) {
    const int64_t c = lane + int64_t(u) * kWarp;
    if (c >= D) break;
    acc_t a = acc[u] * alpha;
    for (int64_t x = 0; x < n; ++x) a += w[x] * M[x * ld + c];
    acc[u] = a;
  }
}

void check_cuda_head_dims(const Dims& d, const char* op) {
  TORCH_CHECK(d.DQ <= kMaxHeadDim && d.DV <= kMaxHeadDim, "tokred::", op,
              ": argument 'num_heads' gives head dims (", d.DQ, ", ", d.DV,
              "); the CUDA kernel supports head dims up to ", kMaxHeadDim);
  TORCH_CHECK(ceil_div(d.WQ, kRowsPerBlock) <= 65535 && ceil_div(d.WK, kRowsPerBlock) <= 65535,
              "tokred::", op, ": window sizes up to ", 65535 * kRowsPerBlock, " are supported");
}

// ------------------------------------------------------------------------ plans

// Asserts every r_idx entry before a backward builds its segments from r_idx (the segment module
// would take -1 for padding and report other values under its own callers' names).
__global__ void check_regions_kernel(const int64_t* idx, int64_t total, int64_t P) {
  TOKRED_GRID_STRIDE(e, total) { TOKRED_ASSERT_REGION(idx[e], P); }
}

// For each batch b and window j, the entries e = i·T + t of r_idx[b] (flattened) with
// r_idx[b, i, t] == j, ascending: order[b, offsets[b, j] .. offsets[b, j + 1]).
std::tuple<at::Tensor, at::Tensor> build_plan(const at::Tensor& idx, int64_t P) {
  const int64_t total = idx.numel();
  if (total > 0) {
    check_regions_kernel<<<cuda::blocks_for(total), cuda::kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(idx.data_ptr<int64_t>(), total, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return build_segments_cuda(idx.view({idx.size(0), idx.size(1) * idx.size(2)}), P);
}

// ------------------------------------------------------------------------ routed_gather

template <typename scalar_t, typename acc_t>
__global__ void routed_gather_kernel(const scalar_t* kv, const int64_t* idx, const acc_t* w,
                                     int64_t P, int64_t T, int64_t row, int64_t total,
                                     scalar_t* out) {
  TOKRED_GRID_STRIDE(o, total) {
    const int64_t e = o / row, c = o % row, b = e / (P * T), j = idx[e];
    TOKRED_ASSERT_REGION(j, P);
    const scalar_t x = routing::region_in_range(j, P) ? kv[(b * P + j) * row + c] : scalar_t(0);
    out[o] = w == nullptr ? x : static_cast<scalar_t>(w[e] * static_cast<acc_t>(x));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void routed_gather_grad_kv_kernel(const scalar_t* grad, const int64_t* order,
                                             const int64_t* offsets, const acc_t* w, int64_t P,
                                             int64_t T, int64_t row, int64_t total,
                                             scalar_t* grad_kv) {
  TOKRED_GRID_STRIDE(o, total) {
    const int64_t bj = o / row, c = o % row, b = bj / P, j = bj % P;
    const int64_t* off = offsets + b * (P + 1);
    acc_t acc = 0;
    for (int64_t s = off[j]; s < off[j + 1]; ++s) {
      const int64_t e = b * P * T + order[b * P * T + s];
      const acc_t g = static_cast<acc_t>(grad[e * row + c]);
      acc += w == nullptr ? g : w[e] * g;
    }
    grad_kv[o] = static_cast<scalar_t>(acc);
  }
}

// grad_w[e] = <grad[e], kv[b, idx[e]]>: one block per e, fixed tree reduction.
template <typename scalar_t, typename acc_t, typename w_t>
__global__ void routed_gather_grad_w_kernel(const scalar_t* grad, const scalar_t* kv,
                                            const int64_t* idx, int64_t P, int64_t T, int64_t row,
                                            w_t* grad_w) {
  __shared__ acc_t part[256];
  const int64_t e = blockIdx.x;
  const int64_t b = e / (P * T), j = idx[e];
  TOKRED_ASSERT_REGION(j, P);
  const scalar_t* g = grad + e * row;
  const scalar_t* x = kv + (b * P + j) * row;
  const int64_t len = routing::region_in_range(j, P) ? row : 0;  // reads nothing for a bad j
  acc_t acc = 0;
  for (int64_t c = threadIdx.x; c < len; c += blockDim.x)
    acc += static_cast<acc_t>(g[c]) * static_cast<acc_t>(x[c]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_w[e] = static_cast<w_t>(part[0]);
}

at::Tensor routed_gather_cuda(const at::Tensor& kv_in, const at::Tensor& r_idx_in,
                              const std::optional<at::Tensor>& r_weight) {
  check_routed_gather(kv_in, r_idx_in, r_weight);
  const c10::cuda::OptionalCUDAGuard guard(kv_in.device());
  const at::Tensor kv = kv_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const int64_t n = kv.size(0), P = kv.size(1), W = kv.size(2), C = kv.size(3), T = idx.size(2);
  at::Tensor out = at::empty({n, P, T, W, C}, kv.options());
  if (out.numel() == 0) return out;
  const int64_t row = W * C;
  TOKRED_DISPATCH_FLOATS(kv.scalar_type(), "tokred_routed_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = r_weight.has_value()
                             ? r_weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous()
                             : at::Tensor();
    routed_gather_kernel<scalar_t, acc_t>
        <<<cuda::blocks_for(out.numel()), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            kv.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
            w.defined() ? w.data_ptr<acc_t>() : nullptr, P, T, row, out.numel(),
            out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> routed_gather_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& kv_in, const at::Tensor& r_idx_in,
    const std::optional<at::Tensor>& r_weight) {
  check_routed_gather_backward(grad_in, kv_in, r_idx_in, r_weight);
  const c10::cuda::OptionalCUDAGuard guard(kv_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor kv = kv_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const int64_t n = kv.size(0), P = kv.size(1), W = kv.size(2), C = kv.size(3), T = idx.size(2);
  const bool weighted = r_weight.has_value();
  at::Tensor grad_kv = at::empty_like(kv);
  at::Tensor grad_w =
      weighted ? at::zeros(r_weight->sizes(), r_weight->options()) : at::empty({0}, kv.options());
  if (kv.numel() == 0) return {grad_kv, grad_w};
  const int64_t row = W * C;
  const auto plan = build_plan(idx, P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  TOKRED_DISPATCH_FLOATS(kv.scalar_type(), "tokred_routed_gather_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using kv_t = scalar_t;
    const at::Tensor w =
        weighted ? r_weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
    routed_gather_grad_kv_kernel<kv_t, acc_t>
        <<<cuda::blocks_for(kv.numel()), cuda::kThreads, 0, stream>>>(
            grad.data_ptr<kv_t>(), std::get<0>(plan).data_ptr<int64_t>(),
            std::get<1>(plan).data_ptr<int64_t>(), weighted ? w.data_ptr<acc_t>() : nullptr, P, T,
            row, kv.numel(), grad_kv.data_ptr<kv_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!weighted || grad_w.numel() == 0) return;
    TOKRED_DISPATCH_FLOATS(grad_w.scalar_type(), "tokred_routed_gather_backward_cuda_w", [&] {
      routed_gather_grad_w_kernel<kv_t, acc_t, scalar_t>
          <<<static_cast<unsigned>(grad_w.numel()), 256, 0, stream>>>(
              grad.data_ptr<kv_t>(), kv.data_ptr<kv_t>(), idx.data_ptr<int64_t>(), P, T, row,
              grad_w.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_kv, grad_w};
}

// ------------------------------------------------------------------------ routed_attention

// Row in k / v of routed key kk of a query window of batch b (routing row ridx), or -1 for an
// r_idx entry outside [0, P) (asserted; the caller loads zeros).
__device__ __forceinline__ int64_t key_row(const int64_t* ridx, const Dims& d, int64_t b,
                                           int64_t kk) {
  const int64_t j = ridx[kk / d.WK];
  TOKRED_ASSERT_REGION(j, d.P);
  return routing::region_in_range(j, d.P) ? routing::routed_key_row(b, j, kk, d.P, d.WK) : -1;
}

// Loads routed keys [kk0, kk0 + kt) of query window (b, i), head h into shared memory:
// Ks [kKeyTile][DQ + 1] (padded against bank conflicts), Vs [kKeyTile][DV + 1].
template <typename scalar_t, typename acc_t>
__device__ void load_key_tile(const scalar_t* k, const scalar_t* v, const int64_t* ridx,
                              const Dims& d, int64_t b, int64_t h, int64_t kk0, int64_t kt,
                              acc_t* Ks, acc_t* Vs) {
  for (int64_t t = threadIdx.x; t < kt * d.DQ; t += blockDim.x) {
    const int64_t x = t / d.DQ, c = t % d.DQ, row = key_row(ridx, d, b, kk0 + x);
    Ks[x * (d.DQ + 1) + c] = row >= 0 ? static_cast<acc_t>(k[row * d.CQ + h * d.DQ + c]) : acc_t(0);
  }
  for (int64_t t = threadIdx.x; t < kt * d.DV; t += blockDim.x) {
    const int64_t x = t / d.DV, c = t % d.DV, row = key_row(ridx, d, b, kk0 + x);
    Vs[x * (d.DV + 1) + c] = row >= 0 ? static_cast<acc_t>(v[row * d.CV + h * d.DV + c]) : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot_smem(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += a[c] * b[c];
  return s;
}

// grid: x = (b, i, h) task, y = block of kRowsPerBlock query rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAttnThreads)
    routed_attention_fwd_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                const int64_t* idx, Dims d, acc_t scale, scalar_t* out,
                                acc_t* lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Vs = Ks + kKeyTile * (d.DQ + 1);
  acc_t* Qs = Vs + kKeyTile * (d.DV + 1);
  acc_t* Ps = Qs + kRowsPerBlock * d.DQ;  // [kWarps][kKeyTile]
  const int64_t task = blockIdx.x;
  const int64_t h = task % d.H, bi = task / d.H, b = bi / d.P;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t r0 = int64_t(blockIdx.y) * kRowsPerBlock;
  const int64_t* ridx = idx + bi * d.T;
  for (int64_t t = threadIdx.x; t < kRowsPerBlock * d.DQ; t += blockDim.x) {
    const int64_t rr = t / d.DQ, c = t % d.DQ, r = r0 + rr;
    Qs[t] =
        r < d.WQ ? static_cast<acc_t>(q[(bi * d.WQ + r) * d.CQ + h * d.DQ + c]) * scale : acc_t(0);
  }
  OnlineSoftmax<acc_t> st[kRowsPerWarp];
  acc_t acc[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    st[rr].init();
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) acc[rr][u] = 0;
  }
  const int64_t keys = d.T * d.WK;
  acc_t* P_w = Ps + warp * kKeyTile;
  for (int64_t kk0 = 0; kk0 < keys; kk0 += kKeyTile) {
    const int64_t kt = keys - kk0 < kKeyTile ? keys - kk0 : kKeyTile;
    __syncthreads();
    load_key_tile<scalar_t, acc_t>(k, v, ridx, d, b, h, kk0, kt, Ks, Vs);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t lr = warp * kRowsPerWarp + rr;
      if (r0 + lr >= d.WQ) break;  // warp-uniform
      const acc_t s = lane < kt ? dot_smem(Qs + lr * d.DQ, Ks + lane * (d.DQ + 1), d.DQ)
                                : routing::neg_inf<acc_t>();
      const acc_t alpha = st[rr].rescale(cuda::warp_allreduce(s, routing::NanMax{}));
      const acc_t p = lane < kt ? st[rr].weight(s) : acc_t(0);
      st[rr].l += cuda::warp_sum(p);
      P_w[lane] = p;
      __syncwarp();
      lane_accumulate(acc[rr], alpha, P_w, Vs, kt, d.DV + 1, d.DV, lane);
      __syncwarp();
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = r0 + warp * kRowsPerWarp + rr;
    if (r >= d.WQ) break;
    const acc_t inv = st[rr].inv_sum();
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) {
      const int64_t c = lane + int64_t(u) * kWarp;
      if (c >= d.DV) break;
      out[(bi * d.WQ + r) * d.CV + h * d.DV + c] = static_cast<scalar_t>(acc[rr][u] * inv);
    }
    if (lane == 0) lse[task * d.WQ + r] = st[rr].lse();
  }
}

// dq and D = rowsum(dO · O); same decomposition as the forward.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAttnThreads)
    routed_attention_dq_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                               const int64_t* idx, const scalar_t* go, const scalar_t* o,
                               const acc_t* lse, Dims d, acc_t scale, scalar_t* dq, acc_t* Dout) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Ks = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Vs = Ks + kKeyTile * (d.DQ + 1);
  acc_t* Qs = Vs + kKeyTile * (d.DV + 1);
  acc_t* Gs = Qs + kRowsPerBlock * d.DQ;  // dO rows
  acc_t* Ss = Gs + kRowsPerBlock * d.DV;  // [kWarps][kKeyTile] dS
  const int64_t task = blockIdx.x;
  const int64_t h = task % d.H, bi = task / d.H, b = bi / d.P;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t r0 = int64_t(blockIdx.y) * kRowsPerBlock;
  const int64_t* ridx = idx + bi * d.T;
  for (int64_t t = threadIdx.x; t < kRowsPerBlock * d.DQ; t += blockDim.x) {
    const int64_t rr = t / d.DQ, c = t % d.DQ, r = r0 + rr;
    Qs[t] =
        r < d.WQ ? static_cast<acc_t>(q[(bi * d.WQ + r) * d.CQ + h * d.DQ + c]) * scale : acc_t(0);
  }
  for (int64_t t = threadIdx.x; t < kRowsPerBlock * d.DV; t += blockDim.x) {
    const int64_t rr = t / d.DV, c = t % d.DV, r = r0 + rr;
    Gs[t] = r < d.WQ ? static_cast<acc_t>(go[(bi * d.WQ + r) * d.CV + h * d.DV + c]) : acc_t(0);
  }
  __syncthreads();
  acc_t Drow[kRowsPerWarp], lrow[kRowsPerWarp];
  acc_t acc[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t lr = warp * kRowsPerWarp + rr, r = r0 + lr;
    acc_t part = 0;
    if (r < d.WQ) {
      for (int64_t c = lane; c < d.DV; c += kWarp)
        part += Gs[lr * d.DV + c] * static_cast<acc_t>(o[(bi * d.WQ + r) * d.CV + h * d.DV + c]);
    }
    Drow[rr] = cuda::warp_sum(part);
    lrow[rr] = r < d.WQ ? lse[task * d.WQ + r] : acc_t(0);
    if (r < d.WQ && lane == 0) Dout[task * d.WQ + r] = Drow[rr];
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) acc[rr][u] = 0;
  }
  const int64_t keys = d.T * d.WK;
  acc_t* S_w = Ss + warp * kKeyTile;
  for (int64_t kk0 = 0; kk0 < keys; kk0 += kKeyTile) {
    const int64_t kt = keys - kk0 < kKeyTile ? keys - kk0 : kKeyTile;
    __syncthreads();
    load_key_tile<scalar_t, acc_t>(k, v, ridx, d, b, h, kk0, kt, Ks, Vs);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t lr = warp * kRowsPerWarp + rr;
      if (r0 + lr >= d.WQ) break;
      acc_t ds = 0;
      if (lane < kt) {
        const acc_t s = dot_smem(Qs + lr * d.DQ, Ks + lane * (d.DQ + 1), d.DQ);
        const acc_t dp = dot_smem(Gs + lr * d.DV, Vs + lane * (d.DV + 1), d.DV);
        ds = routing::score_grad(routing::prob_from_lse(s, lrow[rr]), dp, Drow[rr]) * scale;
      }
      S_w[lane] = ds;
      __syncwarp();
      lane_accumulate(acc[rr], acc_t(1), S_w, Ks, kt, d.DQ + 1, d.DQ, lane);
      __syncwarp();
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = r0 + warp * kRowsPerWarp + rr;
    if (r >= d.WQ) break;
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) {
      const int64_t c = lane + int64_t(u) * kWarp;
      if (c >= d.DQ) break;
      dq[(bi * d.WQ + r) * d.CQ + h * d.DQ + c] = static_cast<scalar_t>(acc[rr][u]);
    }
  }
}

// dk, dv: grid x = (b, j, h) task, y = block of kRowsPerBlock key rows of window j. Query rows
// of the windows routed to j stream through shared memory in tiles of kKeyTile (lane = query).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kAttnThreads)
    routed_attention_dkv_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                const scalar_t* go, const acc_t* lse, const acc_t* Dbuf,
                                const int64_t* order, const int64_t* offsets, Dims d, acc_t scale,
                                scalar_t* dk, scalar_t* dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);  // [kKeyTile][DQ + 1]
  acc_t* Gs = Qs + kKeyTile * (d.DQ + 1);          // [kKeyTile][DV + 1]
  acc_t* Ks = Gs + kKeyTile * (d.DV + 1);          // [kRowsPerBlock][DQ]
  acc_t* Vs = Ks + kRowsPerBlock * d.DQ;           // [kRowsPerBlock][DV]
  acc_t* Ls = Vs + kRowsPerBlock * d.DV;           // [kKeyTile] lse
  acc_t* Ds = Ls + kKeyTile;                       // [kKeyTile] D
  acc_t* Ws = Ds + kKeyTile;                       // [kWarps][2][kKeyTile] p, dS
  const int64_t task = blockIdx.x;
  const int64_t h = task % d.H, bj = task / d.H, b = bj / d.P, j = bj % d.P;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t x0 = int64_t(blockIdx.y) * kRowsPerBlock;
  for (int64_t t = threadIdx.x; t < kRowsPerBlock * d.DQ; t += blockDim.x) {
    const int64_t xx = t / d.DQ, c = t % d.DQ, x = x0 + xx;
    Ks[t] = x < d.WK ? static_cast<acc_t>(k[(bj * d.WK + x) * d.CQ + h * d.DQ + c]) : acc_t(0);
  }
  for (int64_t t = threadIdx.x; t < kRowsPerBlock * d.DV; t += blockDim.x) {
    const int64_t xx = t / d.DV, c = t % d.DV, x = x0 + xx;
    Vs[t] = x < d.WK ? static_cast<acc_t>(v[(bj * d.WK + x) * d.CV + h * d.DV + c]) : acc_t(0);
  }
  acc_t dka[kRowsPerWarp][kMaxPerLane], dva[kRowsPerWarp][kMaxPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) dka[rr][u] = dva[rr][u] = 0;
  }
  acc_t* P_w = Ws + warp * 2 * kKeyTile;
  acc_t* S_w = P_w + kKeyTile;
  const int64_t* off = offsets + b * (d.P + 1);
  for (int64_t s = off[j]; s < off[j + 1]; ++s) {
    const int64_t i = order[b * d.P * d.T + s] / d.T;
    const int64_t bi = b * d.P + i;
    for (int64_t y0 = 0; y0 < d.WQ; y0 += kKeyTile) {
      const int64_t yt = d.WQ - y0 < kKeyTile ? d.WQ - y0 : kKeyTile;
      __syncthreads();
      for (int64_t t = threadIdx.x; t < yt * d.DQ; t += blockDim.x) {
        const int64_t y = t / d.DQ, c = t % d.DQ;
        Qs[y * (d.DQ + 1) + c] =
            static_cast<acc_t>(q[(bi * d.WQ + y0 + y) * d.CQ + h * d.DQ + c]) * scale;
      }
      for (int64_t t = threadIdx.x; t < yt * d.DV; t += blockDim.x) {
        const int64_t y = t / d.DV, c = t % d.DV;
        Gs[y * (d.DV + 1) + c] = static_cast<acc_t>(go[(bi * d.WQ + y0 + y) * d.CV + h * d.DV + c]);
      }
      for (int64_t y = threadIdx.x; y < yt; y += blockDim.x) {
        const int64_t lrow = (bi * d.H + h) * d.WQ + y0 + y;
        Ls[y] = lse[lrow];
        Ds[y] = Dbuf[lrow];
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int64_t lx = warp * kRowsPerWarp + rr;
        if (x0 + lx >= d.WK) break;
        acc_t p = 0, ds = 0;
        if (lane < yt) {
          // Qs holds q·scale: dk = Σ dS (q·scale), so dS carries no scale here.
          const acc_t sc = dot_smem(Qs + lane * (d.DQ + 1), Ks + lx * d.DQ, d.DQ);
          const acc_t dp = dot_smem(Gs + lane * (d.DV + 1), Vs + lx * d.DV, d.DV);
          p = routing::prob_from_lse(sc, Ls[lane]);
          ds = routing::score_grad(p, dp, Ds[lane]);
        }
        P_w[lane] = p;
        S_w[lane] = ds;
        __syncwarp();
        lane_accumulate(dva[rr], acc_t(1), P_w, Gs, yt, d.DV + 1, d.DV, lane);
        lane_accumulate(dka[rr], acc_t(1), S_w, Qs, yt, d.DQ + 1, d.DQ, lane);
        __syncwarp();
      }
    }
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t x = x0 + warp * kRowsPerWarp + rr;
    if (x >= d.WK) break;
#pragma unroll
    for (int u = 0; u < kMaxPerLane; ++u) {
      const int64_t c = lane + int64_t(u) * kWarp;
      if (c < d.DQ) dk[(bj * d.WK + x) * d.CQ + h * d.DQ + c] = static_cast<scalar_t>(dka[rr][u]);
      if (c < d.DV) dv[(bj * d.WK + x) * d.CV + h * d.DV + c] = static_cast<scalar_t>(dva[rr][u]);
    }
  }
}

template <typename acc_t>
size_t fwd_smem(const Dims& d) {
  return sizeof(acc_t) *
         (kKeyTile * (d.DQ + 1) + kKeyTile * (d.DV + 1) + kRowsPerBlock * d.DQ + kWarps * kKeyTile);
}

template <typename acc_t>
size_t dq_smem(const Dims& d) {
  return sizeof(acc_t) * (kKeyTile * (d.DQ + 1) + kKeyTile * (d.DV + 1) +
                          kRowsPerBlock * (d.DQ + d.DV) + kWarps * kKeyTile);
}

template <typename acc_t>
size_t dkv_smem(const Dims& d) {
  return sizeof(acc_t) * (kKeyTile * (d.DQ + 1) + kKeyTile * (d.DV + 1) +
                          kRowsPerBlock * (d.DQ + d.DV) + 2 * kKeyTile + kWarps * 2 * kKeyTile);
}

std::tuple<at::Tensor, at::Tensor> routed_attention_cuda(const at::Tensor& q_in,
                                                         const at::Tensor& k_in,
                                                         const at::Tensor& v_in,
                                                         const at::Tensor& r_idx_in,
                                                         int64_t num_heads, double scale) {
  const char* op = "routed_attention";
  check_routed_attention(q_in, k_in, v_in, r_idx_in, num_heads, op);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const Dims d = dims_of(q, v, idx, num_heads);
  check_cuda_head_dims(d, op);
  at::Tensor out = at::empty({d.n, d.P, d.WQ, d.CV}, q.options());
  at::Tensor lse =
      at::empty({d.n, d.P, d.H, d.WQ}, q.options().dtype(routing_lse_dtype(q.scalar_type())));
  const int64_t tasks = d.n * d.P * d.H;
  if (tasks == 0 || d.WQ == 0) return {out, lse};
  const dim3 grid(static_cast<unsigned>(tasks),
                  static_cast<unsigned>(ceil_div(d.WQ, kRowsPerBlock)));
  TOKRED_DISPATCH_FLOATS(q.scalar_type(), "tokred_routed_attention_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = fwd_smem<acc_t>(d);
    auto kernel = routed_attention_fwd_kernel<scalar_t, acc_t>;
    cuda::allow_dynamic_smem(kernel, smem, q.get_device());
    kernel<<<grid, kAttnThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        idx.data_ptr<int64_t>(), d, static_cast<acc_t>(scale), out.data_ptr<scalar_t>(),
        lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& r_idx_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, int64_t num_heads, double scale) {
  const char* op = "_routed_attention_backward";
  check_routed_attention_backward(grad_in, q_in, k_in, v_in, r_idx_in, out_in, lse_in, num_heads);
  const c10::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_in.contiguous(), o = out_in.contiguous(), lse = lse_in.contiguous();
  const at::Tensor idx = as_int64(r_idx_in);
  const Dims d = dims_of(q, v, idx, num_heads);
  check_cuda_head_dims(d, op);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t tasks = d.n * d.P * d.H;
  if (tasks == 0) return {dq, dk, dv};
  at::Tensor Dbuf = at::empty_like(lse);
  const auto plan = build_plan(idx, d.P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  TOKRED_DISPATCH_FLOATS(q.scalar_type(), "tokred_routed_attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (d.WQ > 0) {
      const size_t smem = dq_smem<acc_t>(d);
      auto kernel = routed_attention_dq_kernel<scalar_t, acc_t>;
      cuda::allow_dynamic_smem(kernel, smem, q.get_device());
      const dim3 grid(static_cast<unsigned>(tasks),
                      static_cast<unsigned>(ceil_div(d.WQ, kRowsPerBlock)));
      kernel<<<grid, kAttnThreads, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          idx.data_ptr<int64_t>(), go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
          lse.data_ptr<acc_t>(), d, static_cast<acc_t>(scale), dq.data_ptr<scalar_t>(),
          Dbuf.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (d.WK > 0) {
      const size_t smem = dkv_smem<acc_t>(d);
      auto kernel = routed_attention_dkv_kernel<scalar_t, acc_t>;
      cuda::allow_dynamic_smem(kernel, smem, q.get_device());
      const dim3 grid(static_cast<unsigned>(tasks),
                      static_cast<unsigned>(ceil_div(d.WK, kRowsPerBlock)));
      kernel<<<grid, kAttnThreads, smem, stream>>>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
          go.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), Dbuf.data_ptr<acc_t>(),
          std::get<0>(plan).data_ptr<int64_t>(), std::get<1>(plan).data_ptr<int64_t>(), d,
          static_cast<acc_t>(scale), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokred, CUDA, m) {
  m.impl("routed_gather", TORCH_FN(routed_gather_cuda));
  m.impl("_routed_gather_backward", TORCH_FN(routed_gather_backward_cuda));
  m.impl("routed_attention", TORCH_FN(routed_attention_cuda));
  m.impl("_routed_attention_backward", TORCH_FN(routed_attention_backward_cuda));
}

}  // namespace tokred
