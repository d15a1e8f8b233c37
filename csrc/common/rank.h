// tokred's selection order, in two forms kept in one place: comes_before / rank_in_row, the
// counting rank of the CUDA kernels (select.cu, merge.cu), and order_key / order_key32, the
// integer sort keys of the CPU kernels (cpu/select.cpp). They encode the same order (tests/simt
// compares the backends on ties, NaN and +-0); change them together.
//
// tokred's order is total: by value (NaN ranks above +inf, as in torch.topk), and between equal
// values the lower index comes first. So every selection is bitwise deterministic, unlike
// torch.topk whose tie order is unspecified.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/hd.h"

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

// An unsigned key whose ascending order is the selection order of the values (before the index
// tie-break): equal values get equal keys (-0 and +0 too), NaN gets the key after +inf when
// largest is false and the first key when it is true. Integer compares make sorts fast. U is
// F's bit width; nan_bits is F's canonical quiet NaN, which every NaN becomes.
template <typename U, typename F>
TOKRED_HD U float_order_key(F v, bool largest, U nan_bits) {
  U bits;
  if (v != v) {
    bits = nan_bits;
  } else if (v == F(0)) {
    bits = 0;  // -0 == +0
  } else {
    memcpy(&bits, &v, sizeof(bits));
  }
  const U sign = U(1) << (8 * sizeof(U) - 1);
  const U key = (bits & sign) ? U(~bits) : U(bits | sign);  // ascending in v
  return largest ? U(~key) : key;
}

TOKRED_HD uint64_t order_key(double v, bool largest) {
  return float_order_key<uint64_t>(v, largest, 0x7FF8000000000000ULL);
}

// order_key for values that are exactly floats (float, half, bfloat16 rows): 32 bits, the same
// order, so a radix sort needs four 8-bit passes instead of eight.
TOKRED_HD uint32_t order_key32(float v, bool largest) {
  return float_order_key<uint32_t>(v, largest, 0x7FC00000u);
}

}  // namespace tokred
