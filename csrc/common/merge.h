// ToMe's bipartite matching and merge plan: the rules of both backends, stated in one place.
//
// Both the CPU and the CUDA kernels call the layout (tome_dims, tome_unm_out, tome_dst_out, ...),
// the plan check (tome_plan_fault) and the merge-mode rules (tome_accumulate, tome_finish,
// tome_grad_coef, ...). The matching rules are called as written by CUDA only (tome_score,
// tome_excluded, tome_argmax_step, tome_slot). The CPU re-implements them in vector form (vec.h
// row scoring, a std::sort by comes_before, one ascending slot pass) and calls tome_argmax_step
// only for rows holding NaN. tests/simt/test_diff_merge.py compares its matches bitwise with the
// CUDA kernel's (ties and NaN included) on metrics whose dot products are exact, and
// tests/test_merge.py with the tie rule itself. On other metrics the backends round differently
// (the CPU's vector sums, the GPU's fused multiply-adds), so a near-tie may pick another partner.
//
// A sequence of N tokens is split by position: set A = even positions (A[a] = token 2a), set B =
// odd positions (B[j] = token 2j + 1). The first P tokens (the model's prefix: class,
// distillation and register tokens; P = num_protected) never merge: their A rows and B columns
// are excluded from matching. A match picks r A tokens (sources) and, for each, its most similar
// B token (destination). The merged sequence has N - r tokens laid out as
//   [the P prefix tokens (in order) | other unmerged A tokens (unm_idx order) | other B tokens]
// which is upstream's [unm | B] for P <= 1 and upstream's distillation interleave
// [unm[0], B[0], unm[1:], B[1:]] for P = 2: the prefix stays where the model's head reads it.
//
// The merge plan maps every original token t to its output token dest[t]; each output token is
// the reduction of its members {t : dest[t] = o}, taken in ascending t. As a value (the merge_plan
// op) it is a CSR plan per batch row: dest [n], offsets [nout + 1] and members [n], output o's
// members being members[offsets[o] .. offsets[o + 1]). merge is a segmented reduction over it,
// unmerge a gather by dest, the backwards the transposed pair, and source tracking a gather of
// dest.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd.h"
#include "common/rank.h"

namespace tokred {

enum class MergeMode : int { kSum = 0, kMean = 1, kAmax = 2, kWavg = 3 };

struct TomeDims {
  int64_t n;     // tokens before the merge
  int64_t na;    // |A| = ceil(n / 2)
  int64_t nb;    // |B| = floor(n / 2)
  int64_t r;     // merged (source) tokens
  int64_t u;     // unmerged A tokens = na - r
  int64_t nout;  // tokens after the merge = n - r
  int64_t pa;    // prefix tokens in A = ceil(min(P, n) / 2): the first pa unmerged A tokens
  int64_t pb;    // prefix tokens in B = floor(min(P, n) / 2)
};

TOKRED_HD TomeDims tome_dims(int64_t n, int64_t r, int64_t num_protected) {
  const int64_t p = num_protected < n ? num_protected : n;
  TomeDims d;
  d.n = n;
  d.na = (n + 1) / 2;
  d.nb = n / 2;
  d.r = r;
  d.u = d.na - r;
  d.nout = n - r;
  d.pa = (p + 1) / 2;
  d.pb = p / 2;
  return d;
}

// An explicit partition (bipartite_match_plan, tomesd's): set B = given destination tokens,
// set A = every other token, each in ascending position; no prefix, so the layout is
// [unmerged A (rank order) | every B token]. At most |A| tokens merge, none without a B token.
TOKRED_HD TomeDims tome_partition_dims(int64_t n, int64_t nb, int64_t r) {
  TomeDims d = tome_dims(n, r, 0);
  d.na = n - nb;
  d.nb = nb;
  d.u = d.na - r;
  return d;
}

// True if entry j of a partition's destination tokens is a position in [0, n) above the entry
// before it (the list ascends strictly, so A is its complement in order).
TOKRED_HD bool tome_dst_token_ok(const int64_t* dst_tokens, int64_t j, int64_t n) {
  const int64_t t = dst_tokens[j];
  return t >= 0 && t < n && (j == 0 || t > dst_tokens[j - 1]);
}

// The token of A row a and of B column j: alternating positions (2a, 2j + 1), or a partition's
// lists (one row shared by the batch).
struct TomeTokens {
  const int64_t* a = nullptr;  // [na], nullptr: alternating
  const int64_t* b = nullptr;  // [nb]
  TOKRED_HD int64_t of_a(int64_t i) const { return a ? a[i] : 2 * i; }
  TOKRED_HD int64_t of_b(int64_t j) const { return b ? b[j] : 2 * j + 1; }
};

// Output position of the k-th unmerged A token and of B token j. Prefix tokens keep their
// position (unm_idx lists the pa prefix A tokens first: it ascends with a prefix); the others
// follow: unmerged A from P on, then B from P + u - pa = u + pb on.
TOKRED_HD int64_t tome_unm_out(int64_t k, const TomeDims& d) { return k < d.pa ? 2 * k : k + d.pb; }
TOKRED_HD int64_t tome_dst_out(int64_t j, const TomeDims& d) {
  return j < d.pb ? 2 * j + 1 : d.u + j;
}

// Output o of a plan is a destination (it holds a B token, an odd position, which merged sources
// may join) or an unmerged A token (one even position). Read from the plan alone, so plans given
// as tensors need no match dimensions: members ascend, so a lone member's parity decides.
TOKRED_HD bool tome_output_is_destination(int64_t count, int64_t first_member) {
  return count > 1 || first_member % 2 == 1;
}

// What is wrong with output o of a plan row, if anything. A row is a merge plan when every output
// passes: offsets start at 0, end at n and rise strictly (every output has a member), members
// lie in [0, n) and ascend within an output, and dest maps each member back to its output. Then
// members is a permutation of [0, n) and dest its inverse grouping, so kernels that trust the
// plan read and write in bounds. CPU and CUDA check plans with this one rule.
enum class PlanFault : int { kNone = 0, kOffsets, kMemberRange, kMemberOrder, kDest };

TOKRED_HD PlanFault tome_plan_fault(const int64_t* offsets, const int64_t* members,
                                    const int64_t* dest, int64_t o, int64_t n, int64_t nout) {
  const int64_t begin = offsets[o], end = offsets[o + 1];
  if ((o == 0 && begin != 0) || (o == nout - 1 && end != n) || begin < 0 || end > n ||
      begin >= end) {
    return PlanFault::kOffsets;
  }
  for (int64_t m = begin; m < end; ++m) {
    const int64_t t = members[m];
    if (t < 0 || t >= n) return PlanFault::kMemberRange;
    if (m > begin && t <= members[m - 1]) return PlanFault::kMemberOrder;
    if (dest[t] != o) return PlanFault::kDest;
  }
  return PlanFault::kNone;
}

// Pairs excluded from matching: the rows of prefix A tokens and the columns of prefix B tokens
// (upstream's class-token row and distillation-token column, for any prefix). In A row a the
// excluded columns are a prefix: every column j < tome_first_scored_column(a, nb, ...).
TOKRED_HD int64_t tome_first_scored_column(int64_t a, int64_t nb, int64_t num_protected) {
  if (2 * a < num_protected) return nb;     // a prefix A token: the whole row
  const int64_t first = num_protected / 2;  // B token j is in the prefix while 2j + 1 < P
  return first < nb ? first : nb;
}

TOKRED_HD bool tome_excluded(int64_t a, int64_t j, int64_t num_protected) {
  // Any row length past j gives the same answer; j + 1 is the shortest.
  return j < tome_first_scored_column(a, j + 1, num_protected);
}

// Cosine similarity from a raw dot product and the two inverse norms (no eps, as upstream: a zero
// vector gives NaN). Excluded pairs score -inf.
template <typename acc_t>
TOKRED_HD acc_t tome_score(acc_t dot, acc_t inv_a, acc_t inv_b, bool excluded) {
  return excluded ? -acc_t(INFINITY) : dot * inv_a * inv_b;
}

// Running "first maximum" of a row: NaN counts as the largest value (as torch.max), ties keep the
// lower column.
template <typename acc_t>
TOKRED_HD void tome_argmax_step(acc_t v, int64_t j, acc_t& best, int64_t& best_j) {
  // Callers visit j in ascending order, so comes_before(v, j, best, best_j) reduces to: v is
  // larger, or v is the first NaN. One compare on the common path keeps the scan fast.
  if (best_j < 0 || v > best || (v != v && best == best)) {
    best = v;
    best_j = j;
  }
}

// Where A token a goes, given the ranks (descending best similarity, ties to the lower index) of
// the A tokens: a source slot in [0, r) (returned as -1 - slot), or an unmerged slot in [0, u).
// Unmerged tokens are in ascending order with a prefix (upstream sorts them with a class token,
// which puts the prefix first), in rank order without.
TOKRED_HD int64_t tome_slot(const int64_t* rank, int64_t a, int64_t r, bool ascending) {
  if (rank[a] < r) return -1 - rank[a];
  if (!ascending) return rank[a] - r;
  int64_t slot = 0;
  for (int64_t i = 0; i < a; ++i) slot += rank[i] >= r ? 1 : 0;
  return slot;
}

// One step of a mode's reduction over an output's members (the first member initialises acc).
template <typename acc_t>
TOKRED_HD void tome_accumulate(MergeMode mode, bool first, acc_t v, acc_t w, acc_t& acc) {
  if (mode == MergeMode::kAmax) {
    if (first || v != v || (acc == acc && v > acc)) acc = v;  // NaN propagates
  } else if (mode == MergeMode::kWavg) {
    acc = first ? w * v : acc + w * v;
  } else {
    acc = first ? v : acc + v;
  }
}

// True if an output whose only member has weight w is that member's value, copied exactly.
// Without a merge (r = 0: upstream's blocks skip merging) every output is; otherwise every mode
// but wavg, and wavg only for a finite, nonzero weight: (w·x)/w is NaN for a size of 0, NaN or
// inf, as upstream's x·size / size.
template <typename acc_t>
TOKRED_HD bool tome_lone_copies(MergeMode mode, acc_t w, bool merging) {
  return !merging || mode != MergeMode::kWavg || (w == w && w != acc_t(0) && w - w == acc_t(0));
}

// True if the gradient of an output whose only member has weight w passes to it unchanged
// (w / w = 1): every mode but amax (a NaN maximum of a destination passes NaN, tome_grad_coef),
// and wavg only where tome_lone_copies copies the value.
template <typename acc_t>
TOKRED_HD bool tome_lone_grad_passes(MergeMode mode, acc_t w) {
  return mode != MergeMode::kAmax && tome_lone_copies(mode, w, /*merging=*/true);
}

// The reduced value of an output with `count` members whose weights sum to wsum.
template <typename acc_t>
TOKRED_HD acc_t tome_finish(MergeMode mode, acc_t acc, acc_t wsum, int64_t count) {
  if (mode == MergeMode::kMean) return acc / static_cast<acc_t>(count);
  if (mode == MergeMode::kWavg) return acc / wsum;
  return acc;
}

// d out / d member: the share of an output's gradient that a member with value v and weight w
// receives. amax splits it evenly between the members equal to the maximum (as torch's
// scatter_reduce); `ties` is how many members equal out. A NaN maximum of a destination passes
// NaN to every member, as scatter_reduce's backward does; an unmerged token's NaN passes through
// (upstream gathers it).
template <typename acc_t>
TOKRED_HD acc_t tome_grad_coef(MergeMode mode, acc_t v, acc_t w, acc_t out, acc_t wsum,
                               int64_t count, int64_t ties, bool destination) {
  switch (mode) {
    case MergeMode::kMean:
      return acc_t(1) / static_cast<acc_t>(count);
    case MergeMode::kWavg:
      return w / wsum;
    case MergeMode::kAmax:
      if (out != out) return destination ? out : acc_t(1);
      return v == out ? acc_t(1) / static_cast<acc_t>(ties) : acc_t(0);
    default:
      return acc_t(1);
  }
}

}  // namespace tokred
