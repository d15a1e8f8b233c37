"""ToMe ops (csrc/cuda/merge.cu, segment.cu): emulated CUDA against the CPU kernels."""
import os
import sys

import pytest
import torch

from differential import DTYPES, assert_both_raise, compare

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from merge_cases import random_sizes, separated_metric  # noqa: E402

MODES = ["sum", "mean", "amax", "wavg"]
# num_protected: a class token, none, class + distillation token, class + 4 registers, and 3.
PROTECT = [1, 0, 2, 5, 3]
PROTECT_IDS = ["cls", "none", "cls+dist", "cls+reg4", "three"]


def sign_metric(b, n, d, g, dtype):
    """Entries +-1: every token has squared norm d, so similarities are dot / d with integer dots.
    Different dots differ by far more than rounding, equal dots are computed from equal inputs:
    both backends must find the same match, exact ties (cosine exactly 1 among them) included. A
    zero token gives NaN similarities, which rank as the largest."""
    m = torch.randint(0, 2, (b, n, d), generator=g).to(torch.float64) * 2 - 1
    m[0, min(4, n - 1)] = 0
    if n > 8:
        m[-1, 6] = m[-1, 2]  # duplicated tokens
        m[-1, 7] = m[-1, 3]
    return m.to(dtype)


# --------------------------------------------------------------------------- bipartite_match

# N > 256: several chunks of 128 A tokens; N / 2 > 32: several B tiles; D > 16 and D % 16 != 0:
# several channel tiles with a ragged last one.
@pytest.mark.parametrize("n,d", [(2, 3), (3, 5), (9, 16), (17, 20), (197, 40), (300, 7), (601, 33)])
@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bipartite_match(n, d, p, dtype):
    g = torch.Generator().manual_seed(n * d)
    metric = sign_metric(3, n, d, g, dtype)
    cap = max(n - p, 0) // 2
    for r in sorted({0, 1, cap // 2, cap, cap + 3}):
        compare("bipartite_match", metric, r, p)


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_bipartite_match_separated_float_metric(p):
    g = torch.Generator().manual_seed(7)
    for n in (16, 197):
        metric = separated_metric(2, n, p, torch.float32, generator=g)
        compare("bipartite_match", metric, n // 3, p)
        compare("bipartite_match", metric.transpose(1, 2).contiguous().transpose(1, 2), n // 3, p)


# Long rows: many chunks of 128 A tokens per row, each its own block. N = 2500 in float64 and 3137
# (a 56x56 grid and a class token) in float32 needed more than 48 KiB of shared memory when a
# block held a whole row.
@pytest.mark.parametrize("n,dtype", [(2500, torch.float64), (3137, torch.float32)])
def test_bipartite_match_long_rows(n, dtype):
    g = torch.Generator().manual_seed(n)
    compare("bipartite_match", sign_metric(2, n, 3, g, dtype), n // 4, 1)


@pytest.mark.parametrize("side", [48, 128])
def test_bipartite_match_plan_long_rows(side):
    # tomesd at a 48x48 and a 128x128 latent (SD at 1024 px): one destination per 2x2 cell. A whole
    # row of 128x128 tokens did not fit in a block's shared memory.
    g = torch.Generator().manual_seed(side)
    grid = torch.tensor([y * side + x for y in range(0, side, 2) for x in range(0, side, 2)])
    compare("bipartite_match_plan", sign_metric(1, side * side, 3, g, torch.float32), grid,
            side * side // 2)


# --------------------------------------------------------------------------- merge family

def _match(b, n, r, p, g, index_dtype=torch.int64):
    metric = separated_metric(b, n, p, generator=g)
    return tuple(i.to(index_dtype) for i in torch.ops.tokred.bipartite_match(metric, r, p))


def _tokens(b, n, c, dtype, g, ties):
    # With ties, values repeat across tokens, so amax has several maximal members.
    x = torch.randint(-3, 4, (b, n, c), generator=g).double() if ties else torch.randn(b, n, c, generator=g)
    return x.to(dtype)


CASES = [(17, 5), (16, 7), (9, 100), (8, 0), (2, 1), (197, 60)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_backward(mode, p, dtype):
    g = torch.Generator().manual_seed(9)
    for n, r in CASES:
        index_dtype = torch.int32 if n % 2 else torch.int64
        idx = _match(3, n, r, p, g, index_dtype)
        for ties in (False, True):
            x = _tokens(3, n, 12, dtype, g, ties)
            for size in (None, random_sizes(3, n, dtype, generator=g)):
                out, _ = compare("merge", x, size, *idx, mode, p, scale=4)
                grad = torch.randn(out.shape, generator=g).to(dtype)
                compare("_merge_backward", grad, x, size, *idx, mode, p, scale=4)
                strided = x.transpose(1, 2).contiguous().transpose(1, 2)
                compare("merge", strided, size, *idx, mode, p, scale=4)


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_and_backward(p, dtype):
    g = torch.Generator().manual_seed(10)
    for n, r in CASES:
        idx = _match(2, n, r, p, g, torch.int32 if n % 2 else torch.int64)
        r_eff = idx[1].shape[1]
        y = torch.randn(2, n - r_eff, 10, generator=g).to(dtype)
        compare("unmerge", y, *idx, n, p, exact=(0,))
        grad = torch.randn(2, n, 10, generator=g).to(dtype)
        compare("_unmerge_backward", grad, *idx, p)


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_merge_source(p):
    g = torch.Generator().manual_seed(11)
    for n, r in CASES:
        idx = _match(2, n, r, p, g, torch.int32 if n % 2 else torch.int64)
        compare("merge_source", None, *idx, n, p)
        source = torch.randint(0, n, (2, 3 * n), generator=g)
        compare("merge_source", source, *idx, n, p)
        compare("merge_source", source.int(), *idx, n, p)


# --------------------------------------------------------------------------- the plan as a value

@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_merge_plan(p):
    g = torch.Generator().manual_seed(15)
    for n, r in CASES:
        idx = _match(3, n, r, p, g, torch.int32 if n % 2 else torch.int64)
        compare("merge_plan", *idx, n, p)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1, 5], ids=["cls", "cls+reg4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_by_plan(mode, p, dtype):
    # The CPU's plan feeds both backends: the kernels must agree on plans they did not build.
    g = torch.Generator().manual_seed(16)
    for n, r in CASES:
        plan = torch.ops.tokred.merge_plan(*_match(3, n, r, p, g), n, p)
        int32_plan = tuple(t.int() for t in plan)
        x = _tokens(3, n, 12, dtype, g, ties=True)
        for size in (None, random_sizes(3, n, dtype, generator=g)):
            out, _ = compare("merge_by_plan", x, size, *plan, mode, scale=4)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            compare("_merge_by_plan_backward", grad, x, size, *int32_plan, mode, scale=4)
        compare("unmerge_by_plan", out, *plan, exact=(0,))
        source = torch.randint(0, n, (3, 2 * n), generator=g)
        compare("merge_source_by_plan", source, *int32_plan)
        compare("merge_source_by_plan", None, *plan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bipartite_match_plan(dtype):
    # tomesd's partitions (one destination per 2x2 cell), random ones, none and all: N up to 529
    # (several chunks of 128 sources), ties and a zero token from sign_metric.
    g = torch.Generator().manual_seed(18)
    for side, d in [(3, 3), (8, 20), (16, 33), (23, 5)]:
        n = side * side
        grid = torch.tensor([y * side + x for y in range(0, side - 1, 2) for x in range(0, side - 1, 2)])
        metric = sign_metric(2, n, d, g, dtype)
        partitions = (grid, grid.int(), torch.randperm(n, generator=g)[:n // 3].sort().values,
                      torch.zeros(0, dtype=torch.long), torch.arange(n))
        for dst_tokens in partitions:
            for r in sorted({0, 1, n // 4, n}):
                compare("bipartite_match_plan", metric, dst_tokens, r)


def test_bad_plans_raise_clear_errors():
    g = torch.Generator().manual_seed(17)
    n = 10
    dest, offsets, members = torch.ops.tokred.merge_plan(*_match(2, n, 3, 1, g), n, 1)
    x = torch.randn(2, n, 4)

    def edited(t, i, v):  # in the second batch row: every row is checked, not only the first
        t = t.clone()
        t[1, i] = v
        return t

    for plan, what in [((edited(dest, 0, 2), offsets, members), "'dest' must map"),
                       ((dest, edited(offsets, 0, 1), members), "'offsets' must start at 0"),
                       # two faults (an empty output, a member in the next one): either may be named
                       ((dest, edited(offsets, 2, 1), members), "not a merge plan"),
                       ((dest, edited(offsets, 3, 99), members), "'offsets'"),
                       ((dest, offsets, edited(members, 5, n)), r"'members' must hold token positions"),
                       ((dest, offsets, edited(members, 0, -1)), r"'members' must hold token positions"),
                       ((dest, offsets, members.flip(1)), "not a merge plan")]:
        assert_both_raise("merge_by_plan", x, None, *plan, "wavg", match=what)
        assert_both_raise("_merge_by_plan_backward", torch.randn(2, n - 3, 4), x, None, *plan, "amax",
                          match=what)
        assert_both_raise("unmerge_by_plan", torch.randn(2, n - 3, 4), *plan, match=what)
        assert_both_raise("merge_source_by_plan", None, *plan, match=what)
    assert_both_raise("merge_source_by_plan", torch.tensor([[0, 1], [0, n]]), dest, offsets, members,
                      match=r"source")


# --------------------------------------------------------------------------- device-side checks

def test_bad_indices_raise_clear_errors():
    g = torch.Generator().manual_seed(12)
    n = 10
    unm, src, dst = _match(1, n, 2, 1, g)
    x = torch.randn(1, n, 4)
    bad_dst = dst.clone()
    bad_dst[0, 0] = 7
    assert_both_raise("merge", x, None, unm, src, bad_dst, "sum", 1, match=r"dst_idx")
    bad_src = src.clone()
    bad_src[0, 0] = -4
    assert_both_raise("merge", x, None, unm, bad_src, dst, "mean", 1, match=r"src_idx")
    # A token listed twice leaves another without an output.
    dup_unm = unm.clone()
    dup_unm[0, 1] = dup_unm[0, 2]
    assert_both_raise("merge", x, None, dup_unm, src, dst, "wavg", 1, match=r"merge")
    grad = torch.randn(1, n - 2, 4)
    assert_both_raise("_merge_backward", grad, x, None, dup_unm, src, dst, "amax", 1, match=r"merge")
    assert_both_raise("unmerge", grad, dup_unm, src, dst, n, 1, match=r"unmerge|unm_idx")
    assert_both_raise("_unmerge_backward", x, dup_unm, src, dst, 1, match=r"merge|unm_idx")
    assert_both_raise("merge_source", None, dup_unm, src, dst, n, 1, match=r"lists an A token twice")
    assert_both_raise("merge_source", torch.tensor([[0, n]]), unm, src, dst, n, 1,
                      match=r"merge_source.*source")
    # Regressions: CUDA merge_source returned -1 as a token id for a duplicated index, and read
    # past the plan for a source map with more rows than the match.
    assert_both_raise("merge_source", torch.zeros(1, 3, dtype=torch.long), dup_unm, src, dst, n, 1,
                      match=r"lists an A token twice")
    assert_both_raise("merge_source", torch.zeros(64, 8, dtype=torch.long), unm, src, dst, n, 1,
                      match=r"merge_source.*batch size 64")


def test_empty_shapes():
    compare("bipartite_match", torch.randn(0, 6, 3), 2, 1)
    compare("bipartite_match", torch.randn(2, 1, 3), 2, 1)
    idx = torch.ops.tokred.bipartite_match(torch.randn(2, 6, 3), 2, 1)
    for mode in MODES:
        # Regression: with C = 0 the CUDA merge returned size_out uninitialised.
        for size in (None, torch.rand(2, 6, 1)):
            compare("merge", torch.randn(2, 6, 0), size, *idx, mode, 1)
            compare("_merge_backward", torch.randn(2, 4, 0), torch.randn(2, 6, 0), size, *idx, mode, 1)
    compare("unmerge", torch.randn(2, 4, 0), *idx, 6, 1)
    compare("_unmerge_backward", torch.randn(2, 6, 0), *idx, 1)
    compare("merge_source", torch.zeros(2, 0, dtype=torch.long), *idx, 6, 1)
    empty = torch.ops.tokred.bipartite_match(torch.randn(0, 6, 3), 2, 1)
    compare("merge", torch.randn(0, 6, 4), None, *empty, "wavg", 1)
    compare("merge_source", None, *empty, 6, 1)
    for b, tokens in [(0, 6), (2, 0), (2, 1)]:
        plan = torch.ops.tokred.merge_plan(
            *torch.ops.tokred.bipartite_match(torch.randn(b, tokens, 3), 2, 1), tokens, 1)
        compare("merge_plan", *torch.ops.tokred.bipartite_match(torch.randn(b, tokens, 3), 2, 1),
                tokens, 1)
        compare("merge_by_plan", torch.randn(b, tokens, 4), None, *plan, "wavg")
        compare("unmerge_by_plan", torch.randn(b, plan[1].shape[1] - 1, 4), *plan)
        compare("merge_source_by_plan", None, *plan)
    compare("merge_by_plan", torch.randn(2, 6, 0), torch.rand(2, 6, 1), *torch.ops.tokred.merge_plan(*idx, 6, 1),
            "mean")


@pytest.mark.parametrize("mode", MODES)
def test_nan_tokens_sizes_and_metric(mode):
    nan = float("nan")
    g = torch.Generator().manual_seed(14)
    metric = torch.randn(2, 9, 4, generator=g)
    metric[0, 2], metric[1, 3, 1] = nan, nan
    compare("bipartite_match", metric, 3, 1)
    idx = torch.ops.tokred.bipartite_match(torch.randn(2, 9, 4, generator=g), 3, 1)
    x = torch.randn(2, 9, 5, generator=g)
    x[0, 1, 2], x[1, :, 0] = nan, nan
    size = torch.rand(2, 9, 1, generator=g) + 0.5
    size[0, 3, 0], size[1, 4, 0] = nan, 0.0
    for sz in (None, size):
        out, _ = compare("merge", x, sz, *idx, mode, 1)
        compare("_merge_backward", torch.randn(out.shape, generator=g), x, sz, *idx, mode, 1)
