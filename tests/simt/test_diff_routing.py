"""BiFormer routing ops (csrc/cuda/routing.cu): emulated CUDA against the CPU kernels."""
import pytest
import torch

from differential import DTYPES, assert_both_raise, compare


def _routing(n, P, T, g, distinct=True, index_dtype=torch.int64):
    """r_idx [n, P, T]: distinct regions per query window (top-k routing), or repeats."""
    if distinct:
        idx = torch.stack([torch.randperm(P, generator=g)[:T] for _ in range(n * P)]).view(n, P, T)
    else:
        idx = torch.randint(0, P, (n, P, T), generator=g)
    return idx.to(index_dtype)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_gather_and_backward(weighted, index_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    for n, P, W, C, T in [(2, 4, 3, 5, 2), (1, 9, 4, 8, 9), (3, 4, 1, 1, 1), (2, 16, 2, 70, 5)]:
        kv = torch.randn(n, P, W, C, generator=g).to(dtype)
        idx = _routing(n, P, T, g, distinct=False, index_dtype=index_dtype)
        w = torch.rand(n, P, T, generator=g) if weighted else None
        out = compare("routed_gather", kv, idx, w, exact=() if weighted else (0,))[0]
        grad = torch.randn(out.shape, generator=g).to(dtype)
        # grad_r_weight sums W * C products: up to 140 terms of magnitude 1.
        compare("_routed_gather_backward", grad, kv, idx, w, scale=12)
    kv = torch.randn(2, 3, 4, 5).to(dtype)  # weights in another dtype than kv
    compare("routed_gather", kv, _routing(2, 3, 2, g), torch.rand(2, 3, 2, dtype=torch.float64))


# (n, P, wq, wk, T, H, head dim q, head dim v): wq != wk, wq > 8 (several row blocks per task),
# T * wk > 32 (several key tiles), head dims 16 to 128 and 256 (the largest the kernel supports).
SHAPES = [
    (1, 4, 5, 6, 2, 2, 16, 16),
    (2, 9, 16, 16, 4, 4, 32, 32),
    (1, 3, 1, 40, 3, 1, 64, 128),
    (1, 2, 33, 7, 1, 3, 16, 48),
    (1, 4, 9, 9, 4, 1, 128, 64),
    (1, 2, 3, 5, 2, 1, 256, 256),
    (2, 5, 4, 4, 5, 2, 24, 40),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_attention_and_backward(shape, dtype):
    n, P, wq, wk, T, H, dq, dv = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(n, P, wq, H * dq, generator=g).to(dtype)
    k = torch.randn(n, P, wk, H * dq, generator=g).to(dtype)
    v = torch.randn(n, P, wk, H * dv, generator=g).to(dtype)
    scale = dq ** -0.5
    for topk in sorted({1, T, P}):
        for distinct in (True, False):
            idx = _routing(n, P, topk, g, distinct)
            out, lse = compare("routed_attention", q, k, v, idx, H, scale)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            # Gradients sum over every routed key and query: scale the bound by their count.
            compare("_routed_attention_backward", grad, q, k, v, idx, out, lse, H, scale,
                    scale=(topk * wk * wq) ** 0.5)


def test_routed_attention_strided_inputs_and_int32_index():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, 4, 6, 3 * 32, generator=g)
    q, k, v = qkv.split(32, dim=-1)  # the module's slices of one qkv projection
    idx = _routing(1, 4, 2, g, index_dtype=torch.int32)
    out, lse = compare("routed_attention", q, k, v, idx, 2, 0.25)
    compare("_routed_attention_backward", torch.randn(out.shape, generator=g), q, k, v, idx, out, lse, 2, 0.25,
            scale=4)


def test_bad_region_index_raises_clear_errors():
    """r_idx is checked on the device (CUDA_KERNEL_ASSERT, no host sync): every op, forward and
    backward, rejects an entry past P and a negative one (the backward's segment plan would take -1
    for padding), naming r_idx and the range."""
    kv = torch.randn(1, 3, 2, 4)
    q = torch.randn(1, 3, 2, 8)
    out, lse = torch.ops.tokred.routed_attention(q, q, q, torch.zeros(1, 3, 1, dtype=torch.long), 2, 0.5)
    for bad in (torch.tensor([[[0], [3], [1]]]), torch.tensor([[[0], [-1], [1]]])):
        match = r"r_idx.*\[0, P\)"
        assert_both_raise("routed_gather", kv, bad, None, match=match)
        assert_both_raise("routed_gather", kv, bad, torch.rand(1, 3, 1), match=match)
        for w in (None, torch.rand(1, 3, 1)):
            assert_both_raise("_routed_gather_backward", torch.randn(1, 3, 1, 2, 4), kv, bad, w, match=match)
        assert_both_raise("routed_attention", q, q, q, bad, 2, 0.5, match=match)
        assert_both_raise("_routed_attention_backward", out, q, q, q, bad, out, lse, 2, 0.5, match=match)


def test_empty_shapes():
    ridx = torch.tensor([[[0], [1], [2]]])
    no_routes = torch.zeros(1, 3, 0, dtype=torch.long)
    q = torch.randn(1, 3, 2, 8)
    for q, k, idx in [(torch.randn(1, 3, 0, 8), torch.randn(1, 3, 4, 8), ridx),  # no query rows
                      (q, torch.randn(1, 3, 0, 8), ridx),  # no keys: lse = -inf, out = 0
                      (q, q, no_routes),  # no routed region
                      (torch.randn(0, 3, 2, 8), torch.randn(0, 3, 2, 8), torch.zeros(0, 3, 1, dtype=torch.long))]:
        out, lse = compare("routed_attention", q, k, k, idx, 2, 0.5)
        compare("_routed_attention_backward", torch.randn(out.shape), q, k, k, idx, out, lse, 2, 0.5)
    compare("routed_gather", torch.randn(1, 3, 0, 4), ridx, None)
    compare("routed_gather", torch.randn(1, 3, 2, 4), no_routes, torch.rand(1, 3, 0))
    compare("_routed_gather_backward", torch.randn(1, 3, 0, 2, 4), torch.randn(1, 3, 2, 4), no_routes,
            torch.rand(1, 3, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nan_and_inf_propagate_alike(dtype):
    # Regression: the CUDA warp max and the CPU max dropped NaN scores, and the two backends
    # disagreed (zeros, -inf lse, dropped windows) where softmax gives NaN.
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 4, 16, generator=g).to(dtype)
    k, v = torch.randn(q.shape, generator=g).to(dtype), torch.randn(q.shape, generator=g).to(dtype)
    q[0, 0, 1, 0] = nan  # a NaN query row
    k[0, 1] = nan        # a window whose keys are all NaN
    v[0, 2, 0, 3] = inf
    idx = torch.tensor([[[0, 2], [2, 0], [0, 1]]])
    for scale in (0.25, nan):
        out, lse = compare("routed_attention", q, k, v, idx, 2, scale)
        compare("_routed_attention_backward", torch.randn(out.shape, generator=g).to(dtype), q, k, v, idx,
                out, lse, 2, scale, scale=4)
    big = torch.randn(1, 3, 4, 16, generator=g).to(dtype)
    big[0, 1, 2, 5] = inf  # a +inf score: softmax NaN, lse +inf
    out, lse = compare("routed_attention", big, big, big, idx, 1, 1.0)
