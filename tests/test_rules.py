"""The production counting rules (tokred_ext.rules, functional, nn.routing) against the oracle's own
copies in tokred_ext.reference: two implementations, compared on a grid of inputs. The dense
partition clamp is compared with the op that applies it, tokred::bipartite_match_plan."""
import pytest
import torch
from conftest import DEVICES

from tokred_ext import functional as F
from tokred_ext import reference as R
from tokred_ext import rules
from tokred_ext.nn.routing import TopkRouting

RATES = [0.0, 0.1, 0.25, 0.3, 0.49, 0.5, 0.7, 0.9, 0.99, 1.0]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 196, 197, 576])
def test_keep_counts(n):
    for rate in RATES:
        assert rules.topk_keep_count(rate, n) == R.topk_keep_count(rate, n), (rate, n)
        assert rules.evit_keep_count(rate, n) == R.evit_keep_count(rate, n), (rate, n)


@pytest.mark.parametrize("layers", [1, 2, 12, 24])
@pytest.mark.parametrize("r", [0, 1, 8, 13, 16, (16, -1), (16, 1), (8, -0.5), (13, 0.3), [3, 2], [1] * 30])
def test_parse_r(layers, r):
    assert rules.parse_r(layers, r) == R.parse_r(layers, r)
    assert F.parse_r is rules.parse_r  # functional re-exports the one owner


@pytest.mark.parametrize("n", range(0, 12))
def test_tome_clamp(n):
    # Any prefix: none, a class token, class + distillation, class + register tokens.
    for r in (-3, 0, 1, 2, 5, 10**6):
        for p in (0, 1, 2, 3, 5, 13):
            assert rules.tome_clamp_r(r, n, p) == R.tome_clamp_r(r, n, p)


@pytest.mark.parametrize("device", DEVICES + ["meta"])  # meta: the shape the compilers see
def test_tome_partition_clamp(device):
    for n in range(0, 8):
        for nb in range(0, n + 1):
            # nb destinations spread over the n tokens, strictly ascending.
            dst = (torch.arange(nb) * n // max(nb, 1)).to(device)
            metric = torch.randn(2, n, 4).to(device)
            for r in (-3, -1, 0, 1, 2, n - nb, n - nb + 1, n, 10**6):
                _, offsets, _ = torch.ops.tokred.bipartite_match_plan(metric, dst, r)
                merged = n + 1 - offsets.shape[1]  # offsets is [B, N - r + 1]
                assert rules.tome_partition_clamp_r(r, n, nb) == merged, (n, nb, r)


@pytest.mark.parametrize("p", [1, 2])
def test_class_attention(p):
    attn = torch.rand(3, 4, 9, 9).softmax(-1)
    torch.testing.assert_close(F.class_attention(attn, p), R.class_attention(attn, p))


def test_routing_logits():
    torch.manual_seed(0)
    router = TopkRouting(qk_dim=16, topk=3)
    q, k = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    weight, idx = router(q, k)
    values, ref_idx = R.topk(R.routing_logits(q, k, router.scale), 3)
    torch.testing.assert_close(idx, ref_idx)
    torch.testing.assert_close(weight, values.softmax(-1))
