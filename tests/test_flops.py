"""FLOP counts: every op's formula against a count worked out by hand for a small shape, SDPA's
CPU kernel against torch's own formula, DeiT-S against its architecture, and each policy's
per-block FLOPs against the block formula at the token counts the model reports."""
import importlib
import json
import math

import pytest
import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, sdpa_backward_flop_count,
                                      sdpa_flop_count)

import tokred_ext
from tokred_ext import cli, flop_formulas
from tokred_ext import ops as T
from tokred_ext.models import biformer_tiny, create_model
from tokred_ext.models.biformer import set_backend
from tokred_ext.nn import policy_from_spec

_ops = torch.ops.tokred


def counts(fn):
    """FLOPs of each op ``fn`` runs: {"tokred.merge_by_plan": n, ...}."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def test_every_op_has_a_formula():
    ops = {name.split("::")[1] for name in tokred_ext.build_info()["ops"]}
    assert set(flop_formulas.FORMULAS) == ops
    for name in ops:
        assert getattr(_ops, name) in flop_registry, name


def test_a_second_import_does_not_register_twice():
    # torch refuses a duplicate registration; the module must skip what is registered already.
    importlib.reload(flop_formulas)
    assert _ops.prune_tokens in flop_registry


# --------------------------------------------------------------------------- each op, by hand

def _g():
    return torch.Generator().manual_seed(0)


def _x(*shape, grad=False):
    return torch.randn(*shape, generator=_g()).requires_grad_(grad)


def _index(b, n, k):
    return torch.stack([torch.randperm(n, generator=_g())[:k] for _ in range(b)])


def _match(n=9, r=3):
    return T.bipartite_match(_x(2, n, 5), r)


def _plan():
    return T.merge_plan(*_match(), 9)


def _routing(weight=False, grad=False):
    kv = _x(2, 4, 3, 5, grad=grad)
    r_idx = torch.randint(0, 4, (2, 4, 2), generator=_g())
    w = _x(2, 4, 2, grad=grad) if weight else None
    return kv, r_idx, w


def _attend(grad=False):
    # q [n=2, P=4, wq=3, cqk=8], k [2, 4, wk=5, 8], v [2, 4, 5, cv=6], topk = 2, 2 heads.
    q, k, v = _x(2, 4, 3, 8, grad=grad), _x(2, 4, 5, 8, grad=grad), _x(2, 4, 5, 6, grad=grad)
    return T.routed_attention(q, k, v, torch.randint(0, 4, (2, 4, 2), generator=_g()), 2, 0.5)[0]


# (id, what runs, the FLOPs of every tokred op it runs). Shapes: B = 2 batch rows throughout.
CASES = [
    ("topk", lambda: T.topk(_x(2, 10), 3), {"tokred.topk": 0}),
    ("gather_tokens", lambda: T.gather_tokens(_x(2, 10, 4), _index(2, 10, 3)),
     {"tokred.gather_tokens": 0}),
    ("complement", lambda: T.complement(_index(2, 10, 3), 10), {"tokred.complement": 0}),
    ("prune_tokens topk", lambda: T.prune_tokens(_x(2, 11, 4), _x(2, 10), 6),
     {"tokred.prune_tokens": 0}),
    # EViT: 10 - 6 = 4 dropped tokens, each times its score into the fused token: 4 * C = 16
    # multiply-adds per row, 2 rows, 2 FLOPs each.
    ("prune_tokens evit", lambda: T.prune_tokens(_x(2, 11, 4), _x(2, 10), 6, fuse=True),
     {"tokred.prune_tokens": 2 * 2 * 4 * 4}),
    # Two protected tokens: still 10 scored, 4 dropped (num_protected is read from the call).
    ("prune_tokens evit P=2",
     lambda: T.prune_tokens(_x(2, 12, 4), _x(2, 10), 6, fuse=True, num_protected=2),
     {"tokred.prune_tokens": 64}),
    # N = 9: A = 5 even tokens, B = 4 odd ones, D = 5: 5 * 4 similarities and 9 norms, each a
    # dot product of 5 multiply-adds, per row.
    ("bipartite_match", lambda: _match(), {"tokred.bipartite_match": 2 * 2 * (5 * 4 + 9) * 5}),
    # N = 2 with a class token: r clamps to (2 - 1) // 2 = 0, nothing is computed.
    ("bipartite_match r=0", lambda: _match(n=2), {"tokred.bipartite_match": 0}),
    ("merge_plan", lambda: _plan(), {"tokred.bipartite_match": 580, "tokred.merge_plan": 0}),
    # Destinations 1 and 4 of N = 9: 7 sources x 2 destinations and 9 norms, D = 5, per row.
    ("bipartite_match_plan",
     lambda: T.bipartite_match_plan(_x(2, 9, 5), torch.tensor([1, 4]), 3),
     {"tokred.bipartite_match_plan": 2 * 2 * (7 * 2 + 9) * 5}),
    ("bipartite_match_plan r=0",
     lambda: T.bipartite_match_plan(_x(2, 9, 5), torch.tensor([1, 4]), 0),
     {"tokred.bipartite_match_plan": 0}),
    # wavg with sizes: every one of the 9 tokens times its size, summed: 9 * C = 36 multiply-adds
    # per row.
    ("merge_by_plan wavg", lambda: T.merge_by_plan(_x(2, 9, 4), _x(2, 9, 1).abs(), _plan()),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.merge_by_plan": 144}),
    ("merge_by_plan sum", lambda: T.merge_by_plan(_x(2, 9, 4), None, _plan(), "sum"),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.merge_by_plan": 0}),
    ("merge_by_plan wavg no size", lambda: T.merge_by_plan(_x(2, 9, 4), None, _plan()),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.merge_by_plan": 0}),
    ("merge wavg", lambda: T.merge(_x(2, 9, 4), _x(2, 9, 1).abs(), *_match()),
     {"tokred.bipartite_match": 580, "tokred.merge": 144}),
    # r = 0: the merge copies.
    ("merge r=0", lambda: T.merge(_x(2, 2, 4), _x(2, 2, 1).abs(), *_match(n=2)),
     {"tokred.bipartite_match": 0, "tokred.merge": 0}),
    ("unmerge", lambda: T.unmerge(_x(2, 6, 4), *_match(), 9),
     {"tokred.bipartite_match": 580, "tokred.unmerge": 0}),
    ("merge_source", lambda: T.merge_source(None, *_match(), 9),
     {"tokred.bipartite_match": 580, "tokred.merge_source": 0}),
    ("unmerge_by_plan", lambda: T.unmerge_by_plan(_x(2, 6, 4), _plan()),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.unmerge_by_plan": 0}),
    ("merge_source_by_plan", lambda: T.merge_source_by_plan(None, _plan()),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.merge_source_by_plan": 0}),
    ("routed_gather", lambda: T.routed_gather(*_routing()), {"tokred.routed_gather": 0}),
    # Soft routing: each of the 2 * 4 * 2 * 3 * 5 = 240 gathered values times its weight.
    ("routed_gather weighted", lambda: T.routed_gather(*_routing(weight=True)),
     {"tokred.routed_gather": 2 * 240}),
    # 2 * 4 windows * 2 heads = 16 attentions of 3 queries over 2 * 5 = 10 keys; head dims 4 (qk)
    # and 3 (v): q kᵀ is 3 * 10 * 4 multiply-adds, p v 3 * 10 * 3.
    ("routed_attention", lambda: _attend(), {"tokred.routed_attention": 2 * 16 * 3 * 10 * (4 + 3)}),
]


def _backward(fn):
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


BACKWARD_CASES = [
    ("topk", _backward(lambda: T.topk(_x(2, 10, grad=True), 3)),
     {"tokred.topk": 0, "tokred._topk_backward": 0}),
    ("gather_tokens", _backward(lambda: T.gather_tokens(_x(2, 10, 4, grad=True), _index(2, 10, 3))),
     {"tokred.gather_tokens": 0, "tokred._gather_tokens_backward": 0}),
    ("prune_tokens topk", _backward(lambda: T.prune_tokens(_x(2, 11, 4, grad=True), _x(2, 10), 6)),
     {"tokred.prune_tokens": 0, "tokred._prune_tokens_backward": 0}),
    # The fused token's transpose (4 dropped rows * C) and the score gradient (4 dot products of
    # C): twice the forward's 64.
    ("prune_tokens evit",
     _backward(lambda: T.prune_tokens(_x(2, 11, 4, grad=True), _x(2, 10, grad=True), 6, fuse=True)),
     {"tokred.prune_tokens": 64, "tokred._prune_tokens_backward": 2 * 2 * 2 * 4 * 4}),
    # Every token's gradient scaled by its weight: the forward's 144 again.
    ("merge_by_plan wavg",
     _backward(lambda: T.merge_by_plan(_x(2, 9, 4, grad=True), _x(2, 9, 1).abs(), _plan())),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.merge_by_plan": 144,
      "tokred._merge_by_plan_backward": 144}),
    ("merge wavg", _backward(lambda: T.merge(_x(2, 9, 4, grad=True), _x(2, 9, 1).abs(), *_match())),
     {"tokred.bipartite_match": 580, "tokred.merge": 144, "tokred._merge_backward": 144}),
    ("merge mean", _backward(lambda: T.merge(_x(2, 9, 4, grad=True), None, *_match(), "mean")),
     {"tokred.bipartite_match": 580, "tokred.merge": 0, "tokred._merge_backward": 0}),
    ("unmerge", _backward(lambda: T.unmerge(_x(2, 6, 4, grad=True), *_match(), 9)),
     {"tokred.bipartite_match": 580, "tokred.unmerge": 0, "tokred._unmerge_backward": 0}),
    # unmerge_by_plan's backward is the plan's sum-merge: 0.
    ("unmerge_by_plan", _backward(lambda: T.unmerge_by_plan(_x(2, 6, 4, grad=True), _plan())),
     {"tokred.bipartite_match": 580, "tokred.merge_plan": 0, "tokred.unmerge_by_plan": 0,
      "tokred.merge_by_plan": 0}),
    ("routed_gather", _backward(lambda: T.routed_gather(*_routing(grad=True))),
     {"tokred.routed_gather": 0, "tokred._routed_gather_backward": 0}),
    # grad_kv (weight * grad) and grad_r_weight (<grad, kv>): two products per gathered value.
    ("routed_gather weighted", _backward(lambda: T.routed_gather(*_routing(weight=True, grad=True))),
     {"tokred.routed_gather": 480, "tokred._routed_gather_backward": 2 * 2 * 240}),
    # As torch's SDPA backward: q kᵀ again (4), dO vᵀ (3), Pᵀ dO (3), dS k (4), dSᵀ q (4).
    ("routed_attention", _backward(lambda: _attend(grad=True)),
     {"tokred.routed_attention": 6720,
      "tokred._routed_attention_backward": 2 * 16 * 3 * 10 * (4 + 3 + 3 + 4 + 4)}),
]


@pytest.mark.parametrize("fn,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_formula(fn, expected):
    with torch.no_grad():
        got = counts(fn)
    assert {k: v for k, v in got.items() if k.startswith("tokred.")} == expected


@pytest.mark.parametrize("fn,expected", [c[1:] for c in BACKWARD_CASES],
                         ids=[c[0] for c in BACKWARD_CASES])
def test_backward_formula(fn, expected):
    got = counts(fn)
    assert {k: v for k, v in got.items() if k.startswith("tokred.")} == expected


def test_every_op_is_run_above():
    seen = set().union(*(c[2] for c in BACKWARD_CASES + CASES))
    assert {f"tokred.{n}" for n in flop_formulas.FORMULAS} - seen == set()


# --------------------------------------------------------------------------- SDPA on the CPU

def test_sdpa_cpu_kernel_is_counted_as_torch_counts_sdpa():
    # q [2, 3 heads, 7, 8], k and v [2, 3, 5, 8] (equal head dims: the CPU flash kernel's case).
    # torch has formulas for the CUDA kernels only; the CPU flash kernel must count the same.
    q, k, v = _x(2, 3, 7, 8, grad=True), _x(2, 3, 5, 8, grad=True), _x(2, 3, 5, 8, grad=True)

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    got = counts(run)
    shapes = (q.shape, k.shape, v.shape)
    fwd = "aten._scaled_dot_product_flash_attention_for_cpu"
    assert got[fwd] == sdpa_flop_count(*shapes) == 2 * 6 * 7 * 5 * (8 + 8)
    assert (got[fwd + "_backward"] == sdpa_backward_flop_count((2, 3, 7, 8), *shapes)
            == 2 * 6 * 7 * 5 * (3 * 8 + 2 * 8))
    # The math backend's two bmm do the same multiply-adds.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), torch.no_grad():
        assert counts(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)) == \
            {"aten.bmm": got[fwd]}


# --------------------------------------------------------------------------- models

C, HEADS, MLP, PATCHES, CLASSES = 384, 6, 4 * 384, 196, 1000
# DeiT-S outside its blocks: the 16x16 patch conv (3 * 16 * 16 = 768 inputs per output) and the
# head; LayerNorm, GELU, softmax and the additions count 0 (as torch counts them).
OUTSIDE = 2 * PATCHES * 768 * C + 2 * C * CLASSES


def block_flops(n_in, n_out, method=None):
    """One DeiT-S block with ``n_in`` tokens entering and ``n_out`` leaving: qkv and proj and the
    attention at n_in, the reduction step, the MLP at n_out."""
    f = 2 * n_in * C * 3 * C + 2 * n_in * C * C + 2 * 2 * n_in * n_in * C
    f += 2 * 2 * n_out * C * MLP
    if method in ("topk", "evit"):
        f += 2 * n_in * C  # the class token's attention row, all heads: 1 x n_in per head
    if method == "evit":
        dropped = n_in - (n_out - 1)  # the kept tokens and the fused one leave
        f += 2 * dropped * C
    if method == "tome":
        d = C // HEADS  # the metric: keys averaged over heads
        f += 2 * ((n_in + 1) // 2 * (n_in // 2) + n_in) * d  # matching: similarities, norms
        f += 2 * n_in * C  # wavg merge
    return f


def _images(batch=1):
    return torch.randn(batch, 3, 224, 224, generator=_g())


def test_deit_small_without_reduction():
    model = create_model("deit_small_patch16_224")
    report = tokred_ext.flops(model, _images())
    expected = OUTSIDE + 12 * block_flops(197, 197)
    assert report.flops == expected == 9_197_764_608
    assert round(report.gmacs, 2) == 4.60  # DeiT-S's published "4.6 GFLOPs" (MACs)
    assert [(b.name, b.tokens_in, b.tokens_out) for b in report.blocks] == \
        [(f"blocks.{i}", 197, 197) for i in range(12)]
    assert all(b.flops == block_flops(197, 197) for b in report.blocks)
    assert report.outside_blocks == OUTSIDE


@pytest.mark.parametrize("spec", ["topk:0.7", "evit:0.7", "tome:13"])
def test_policy_per_block(spec):
    policy = policy_from_spec(spec)
    model = create_model("deit_small_patch16_224", reduction=policy)
    report = tokred_ext.flops(model, _images())
    method = spec.split(":")[0]
    n_in = [197] + model.token_counts[:-1]
    reducing = set(range(12)) if method == "tome" else set(policy.locs)
    expected = [block_flops(a, b, method if i in reducing else None)
                for i, (a, b) in enumerate(zip(n_in, model.token_counts))]
    assert [b.flops for b in report.blocks] == expected
    assert [(b.tokens_in, b.tokens_out) for b in report.blocks] == list(zip(n_in, model.token_counts))
    assert report.flops == OUTSIDE + sum(expected)
    # The schedule is visible: the tokens shrink where the policy acts.
    if method == "tome":
        assert model.token_counts == [197 - 13 * (i + 1) for i in range(12)]
    else:
        assert len(set(model.token_counts)) == 4 and model.token_counts[3] < 197


def test_flops_scale_with_the_batch():
    model = create_model("deit_small_patch16_224", reduction=policy_from_spec("tome:13"))
    one, two = (tokred_ext.flops(model, _images(b)) for b in (1, 2))
    assert two.flops == 2 * one.flops and two.batch == 2
    assert [b.flops for b in two.blocks] == [2 * b.flops for b in one.blocks]


def test_biformer_per_block_and_fused_attention_counted_as_its_matmuls():
    model = biformer_tiny()
    report = tokred_ext.flops(model, _images())
    tokens = [3136] * 2 + [784] * 2 + [196] * 8 + [49] * 2
    assert [b.tokens_in for b in report.blocks] == [b.tokens_out for b in report.blocks] == tokens
    assert report.blocks[4].name == "stages.2.0"
    # Stage s has 7 x 7 windows of w = (56 / 2**s / 7)**2 pixels, routed to topk = 1, 4, 16
    # windows, qk and v dims 64, 128, 256: q kᵀ and p v per window.
    routed = sum(depth * 2 * 49 * w * (topk * w) * 2 * dim
                 for depth, w, topk, dim in ((2, 64, 1, 64), (2, 16, 4, 128), (8, 4, 16, 256)))
    assert report.by_op["tokred.routed_attention"] == routed
    # Upstream's gather + matmul (the reference backend) does the same multiply-adds in bmm.
    reference = tokred_ext.flops(set_backend(model, "reference"), _images())
    assert reference.flops == report.flops
    assert "tokred.routed_attention" not in reference.by_op
    assert 2.2 <= report.gmacs < 2.25  # BiFormer-T's published 2.2 G


# --------------------------------------------------------------------------- flops() itself

def test_total_only_and_restored_modes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    model[1].eval()  # a mixed model: each flag must come back as it was
    report = tokred_ext.flops(model, _x(2, 4), per_block=False)
    assert report.flops == 2 * 2 * 4 * 3 and report.blocks == () and report.gmacs == 24 / 1e9
    assert model.training and model[0].training and not model[1].training


LINEAR = torch.nn.Linear(4, 3)


@pytest.mark.parametrize("model,inp,err,match", [
    (LINEAR, _x(2, 4), ValueError, "cannot find the blocks of Linear"),
    (None, _x(2, 4), TypeError, "model must be a torch.nn.Module"),
    (LINEAR, [1.0], TypeError, "input must be a Tensor"),
    (LINEAR, torch.tensor(1.0), ValueError, "batch dimension"),
], ids=["no blocks", "not a module", "not a tensor", "0-d"])
def test_bad_input(model, inp, err, match):
    with pytest.raises(err, match=match):
        tokred_ext.flops(model, inp)


# --------------------------------------------------------------------------- the command

def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_table(capsys):
    rc, out, err = _run(capsys, "flops", "--model", "deit_small_patch16_224", "--policy", "tome:13")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[1].split() == ["block", "tokens", "in", "tokens", "out", "GFLOPs"]
    rows = [line.split() for line in lines[2:14]]
    assert [r[:3] for r in rows] == [[f"blocks.{i}", str(197 - 13 * i), str(184 - 13 * i)]
                                     for i in range(12)]
    first = block_flops(197, 184, "tome") / 1e9
    assert math.isclose(float(rows[0][3]), first, abs_tol=5e-5)
    assert lines[-1].startswith("total: ") and "GMACs" in lines[-1]


def test_cli_json_alone_on_stdout(capsys):
    rc, out, err = _run(capsys, "flops", "--model", "deit_small", "--policy", "evit:0.7",
                        "--batch", "2", "--json")
    assert rc == 0, err
    data = json.loads(out)  # nothing but the JSON
    model = create_model("deit_small_patch16_224", reduction=policy_from_spec("evit:0.7"))
    expected = tokred_ext.flops(model, _images(2))
    assert data["flops"] == expected.flops and data["batch"] == 2
    assert data["gmacs"] == expected.flops / 2e9
    assert [b["tokens_out"] for b in data["blocks"]] == model.token_counts
    assert data["model"] == "deit_small_patch16_224" and data["policy"] == "evit:0.7"


def test_cli_biformer(capsys):
    rc, out, err = _run(capsys, "flops", "--model", "biformer_tiny", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert len(data["blocks"]) == 14 and data["blocks"][-1]["tokens_in"] == 49
