// tokred's CPU SIMD toolkit: fixed-width vectors (GCC / Clang vector extensions), their loads,
// stores and lane reductions, sums of squares, first maxima, a vectorised exp, and two blocked
// row kernels (scores a·bᵀ and weighted row sums w·B) built on them. The routing kernels
// (cpu/routing.cpp), ToMe's matching (cpu/merge.cpp) and EViT's fused token (cpu/select.cpp) use
// it.
//
// Every operation is element-wise multiplies and adds: each lane does the scalar operations in
// the scalar order, so each target clone and every thread count gives the same bits. Including
// this header turns FMA contraction off for the rest of the translation unit; only an entry point
// marked TOKRED_FMA_TARGET fuses (every multiply that feeds an add, as the compiler finds them),
// and it runs only where fused_multiply_add() says so (cpu/fma.h).
//
// Templates here are always inlined; GCC cannot clone templates for several targets, so a .cpp
// defines the entry points (TOKRED_VEC_DOT_ROWS and TOKRED_VEC_AXPY_ROWS below, and its own).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/routing.h"

#if !defined(__GNUC__)
#error "tokred's CPU SIMD toolkit (cpu/vec.h) uses GCC / Clang vector extensions"
#endif

#define TOKRED_INLINE inline __attribute__((always_inline))
// Vectors are passed by value only between always-inline helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
// No a * b + c fused into an FMA (the AVX-512 clones, or targets with FMA in the baseline).
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

// x86-64 GCC builds clone the kernels for AVX-512 and AVX2 (picked at load time) and use 32-byte
// vectors, whose lane count decides the order of the softmax's row sums; elsewhere the vectors
// are the baseline's 16 bytes. (The x86 baseline clone lowers 32-byte vectors poorly; it only
// runs on CPUs without AVX2.)
#if defined(__x86_64__) && !defined(__clang__)
#define TOKRED_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define TOKRED_VEC_BYTES 32
#else
#define TOKRED_SIMD_CLONES
#define TOKRED_VEC_BYTES 16
#endif

namespace tokred {
namespace vec {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(TOKRED_VEC_BYTES)));
  typedef float unaligned __attribute__((vector_size(TOKRED_VEC_BYTES), aligned(4), may_alias));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(TOKRED_VEC_BYTES)));
  typedef double unaligned __attribute__((vector_size(TOKRED_VEC_BYTES), aligned(8), may_alias));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
using VecU = typename VecOf<T>::unaligned;  // for loads and stores at any element address

// Signed integer lanes as wide as T's, one per lane of Vec<T> (the type of Vec<T>'s comparisons).
template <typename T>
struct IndexVecOf;
template <>
struct IndexVecOf<float> {
  typedef int32_t type __attribute__((vector_size(TOKRED_VEC_BYTES)));
};
template <>
struct IndexVecOf<double> {
  typedef int64_t type __attribute__((vector_size(TOKRED_VEC_BYTES)));
};
template <typename T>
using IndexVec = typename IndexVecOf<T>::type;

template <typename T>
constexpr int64_t kLanes = int64_t(TOKRED_VEC_BYTES / sizeof(T));

constexpr int64_t kRows = 4;  // rows of a per dot_rows / axpy_rows block

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
TOKRED_INLINE Vec<T> vload(const T* p) {
  return *reinterpret_cast<const VecU<T>*>(p);
}

template <typename T>
TOKRED_INLINE void vstore(T* p, const Vec<T>& v) {
  *reinterpret_cast<VecU<T>*>(p) = v;
}

template <typename T>
TOKRED_INLINE Vec<T> vsplat(T s) {
  Vec<T> v;
  for (int64_t l = 0; l < kLanes<T>; ++l) v[l] = s;
  return v;
}

// Sum of the lanes as a fixed pairwise tree.
template <typename T>
TOKRED_INLINE T vsum(Vec<T> v) {
  for (int64_t w = kLanes<T> / 2; w >= 1; w /= 2) {
    for (int64_t l = 0; l < w; ++l) v[l] += v[l + w];
  }
  return v[0];
}

template <typename T>
TOKRED_INLINE T vmax(const Vec<T>& v) {
  T m = v[0];
  for (int64_t l = 1; l < kLanes<T>; ++l) m = routing::nan_max(m, v[l]);
  return m;
}

// out[j] = (a[j] · s) · b[j] for j in [0, n), the products in that order.
template <typename T>
TOKRED_INLINE void scaled_products(const T* a, T s, const T* b, int64_t n, T* out) {
  int64_t j = 0;
  for (; j + kLanes<T> <= n; j += kLanes<T>) vstore(out + j, (vload(a + j) * s) * vload(b + j));
  for (; j < n; ++j) out[j] = (a[j] * s) * b[j];
}

// Σ x[i]² for i in [0, n): lane l sums i ≡ l (mod lanes) in ascending order, the lanes meet in
// vsum's tree, then the tail in order.
template <typename T>
TOKRED_INLINE T sum_squares(const T* x, int64_t n) {
  Vec<T> acc = vsplat(T(0));
  int64_t i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) {
    const Vec<T> v = vload(x + i);
    acc += v * v;
  }
  T s = vsum<T>(acc);
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// The first maximum of s[0..n), n >= 1: its value and its index, the first j with s[j] equal to
// the maximum (so a -0 before a +0 is the one found). Returns false (and best, best_j
// unspecified) where s holds a NaN, whose ordering the caller's scalar rule decides. Each lane
// keeps its own first maximum; the lanes then pick the largest value at the lowest index.
template <typename T>
TOKRED_INLINE bool first_max_without_nan(const T* s, int64_t n, T& best, int64_t& best_j) {
  using V = Vec<T>;
  using I = IndexVec<T>;
  best = s[0];
  best_j = 0;
  bool nan = s[0] != s[0];
  int64_t j = 1;
  if (n >= kLanes<T> && n <= int64_t(INT32_MAX)) {
    V vm = vload(s);
    I im, at;
    for (int64_t l = 0; l < kLanes<T>; ++l) im[l] = at[l] = l;
    auto bad = vm != vm;
    for (j = kLanes<T>; j + kLanes<T> <= n; j += kLanes<T>) {
      const V v = vload(s + j);
      at += kLanes<T>;
      bad |= v != v;
      const auto larger = v > vm;
      vm = larger ? v : vm;
      im = larger ? at : im;
    }
    best = vm[0];
    best_j = im[0];
    for (int64_t l = 0; l < kLanes<T>; ++l) {
      nan |= bad[l] != 0;
      if (vm[l] > best || (vm[l] == best && im[l] < best_j)) {
        best = vm[l];
        best_j = im[l];
      }
    }
  }
  for (; j < n; ++j) {
    nan |= s[j] != s[j];
    if (s[j] > best) {
      best = s[j];
      best_j = j;
    }
  }
  return !nan;
}

// exp for the softmax arguments (x <= 0 in practice): Cody-Waite reduction x = n ln2 + r and
// Cephes' degree-6 polynomial (about 1 ulp), times 2^n written into the exponent bits. Plain
// arithmetic, so it vectorises and is the same on every build; x < -87.3 (and -inf) gives 0,
// NaN stays NaN. glibc's expf is a scalar call and its bits depend on the CPU it picks.
TOKRED_INLINE Vec<float> vexp(Vec<float> x) {
  typedef int32_t VI __attribute__((vector_size(TOKRED_VEC_BYTES)));
  const Vec<float> hi = vsplat(88.3762626647949f), lo = vsplat(-87.3365447504f);
  const Vec<float> xc = x > hi ? hi : x;
  const Vec<float> n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec<float> y = (p * (r * r) + r) + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  return x < lo ? vsplat(0.0f) : y * (Vec<float>)e;
}

// Doubles keep libm's exp (the float64 tests compare at 1e-10).
TOKRED_INLINE Vec<double> vexp(Vec<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

// out[r][x] = Σ_c a[r][c] · bT[c][x] for kRows rows of a (stride lda), x in
// [x0, x0 + NV·lanes), c ascending. NV vectors per row: 4·NV accumulators stay in registers.
template <typename T, int NV>
TOKRED_INLINE void dot_rows_block(const T* a, int64_t lda, int64_t C, const T* bT, int64_t ldb,
                                  T* out, int64_t ldo) {
  using V = Vec<T>;
  V s[kRows][NV] = {};
  for (int64_t c = 0; c < C; ++c) {
    V bv[NV];
    for (int u = 0; u < NV; ++u) bv[u] = vload(bT + c * ldb + u * kLanes<T>);
    for (int r = 0; r < kRows; ++r) {
      const T ar = a[r * lda + c];
      for (int u = 0; u < NV; ++u) s[r][u] += bv[u] * ar;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int u = 0; u < NV; ++u) vstore(out + r * ldo + u * kLanes<T>, s[r][u]);
  }
}

// dot_rows_block over x < nx (a multiple of the lane count).
template <typename T>
TOKRED_INLINE void dot_rows_impl(const T* a, int64_t lda, int64_t C, const T* bT, int64_t ldb,
                                 int64_t nx, T* out, int64_t ldo) {
  int64_t x = 0;
  for (; x + 2 * kLanes<T> <= nx; x += 2 * kLanes<T>)
    dot_rows_block<T, 2>(a, lda, C, bT + x, ldb, out + x, ldo);
  for (; x < nx; x += kLanes<T>) dot_rows_block<T, 1>(a, lda, C, bT + x, ldb, out + x, ldo);
}

// o[r][c] += Σ_{x < X} w[r·wr + x·wx] · brow[x][c] for R rows of o (stride ldo) and c in
// [c0, c0 + NV·lanes), x ascending.
template <typename T, int R, int NV>
TOKRED_INLINE void axpy_rows_block(const T* w, int64_t wr, int64_t wx, const T* const* brow,
                                   int64_t X, int64_t c0, T* o, int64_t ldo) {
  using V = Vec<T>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) acc[r][u] = vload(o + r * ldo + c0 + u * kLanes<T>);
  }
  for (int64_t x = 0; x < X; ++x) {
    V bv[NV];
    for (int u = 0; u < NV; ++u) bv[u] = vload(brow[x] + c0 + u * kLanes<T>);
    for (int r = 0; r < R; ++r) {
      const T wv = w[r * wr + x * wx];
      for (int u = 0; u < NV; ++u) acc[r][u] += bv[u] * wv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < NV; ++u) vstore(o + r * ldo + c0 + u * kLanes<T>, acc[r][u]);
  }
}

// axpy_rows_block over all c < C (the last C mod lanes columns in scalar code, same order).
template <typename T, int R>
TOKRED_INLINE void axpy_rows_impl(const T* w, int64_t wr, int64_t wx, const T* const* brow,
                                  int64_t X, int64_t C, T* o, int64_t ldo) {
  int64_t c = 0;
  for (; c + 2 * kLanes<T> <= C; c += 2 * kLanes<T>)
    axpy_rows_block<T, R, 2>(w, wr, wx, brow, X, c, o, ldo);
  for (; c + kLanes<T> <= C; c += kLanes<T>)
    axpy_rows_block<T, R, 1>(w, wr, wx, brow, X, c, o, ldo);
  for (; c < C; ++c) {
    for (int r = 0; r < R; ++r) {
      T acc = o[r * ldo + c];
      for (int64_t x = 0; x < X; ++x) acc += brow[x][c] * w[r * wr + x * wx];
      o[r * ldo + c] = acc;
    }
  }
}

// axpy_rows_impl over `rows` rows of o, kRows at a time.
template <typename T>
TOKRED_INLINE void axpy_rows_all(const T* w, int64_t wr, int64_t wx, const T* const* brow,
                                 int64_t X, int64_t C, int64_t rows, T* o, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const T* wb = w + r0 * wr;
    T* ob = o + r0 * ldo;
    switch (std::min(kRows, rows - r0)) {
      case 1:
        axpy_rows_impl<T, 1>(wb, wr, wx, brow, X, C, ob, ldo);
        break;
      case 2:
        axpy_rows_impl<T, 2>(wb, wr, wx, brow, X, C, ob, ldo);
        break;
      case 3:
        axpy_rows_impl<T, 3>(wb, wr, wx, brow, X, C, ob, ldo);
        break;
      default:
        axpy_rows_impl<T, 4>(wb, wr, wx, brow, X, C, ob, ldo);
        break;
    }
  }
}

}  // namespace vec
}  // namespace tokred

// Entry points for accumulator type T under ATTRS (TOKRED_SIMD_CLONES, or TOKRED_FMA_TARGET for
// a fused variant); expand each once per type and variant in the .cpp that calls it.
// dot_rows: kRows-row blocks of a·bᵀ (routing's scores, ToMe's matching).
#define TOKRED_VEC_DOT_ROWS(T, ATTRS)                                                           \
  ATTRS void dot_rows(const T* a, int64_t lda, int64_t C, const T* bT, int64_t ldb, int64_t nx, \
                      T* out, int64_t ldo) {                                                    \
    ::tokred::vec::dot_rows_impl<T>(a, lda, C, bT, ldb, nx, out, ldo);                          \
  }
// axpy_rows: rows of o += w·B, any row count (routing's weighted values).
#define TOKRED_VEC_AXPY_ROWS(T, ATTRS)                                                      \
  ATTRS void axpy_rows(const T* w, int64_t wr, int64_t wx, const T* const* brow, int64_t X, \
                       int64_t C, int64_t rows, T* o, int64_t ldo) {                        \
    ::tokred::vec::axpy_rows_all<T>(w, wr, wx, brow, X, C, rows, o, ldo);                   \
  }
