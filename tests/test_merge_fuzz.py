"""Fuzz: FUZZ_CASES (1,000 unless TOKRED_FUZZ_CASES says) random small ToMe cases per op against
tokred_ext.reference, zero mismatches."""
import random

import torch
from torch.testing import assert_close

import tokred_ext  # noqa: F401
from tokred_ext import ops
from tokred_ext import reference as R

from conftest import DTYPES, FUZZ_CASES, TOL, tie_free


def test_fuzz_all_merge_ops(device):
    rng = random.Random(20261122)
    gen = torch.Generator().manual_seed(20261122)
    mismatches = []
    for case in range(FUZZ_CASES):
        b, n, d, c = rng.randint(0, 3), rng.randint(1, 24), rng.randint(2, 9), rng.randint(1, 6)
        p = rng.choice([0, 1, 1, 2, 3, 5])
        r = rng.choice([rng.randint(-2, 14), rng.randint(0, n)])
        mode = rng.choice(["sum", "mean", "amax", "wavg"])
        dtype = rng.choice(DTYPES)
        int32 = rng.random() < 0.3
        where = dict(case=case, b=b, n=n, d=d, c=c, p=p, r=r, mode=mode,
                     dtype=dtype)
        # float64 metrics in >= 2 dims: no exact ties (d = 1 makes every cosine +-1), and rounding
        # is far below the gaps between similarities
        metric = torch.randn(b, n, d, dtype=torch.float64, generator=gen).to(device)
        got = ops.bipartite_match(metric, r, p)
        want = R.bipartite_match(metric, r, p)
        if not all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want)):
            mismatches.append(("bipartite_match", where))
            continue
        idx = tuple(i.int() for i in want) if int32 else want
        x = tie_free((b, n, c), dtype, device, gen)
        if rng.random() < 0.5:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
        size = (torch.randint(1, 4, (b, n, 1), generator=gen).to(dtype=dtype, device=device)
                if rng.random() < 0.7 else None)
        out, size_out = ops.merge(x, size, *idx, mode, p)
        ref, ref_size = R.merge(x.double(), None if size is None else size.double(), *idx,
                                mode, p)
        try:
            assert_close(out.double(), ref, **TOL[dtype])
            assert_close(size_out.double(), ref_size, **TOL[dtype])
        except AssertionError as e:
            mismatches.append(("merge", where, str(e)[:200]))
        up = ops.unmerge(out, *idx, n, p)
        if not torch.equal(up, R.unmerge(out, *idx, n, p)):
            mismatches.append(("unmerge", where))
        source = torch.randint(0, max(n, 1), (b, rng.randint(0, 30)), generator=gen).to(device)
        source = None if rng.random() < 0.3 or n == 0 else source
        if not torch.equal(ops.merge_source(source, *idx, n, p),
                           R.merge_source(source, *idx, n, p)):
            mismatches.append(("merge_source", where))
    assert mismatches == []
