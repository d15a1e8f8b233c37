"""Fuzz: FUZZ_CASES (1,000 unless TOKRED_FUZZ_CASES says) random small cases per selection op,
compared with the reference.

The seed changes every run and is printed on failure; set TOKRED_FUZZ_SEED to replay one.
"""
import os
import random

import torch

import tokred_ext  # noqa: F401
from tokred_ext import ops, reference as ref

from conftest import DTYPES, FUZZ_CASES, TOL


def _seed():
    return int(os.environ.get("TOKRED_FUZZ_SEED", random.SystemRandom().randrange(2**31)))


def _scores(rnd, shape, dtype, device, gen):
    kind = rnd.choice(["ties", "normal", "special"])
    if kind == "ties":
        s = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
    else:
        s = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "special" and s.numel():
        flat = s.view(-1)
        for _ in range(rnd.randint(1, 3)):
            flat[rnd.randrange(flat.numel())] = rnd.choice([float("nan"), float("inf"), float("-inf")])
    s = s.to(dtype).to(device)
    if rnd.random() < 0.3 and s.dim() >= 2:  # non-contiguous view of the same values
        s = s.transpose(0, -1).contiguous().transpose(0, -1)
    return s


def _same(a, b):
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_fuzz_topk(device):
    seed = _seed()
    rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for case in range(FUZZ_CASES):
        lead = [rnd.randint(0, 3) for _ in range(rnd.randint(0, 2))]
        n = rnd.randint(0, 40)
        k = rnd.randint(0, n)
        largest = rnd.random() < 0.5
        dtype = rnd.choice(DTYPES)
        s = _scores(rnd, lead + [n], dtype, device, gen)
        lengths = None
        if rnd.random() < 0.3:
            lengths = torch.randint(0, n + 1, lead, generator=gen).to(device)
        got = ops.topk(s, k, largest, lengths)
        want = ref.topk(s, k, largest, lengths)
        assert _same(got[0], want[0]) and torch.equal(got[1], want[1]), (
            f"seed {seed} case {case}: shape {lead + [n]} k {k} largest {largest} {dtype}")


def test_fuzz_gather_and_complement(device):
    seed = _seed()
    rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for case in range(FUZZ_CASES):
        B, N, C = rnd.randint(0, 3), rnd.randint(1, 24), rnd.randint(1, 9)
        dtype = rnd.choice(DTYPES)
        x = torch.randn(B, N, C, generator=gen).to(dtype).to(device)
        if rnd.random() < 0.3:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        K = rnd.randint(0, 2 * N)
        index = torch.randint(-1, N, (B, K), generator=gen).to(device)
        index = index.int() if rnd.random() < 0.3 else index
        assert torch.equal(ops.gather_tokens(x, index), ref.gather_tokens(x, index)), (
            f"seed {seed} case {case}: gather B {B} N {N} C {C} K {K} {dtype}")
        k = rnd.randint(0, N)
        keep = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(B)]) if B else \
            torch.empty(0, k, dtype=torch.long)
        keep = keep.to(device)
        assert torch.equal(ops.complement(keep, N), ref.complement(keep, N)), (
            f"seed {seed} case {case}: complement B {B} N {N} k {k}")


def test_fuzz_prune_tokens(device):
    seed = _seed()
    rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for case in range(FUZZ_CASES):
        B, N, C, P = rnd.randint(0, 3), rnd.randint(0, 24), rnd.randint(1, 9), rnd.randint(0, 2)
        k = rnd.randint(0, N)
        fuse, keep_order = rnd.random() < 0.5, rnd.random() < 0.5
        dtype = rnd.choice(DTYPES)
        x = torch.randn(B, P + N, C, generator=gen).to(dtype).to(device)
        s = _scores(rnd, [B, N], dtype, device, gen).nan_to_num(0.5, 2.0, -2.0)
        out, idx = ops.prune_tokens(x, s, k, fuse, P, keep_order)
        rout, ridx = ref.prune_tokens(x, s, k, fuse, P, keep_order)
        where = f"seed {seed} case {case}: B {B} N {N} C {C} P {P} k {k} fuse {fuse} {dtype}"
        assert torch.equal(idx, ridx), where
        assert torch.equal(out[:, :P + k], rout[:, :P + k]), where
        torch.testing.assert_close(out[:, P + k:], rout[:, P + k:], **TOL[dtype], msg=where)
