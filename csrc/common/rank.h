// The tie rule and the per-row rank, written once for the CPU and the CUDA kernels.
//
// tokred's order is total: by value (NaN ranks above +inf, as in torch.topk), and between equal
// values the lower index comes first. So every selection is bitwise deterministic, unlike
// torch.topk whose tie order is unspecified.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TOKRED_HD __host__ __device__ __forceinline__
#else
#define TOKRED_HD inline
#endif

namespace tokred {

// True if (a at index ia) is selected before (b at index ib). T is float or double.
template <typename T>
TOKRED_HD bool comes_before(T a, int64_t ia, T b, int64_t ib, bool largest) {
  const bool a_nan = a != a;
  const bool b_nan = b != b;
  if (a_nan || b_nan) {
    if (a_nan && b_nan) return ia < ib;
    return largest ? a_nan : b_nan;  // NaN is the largest value
  }
  if (a != b) return largest ? a > b : a < b;
  return ia < ib;
}

// Rank of entry i among the first n entries of a row: how many entries come before it.
// O(n); the CUDA kernels give each entry its own thread, which makes top-k sort-free.
template <typename T>
TOKRED_HD int64_t rank_in_row(const T* row, int64_t n, int64_t i, bool largest) {
  const T v = row[i];
  int64_t r = 0;
  for (int64_t j = 0; j < n; ++j) r += comes_before(row[j], j, v, i, largest) ? 1 : 0;
  return r;
}

}  // namespace tokred
