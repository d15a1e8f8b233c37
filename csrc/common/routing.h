// BiFormer routed attention: what the CPU and the CUDA kernels share. Both use Dims, the index
// math (window_row, split_routed_key; routed_key_row on CUDA), region_in_range and the online
// softmax's state (OnlineSoftmax: rescale, lse, inv_sum; nan_max). They differ in the exp: the
// CUDA kernels call acc_exp (expf / exp) through OnlineSoftmax::weight and prob_from_lse, the CPU
// kernels a vectorised polynomial (vec::vexp in cpu/vec.h) on whole tiles, so CPU and CUDA agree
// within a tolerance, not bitwise. prob_from_lse and score_grad are the CUDA kernels' scalar form;
// cpu/routing.cpp's probs_grads_row is the same formula on vectors.
//
// Layout (all contiguous): q [n, P, wq, cqk], k [n, P, wk, cqk], v [n, P, wk, cv],
// r_idx [n, P, T] (T = topk). Query window (b, i) attends to the T·wk keys of the windows
// r_idx[b, i, 0..T) in routing order; the key at position kk of that sequence is row
// kk % wk of window r_idx[b, i, kk / wk]. Heads are contiguous channel chunks.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/hd.h"

namespace tokred {
namespace routing {

// Sizes of one routed_attention call (dims_of in common/routing_args.h fills it): n images of P
// windows, WQ query rows and WK key rows per window, T routed windows per query window, H heads;
// CQ = H·DQ channels of q and k, CV = H·DV of v. Passed by value to the CUDA kernels.
struct Dims {
  int64_t n, P, WQ, WK, T, H, CQ, CV, DQ, DV;
};

// Row index (in units of rows of length c) of row r of window j in batch b.
TOKRED_HD int64_t window_row(int64_t b, int64_t j, int64_t r, int64_t P, int64_t w) {
  return (b * P + j) * w + r;
}

// Splits position kk of a routed key sequence into its routing slot and its row in the window.
TOKRED_HD void split_routed_key(int64_t kk, int64_t wk, int64_t& slot, int64_t& row) {
  slot = kk / wk;
  row = kk - slot * wk;
}

// The key at position kk of query window (b, i)'s routed sequence: its row in a contiguous k / v,
// given the routed window j = r_idx[b, i, kk / wk].
TOKRED_HD int64_t routed_key_row(int64_t b, int64_t j, int64_t kk, int64_t P, int64_t wk) {
  int64_t slot, row;
  split_routed_key(kk, wk, slot, row);
  return window_row(b, j, row, P, wk);
}

TOKRED_HD bool region_in_range(int64_t j, int64_t P) { return j >= 0 && j < P; }

TOKRED_HD float acc_exp(float x) { return ::expf(x); }
TOKRED_HD double acc_exp(double x) { return ::exp(x); }
TOKRED_HD float acc_log(float x) { return ::logf(x); }
TOKRED_HD double acc_log(double x) { return ::log(x); }

template <typename acc_t>
TOKRED_HD acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Running state of one query row's softmax: max m and sum l of exp(s - m); scored: whether the
// row has keys (a tile reached rescale), which tells a row without keys (topk = 0: output 0) from
// one whose every score is -inf (the reference's softmax: NaN).
template <typename acc_t>
struct OnlineSoftmax {
  acc_t m;
  acc_t l;
  bool scored;

  TOKRED_HD void init() {
    m = neg_inf<acc_t>();
    l = acc_t(0);
    scored = false;
  }

  // Moves to the new max max(m, tile_max). Returns the factor the running sum and the output
  // accumulator must be multiplied by. Keeps all-(-inf) rows finite (factor 1, sum 0). A NaN
  // score (tile_max is NaN: callers take a NaN-propagating max) makes the whole row NaN, as
  // softmax does: m, l and the factor become NaN and stay so.
  TOKRED_HD acc_t rescale(acc_t tile_max) {
    scored = true;
    if (tile_max != tile_max || m != m) {
      m = l = tile_max != tile_max ? tile_max : m;
      return m;
    }
    const acc_t m_new = tile_max > m ? tile_max : m;
    acc_t alpha = acc_t(1);
    if (m_new != m) alpha = (m == neg_inf<acc_t>()) ? acc_t(0) : acc_exp(m - m_new);
    m = m_new;
    l *= alpha;
    return alpha;
  }

  // Probability weight of a score under the current max (before normalisation).
  TOKRED_HD acc_t weight(acc_t s) const {
    return m == neg_inf<acc_t>() ? acc_t(0) : acc_exp(s - m);
  }

  // Log-sum-exp of the scores seen: the softmax normaliser saved for the backward. NaN for a row
  // with a NaN score, +inf for one with +inf (as torch.logsumexp), -inf for a row without keys.
  TOKRED_HD acc_t lse() const {
    if (m != m || m == -neg_inf<acc_t>()) return m;  // a NaN score; else +inf (torch.logsumexp)
    if (l != l) return l;
    return l > acc_t(0) ? m + acc_log(l) : neg_inf<acc_t>();
  }

  // 1 / l, to normalise the output; 0 for a row without keys (its output is 0), NaN for NaN
  // and for a row whose every score is -inf.
  TOKRED_HD acc_t inv_sum() const {
    if (l != l) return l;
    if (l > acc_t(0)) return acc_t(1) / l;
    return scored ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
  }
};

// max that propagates NaN (a plain a > b ? a : b drops a NaN b), for the row maxima above.
template <typename acc_t>
TOKRED_HD acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || b != b) ? b : a;
}

// nan_max as a function object, for reductions that take the combine op (cuda::warp_allreduce).
struct NanMax {
  template <typename acc_t>
  TOKRED_HD acc_t operator()(acc_t a, acc_t b) const {
    return nan_max(a, b);
  }
};

// Backward: the probability of a score given the row's saved log-sum-exp. Only rows with keys
// reach it, so lse = -inf means every score was -inf: the forward's softmax was NaN.
template <typename acc_t>
TOKRED_HD acc_t prob_from_lse(acc_t s, acc_t lse) {
  return lse == neg_inf<acc_t>() ? std::numeric_limits<acc_t>::quiet_NaN() : acc_exp(s - lse);
}

// Backward: gradient of a score, dS = P · (dP − D) with D = Σ dO·O over the row.
template <typename acc_t>
TOKRED_HD acc_t score_grad(acc_t p, acc_t dp, acc_t D) {
  return p * (dp - D);
}

}  // namespace routing
}  // namespace tokred
