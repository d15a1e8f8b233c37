"""ViT models with Top-K, EViT and ToMe: logits equal the upstream-style reference model, token
counts follow the upstream tables, and the policies compile."""
import math

import pytest
import torch

import tokred_ext
from tokred_ext import functional, reference
from tokred_ext.models import MODELS, VisionTransformer, create_model
from tokred_ext.nn import EViT, ToMe, TopK, attention_forward
from tokred_ext.nn.attention import Attention



def tiny(distilled=False, img_size=64, patch_size=8, depth=4, dim=64, heads=4, **kw):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth,
                          num_heads=heads, num_classes=10, distilled=distilled, **kw).eval()
    # Larger weights than the default init make attention peaked, so no two tokens tie.
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return m


def policies():
    out = [("topk", lambda: TopK(0.6, locs=(0, 2, 3))),
           ("evit", lambda: EViT(0.6, locs=(0, 2, 3))),
           ("evit_nofuse", lambda: EViT(0.6, locs=(1, 3), fuse=False)),
           ("topk_rates", lambda: TopK([0.9, 0.5], locs=(1, 2)))]
    out += [("tome", lambda: ToMe(8)), ("tome_noprop", lambda: ToMe(6, prop_attn=False)),
            ("tome_sched", lambda: ToMe((8, -0.5)))]
    return out


POLICIES = policies()


# --------------------------------------------------------------------------- attention

@pytest.mark.parametrize("num_protected", [1, 2])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_class_scores_equal_full_map(num_protected, qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm).eval()
    x = torch.randn(3, 11, 32)
    size = torch.randint(1, 4, (3, 11, 1)).float()
    for s in (None, size):
        out, scores, metric = attention_forward(attn, x, s, True, num_protected, True)
        ref_out, ref_map, ref_metric = reference._attention(attn, x, s)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores, ref_map[:, :, 0, num_protected:].mean(1))
        torch.testing.assert_close(metric, ref_metric)


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("distilled", [False, True], ids=["cls", "distilled"])
@pytest.mark.parametrize("name,make", POLICIES, ids=[p[0] for p in POLICIES])
def test_model_equals_reference(name, make, distilled):
    model = tiny(distilled)
    x = torch.randn(2, 3, 64, 64)
    model.reduction = make()
    ref = reference.ReferenceViT(model, make())
    with torch.no_grad():
        out = model(x)
        expected = ref(x)
    assert model.token_counts == ref.token_counts
    assert model.token_counts[-1] < 64 + model.num_prefix_tokens
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_no_reduction_equals_reference():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.ReferenceViT(model)(x), atol=1e-4,
                                   rtol=1e-4)
    assert model.token_counts == [65] * 4


@pytest.mark.parametrize("name,make", POLICIES[:2], ids=[p[0] for p in POLICIES[:2]])
def test_gradients_match_reference(name, make):
    model = tiny()
    model.reduction = make()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference.ReferenceViT(model, make())(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-3, rtol=1e-3, msg=n)


def test_layer_scale_and_qk_norm():
    model = tiny(init_values=0.5, qk_norm=True)
    model.reduction = EViT(0.5, locs=(1, 2))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.ReferenceViT(model, EViT(0.5, (1, 2)))(x),
                                   atol=1e-4, rtol=1e-4)
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.ls1.gamma", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias"} <= names


# --------------------------------------------------------------------------- token counts

def counts_for(policy, depth=12, img_size=224):
    """Token counts for DeiT/ViT geometry (197 tokens) on a narrow model: counts do not depend
    on the width."""
    torch.manual_seed(0)
    m = VisionTransformer(img_size=img_size, embed_dim=24, depth=depth, num_heads=2,
                          num_classes=0, reduction=policy).eval()
    with torch.no_grad():
        m(torch.randn(1, 3, img_size, img_size))
    return m.token_counts


@pytest.mark.parametrize("kr,expected", [(0.7, (137, 96, 67)), (0.9, (176, 158, 142)),
                                         (0.5, (98, 49, 24)), (0.25, (49, 12, 3))])
def test_topk_counts_haurum(kr, expected):
    counts = counts_for(TopK(kr))
    assert counts == [197] * 3 + [1 + expected[0]] * 3 + [1 + expected[1]] * 3 + \
        [1 + expected[2]] * 3


@pytest.mark.parametrize("kr,fuse,expected", [
    (0.9, True, (179, 163, 148)), (0.8, True, (159, 129, 105)), (0.7, True, (140, 100, 72)),
    (0.6, True, (120, 74, 46)), (0.5, True, (100, 52, 28)), (0.7, False, (139, 98, 69))])
def test_evit_counts_table(kr, fuse, expected):
    counts = counts_for(EViT(kr, fuse=fuse))
    assert counts[3] == expected[0] and counts[6] == expected[1] and counts[9] == expected[2]
    assert counts[2] == 197 and counts[5] == counts[3] and counts[11] == counts[9]


@pytest.mark.parametrize("r,depth,last", [(16, 12, 11), (13, 12, 41), (8, 24, 7)])
def test_tome_counts_table(r, depth, last):
    counts = counts_for(ToMe(r), depth=depth)
    assert counts[0] == 197 - r and counts[-1] == last


def test_tome_counts_schedules():
    assert counts_for(ToMe((16, -1))) == [165, 136, 110, 87, 67, 50, 36, 25, 17, 12, 10, 10]
    assert counts_for(ToMe(100)) == [99, 50, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2]


def test_factories_build_timm_names():
    names = dict(create_model("deit_tiny_distilled_patch16_224").named_parameters())
    for n in ["cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight",
              "blocks.11.attn.qkv.weight", "blocks.11.attn.proj.bias", "blocks.0.norm1.weight",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.weight",
              "head_dist.weight"]:
        assert n in names, n
    assert names["pos_embed"].shape == (1, 198, 192)
    assert set(MODELS) >= {"deit_small_patch16_224", "vit_large_patch16_384",
                           "deit_base_distilled_patch16_224", "vit_base_patch16_384"}
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


def test_policy_argument_errors():
    with pytest.raises(ValueError, match="keep rate"):
        TopK(1.5)
    with pytest.raises(ValueError, match="locations"):
        EViT([0.5, 0.6], locs=(3, 6, 9))
    with pytest.raises(ValueError, match="outside"):
        tiny(depth=4).set_reduction(TopK(0.5, locs=(9,)))(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("make,error,message", [
    (lambda: ToMe(-1), ValueError, "r must be a token count >= 0"),
    (lambda: ToMe(1.5), ValueError, "r must be a token count"),
    (lambda: ToMe([1.5, 2]), ValueError, "r must be a token count"),
    (lambda: ToMe([-1, 2]), ValueError, "r must be a token count"),
    (lambda: ToMe((3,)), ValueError, "r must be a token count"),
    (lambda: ToMe((3, float("nan"))), ValueError, "finite inflection"),
    (lambda: ToMe("3"), ValueError, "r must be a token count"),
    (lambda: ToMe(None), ValueError, "r must be a token count"),
    (lambda: TopK("0.5"), ValueError, "keep_rate must be a number"),
    (lambda: TopK(float("nan")), ValueError, "keep rate must be in"),
    (lambda: TopK(0.5, locs=(1.5,)), ValueError, "locs must be block indices"),
    (lambda: EViT(0.7, locs="3"), ValueError, "locs must be block indices"),
    (lambda: tiny(patch_size=0), ValueError, "patch_size"),
    (lambda: tiny(heads=0), ValueError, "num_heads"),
    (lambda: tiny(img_size=-8), ValueError, "img_size"),
    (lambda: tiny(reduction="tome"), TypeError, "must be a tokred_ext.nn.ReductionPolicy"),
    (lambda: tiny().set_reduction("tome"), TypeError, "must be a tokred_ext.nn.ReductionPolicy"),
])
def test_constructors_refuse_bad_arguments_at_once(make, error, message):
    """A bad argument is refused where it is given, naming it, not later inside a forward."""
    with pytest.raises(error, match=message):
        make()


def test_constructors_take_numpy_integers_and_keep_python_types():
    np = pytest.importorskip("numpy")
    assert ToMe(np.int64(3)).r == 3 and type(ToMe(np.int64(3)).r) is int
    assert ToMe((np.int64(3), 1)).r == (3, 1.0)
    assert TopK(0.5, locs=np.arange(2)).locs == (0, 1)


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_a_pooling_head_refuses_to_pool_no_tokens(global_pool):
    """Without a class token, a Top-K step keeping no patch left the head nothing: NaN (avg) or
    the bias alone (map), silently."""
    model = tiny(class_token=False, global_pool=global_pool, reduction=TopK(0.01, locs=(1,)))
    with pytest.raises(ValueError, match="left no tokens after the prefix"):
        model(torch.randn(1, 3, 64, 64))


# --------------------------------------------------------------------------- source maps

@pytest.mark.parametrize("fuse", [False, True])
def test_evit_source_map_follows_tokens(fuse):
    """Tracing the map must send every kept original token to the row holding it."""
    model = tiny(depth=2)
    model.blocks[1].mlp.fc2.weight.data.zero_()   # the reduction's output passes through
    model.blocks[1].mlp.fc2.bias.data.zero_()
    model.reduction = EViT(0.5, locs=(1,), fuse=fuse, trace_source=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
    src = model.sources[-1]
    assert src.shape == (2, 65) and (src[:, 0] == 0).all()
    kept = (src >= 0) & (src < 1 + 32)
    assert int(kept[0].sum()) == 33
    if fuse:
        assert ((src == 33) | kept).all()
    else:
        assert ((src == -1) | kept).all()


# --------------------------------------------------------------------------- compile / script

@pytest.mark.parametrize("name,make", POLICIES[:2] + [POLICIES[4]],
                         ids=["topk", "evit", "tome"])
def test_compile_fullgraph(name, make):
    torch._dynamo.reset()
    model = tiny()
    model.reduction = make()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        counts = list(model.token_counts)
        model.token_counts = []
        # aot_eager traces through the ops' Meta kernels and autograd registration.
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert model.token_counts == counts


@torch.jit.script
def _scripted_evit_step(x: torch.Tensor, scores: torch.Tensor, rate: float,
                        num_protected: int, fuse: bool):
    k = int(math.ceil(rate * (x.shape[1] - num_protected)))
    return tokred_ext.ops.prune_tokens(x, scores, k, fuse, num_protected, False)


def test_jit_script_policy_path():
    """The reduction step a policy runs (keep-count rule + tokred op) scripts on its own; whole
    models script too (tests/test_torchscript.py)."""
    x = torch.randn(2, 17, 8)
    scores = torch.rand(2, 16).softmax(-1)
    out, index = _scripted_evit_step(x, scores, 0.5, 1, True)
    expected, eindex = functional.evit_prune(x, scores, 0.5)
    torch.testing.assert_close(out, expected)
    assert torch.equal(index, eindex)


@pytest.mark.parametrize("name,make", POLICIES, ids=[p[0] for p in POLICIES])
def test_every_policy_takes_batch_zero(name, make):
    # Regression: ToMe's size bias reshaped [0, N, 1] with -1 and failed.
    model = tiny().eval()
    model.reduction = make()
    with torch.no_grad():
        out = model(torch.randn(0, 3, 64, 64))
        ref = reference.ReferenceViT(model, make())(torch.randn(0, 3, 64, 64))
    assert out.shape == ref.shape == (0, model.head.out_features)


@pytest.mark.parametrize("name,make", POLICIES, ids=[n for n, _ in POLICIES])
def test_policies_pass_integer_counts_to_functional(monkeypatch, name, make):
    # A policy turns its rate into an integer count once; functional takes that count as is.
    seen = []
    for fn in ("topk_prune", "evit_prune", "tome_merge"):
        original = getattr(functional, fn)

        def spy(x, scores_or_metric, amount, *args, _original=original, **kwargs):
            seen.append(amount)
            return _original(x, scores_or_metric, amount, *args, **kwargs)

        monkeypatch.setattr(functional, fn, spy)
    model = tiny(reduction=make())
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert seen and all(type(k) is int for k in seen), seen
