"""The CPU kernels run on every thread torch offers, and give the same bits on any thread count."""
import sys

import pytest
import torch

import tokred_ext
from tokred_ext import _C, ops

THREADS = torch.get_num_threads()
needs_threads = pytest.mark.skipif(THREADS < 2, reason="one CPU thread: nothing runs in parallel")


@needs_threads
@pytest.mark.skipif(not (torch._C.has_openmp and sys.platform.startswith("linux")),
                    reason="tokred's CPU kernels thread through OpenMP on Linux builds only")
def test_cpu_kernels_use_every_thread():
    # at::parallel_for is a header template: a library built without torch's OpenMP flag runs it
    # on one thread whatever torch.get_num_threads() says.
    assert _C._parallel_threads() == THREADS
    assert tokred_ext.build_info()["cpu_kernel_threads"] == THREADS


def _every_cpu_op():
    """Forward and backward of each op family at sizes that split into many parallel chunks."""
    g = torch.Generator().manual_seed(0)
    B, N, C = 16, 197, 96
    x = torch.randn(B, N, C, generator=g, requires_grad=True)
    scores = torch.rand(B, N - 1, generator=g, requires_grad=True)
    size = torch.rand(B, N, 1, generator=g) + 0.5
    out = {}
    out["topk"] = ops.topk(scores, 60)[0]
    pruned, index = ops.prune_tokens(x, scores, 120, fuse=True)
    out["prune"], out["prune_index"] = pruned, index
    out["gather"] = ops.gather_tokens(x, index)
    metric = torch.randn(B, N, 32, generator=g)
    unm, src, dst = ops.bipartite_match(metric, 60)
    plan = ops.merge_plan(unm, src, dst, N)
    out["plan"] = torch.cat([p.reshape(-1) for p in plan])
    for mode in ("wavg", "mean", "sum", "amax"):
        out["merge_" + mode] = ops.merge_by_plan(x, size, plan, mode)[0]
    out["unmerge"] = ops.unmerge_by_plan(out["merge_wavg"], plan)
    out["source"] = ops.merge_source_by_plan(None, plan)
    kv = torch.randn(4, 16, 8, 64, generator=g, requires_grad=True)
    r_idx = torch.randint(0, 16, (4, 16, 4), generator=g)
    q, k, v = (torch.randn(4, 16, 8, 64, generator=g, requires_grad=True) for _ in range(3))
    out["routed_gather"] = ops.routed_gather(kv, r_idx, torch.rand(4, 16, 4, generator=g))
    out["routed_attention"], out["lse"] = ops.routed_attention(q, k, v, r_idx, 4, 0.125)
    loss = sum(t.double().sin().sum() for t in out.values() if t.is_floating_point())
    leaves = {"x": x, "scores": scores, "kv": kv, "q": q, "k": k, "v": v}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out.update({"grad_" + name: gr for name, gr in zip(leaves, grads)})
    return out


@needs_threads
def test_cpu_kernels_same_bits_on_one_and_many_threads():
    many = _every_cpu_op()
    torch.set_num_threads(1)
    try:
        one = _every_cpu_op()
    finally:
        torch.set_num_threads(THREADS)
    for name in many:
        assert torch.equal(many[name], one[name]), name


@needs_threads
def test_errors_name_the_first_bad_row_on_any_thread_count():
    # Rows fail in several threads' chunks (sizes above each kernel's grain); the message is the
    # one a serial loop would give.
    B, N = 64, 300
    x = torch.randn(B, N, 4)
    index = torch.zeros(B, 256, dtype=torch.long)
    index[5, 1] = N + 7
    index[50, 0] = -3
    lengths = torch.full((512,), 20)
    lengths[9], lengths[500] = 21, -1
    unm, src, dst = ops.bipartite_match(torch.randn(B, N, 8), 4)
    src[33, 0] = unm[33, 0]
    src[62, 1] = unm[62, 0]
    cases = [
        (lambda: ops.gather_tokens(x, index), r"holds 307 at \[5, 1\]"),
        (lambda: ops.topk(torch.rand(512, 20), 2, lengths=lengths), r"got 21 for row 9"),
        (lambda: ops.merge_plan(unm, src, dst, N), r"at \[33, 0\]"),
    ]
    for threads in (1, THREADS):
        torch.set_num_threads(threads)
        try:
            for fn, message in cases:
                for _ in range(10):
                    with pytest.raises(RuntimeError, match=message):
                        fn()
        finally:
            torch.set_num_threads(THREADS)
