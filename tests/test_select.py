"""Selection ops (topk, gather_tokens, complement, prune_tokens) against tokred_ext.reference."""
import pytest
import torch

import tokred_ext  # noqa: F401
from tokred_ext import functional as F
from tokred_ext import ops, reference as ref

from conftest import TOL, rows_tie_free

OPS = torch.ops.tokred


def _assert_same(a, b):
    """Bitwise equality, NaN included."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), (a, b)


# --------------------------------------------------------------------------- topk

@pytest.mark.parametrize("shape", [(7,), (3, 10), (2, 3, 17), (4, 197), (2, 2500)])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_reference(device, dtype, shape, largest):
    g = torch.Generator().manual_seed(0)
    # Few distinct levels: many ties, which must go to the lower index.
    scores = torch.randint(0, 5, shape, generator=g).to(dtype).to(device)
    n = shape[-1]
    for k in sorted({0, 1, n // 2, n}):
        v, i = ops.topk(scores, k, largest)
        rv, ri = ref.topk(scores, k, largest)
        _assert_same(v, rv)
        assert torch.equal(i, ri)


def _rows_of_kind(kind, n, dtype, g):
    """Rows that steer the CPU selection (csrc/cpu/select.cpp) down each of its paths."""
    if kind == "normal":
        return torch.randn(3, n, generator=g).to(dtype)
    if kind == "ties":  # equal keys across the heap's worst entry and the boundary bucket
        return torch.randint(-2, 3, (3, n), generator=g).to(dtype)
    if kind in ("ascending", "descending"):  # the heap is displaced by every entry, or none
        row = torch.arange(n, dtype=torch.float64)
        return (row if kind == "ascending" else -row).expand(3, n).to(dtype)
    if kind == "clustered":  # one far outlier: the narrow cluster takes several histogram passes
        steps = torch.randint(0, 3 * n, (3, n), generator=g).double()
        rows = 1 + steps * torch.finfo(dtype).eps
        rows[:, n // 3] = torch.finfo(dtype).max / 2
        return rows.to(dtype)
    assert kind == "specials"
    row = torch.randn(3, n, generator=g)
    for value, where in ((float("nan"), 5), (float("inf"), 7), (-float("inf"), 11), (0.0, 13),
                         (-0.0, 17), (1e-40, 19), (-1e-40, 23)):
        row[:, where // 2::where] = value
    return row.to(dtype)


# Every path of the CPU selection: the heap for k <= 16, one or more histogram passes, and
# candidate sets of up to 64 (std::sort) and more (radix sort).
@pytest.mark.parametrize("kind", ["normal", "ties", "ascending", "descending", "clustered",
                                  "specials"])
@pytest.mark.parametrize("n", [40, 600, 5000])
def test_topk_every_selection_path_matches_reference(device, dtype, kind, n):
    rows = _rows_of_kind(kind, n, dtype, torch.Generator().manual_seed(n)).to(device)
    for largest in (True, False):
        for k in sorted({k for k in (1, 2, 16, 17, 64, 65, n // 8, n // 2, n - 1, n) if k <= n}):
            v, i = ops.topk(rows, k, largest)
            rv, ri = ref.topk(rows, k, largest)
            _assert_same(v, rv)
            assert torch.equal(i, ri), (kind, n, k, largest)


def test_topk_nan_and_inf(device, dtype):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, -inf, inf, nan, 0.0, -inf]], dtype=dtype, device=device)
    for largest in (True, False):
        for k in range(8):
            v, i = ops.topk(scores, k, largest)
            rv, ri = ref.topk(scores, k, largest)
            _assert_same(v, rv)
            assert torch.equal(i, ri)
    # NaN ranks above +inf, like torch.topk.
    assert ops.topk(scores, 2)[1].tolist() == [[1, 4]]
    assert ops.topk(scores, 2, largest=False)[1].tolist() == [[2, 6]]


def _scores_with_signed_nans(b, n, dtype, device):
    """Random scores where every 7th entry is a NaN with the sign bit set (x86's 0/0 gives one), and
    every 11th a positive NaN."""
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(b, n, generator=g)
    scores[:, 3::11] = float("nan")
    scores[:, ::7] = -torch.tensor(float("nan"))
    scores = scores.to(dtype)
    assert scores[:, ::7].isnan().all() and torch.signbit(scores[:, ::7]).all()
    return scores.to(device)


# n = 3000: CUDA ranks rows longer than 2048 with a radix sort, which orders NaNs by their bits.
@pytest.mark.parametrize("n", [40, 3000])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_ranks_every_nan_above_inf_whatever_its_sign(device, dtype, n, largest):
    scores = _scores_with_signed_nans(2, n, dtype, device)
    nans = int(scores[0].isnan().sum())
    for k in (1, nans, n // 2, n):
        v, i = ops.topk(scores, k, largest)
        rv, ri = ref.topk(scores, k, largest)
        _assert_same(v, rv)
        assert torch.equal(i, ri)
    assert ops.topk(scores, nans, largest=True)[0].isnan().all()


@pytest.mark.parametrize("n", [40, 3000])
def test_prune_tokens_keeps_nan_scored_tokens_first_whatever_their_sign(device, n):
    scores = _scores_with_signed_nans(2, n, torch.float32, device)
    x = torch.randn(2, n + 1, 4).to(device)
    for keep_order in (False, True):
        out, idx = ops.prune_tokens(x, scores, n // 3, False, 1, keep_order)
        rout, ridx = ref.prune_tokens(x, scores, n // 3, False, 1, keep_order)
        assert torch.equal(idx, ridx) and torch.equal(out, rout)


def test_topk_agrees_with_torch_topk_without_ties(device, dtype):
    scores = rows_tie_free(6, 50, dtype, device)
    for largest in (True, False):
        v, i = ops.topk(scores, 13, largest)
        tv, ti = torch.topk(scores, 13, largest=largest)
        assert torch.equal(v, tv) and torch.equal(i, ti)


@pytest.mark.parametrize("n", [9, 3000])
@pytest.mark.parametrize("largest", [True, False])
def test_topk_ragged_lengths(device, dtype, n, largest):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-3, 3, (5, n), generator=g).to(dtype)
    scores[0, 2] = float("nan")
    scores = scores.to(device)
    lengths = torch.tensor([0, 1, n // 2, n, 3], device=device, dtype=torch.int32)
    for k in (0, 1, 4, n):
        v, i = ops.topk(scores, k, largest, lengths)
        rv, ri = ref.topk(scores, k, largest, lengths)
        _assert_same(v, rv)
        assert torch.equal(i, ri)
        assert (i[0] == -1).all()


def test_topk_noncontiguous(device):
    base = torch.randn(30, 8, device=device)
    scores = base.t()  # [8, 30], not contiguous
    v, i = ops.topk(scores, 5)
    rv, ri = ref.topk(scores.contiguous(), 5)
    assert torch.equal(v, rv) and torch.equal(i, ri)


def test_topk_edge_sizes(device):
    assert ops.topk(torch.empty(0, 5, device=device), 3)[0].shape == (0, 3)
    v, i = ops.topk(torch.ones(4, 1, device=device), 1)
    assert i.tolist() == [[0]] * 4
    v, i = ops.topk(torch.empty(3, 0, device=device), 0)
    assert v.shape == (3, 0) and i.shape == (3, 0)


# --------------------------------------------------------------------------- gather / complement

def test_gather_tokens_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 6, generator=g).to(dtype).to(device)
    index = torch.randint(0, 11, (3, 7), generator=g).to(device)
    index[1, 2] = -1  # padding row
    _assert_same(ops.gather_tokens(x, index), ref.gather_tokens(x, index))
    # Non-contiguous x and int32 index.
    xt = torch.randn(3, 6, 11, generator=g).to(dtype).to(device).transpose(1, 2)
    _assert_same(ops.gather_tokens(xt, index.int()), ref.gather_tokens(xt, index))


def test_gather_tokens_edge_sizes(device):
    x = torch.randn(0, 4, 3, device=device)
    assert ops.gather_tokens(x, torch.empty(0, 2, dtype=torch.long, device=device)).shape == (0, 2, 3)
    x = torch.randn(2, 1, 3, device=device)
    idx = torch.zeros(2, 1, dtype=torch.long, device=device)
    assert torch.equal(ops.gather_tokens(x, idx), x)
    assert ops.gather_tokens(x, idx[:, :0]).shape == (2, 0, 3)


def test_complement_matches_reference_and_evit(device):
    index = torch.tensor([[5, 0, 3], [1, 2, 7]], device=device)
    out = ops.complement(index, 8)
    assert out.tolist() == [[1, 2, 4, 6, 7], [0, 3, 4, 5, 6]]  # anchors §1.2 item 7
    g = torch.Generator().manual_seed(3)
    for n, k in [(1, 0), (1, 1), (10, 4), (197, 137), (50, 50)]:
        index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(3)]).to(device)
        assert torch.equal(ops.complement(index, n), ref.complement(index, n))
        assert torch.equal(ops.complement(index.int(), n), ref.complement(index, n))


# --------------------------------------------------------------------------- prune_tokens

@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("num_protected", [0, 1, 2])
def test_prune_tokens_matches_reference(device, dtype, fuse, keep_order, num_protected):
    g = torch.Generator().manual_seed(4)
    B, N, C = 3, 23, 8
    x = torch.randn(B, num_protected + N, C, generator=g).to(dtype).to(device)
    scores = torch.randint(0, 6, (B, N), generator=g).to(dtype).to(device) / 8  # ties
    for k in (0, 1, 16, N):
        out, idx = ops.prune_tokens(x, scores, k, fuse, num_protected, keep_order)
        rout, ridx = ref.prune_tokens(x, scores, k, fuse, num_protected, keep_order)
        assert torch.equal(idx, ridx)
        kept = num_protected + k
        assert torch.equal(out[:, :kept], rout[:, :kept])  # copies are exact
        assert out.shape == rout.shape
        if fuse:
            torch.testing.assert_close(out[:, kept:], rout[:, kept:], **TOL[dtype])


def test_prune_tokens_mixed_dtypes(device):
    x = torch.randn(2, 9, 4, device=device, dtype=torch.float16)
    scores = torch.rand(2, 8, device=device, dtype=torch.float32)
    out, idx = ops.prune_tokens(x, scores, 3, fuse=True)
    rout, ridx = ref.prune_tokens(x, scores, 3, fuse=True)
    assert out.dtype == torch.float16 and torch.equal(idx, ridx)
    torch.testing.assert_close(out, rout, **TOL[torch.float16])


def test_prune_tokens_edge_sizes(device):
    x = torch.randn(0, 5, 3, device=device)
    out, idx = ops.prune_tokens(x, torch.rand(0, 4, device=device), 2, fuse=True)
    assert out.shape == (0, 4, 3) and idx.shape == (0, 2)
    x = torch.randn(2, 2, 3, device=device)
    out, idx = ops.prune_tokens(x, torch.rand(2, 1, device=device), 1, fuse=True)
    assert torch.equal(out[:, :2], x) and (out[:, 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("C", [384, 101])  # 101: rows that start off any vector alignment
def test_large_outputs_equal_small_ones_and_reference(device, dtype, C):
    # Outputs of 4 MiB and more are written with non-temporal stores on the CPU (cpu/copy.h), and
    # float rows of the fused token summed by vector clones: the bits must not change.
    g = torch.Generator().manual_seed(9)
    N, k = 197, 120
    row_bytes = (k + 2) * C * torch.finfo(dtype).bits // 8
    B = -(-(4 << 20) // row_bytes)  # the smallest batch with a streamed output
    x = torch.randn(B, N, C, generator=g).to(dtype).to(device)
    scores = torch.rand(B, N - 1, generator=g).to(device)
    out, idx = ops.prune_tokens(x, scores, k, fuse=True)
    assert out.nbytes >= 4 << 20 > out[:1].nbytes
    for b in (0, B - 1):  # one batch row alone: a small output, ordinary stores
        small, small_idx = ops.prune_tokens(x[b:b + 1], scores[b:b + 1], k, fuse=True)
        assert torch.equal(small, out[b:b + 1]) and torch.equal(small_idx, idx[b:b + 1])
    rout, ridx = ref.prune_tokens(x, scores, k, True, 1, False)
    assert torch.equal(idx, ridx) and torch.equal(out[:, :k + 1], rout[:, :k + 1])
    torch.testing.assert_close(out[:, k + 1:], rout[:, k + 1:], **TOL[dtype])
    gathered = ops.gather_tokens(x, idx + 1)
    assert torch.equal(gathered, ref.gather_tokens(x, idx + 1))
    assert torch.equal(gathered[1:2], ops.gather_tokens(x[1:2], idx[1:2] + 1))


# --------------------------------------------------------------------------- seeds, end to end

def _heaviside(v):
    return (v > 0).to(v.dtype)


def _delta(v):
    return (v == 0).to(v.dtype)


def _seed_topk_pruning(X, attn, k):
    """Seed 000: sort_by_key through kth_largest with heaviside/delta sums, one image."""
    x_non_cls, key = X[1:], attn[0, 1:]
    num_greater = _heaviside(key[None, :] - key[:, None]).sum(1)  # [N]: #{j: key_j > key_i}
    rows = [(_delta(num_greater - r)[:, None] * x_non_cls).sum(0) for r in range(k)]
    return torch.cat([X[:1], torch.stack(rows)]) if k else X[:1]


def _seed_evit(X, attn, k):
    """Seed 002: Top-K's rows plus Σ s_i·x_i over the tokens of rank >= k (the dropped ones)."""
    x_non_cls, key = X[1:], attn[0, 1:]
    num_greater = _heaviside(key[None, :] - key[:, None]).sum(1)
    dropped = _heaviside(num_greater - k + 0.5)
    extra = ((dropped * key)[:, None] * x_non_cls).sum(0, keepdim=True)
    return torch.cat([_seed_topk_pruning(X, attn, k), extra])


def test_topk_and_evit_follow_the_seeds(device):
    g = torch.Generator().manual_seed(5)
    B, N, C, H = 2, 17, 6, 3
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64).to(device)
    attn = torch.softmax(torch.randn(B, H, N, N, generator=g, dtype=torch.float64), -1).to(device)
    for k in (1, 5, 12, 15):  # k = 16 keeps every token: a no-op, as upstream
        out, _ = F.topk_prune(x, attn, k)
        fused, _ = F.evit_prune(x, attn, k)
        for b in range(B):
            a = attn[b].mean(0)  # the seeds read the head-averaged map
            torch.testing.assert_close(out[b], _seed_topk_pruning(x[b], a, k))
            torch.testing.assert_close(fused[b], _seed_evit(x[b], a, k))


def test_functional_keep_rules(device):
    x = torch.randn(2, 197, 4, device=device)
    attn = torch.softmax(torch.randn(2, 3, 197, 197, device=device), -1)
    assert F.evit_prune(x, attn, 0.7)[0].shape[1] == 1 + 138 + 1  # ceil(0.7 * 196) + cls + fused
    assert F.topk_prune(x, attn, 0.49)[0].shape[1] == 1 + 96  # int(0.49 * 196)
    y, idx = F.evit_prune(x, attn, 1.0)
    assert y is x and idx.shape == (2, 196)
    scores = F.class_attention(attn)
    assert torch.equal(F.topk_prune(x, scores, 50)[0], F.topk_prune(x, attn, 50)[0])
    with pytest.raises(ValueError, match="attention map"):
        F.topk_prune(x, attn[0], 3)


# --------------------------------------------------------------------------- gradients

def test_gradients_match_reference(device):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 5, generator=g, dtype=torch.float64).to(device)
    scores = rows_tie_free(2, 11, torch.float64, device, g)
    for fuse in (False, True):
        for keep_order in (False, True):
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            ss = [scores.clone().requires_grad_(), scores.clone().requires_grad_()]
            a, _ = ops.prune_tokens(xs[0], ss[0], 6, fuse, 1, keep_order)
            b, _ = ref.prune_tokens(xs[1], ss[1], 6, fuse, 1, keep_order)
            w = torch.randn_like(a)
            (a * w).sum().backward()
            (b * w).sum().backward()
            torch.testing.assert_close(xs[0].grad, xs[1].grad)
            # Without fusion the reference leaves scores out of the graph (grad None); tokred
            # returns zeros.
            want = ss[1].grad if ss[1].grad is not None else torch.zeros_like(scores)
            torch.testing.assert_close(ss[0].grad, want)
    index = torch.randint(0, 12, (2, 20), generator=g).to(device)  # duplicates accumulate
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 20, 5, dtype=torch.float64, device=device)
    (ops.gather_tokens(xa, index) * w).sum().backward()
    (ref.gather_tokens(xb, index) * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_gradcheck(device):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    # Well separated scores: finite differences must not reorder the selection.
    scores = (rows_tie_free(2, 8, torch.float64, device, g) * 10).requires_grad_()
    index = torch.tensor([[0, 3, 3, -1], [8, 1, 2, 0]], device=device)
    lengths = torch.tensor([8, 5], device=device)
    assert torch.autograd.gradcheck(lambda s: ops.topk(s, 4)[0], (scores,))
    def ragged(s):  # padded slots hold -inf: mask them so finite differences stay finite
        v, i = ops.topk(s, 6, True, lengths)
        return v.masked_fill(i < 0, 0)

    assert torch.autograd.gradcheck(ragged, (scores,))
    assert torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, index), (x,))
    for fuse in (False, True):
        assert torch.autograd.gradcheck(
            lambda t, s: ops.prune_tokens(t, s, 3, fuse, 1, False)[0], (x, scores))
        assert torch.autograd.gradcheck(
            lambda t, s: ops.prune_tokens(t, s, 3, fuse, 1, True)[0], (x, scores))


def test_determinism(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 60, 32, generator=g).to(device)
    scores = torch.randint(0, 4, (4, 59), generator=g).float().to(device)
    runs = []
    for _ in range(3):
        xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
        out, idx = ops.prune_tokens(xr, sr, 20, fuse=True)
        gi = torch.randint(0, 60, (4, 80), generator=torch.Generator().manual_seed(9)).to(device)
        out2 = ops.gather_tokens(xr, gi)
        (out.sum() + out2.square().sum()).backward()
        runs.append((out, idx, out2, xr.grad, sr.grad))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- PyTorch integration

def _opcheck_cases(device):
    x = torch.randn(2, 7, 3, device=device, requires_grad=True)
    s = torch.rand(2, 6, device=device, requires_grad=True)
    idx = torch.tensor([[1, 4, 4], [0, 6, 2]], device=device)
    return [
        (OPS.topk.default, (s, 3, True, None)),
        (OPS.topk.default, (s, 3, False, torch.tensor([2, 6], device=device))),
        (OPS._topk_backward.default, (torch.randn(2, 3, device=device), idx.clamp(max=5), 6)),
        (OPS.gather_tokens.default, (x, idx)),
        (OPS._gather_tokens_backward.default, (torch.randn(2, 3, 3, device=device), idx, 7)),
        (OPS.complement.default, (torch.tensor([[1, 4], [0, 2]], device=device), 5)),
        (OPS.prune_tokens.default, (x, s, 3, True, 1, False)),
        (OPS.prune_tokens.default, (x, s, 2, False, 1, True)),
        (OPS._prune_tokens_backward.default,
         (torch.randn(2, 5, 3, device=device), x.detach(), s.detach(),
          torch.tensor([[1, 4, 0], [5, 2, 3]], device=device), True, 1)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_meta_shapes():
    x = torch.empty(4, 11, 8, device="meta")
    s = torch.empty(4, 10, device="meta")
    out, idx = ops.prune_tokens(x, s, 6, fuse=True)
    assert out.shape == (4, 8, 8) and idx.shape == (4, 6) and idx.dtype == torch.long
    v, i = ops.topk(torch.empty(2, 3, 50, device="meta"), 7)
    assert v.shape == i.shape == (2, 3, 7)
    assert ops.complement(torch.empty(3, 4, dtype=torch.long, device="meta"), 9).shape == (3, 5)
    with pytest.raises(RuntimeError, match="argument 'k'"):
        ops.prune_tokens(x, s, 11)


def test_torchscript(device):
    @torch.jit.script
    def evit(x: torch.Tensor, s: torch.Tensor, k: int):
        out, idx = torch.ops.tokred.prune_tokens(x, s, k, True, 1, False)
        v, i = torch.ops.tokred.topk(s, k, True, None)
        return out, torch.ops.tokred.gather_tokens(x, i), torch.ops.tokred.complement(idx, s.shape[1])

    x, s = torch.randn(2, 9, 4, device=device), torch.rand(2, 8, device=device)
    out, g, c = evit(x, s, 3)
    assert torch.equal(out, ops.prune_tokens(x, s, 3, True)[0])
    assert torch.equal(c, ref.complement(ops.topk(s, 3)[1], 8))


def test_torch_compile_dynamic_no_recompiles(device):
    torch._dynamo.reset()

    def step(x, s, k: int):
        out, idx = ops.prune_tokens(x, s, k, fuse=True)
        v, i = ops.topk(s, k)
        return out, ops.gather_tokens(x[:, 1:], i), ops.complement(idx, s.shape[1])

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        # Sizes stay >= 2: dynamo always specializes the values 0 and 1.
        for B, N, k in [(2, 9, 3), (3, 17, 5), (5, 33, 20), (4, 12, 2)]:
            x, s = torch.randn(B, N + 1, 4, device=device), torch.rand(B, N, device=device)
            got, want = compiled(x, s, k), step(x, s, k)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs(device):
    s = torch.rand(2, 5, device=device)
    x = torch.randn(2, 6, 3, device=device)
    bad = [
        (lambda: ops.topk(s, 6), "argument 'k' must be <= scores.size\\(-1\\) = 5, got 6"),
        (lambda: ops.topk(s, -1), "argument 'k' must be >= 0"),
        (lambda: ops.topk(s.long(), 2), "argument 'scores' must be float32"),
        (lambda: ops.topk(torch.tensor(1.0), 0), "at least 1 dimension"),
        (lambda: ops.topk(s, 2, True, torch.tensor([1, 2, 3], device=device)), "argument 'lengths'"),
        (lambda: ops.topk(s, 2, True, torch.tensor([1.0, 2.0], device=device)), "argument 'lengths' must be an int64"),
        (lambda: ops.gather_tokens(x, torch.tensor([[1], [9]], device=device)), "argument 'index' holds 9"),
        (lambda: ops.gather_tokens(x, torch.tensor([[1], [-2]], device=device)), "argument 'index' holds -2"),
        (lambda: ops.gather_tokens(x[0], torch.tensor([[1]], device=device)), "argument 'x' must be 3-D"),
        (lambda: ops.gather_tokens(x, torch.tensor([[1]], device=device)), "argument 'index' must have batch size"),
        (lambda: ops.gather_tokens(x, torch.tensor([[1.0], [0.0]], device=device)), "must be an int64 or int32"),
        (lambda: ops.complement(torch.tensor([[1, 1]], device=device), 4), "twice"),
        (lambda: ops.complement(torch.tensor([[1, 4]], device=device), 4), "argument 'index' holds 4"),
        (lambda: ops.complement(torch.tensor([[1, 2]], device=device), 1), "argument 'n' must be >= "),
        (lambda: ops.prune_tokens(x, s, 6), "argument 'k' must be <= the number of scored tokens 5"),
        (lambda: ops.prune_tokens(x, s[:, :4], 2), "argument 'scores' must score every unprotected token"),
        (lambda: ops.prune_tokens(x, s[:1], 2), "argument 'scores' must have batch size"),
        (lambda: ops.prune_tokens(x, s, 2, num_protected=-1), "argument 'num_protected' must be >= 0"),
    ]
    if device == "cpu":  # device-mix error needs two devices; meta stands in for the second
        bad.append((lambda: ops.gather_tokens(x, torch.zeros(2, 1, dtype=torch.long, device="meta")),
                    "must be on the same device"))
    for fn, message in bad:
        if device == "cuda" and ("holds" in message or "twice" in message):
            continue  # CUDA reports data-dependent errors with device-side asserts
        with pytest.raises(RuntimeError, match=message):
            fn()
