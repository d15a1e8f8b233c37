"""Selection ops (csrc/cuda/select.cu, segment.cu): emulated CUDA against the CPU kernels, on
shapes that reach every kernel path."""
import pytest
import torch

from differential import DTYPES, assert_both_raise, compare

INDEX_DTYPES = [torch.int64, torch.int32]


def _scores(shape, dtype, g):
    """Few distinct levels (many ties), with NaN, a NaN with the sign bit set, and +-inf planted in
    the first row."""
    s = torch.randint(0, 7, shape, generator=g).to(torch.float64) / 4
    flat = s.reshape(-1, shape[-1])
    if shape[-1] > 6:
        flat[0, 1], flat[0, 3], flat[0, 6] = float("nan"), float("inf"), -float("inf")
        flat[0, 4] = -torch.tensor(float("nan"))
    return s.to(dtype)


# --------------------------------------------------------------------------- topk

# n <= 2048 ranks by counting in shared memory (one block per row); n > 2048 takes the sort path.
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 197), (2, 2, 300), (2, 2048), (2, 2049), (3, 3000)])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk(shape, largest, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    scores = _scores(shape, dtype, g)
    n = shape[-1]
    for k in sorted({0, 1, min(5, n), n // 2, n}):
        compare("topk", scores, k, largest, None)


@pytest.mark.parametrize("n", [9, 300, 2048, 2600])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_lengths(n, index_dtype, dtype):
    g = torch.Generator().manual_seed(n)
    rows = 5
    scores = _scores((rows, n), dtype, g)
    lengths = torch.tensor([0, n, 1, n // 2, n - 1], dtype=index_dtype)
    for largest in (True, False):
        for k in (1, n // 3, n):
            compare("topk", scores, k, largest, lengths)


def test_topk_many_rows():
    scores = torch.randn(700, 33)
    compare("topk", scores, 4, True, None)


@pytest.mark.parametrize("n", [12, 3000])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_backward(n, index_dtype, dtype):
    g = torch.Generator().manual_seed(1)
    rows, k = 4, 5
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)])
    index[1, 3:] = -1  # the padding of a short row
    grad = torch.randn(rows, k, generator=g).to(dtype)
    compare("_topk_backward", grad, index.to(index_dtype), n)
    compare("_topk_backward", grad.reshape(2, 2, k), index.reshape(2, 2, k).to(index_dtype), n)


# --------------------------------------------------------------------------- gather_tokens

def _layouts(B, N, C, dtype, g):
    """x as contiguous rows (the 16-byte vector path when C * itemsize % 16 == 0), a view whose
    base is off by one element (misaligned: the scalar path), and transposed rows (strided)."""
    base = torch.randn(B, N, C + 1, generator=g).to(dtype)
    return {
        "contiguous": base[..., :C].contiguous(),
        "misaligned": base[..., 1:],
        "strided": torch.randn(B, C, N, generator=g).to(dtype).transpose(1, 2),
    }


@pytest.mark.parametrize("C", [8, 16, 7, 40])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_tokens(C, index_dtype, dtype):
    g = torch.Generator().manual_seed(C)
    B, N, K = 3, 21, 13
    index = torch.randint(-1, N, (B, K), generator=g).to(index_dtype)
    for name, x in _layouts(B, N, C, dtype, g).items():
        compare("gather_tokens", x, index, exact=(0,))
    compare("gather_tokens", torch.randn(0, N, C).to(dtype), torch.zeros(0, K, dtype=index_dtype), exact=(0,))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_tokens_backward(index_dtype, dtype):
    g = torch.Generator().manual_seed(2)
    B, N, K, C = 3, 17, 30, 9  # K > N: repeated indices sum
    index = torch.randint(-1, N, (B, K), generator=g).to(index_dtype)
    grad = torch.randn(B, K, C, generator=g).to(dtype)
    compare("_gather_tokens_backward", grad, index, N)
    compare("_gather_tokens_backward", grad.transpose(1, 2).contiguous().transpose(1, 2), index, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_index_backwards_on_long_rows(dtype):
    # Rows past the segment plan's block of 256: runs that span chunks, a row with one target
    # throughout, padding between, and more targets (n + 1 counts) than one scan chunk holds.
    g = torch.Generator().manual_seed(7)
    for B, K, n in [(2, 700, 50), (3, 600, 1000), (1, 257, 255)]:
        index = torch.randint(-1, n, (B, K), generator=g)
        index[0] = n // 2
        compare("_gather_tokens_backward", torch.randn(B, K, 5, generator=g).to(dtype), index, n)
    n, k = 3000, 400
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(3)])
    index[1, 300:] = -1
    compare("_topk_backward", torch.randn(3, k, generator=g).to(dtype), index, n)


# --------------------------------------------------------------------------- complement

@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_complement(index_dtype):
    g = torch.Generator().manual_seed(3)
    for n, k in [(1, 0), (1, 1), (10, 3), (197, 98), (300, 300), (64, 0), (4000, 1500)]:
        index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(4)]).to(index_dtype)
        compare("complement", index, n)


# --------------------------------------------------------------------------- prune_tokens

@pytest.mark.parametrize("num_protected", [0, 1, 2])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("keep_order", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prune_tokens(num_protected, fuse, keep_order, dtype):
    g = torch.Generator().manual_seed(4)
    B, N, C = 3, 40, 16
    scores = _scores((B, N), torch.float32, g).softmax(-1).nan_to_num(0.0).to(dtype)
    scores[1, 5:9] = scores[1, 4]  # ties
    for name, x in _layouts(B, num_protected + N, C, dtype, g).items():
        for k in (0, 1, 17, N):
            out, index = compare("prune_tokens", x, scores, k, fuse, num_protected, keep_order,
                                 exact=() if fuse else (0,))
            grad = torch.randn(out.shape, generator=g).to(dtype)
            compare("_prune_tokens_backward", grad, x, scores, index, fuse, num_protected)
            compare("_prune_tokens_backward", grad, x, scores, index.int(), fuse, num_protected)


@pytest.mark.parametrize("C", [3, 8])
def test_prune_tokens_mixed_dtypes_and_long_rows(C):
    # scores in float32 with half tokens; N > 2048 selects through the sort path.
    g = torch.Generator().manual_seed(5)
    B, N = 2, 2100
    x = torch.randn(B, 1 + N, C, generator=g).half()
    scores = torch.rand(B, N, generator=g)
    scores[0, 100:200] = 0.5  # ties
    for keep_order in (False, True):
        for fuse in (False, True):
            out, index = compare("prune_tokens", x, scores, 700, fuse, 1, keep_order)
            grad = torch.randn(out.shape, generator=g).half()
            compare("_prune_tokens_backward", grad, x, scores, index, fuse, 1, scale=N ** 0.5)


def test_prune_tokens_backward_fused_scores_reduce_over_many_channels():
    # grad_scores of a fused token is a dot product over C: C > 32 runs the warp's shuffle tree
    # over several strided loads per lane.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1 + 50, 200, generator=g)
    scores = torch.rand(2, 50, generator=g)
    out, index = compare("prune_tokens", x, scores, 10, True, 1, False)
    compare("_prune_tokens_backward", torch.randn(out.shape, generator=g), x, scores, index, True, 1, scale=15)


# --------------------------------------------------------------------------- device-side checks

def test_bad_indices_raise_clear_errors():
    x = torch.randn(1, 4, 8)
    assert_both_raise("gather_tokens", x, torch.tensor([[0, 9]]), match=r"gather_tokens.*index")
    assert_both_raise("gather_tokens", x, torch.tensor([[0, -2]]), match=r"gather_tokens.*index")
    assert_both_raise("complement", torch.tensor([[0, 7]]), 4, match=r"complement.*index out of range")
    assert_both_raise("complement", torch.tensor([[2, 2]]), 4, match=r"complement.*duplicate index")
    assert_both_raise("_topk_backward", torch.randn(1, 2), torch.tensor([[0, 5]]), 4,
                      match=r"index out of range")
    assert_both_raise("_gather_tokens_backward", torch.randn(1, 2, 3), torch.tensor([[0, -3]]), 4,
                      match=r"index out of range")
    for n in (10, 3000):  # the counting path asserts in the kernel, the sort path before sorting
        assert_both_raise("topk", torch.randn(2, n), 3, True, torch.tensor([3, n + 1]),
                          match=r"topk.*lengths")
    scores = torch.rand(1, 6)
    out, index = torch.ops.tokred.prune_tokens(torch.randn(1, 7, 4), scores, 2, True, 1, False)
    assert_both_raise("_prune_tokens_backward", torch.randn(out.shape), torch.randn(1, 7, 4), scores,
                      torch.tensor([[0, 6]]), True, 1, match=r"kept index out of range|index")


def test_empty_shapes():
    long = torch.long
    compare("topk", torch.randn(0, 5), 2, True, None)
    compare("topk", torch.randn(3, 0), 0, True, None)
    compare("topk", torch.randn(3, 4), 0, True, torch.tensor([1, 2, 3]))
    compare("gather_tokens", torch.randn(2, 5, 0), torch.tensor([[0, 1], [2, -1]]))
    compare("gather_tokens", torch.randn(2, 0, 3), torch.full((2, 2), -1))
    compare("gather_tokens", torch.randn(2, 5, 3), torch.zeros(2, 0, dtype=long))
    compare("_gather_tokens_backward", torch.randn(2, 0, 3), torch.zeros(2, 0, dtype=long), 4)
    compare("_topk_backward", torch.randn(2, 0), torch.zeros(2, 0, dtype=long), 4)
    compare("complement", torch.zeros(2, 0, dtype=long), 0)
    compare("complement", torch.zeros(0, 2, dtype=long), 5)
    for x, scores, k in [(torch.randn(0, 5, 3), torch.randn(0, 4), 2), (torch.randn(2, 1, 3), torch.randn(2, 0), 0),
                         (torch.randn(2, 5, 0), torch.randn(2, 4), 2)]:
        out, index = compare("prune_tokens", x, scores, k, True, 1, False)
        compare("_prune_tokens_backward", torch.randn(out.shape), x, scores, index, True, 1)


@pytest.mark.parametrize("fuse", [False, True])
def test_nan_scores_and_tokens(fuse):
    nan = float("nan")
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 11, 6, generator=g)
    x[0, 4, 2] = nan
    scores = torch.rand(3, 10, generator=g)
    scores[0, 3], scores[1, :] = nan, nan  # NaN ranks above every number
    for keep_order in (False, True):
        out, index = compare("prune_tokens", x, scores, 4, fuse, 1, keep_order)
        compare("_prune_tokens_backward", torch.randn(out.shape, generator=g), x, scores, index, fuse, 1)
