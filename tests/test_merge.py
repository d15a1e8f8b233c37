"""ToMe ops (bipartite_match, merge, unmerge, merge_source) against tokred_ext.reference."""
import math

import pytest
import torch
from torch.testing import assert_close

from tokred_ext import functional as F
from tokred_ext import ops
from tokred_ext import reference as R

from conftest import TOL, tie_free
from merge_cases import random_sizes, separated_metric

MODES = ["sum", "mean", "amax", "wavg"]
# num_protected: a class token, none, class + distillation token, class + 4 registers, and 3.
PROTECT = [1, 0, 2, 5, 3]
PROTECT_IDS = ["cls", "none", "cls+dist", "cls+reg4", "three"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _match_both(metric, r, p):
    got = ops.bipartite_match(metric, r, p)
    want = R.bipartite_match(metric, r, p)
    for g, w, name in zip(got, want, ("unm_idx", "src_idx", "dst_idx")):
        assert g.dtype == torch.long and g.device == metric.device, name
        assert torch.equal(g.cpu(), w.cpu()), (name, g, w)
    return got


# --------------------------------------------------------------------------- bipartite_match

@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 16, 17, 33])
def test_bipartite_match_matches_reference(device, dtype, p, n):
    g = _gen(n)
    metric = separated_metric(3, n, p, dtype, device, g)
    cap = R.tome_clamp_r(10**6, n, p)
    for r in sorted({-2, 0, 1, 3, cap, cap + 1, 10**6}):
        unm, src, dst = _match_both(metric, r, p)
        rr = R.tome_clamp_r(r, n, p)
        assert unm.shape == (3, (n + 1) // 2 - rr) and src.shape == dst.shape == (3, rr)


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_bipartite_match_random_metric_float64(device, p):
    g = _gen(1)
    for n, r in [(197, 16), (196, 13), (50, 24), (65, 8)]:
        metric = torch.randn(4, n, 64, dtype=torch.float64, generator=g).to(device)
        _match_both(metric, r, p)


def test_bipartite_match_non_contiguous(device):
    metric = separated_metric(2, 17, d=16, generator=_gen(2)).to(device)
    wide = torch.zeros(17, 2, 32, device=device).transpose(0, 1)
    wide[..., ::2] = metric
    _match_both(wide[..., ::2], 4, 1)


# --------------------------------------------------------------------------- merge

def _indices(device, b, n, r, p, g, int32=False):
    metric = separated_metric(b, n, p, generator=g).to(device)
    idx = R.bipartite_match(metric, r, p)
    return tuple(i.int() for i in idx) if int32 else idx


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_merge_matches_reference(device, dtype, mode, p):
    g = _gen(3)
    for n, r, with_size in [(17, 5, True), (16, 7, False), (9, 100, True), (8, 0, True),
                            (1, 1, False), (2, 1, True)]:
        idx = _indices(device, 3, n, r, p, g, int32=n % 2 == 1)
        x = tie_free((3, 6, n), dtype, device, g).transpose(1, 2)  # non-contiguous
        size = random_sizes(3, n, dtype, device, g) if with_size else None
        out, size_out = ops.merge(x, size, *idx, mode, p)
        want, want_size = R.merge(x.double(), None if size is None else size.double(), *idx, mode,
                                  p)
        assert out.dtype == dtype and size_out.dtype == dtype
        assert_close(out.double(), want, **TOL[dtype])
        assert_close(size_out.double(), want_size, **TOL[dtype])


def test_merge_r0_is_identity(device):
    x = torch.randn(2, 9, 4, device=device)
    idx = ops.bipartite_match(torch.randn(2, 9, 3, device=device), 0)
    for mode in MODES:
        out, size = ops.merge(x, None, *idx, mode)
        assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1, device=device))


def test_empty_batch_and_single_token(device):
    for b, tokens, left in [(0, 9, 6), (3, 1, 1), (0, 0, 0), (2, 2, 2)]:
        metric = torch.randn(b, tokens, 4, device=device)
        x = torch.randn(b, tokens, 5, device=device, requires_grad=True)
        idx = ops.bipartite_match(metric, 3)
        out, size = ops.merge(x, None, *idx, "wavg")
        assert out.shape == (b, left, 5) and size.shape == (b, left, 1)
        out.sum().backward()
        assert ops.unmerge(out, *idx, tokens).shape == (b, tokens, 5)
        assert ops.merge_source(None, *idx, tokens).shape == (b, tokens)


# --------------------------------------------------------------------------- unmerge, sources

@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_unmerge_matches_reference(device, dtype, p):
    g = _gen(4)
    for n, r in [(17, 5), (16, 8), (9, 100), (8, 0), (3, 1)]:
        idx = _indices(device, 2, n, r, p, g, int32=n % 2 == 0)
        rr = idx[1].shape[1]
        x = tie_free((2, 7, n - rr), dtype, device, g).transpose(1, 2)
        got = ops.unmerge(x, *idx, n, p)
        assert torch.equal(got, R.unmerge(x, *idx, n, p))
        # merge then unmerge gives every token the value of the token it ended in
        merged, _ = ops.merge(got, None, *idx, "mean", p)
        assert_close(merged, x, **TOL[dtype])


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_merge_source_matches_reference_and_upstream_onehot(device, p):
    g = _gen(5)
    n = 17
    src_map, onehot = None, None
    x = torch.zeros(2, n, 1, device=device)
    for r in [3, 2, 5, 1]:
        idx = _indices(device, 2, n, r, p, g)
        got = ops.merge_source(src_map, *idx, n, p)
        assert torch.equal(got, R.merge_source(src_map, *idx, n, p))
        onehot = R.merge_source_onehot(onehot, x, *idx, p)
        src_map = got
        n -= idx[1].shape[1]
        x = x[:, :n]
        assert torch.equal(ops.source_onehot(src_map, n), onehot)
        assert int(src_map.max()) < n


def test_source_int32(device):
    idx = _indices(device, 2, 9, 2, 1, _gen(6))
    source = torch.arange(9, device=device, dtype=torch.int32).expand(2, 9)
    assert torch.equal(ops.merge_source(source, *idx, 9), ops.merge_source(None, *idx, 9))


# --------------------------------------------------------------------------- ToMe over 12 layers

@pytest.mark.parametrize("p", [0, 1, 2, 3, 5, 8])
def test_prefix_tokens_never_merge_and_stay_first(device, p):
    # Whatever the metric (here: every prefix token a duplicate of a patch, the best match there
    # is), the first p tokens come out first, unchanged, with size 1, and hold only themselves.
    g = _gen(12)
    x = torch.randn(2, 29, 4, generator=g).to(device)
    metric = torch.randn(2, 29, 6, generator=g).to(device)
    metric[:, :p] = metric[:, p:2 * p]
    start = torch.arange(29, device=device).expand(2, 29)
    out, size, source = F.tome_merge(x, metric, 100, None, p, start)
    r = (29 - p) // 2
    assert out.shape == (2, 29 - r, 4)
    assert torch.equal(out[:, :p], x[:, :p]) and torch.equal(size[:, :p], torch.ones_like(size[:, :p]))
    assert torch.equal(source[:, :p], start[:, :p])
    assert not (source[:, p:, None] == torch.arange(p, device=device)).any()


@pytest.mark.parametrize("p", [1, 2, 5], ids=["cls", "cls+dist", "cls+reg4"])
def test_twelve_layers_equal_upstream_recipe(device, p):
    g = _gen(7)
    b, n, c = 2, 197, 24
    x = torch.randn(b, n, c, dtype=torch.float64, generator=g).to(device)
    x_ref, size, size_ref, source_ref = x, None, None, None
    source = torch.arange(n, device=device).expand(b, n)  # tracing starts from the identity
    left = n
    for r in F.parse_r(12, 16):
        left -= R.tome_clamp_r(r, left, p)
        metric = torch.randn(b, x.shape[1], 16, dtype=torch.float64, generator=g).to(device)
        proj = torch.randn(c, c, dtype=torch.float64, generator=g).to(device) / c ** 0.5
        idx = R.bipartite_match(metric, r, p)
        if idx[1].shape[1] > 0:  # upstream's block skips the merge when r is clamped to 0
            source_ref = R.merge_source_onehot(source_ref, x_ref, *idx, p)
            x_ref, size_ref = R.merge(x_ref, size_ref, *idx, "wavg", p)
        x, size, source = F.tome_merge(x, metric, r, size, p, source)
        assert_close(x, x_ref)
        assert_close(size, size_ref)
        x, x_ref = torch.tanh(x @ proj), torch.tanh(x_ref @ proj)
    assert x.shape[1] == left and left == {1: 11, 2: 12}.get(p, left)
    assert torch.equal(ops.source_onehot(source, x.shape[1], torch.float64),
                       source_ref.double())


def test_parse_r():
    assert F.parse_r(12, 8) == [8] * 12
    assert F.parse_r(4, [3, 2]) == [3, 2, 0, 0]
    assert F.parse_r(12, (16, -1)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert F.parse_r(12, (16, 1)) == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert F.parse_r(12, (8, -0.5)) == [12, 11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 4]


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1, 2, 5])
def test_merge_gradcheck(device, mode, p):
    g = _gen(8)
    idx = _indices(device, 2, 11, 4, p, g)
    x = tie_free((2, 11, 3), torch.float64, device, g).requires_grad_()
    size = random_sizes(2, 11, torch.float64, device, g)
    for s in (size, None):
        assert torch.autograd.gradcheck(lambda t: ops.merge(t, s, *idx, mode, p)[0], (x,))


@pytest.mark.parametrize("p", [1, 2, 5])
def test_unmerge_gradcheck(device, p):
    idx = _indices(device, 2, 11, 4, p, _gen(9))
    x = torch.randn(2, 11 - idx[1].shape[1], 3, dtype=torch.float64, device=device,
                    requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.unmerge(t, *idx, 11, p), (x,))


@pytest.mark.parametrize("mode", MODES)
def test_merge_grad_matches_reference(device, dtype, mode):
    g = _gen(10)
    idx = _indices(device, 3, 15, 6, 1, g)
    x = tie_free((3, 15, 8), dtype, device, g)
    size = random_sizes(3, 15, dtype, device, g)
    grad = tie_free((3, 9, 8), dtype, device, g)
    xa = x.clone().requires_grad_()
    ops.merge(xa, size, *idx, mode)[0].backward(grad)
    xr = x.double().requires_grad_()
    R.merge(xr, size.double(), *idx, mode)[0].backward(grad.double())
    assert_close(xa.grad.double(), xr.grad, **TOL[dtype])


def test_amax_ties_split_gradient_like_torch(device):
    idx = _indices(device, 1, 5, 2, 0, _gen(11))
    x = torch.ones(1, 5, 2, dtype=torch.float64, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ops.merge(x, None, *idx, "amax")[0].sum().backward()
    R.merge(xr, None, *idx, "amax")[0].sum().backward()
    assert_close(x.grad, xr.grad)


# --------------------------------------------------------------------------- determinism

def test_bitwise_deterministic(device):
    g = _gen(12)
    metric = torch.randn(8, 197, 64, generator=g).to(device)
    x = torch.randn(8, 197, 96, generator=g).to(device)
    size = random_sizes(8, 197, generator=g).to(device)
    runs = []
    for _ in range(2):
        xa = x.clone().requires_grad_()
        idx = ops.bipartite_match(metric, 16)
        out, s = ops.merge(xa, size, *idx, "wavg")
        up = ops.unmerge(out, *idx, 197)
        (up * torch.arange(197 * 96, device=device).view(1, 197, 96).sin()).sum().backward()
        runs.append(idx + (out, s, up, xa.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- opcheck

def _opcheck_samples(device):
    g = _gen(13)
    x = tie_free((2, 9, 4), torch.float32, device, g)
    metric = separated_metric(2, 9, generator=g).to(device)
    size = random_sizes(2, 9, generator=g).to(device)
    idx = ops.bipartite_match(metric, 3)
    idx_d = ops.bipartite_match(metric, 3, 2)
    merged = torch.randn(2, 6, 4, device=device)
    return x, metric, size, idx, idx_d, merged


def test_opcheck(device):
    x, metric, size, idx, idx_d, merged = _opcheck_samples(device)
    xg = x.clone().requires_grad_()
    cases = [
        (torch.ops.tokred.bipartite_match.default, (metric, 3, 1)),
        (torch.ops.tokred.bipartite_match.default, (metric, 100, 0)),
        (torch.ops.tokred.bipartite_match.default, (metric, 100, 5)),
        (torch.ops.tokred.merge.default, (xg, size, *idx, "wavg", 1)),
        (torch.ops.tokred.merge.default, (xg, None, *idx, "mean", 1)),
        (torch.ops.tokred.merge.default, (xg, None, *idx_d, "amax", 2)),
        (torch.ops.tokred.merge.default, (xg, size, *idx, "sum", 1)),
        (torch.ops.tokred._merge_backward.default,
         (merged, x, size, *idx, "wavg", 1)),
        (torch.ops.tokred.unmerge.default, (merged.clone().requires_grad_(), *idx, 9, 1)),
        (torch.ops.tokred._unmerge_backward.default, (x, *idx_d, 2)),
        (torch.ops.tokred.merge_source.default, (None, *idx, 9, 1)),
        (torch.ops.tokred.merge_source.default,
         (torch.randint(0, 9, (2, 20), device=device), *idx, 9, 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- script, compile

def test_torchscript(device):
    scripted = torch.jit.script(F.tome_merge)
    g = _gen(14)
    x = torch.randn(2, 17, 8, generator=g).to(device)
    metric = separated_metric(2, 17, generator=g).to(device)
    source = torch.arange(17).expand(2, 17).to(device)
    for a, b in zip(scripted(x, metric, 4, None, 1, source),
                    F.tome_merge(x, metric, 4, source=source)):
        assert torch.equal(a, b)
    unm = torch.jit.script(ops.unmerge)
    idx = ops.bipartite_match(metric, 4)
    assert torch.equal(unm(x[:, :13], *idx, 17), ops.unmerge(x[:, :13], *idx, 17))


def test_torch_compile_dynamic_no_recompile(device):
    torch._dynamo.reset()

    def step(x, metric, r, size, source):
        x, size, source = F.tome_merge(x, metric, r, size, 1, source)
        up = ops.unmerge(x, *ops.bipartite_match(metric, r), metric.shape[1])
        return x, size, source, up

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    g = _gen(15)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for b, n, r in [(2, 17, 4), (3, 25, 5), (4, 33, 3)]:
            x = torch.randn(b, n, 8, generator=g).to(device)
            metric = separated_metric(b, n, generator=g).to(device)
            size = random_sizes(b, n, generator=g).to(device)
            source = torch.arange(n, device=device).expand(b, n).contiguous()
            for a, e in zip(compiled(x, metric, r, size, source), step(x, metric, r, size, source)):
                assert torch.equal(a, e)


# --------------------------------------------------------------------------- errors

def test_errors(device):
    x, metric, size, (unm, src, dst), _, merged = _opcheck_samples(device)
    bad = [
        (lambda: ops.bipartite_match(metric[0], 3), r"bipartite_match: argument 'metric' must be 3-D"),
        (lambda: ops.bipartite_match(metric.long(), 3), r"'metric' must be float32"),
        (lambda: ops.merge(x, size, unm, src, dst, "max"), r"'mode' must be one of"),
        (lambda: ops.merge(x[0], size, unm, src, dst), r"merge: argument 'x' must be 3-D"),
        (lambda: ops.merge(x, size[..., 0], unm, src, dst), r"'size' must have shape \[B, N, 1\]"),
        (lambda: ops.merge(x, size.double(), unm, src, dst), r"'size' must have the dtype of x"),
        (lambda: ops.merge(x, size, unm.float(), src, dst), r"'unm_idx' must be an int64 or int32"),
        (lambda: ops.merge(x, size, unm[:, 1:], src, dst), r"'unm_idx' and src_idx must together"),
        (lambda: ops.merge(x, size, unm, src, dst[:, :2]), r"'dst_idx' must have the shape of src_idx"),
        (lambda: ops.merge(x, size, unm[:1], src, dst), r"'unm_idx' must have batch size 2"),
        (lambda: ops.merge(x, size, unm + 5, src, dst), r"'unm_idx' holds \d+ at \[0, 0\], expected an index of set A in \[0, 5\)"),
        (lambda: ops.merge(x, size, unm, src.clone().fill_(-1), dst), r"'src_idx' holds -1"),
        (lambda: ops.merge(x, size, unm, dst * 0 + unm[:, :1], dst), r"'src_idx' holds A token \d+ at \[0, 0\], which unm_idx and src_idx already list"),
        (lambda: ops.merge(x, size, unm, src, dst + 4), r"'dst_idx' holds \d+ at \[0, 0\], expected an index of set B in \[0, 4\)"),
        (lambda: ops.unmerge(merged[:, 1:], unm, src, dst, 9), r"unmerge: argument 'x' must have n - r = 6 tokens, got 5"),
        (lambda: ops.unmerge(merged, unm, src, dst, 11), r"'unm_idx' and src_idx must together list the ceil\(N/2\) = 6"),
        (lambda: ops.merge_source(torch.full((2, 3), 9, device=device), unm, src, dst, 9), r"'source' holds 9 at \[0, 0\], expected a token position in \[0, 9\)"),
        (lambda: ops.merge_source(src.float(), unm, src, dst, 9), r"'source' must be an int64 or int32"),
        (lambda: torch.ops.tokred._merge_backward(merged[:, 1:], x, size, unm, src, dst, "sum", 1), r"'grad_out' must have shape \[B, N - r, C\]"),
        (lambda: torch.ops.tokred._unmerge_backward(x[:, 1:], unm, src, dst, 1), r"_unmerge_backward: argument 'unm_idx' and src_idx must together"),
    ]
    for fn, msg in bad:
        if device == "cuda" and " holds " in msg:
            # A bad index value trips a device-side assert on a GPU, which ends the CUDA context;
            # the emulated suite (tests/simt) checks those asserts' messages.
            continue
        with pytest.raises(RuntimeError, match=msg):
            fn()


def test_meta_shapes_with_clamped_r():
    metric = torch.empty(3, 197, 64, device="meta")
    for r, p, want in [(16, 1, 16), (200, 1, 98), (200, 2, 97), (200, 5, 96), (-3, 1, 0),
                       (99, 0, 98), (5, 197, 0), (5, 300, 0)]:
        unm, src, dst = ops.bipartite_match(metric, r, p)
        assert unm.shape == (3, 99 - want) and src.shape == dst.shape == (3, want)
        out, size = ops.merge(torch.empty(3, 197, 8, device="meta"), None, unm, src, dst)
        assert out.shape == (3, 197 - want, 8) and size.shape == (3, 197 - want, 1)


# --------------------------------------------------------------------------- the tie rule

def _tied_metric(b, n, d, dtype, g):
    """Entries +-1 (every similarity is an integer over d: exact ties everywhere), duplicated
    tokens (cosine exactly 1) and a zero token (NaN similarities)."""
    m = (torch.randint(0, 2, (b, n, d), generator=g) * 2 - 1).to(torch.float64)
    m[:, 5] = m[:, 2]
    m[:, 8] = m[:, 3]
    m[:, 9] = m[:, 4]
    m[0, 6] = 0
    return m.to(dtype)


@pytest.mark.parametrize("p", PROTECT, ids=PROTECT_IDS)
def test_bipartite_match_tie_rule(device, dtype, p):
    """Partner: the lowest-index B token of largest similarity (NaN largest). Ranking: by that
    similarity, descending, NaN first, ties to the lower A index. CPU, CUDA and the reference."""
    g = _gen(21)
    for n, d in [(12, 3), (40, 4), (197, 6)]:
        metric = _tied_metric(4, n, d, dtype, g).to(device)
        cap = R.tome_clamp_r(10 ** 6, n, p)
        for r in sorted({1, cap // 2, cap}):
            unm, src, dst = _match_both(metric, r, p)
            # The rule, checked directly on exact similarities (integers over d).
            m = metric.double().cpu()
            a, bb = m[:, ::2], m[:, 1::2]
            sim = (a @ bb.transpose(1, 2)) / (a.norm(dim=-1)[..., None] * bb.norm(dim=-1)[:, None])
            sim[:, :(p + 1) // 2] = -math.inf  # the prefix's A rows and B columns
            sim[:, :, :p // 2] = -math.inf
            best = torch.where(sim.isnan(), math.inf, sim).amax(-1)
            for row in range(4):
                for s_i, j in zip(src[row].tolist(), dst[row].tolist()):
                    row_sim = torch.where(sim[row, s_i].isnan(), math.inf, sim[row, s_i])
                    assert j == int((row_sim == best[row, s_i]).nonzero()[0]), (n, r, row, s_i)
                order = sorted(range(best.shape[1]), key=lambda i: (-best[row, i].item(), i))
                assert src[row].tolist() == order[:src.shape[1]], (n, r, row)


# --------------------------------------------------------------------------- the plan as a value

def _plan_cases(device, g):
    """Matches of every protection kind and size, including r = 0 and the one-token sequence."""
    for p in PROTECT:
        for n, r in [(17, 5), (16, 7), (9, 100), (8, 0), (1, 1), (2, 1)]:
            yield p, n, _indices(device, 3, n, r, p, g, int32=n % 2 == 1)


def test_merge_plan_matches_reference(device):
    g = _gen(21)
    for p, n, idx in _plan_cases(device, g):
        got = ops.merge_plan(*idx, n, p)
        want = R.merge_plan(*idx, n, p)
        for a, e, name in zip(got, want, ("dest", "offsets", "members")):
            assert a.dtype == torch.long and torch.equal(a.cpu(), e.cpu()), (p, n, name)


@pytest.mark.parametrize("mode", MODES)
def test_by_plan_ops_equal_the_ops_that_build_it(device, dtype, mode):
    # The same plan, built once: every op given it equals the op that builds it again, bitwise.
    g = _gen(22)
    for p, n, idx in _plan_cases(device, g):
        plan = ops.merge_plan(*idx, n, p)
        x = tie_free((3, 6, n), dtype, device, g).transpose(1, 2)
        size = random_sizes(3, n, dtype, device, g)
        for s in (size, None):
            got = ops.merge_by_plan(x, s, plan, mode)
            want = ops.merge(x, s, *idx, mode, p)
            assert all(torch.equal(a, e) for a, e in zip(got, want)), (p, n)
            want_ref, _ = R.merge(x.double(), None if s is None else s.double(), *idx, mode, p)
            assert_close(got[0].double(), want_ref, **TOL[dtype])
        merged = torch.randn(3, plan.offsets.shape[1] - 1, 6, generator=g).to(device, dtype)
        assert torch.equal(ops.unmerge_by_plan(merged, plan), ops.unmerge(merged, *idx, n, p))
        source = torch.randint(0, n, (3, 11), generator=g).to(device)
        for src_map in (source, source.int(), None):
            assert torch.equal(ops.merge_source_by_plan(src_map, plan),
                               ops.merge_source(src_map, *idx, n, p))
        grad = torch.randn(3, plan.offsets.shape[1] - 1, 6, generator=g).to(device, dtype)
        assert torch.equal(
            torch.ops.tokred._merge_by_plan_backward(grad, x, size, *plan, mode),
            torch.ops.tokred._merge_backward(grad, x, size, *idx, mode, p))


@pytest.mark.parametrize("mode", MODES)
def test_merge_by_plan_gradcheck(device, mode):
    g = _gen(23)
    for p in (1, 2, 5):
        idx = _indices(device, 2, 11, 3, p, g)
        plan = ops.merge_plan(*idx, 11, p)
        x = tie_free((2, 11, 3), torch.float64, device, g).requires_grad_()
        size = random_sizes(2, 11, torch.float64, device, g)
        assert torch.autograd.gradcheck(lambda t: ops.merge_by_plan(t, size, plan, mode)[0], (x,))
        y = torch.randn(2, 8, 3, dtype=torch.float64, generator=g).to(device).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ops.unmerge_by_plan(t, plan), (y,))


def test_plan_opcheck(device):
    x, metric, size, idx, idx_d, merged = _opcheck_samples(device)
    plan, plan_d = ops.merge_plan(*idx, 9), ops.merge_plan(*idx_d, 9, 2)
    xg = x.clone().requires_grad_()
    cases = [
        (torch.ops.tokred.merge_plan.default, (*idx, 9, 1)),
        (torch.ops.tokred.merge_plan.default, (*idx_d, 9, 2)),
        (torch.ops.tokred.merge_by_plan.default, (xg, size, *plan, "wavg")),
        (torch.ops.tokred.merge_by_plan.default, (xg, None, *plan_d, "amax")),
        (torch.ops.tokred._merge_by_plan_backward.default, (merged, x, size, *plan, "mean")),
        (torch.ops.tokred.unmerge_by_plan.default, (merged.clone().requires_grad_(), *plan)),
        (torch.ops.tokred.merge_source_by_plan.default, (None, *plan)),
        (torch.ops.tokred.merge_source_by_plan.default,
         (torch.randint(0, 9, (2, 20), device=device), *plan_d)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_plan_torchscript_and_compile_without_recompiles(device):
    def step(x, metric, r: int, size):
        plan = ops.merge_plan(*ops.bipartite_match(metric, r), metric.shape[1])
        out, size = ops.merge_by_plan(x, size, plan, "wavg")
        return out, size, ops.unmerge_by_plan(out, plan)

    scripted = torch.jit.script(step)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    g = _gen(24)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for b, n, r in [(2, 17, 4), (3, 25, 5), (4, 33, 3)]:
            x = torch.randn(b, n, 8, generator=g).to(device)
            metric = separated_metric(b, n, generator=g).to(device)
            size = random_sizes(b, n, generator=g).to(device)
            want = step(x, metric, r, size)
            for got in (scripted(x, metric, r, size), compiled(x, metric, r, size)):
                assert all(torch.equal(a, e) for a, e in zip(got, want))


def test_tome_merge_traces_sources_only_when_asked(device):
    g = _gen(25)
    x = torch.randn(2, 17, 8, generator=g).to(device)
    metric = separated_metric(2, 17, generator=g).to(device)
    out, size, source = F.tome_merge(x, metric, 4)
    assert source is None
    start = torch.arange(17, device=device).expand(2, 17)
    out2, size2, source = F.tome_merge(x, metric, 4, source=start)
    assert torch.equal(out, out2) and torch.equal(size, size2)
    assert torch.equal(source, R.merge_source(None, *R.bipartite_match(metric, 4), 17))


def test_plan_faults_are_named_on_the_cpu():
    # The CPU names the first faulty output of the first faulty row, in order.
    g = _gen(26)
    plan = ops.merge_plan(*_indices("cpu", 2, 10, 3, 1, g), 10)
    x = torch.randn(2, 10, 4)

    def bad(field, index, value):
        t = getattr(plan, field).clone()
        t[index] = value
        return plan._replace(**{field: t})

    for broken, message in [(bad("offsets", (1, 1), 0), r"batch row 1, output 0: 'offsets' .* rise strictly"),
                            (bad("offsets", (0, -1), 9), r"row 0, output 6: 'offsets' must .* end at N"),
                            (bad("members", (1, 0), 10), r"row 1, output 0: 'members' must hold"),
                            (bad("dest", (0, 0), 1), r"row 0, output 0: 'dest' must map")]:
        with pytest.raises(RuntimeError, match=message):
            ops.merge_by_plan(x, None, broken)


# --------------------------------------------------------------------------- dense partitions

def _partitions(n, g):
    """Destination lists of n tokens: a 2x2 grid's top-left cells (as tomesd's), random subsets,
    one token, all but one, none and all."""
    side = int(n ** 0.5)
    grid = [y * side + x for y in range(0, side - side % 2, 2) for x in range(0, side - side % 2, 2)]
    yield torch.tensor(grid, dtype=torch.long)
    for k in (1, n // 3, n - 1, 0, n):
        yield torch.randperm(n, generator=g)[:k].sort().values


@pytest.mark.parametrize("n", [1, 2, 9, 16, 37, 64])
def test_bipartite_match_plan_matches_reference(device, dtype, n):
    g = _gen(31)
    for dst_tokens in _partitions(n, g):
        metric = tie_free((3, n, 5), dtype, device, g)
        for r in sorted({0, 1, n // 4, n, -1}):
            for tokens in (dst_tokens, dst_tokens.int()):
                got = ops.bipartite_match_plan(metric, tokens.to(device), r)
                want = R.bipartite_match_plan(metric, tokens, r)
                for a, e, name in zip(got, want, ("dest", "offsets", "members")):
                    assert a.dtype == torch.long and torch.equal(a.cpu(), e.cpu()), (n, r, name)


def test_bipartite_match_plan_tie_rule(device, dtype):
    # Duplicated tokens, +-1 entries and a zero token: exact ties and NaN, decided by the rule.
    g = _gen(32)
    for n, d in [(16, 3), (64, 4)]:
        metric = _tied_metric(2, n, d, dtype, g).to(device)
        for dst_tokens in _partitions(n, g):
            for r in (1, n // 4, n // 2):
                got = ops.bipartite_match_plan(metric, dst_tokens.to(device), r)
                want = R.bipartite_match_plan(metric, dst_tokens, r)
                assert all(torch.equal(a.cpu(), e) for a, e in zip(got, want)), (n, r)


def test_bipartite_match_plan_merges_and_unmerges_as_tomesd(device):
    # tomesd's merge ("mean", include_self) and unmerge, written out with its index tensors.
    g = _gen(33)
    h = w = 8
    n = h * w
    dst_tokens = torch.tensor([y * w + x for y in range(0, h, 2) for x in range(1, w, 2)])
    metric = tie_free((2, n, 6), torch.float64, device, g)
    x = torch.randn(2, n, 5, dtype=torch.float64, generator=g).to(device)
    plan = ops.bipartite_match_plan(metric, dst_tokens.to(device), 24)
    merged, size = ops.merge_by_plan(x, None, plan, "mean")
    is_src = torch.ones(n, dtype=torch.bool)
    is_src[dst_tokens] = False
    src_rows = is_src.nonzero()[:, 0].to(device)
    unm_idx, src_idx, dst_idx = R._rank_matches(R._cosine_scores(metric, src_rows, dst_tokens.to(device)), 24)
    a, b = x[:, src_rows], x[:, dst_tokens.to(device)]
    c = x.shape[-1]
    unm = a.gather(1, unm_idx[..., None].expand(-1, -1, c))
    src = a.gather(1, src_idx[..., None].expand(-1, -1, c))
    dst = b.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), src, reduce="mean")
    assert_close(merged, torch.cat([unm, dst], dim=1))
    assert merged.shape == (2, n - 24, 5) and size.sum().item() == 2 * n
    back = ops.unmerge_by_plan(merged, plan)
    assert torch.equal(back[:, dst_tokens.to(device)], merged[:, -dst_tokens.numel():])
    assert torch.equal(back, merged.gather(1, plan.dest[..., None].expand(-1, -1, c)))


def test_bipartite_match_plan_opcheck_meta_and_compile(device):
    g = _gen(34)
    metric = tie_free((2, 16, 4), torch.float32, device, g)
    dst_tokens = torch.tensor([0, 2, 8, 10], device=device)
    for r in (0, 5, 100):
        torch.library.opcheck(torch.ops.tokred.bipartite_match_plan.default, (metric, dst_tokens, r))
    dest, offsets, members = ops.bipartite_match_plan(metric.to("meta"), dst_tokens.to("meta"), 100)
    assert dest.shape == members.shape == (2, 16) and offsets.shape == (2, 16 - 12 + 1)
    torch._dynamo.reset()

    def step(x, m, d):
        plan = ops.bipartite_match_plan(m, d, m.shape[1] // 2)
        return ops.unmerge_by_plan(ops.merge_by_plan(x, None, plan, "mean")[0], plan)
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for b, side in [(2, 4), (3, 6)]:
            n = side * side
            d = torch.tensor([y * side + x for y in range(0, side, 2) for x in range(0, side, 2)],
                             device=device)
            # D = 5, C = 3: no size equal to the destination count (duck sizing would tie them).
            m = tie_free((b, n, 5), torch.float32, device, g)
            x = torch.randn(b, n, 3, generator=g).to(device)
            assert torch.equal(compiled(x, m, d), step(x, m, d))



def test_tome_merge_names_a_metric_that_does_not_score_x():
    from tokred_ext import functional
    with pytest.raises(ValueError, match=r"metric \[B, N, D\] must score x's \[B, N\] = \[1, 5\]"):
        functional.tome_merge(torch.randn(1, 5, 4), torch.randn(1, 6, 4), 2)
