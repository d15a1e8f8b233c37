"""tokred::routed_gather and tokred::routed_attention against the upstream gather + matmul."""
import os
import platform
import random
import subprocess
import sys

import pytest
import torch

from tokred_ext import ops, reference
from conftest import TOL

ops_ = torch.ops.tokred


def routing(n, P, T, device="cpu", distinct=True, generator=None, dtype=torch.int64):
    if distinct:
        idx = torch.stack([torch.randperm(P, generator=generator)[:T] for _ in range(n * P)])
        idx = idx.view(n, P, T)
    else:
        idx = torch.randint(0, P, (n, P, T), generator=generator)
    return idx.to(device=device, dtype=dtype)


def attn_inputs(n, P, wq, wk, T, H, dq, dv, dtype, device, distinct=True, grad=False, g=None):
    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        return t.requires_grad_(grad)
    q, k, v = rnd(n, P, wq, H * dq), rnd(n, P, wk, H * dq), rnd(n, P, wk, H * dv)
    return q, k, v, routing(n, P, T, device, distinct, g)


def assert_close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


# ----------------------------------------------------------------------------------- gather

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_routed_gather_matches_reference(device, dtype, weighted, idx_dtype):
    g = torch.Generator().manual_seed(0)
    for n, P, W, C, T in [(2, 4, 3, 5, 2), (1, 9, 4, 8, 9), (3, 4, 1, 1, 1), (2, 16, 2, 6, 5)]:
        kv = torch.randn(n, P, W, C, generator=g).to(dtype=dtype, device=device)
        r = routing(n, P, T, device, distinct=False, generator=g, dtype=idx_dtype)
        w = torch.rand(n, P, T, generator=g).to(device) if weighted else None
        out = ops.routed_gather(kv, r, w)
        assert out.shape == (n, P, T, W, C) and out.dtype == dtype
        ref = reference.routed_gather(kv, r, w)
        if weighted:
            assert_close(out, ref, dtype)
        else:
            assert torch.equal(out, ref)


@pytest.mark.parametrize("weighted", [False, True])
def test_routed_gather_backward_matches_reference(device, weighted):
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    r = routing(2, 6, 4, device, distinct=False, generator=g)
    w = (torch.rand(2, 6, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
         if weighted else None)
    grad = torch.randn(2, 6, 4, 3, 4, generator=g, dtype=torch.float64).to(device)
    inputs = (kv, w) if weighted else (kv,)
    got = torch.autograd.grad(ops.routed_gather(kv, r, w), inputs, grad)
    want = torch.autograd.grad(reference.routed_gather(kv, r, w), inputs, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------- attention

SHAPES = [  # n, P, wq, wk, T, H, dq, dv
    (2, 4, 5, 3, 2, 2, 4, 3),
    (1, 4, 4, 4, 4, 1, 8, 8),       # topk = P
    (2, 9, 4, 1, 1, 3, 2, 5),       # topk 1, one key per window (ada pooling)
    (1, 4, 16, 4, 3, 2, 16, 16),    # wk != wq (kv downsampling)
    (1, 4, 3, 70, 2, 1, 5, 4),      # keys span several kernel tiles
    (2, 49, 4, 4, 16, 2, 4, 4),     # BiFormer stage-3 layout (small channels)
    (1, 4, 2, 3, 0, 2, 4, 4),       # topk 0: empty softmax -> zeros, lse -inf
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_routed_attention_matches_reference(device, dtype, shape):
    n, P, wq, wk, T, H, dq, dv = shape
    g = torch.Generator().manual_seed(2)
    q, k, v, r = attn_inputs(n, P, wq, wk, T, H, dq, dv, dtype, device, g=g)
    scale = (H * dq) ** -0.5
    out, lse = ops.routed_attention(q, k, v, r, H, scale)
    ref_out, ref_lse = reference.routed_attention(q, k, v, r, H, scale)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert lse.shape == (n, P, H, wq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("shape", SHAPES[:6], ids=[str(s) for s in SHAPES[:6]])
@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16])
def test_routed_attention_backward_matches_reference(device, shape, dt):
    n, P, wq, wk, T, H, dq, dv = shape
    g = torch.Generator().manual_seed(3)
    q, k, v, r = attn_inputs(n, P, wq, wk, T, H, dq, dv, dt, device, distinct=False, grad=True,
                             g=g)
    grad = torch.randn(n, P, wq, H * dv, generator=g).to(dtype=dt, device=device)
    got = torch.autograd.grad(ops.routed_attention(q, k, v, r, H, 0.37)[0], (q, k, v), grad)
    # Reference in float64: bf16's reference is itself far from the exact gradient.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference.routed_attention(q64, k64, v64, r, H, 0.37)[0],
                               (q64, k64, v64), grad.double())
    tol = dict(atol=5e-2, rtol=5e-2) if dt == torch.bfloat16 else TOL[dt]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)


def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(4)
    q, k, v, r = attn_inputs(2, 4, 3, 2, 3, 2, 3, 2, torch.float64, device, distinct=False,
                             grad=True, g=g)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.routed_attention(q, k, v, r, 2, 0.5)[0],
                                    (q, k, v))
    kv = torch.randn(2, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(2, 4, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda kv, w: ops.routed_gather(kv, r, w), (kv, w))
    assert torch.autograd.gradcheck(lambda kv: ops.routed_gather(kv, r), (kv,))


def test_opcheck(device):
    g = torch.Generator().manual_seed(5)
    q, k, v, r = attn_inputs(2, 4, 3, 2, 3, 2, 4, 2, torch.float32, device, grad=True, g=g)
    torch.library.opcheck(ops_.routed_attention.default, (q, k, v, r, 2, 0.5))
    torch.library.opcheck(ops_.routed_attention.default, (q.detach(), k.detach(), v, r.int(), 1,
                                                           1.0))
    kv = torch.randn(2, 4, 3, 5, device=device, requires_grad=True)
    w = torch.rand(2, 4, 3, device=device, requires_grad=True)
    torch.library.opcheck(ops_.routed_gather.default, (kv, r, w))
    torch.library.opcheck(ops_.routed_gather.default, (kv, r))
    out, lse = ops.routed_attention(q, k, v, r, 2, 0.5)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops_._routed_attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), r, out.detach(), lse, 2, 0.5))
    torch.library.opcheck(ops_._routed_gather_backward.default,
                          (torch.randn(2, 4, 3, 3, 5, device=device), kv.detach(), r, w.detach()))


def test_jit_script():
    fa = torch.jit.script(ops.routed_attention)
    fg = torch.jit.script(ops.routed_gather)
    q, k, v, r = attn_inputs(1, 4, 3, 2, 2, 2, 4, 2, torch.float32, "cpu")
    torch.testing.assert_close(fa(q, k, v, r, 2, 0.5)[0], ops.routed_attention(q, k, v, r, 2,
                                                                               0.5)[0])
    kv = torch.randn(1, 4, 2, 3)
    assert torch.equal(fg(kv, r, None), ops.routed_gather(kv, r))


def test_compile_fullgraph_dynamic_no_recompile(device):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def f(q, k, v, r, kv):
        out, lse = ops.routed_attention(q, k, v, r, 2, 0.5)
        return out.sum() + ops.routed_gather(kv, r).sum() + lse.sum()

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    # First sizes all distinct, so duck sizing ties no two dimensions together.
    for n, P, wq, wk, T in [(2, 9, 3, 5, 4), (3, 16, 5, 2, 6), (2, 4, 2, 3, 3)]:
        q, k, v, r = attn_inputs(n, P, wq, wk, T, 2, 4, 3, torch.float32, device, grad=True)
        kv = torch.randn(n, P, wk, 7, device=device, requires_grad=True)
        got = cf(q, k, v, r, kv)
        want = f(q, k, v, r, kv)
        torch.testing.assert_close(got, want)
        gq = torch.autograd.grad(got, (q, k, v, kv))
        wq_ = torch.autograd.grad(f(q, k, v, r, kv), (q, k, v, kv))
        for a, b in zip(gq, wq_):
            torch.testing.assert_close(a, b)
    cnt = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert cnt == 1, f"recompiled: {cnt} graphs"
    torch._dynamo.reset()


def test_compile_inductor_forward():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, r: ops.routed_attention(q, k, v, r, 2, 0.5)[0] * 2,
                      fullgraph=True, dynamic=True)
    q, k, v, r = attn_inputs(1, 4, 3, 2, 2, 2, 4, 2, torch.float32, "cpu")
    torch.testing.assert_close(f(q, k, v, r), ops.routed_attention(q, k, v, r, 2, 0.5)[0] * 2)
    torch._dynamo.reset()


def test_bitwise_deterministic_fwd_bwd(device):
    g = torch.Generator().manual_seed(6)
    q, k, v, r = attn_inputs(2, 9, 5, 4, 4, 2, 8, 8, torch.float32, device, distinct=False,
                             grad=True, g=g)
    kv = torch.randn(2, 9, 4, 6, device=device, requires_grad=True)
    w = torch.rand(2, 9, 4, device=device, requires_grad=True)

    def run():
        out, lse = ops.routed_attention(q, k, v, r, 2, 0.3)
        sel = ops.routed_gather(kv, r, w)
        grads = torch.autograd.grad((out.square().sum(), sel.sin().sum()), (q, k, v, kv, w))
        return (out, lse, sel) + grads

    threads = torch.get_num_threads()
    first = run()
    for nt in {1, threads}:
        torch.set_num_threads(nt)
        try:
            again = run()
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_training_step_deterministic_mode(device):
    from tokred_ext.nn import BiLevelRoutingAttention
    torch.manual_seed(7)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(7)
            m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2, side_dwconv=3).to(device)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            x = torch.randn(2, 8, 8, 16, device=device)
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            results.append([p.detach().clone() for p in m.parameters()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


# ----------------------------------------------------------------------------------- errors

def _good(device="cpu"):
    return attn_inputs(1, 4, 3, 2, 2, 2, 4, 2, torch.float32, device)


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_attention_errors(device_):
    q, k, v, r = _good()
    to = lambda t: t.to(device_)  # noqa: E731
    q, k, v, r = map(to, (q, k, v, r))
    cases = [
        ((q, k, v, r, 3, 0.5), "num_heads.*must divide the q/k channels"),
        ((q, k, v[..., :1], r, 2, 0.5), "num_heads.*must divide the v channels"),
        ((q, k, v, r, 0, 0.5), "num_heads.*must be >= 1"),
        ((q, k[..., :2], v, r, 2, 0.5), "'k'.*channels of q"),
        ((q, k, v[:, :, :1], r, 2, 0.5), "'v'.*must match k"),
        ((q, k[:, :2], v, r, 2, 0.5), "'k'.*region count"),
        ((q, k, v, r[:, :2], 2, 0.5), "'r_idx'.*one row per region"),
        ((q, k, v, r.float(), 2, 0.5), "'r_idx'.*int64 or int32"),
        ((q, k, v, r[0], 2, 0.5), "'r_idx'.*3-D"),
        ((q[0], k, v, r, 2, 0.5), "'q'.*4-D"),
        ((q, k.double(), v, r, 2, 0.5), "'k'.*dtype of q"),
        ((q.int(), k, v, r, 2, 0.5), "'q'.*float32, float16"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops_.routed_attention(*args)


def test_attention_index_out_of_range(device):
    if device == "cuda":
        pytest.skip("a bad r_idx trips a device-side assert on a GPU, which ends the CUDA context; "
                    "the emulated suite (tests/simt) checks those asserts' messages")
    q, k, v, r = _good(device)
    for bad in (-1, 4):
        rb = r.clone()
        rb[0, 1, 1] = bad
        with pytest.raises(RuntimeError, match=r"routed_attention: argument 'r_idx'.*\[0, 4\)"):
            ops.routed_attention(q, k, v, rb, 2, 0.5)
        with pytest.raises(RuntimeError, match=r"routed_gather: argument 'r_idx'.*\[0, 4\)"):
            ops.routed_gather(k, rb)
    out, lse = ops.routed_attention(q, k, v, r, 2, 0.5)
    rb = r.clone()
    rb[0, 0, 0] = 7
    with pytest.raises(RuntimeError, match="_routed_attention_backward: argument 'r_idx'"):
        ops_._routed_attention_backward(out, q, k, v, rb, out, lse, 2, 0.5)
    with pytest.raises(RuntimeError, match="_routed_gather_backward: argument 'r_idx'"):
        ops_._routed_gather_backward(ops.routed_gather(k, r), k, rb)


def test_attention_backward_errors():
    q, k, v, r = _good()
    out, lse = ops.routed_attention(q, k, v, r, 2, 0.5)
    with pytest.raises(RuntimeError, match="'grad_out' must have shape"):
        ops_._routed_attention_backward(out[:, :, :1], q, k, v, r, out, lse, 2, 0.5)
    with pytest.raises(RuntimeError, match="'lse' must have shape"):
        ops_._routed_attention_backward(out, q, k, v, r, out, lse[..., :1], 2, 0.5)
    with pytest.raises(RuntimeError, match="'lse' must be Float"):
        ops_._routed_attention_backward(out, q, k, v, r, out, lse.double(), 2, 0.5)
    with pytest.raises(RuntimeError, match="'out' must have shape"):
        ops_._routed_attention_backward(out, q, k, v, r, out[..., :1], lse, 2, 0.5)


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_gather_errors(device_):
    kv = torch.randn(2, 4, 3, 5, device=device_)
    r = routing(2, 4, 2).to(device_)
    cases = [
        ((kv[0], r), "'kv' must be 4-D"),
        ((kv, r[:1]), "'r_idx' must have batch size"),
        ((kv, r[:, :3]), "'r_idx' must have one row per region"),
        ((kv, r.float()), "'r_idx' must be an int64 or int32"),
        ((kv, r, torch.rand(2, 4, 3, device=device_)), "'r_weight' must have the shape of r_idx"),
        ((kv.int(), r), "'kv' must be float32"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ops_.routed_gather(*args)
    with pytest.raises(RuntimeError, match="'grad' must have the routed_gather output shape"):
        ops_._routed_gather_backward(torch.randn(2, 4, 2, 3, 4, device=device_), kv, r)


# ----------------------------------------------------------------------------------- fuzz

def test_fuzz_against_reference():
    """>= 1000 random small cases per op, every dtype, forward (and backward in float64)."""
    rng = random.Random(1234)
    g = torch.Generator().manual_seed(1234)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    mismatches = []
    for case in range(1000):
        dt = dtypes[case % 4]
        n, P = rng.randint(1, 2), rng.choice([1, 2, 4, 9])
        T = rng.randint(1, P)
        wq, wk = rng.randint(1, 6), rng.randint(1, 6)
        H, dq, dv = rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5)
        distinct = rng.random() < 0.7
        q, k, v, r = attn_inputs(n, P, wq, wk, T, H, dq, dv, dt, "cpu", distinct,
                                 grad=dt == torch.float64, g=g)
        if rng.random() < 0.3:
            r = r.int()
        scale = rng.uniform(0.05, 1.5)
        out, lse = ops.routed_attention(q, k, v, r, H, scale)
        ref_out, ref_lse = reference.routed_attention(q, k, v, r, H, scale)
        try:
            assert_close(out, ref_out, dt)
            assert_close(lse, ref_lse, dt)
            if dt == torch.float64:
                grad = torch.randn(out.shape, generator=g, dtype=dt)
                a = torch.autograd.grad(out, (q, k, v), grad)
                b = torch.autograd.grad(ref_out, (q, k, v), grad)
                for x, y in zip(a, b):
                    assert_close(x, y, dt)
        except AssertionError as e:
            mismatches.append(("attention", case, (n, P, wq, wk, T, H, dq, dv, dt), str(e)[:200]))
        # routed_gather on the same routing.
        kv = torch.randn(n, P, wk, rng.randint(1, 6), generator=g, dtype=torch.float64).to(dt)
        w = torch.rand(r.shape, generator=g) if rng.random() < 0.5 else None
        try:
            got = ops.routed_gather(kv, r, w)
            want = reference.routed_gather(kv, r, w)
            assert_close(got, want, dt)
            if w is None:
                assert torch.equal(got, want)
        except AssertionError as e:
            mismatches.append(("gather", case, (n, P, wk, T, dt), str(e)[:200]))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


@pytest.mark.parametrize("shape", [(1, 2, 3, 1024, 2, 1, 16, 16), (1, 4, 9, 33, 4, 2, 128, 64),
                                   (1, 3, 70, 5, 3, 2, 64, 128)],
                         ids=["wk1024", "dq128", "wq70-dv128"])
def test_large_windows_and_head_dims(device, shape):
    """Window sizes up to 1024 keys and head dims 16..128, forward and backward (float32)."""
    n, P, wq, wk, T, H, dq, dv = shape
    g = torch.Generator().manual_seed(8)
    q, k, v, r = attn_inputs(n, P, wq, wk, T, H, dq, dv, torch.float32, device, grad=True, g=g)
    out, lse = ops.routed_attention(q, k, v, r, H, dq ** -0.5)
    ref, ref_lse = reference.routed_attention(q, k, v, r, H, dq ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_strided_inputs(device):
    """Slices of a fused projection (as the module passes them) give the same results."""
    g = torch.Generator().manual_seed(9)
    n, P, w, T, H = 2, 4, 5, 3, 2
    qkv = torch.randn(n, P, w, 8 + 8 + 6, generator=g, dtype=torch.float64).to(device)
    qkv.requires_grad_()
    q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
    qt = torch.randn(n, w, P, 8, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
    r = routing(n, P, T, device, generator=g)
    for qq in (q, qt):
        out, lse = ops.routed_attention(qq, k, v, r, H, 0.4)
        ref, ref_lse = reference.routed_attention(qq, k, v, r, H, 0.4)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, ref_lse)
    grad = torch.randn(n, P, w, 6, generator=g, dtype=torch.float64).to(device)
    go = torch.randn(n, P, 6, w, generator=g, dtype=torch.float64).to(device).transpose(-1, -2)
    for gg in (grad, go):
        a = torch.autograd.grad(ops.routed_attention(q, k, v, r, H, 0.4)[0], qkv, gg)[0]
        b = torch.autograd.grad(reference.routed_attention(q, k, v, r, H, 0.4)[0], qkv, gg)[0]
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------- fused and unfused CPU kernels

def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None


def _fuses():
    import tokred_ext
    return tokred_ext.build_info()["cpu_fused_multiply_add"]


def _unfused_run(args, cwd):
    """`python args...` in a process whose CPU kernels run unfused (TOKRED_CPU_FMA=0). It imports
    the tokred_ext this process did (installed or built in place), never an unbuilt source tree:
    `python -m` and `-c` put their working directory first on the path."""
    import tokred_ext
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(tokred_ext.__file__)))
    path = os.pathsep.join(filter(None, [package_dir, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TOKRED_CPU_FMA="0", PYTHONPATH=path)
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.skipif(platform.machine() != "x86_64" or _cpu_flags() is None,
                    reason="reads the CPU's flags from /proc/cpuinfo (Linux x86-64)")
def test_cpu_kernels_fuse_exactly_where_the_cpu_has_fma():
    import tokred_ext
    has_fma = {"avx2", "fma"} <= set(_cpu_flags())
    want = has_fma and os.environ.get("TOKRED_CPU_FMA") != "0"
    assert tokred_ext.build_info()["cpu_fused_multiply_add"] == want


@pytest.mark.skipif(os.environ.get("TOKRED_CPU_FMA") == "0", reason="already the unfused run")
def test_unfused_kernels_pass_this_file(tmp_path):
    """This file's tests again in a process that runs the unfused variant. On a CPU with FMA (as
    CI's) the run this test belongs to covered the fused one."""
    res = _unfused_run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(not _fuses(), reason="the CPU runs the unfused kernels only")
def test_fused_and_unfused_kernels_differ_in_the_last_bits_only(tmp_path):
    g = torch.Generator().manual_seed(11)
    q, k, v, r = attn_inputs(2, 9, 16, 16, 3, 2, 32, 32, torch.float32, "cpu", g=g)
    torch.save((q, k, v, r), tmp_path / "inputs.pt")
    script = ("import sys, torch; from tokred_ext import ops; "
              "q, k, v, r = torch.load(sys.argv[1]); "
              "torch.save(ops.routed_attention(q, k, v, r, 2, 0.2), sys.argv[2])")
    res = _unfused_run(["-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                       tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    unfused = torch.load(tmp_path / "out.pt")
    fused = ops.routed_attention(q, k, v, r, 2, 0.2)
    for a, b in zip(fused, unfused):
        assert not torch.equal(a, b)  # the variant did change
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
