"""Every prefix layout of timm's ViT: class token or none, distillation token, register tokens,
position embedding over the prefix or not, and the heads (token, avg, map, none).

tokred's VisionTransformer is compared with the reference composition (tokred_ext.reference,
which imports no production code) at real reduction, and with itself unreduced at keep rate 1.
"""
import pytest
import torch

from tokred_ext import functional, reference
from tokred_ext.models import VisionTransformer
from tokred_ext.nn import EViT, ToMe, TopK, attention_forward
from tokred_ext.nn.attention import Attention

SMALL = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
N_PATCHES = 64

# (id, layout kwargs, prefix tokens)
LAYOUTS = [
    ("cls", dict(), 1),
    ("cls_dist", dict(distilled=True), 2),
    ("cls_reg4_noembed", dict(reg_tokens=4, no_embed_class=True), 5),
    ("cls_reg2_avg", dict(reg_tokens=2, global_pool="avg"), 3),
    ("gap", dict(class_token=False, global_pool="avg"), 0),
    ("gap_no_fc_norm", dict(class_token=False, global_pool="avg", fc_norm=False), 0),
    ("reg3_avg", dict(class_token=False, reg_tokens=3, global_pool="avg"), 3),
    ("map", dict(class_token=False, global_pool="map"), 0),
    ("cls_map", dict(global_pool="map"), 1),
    ("reg1_none", dict(class_token=False, reg_tokens=1, global_pool=""), 1),
]
LAYOUT_IDS = [c[0] for c in LAYOUTS]
POLICIES = [("topk", lambda **kw: TopK(0.6, locs=(0, 2), **kw)),
            ("evit", lambda **kw: EViT(0.6, locs=(1, 3), **kw)),
            ("tome", lambda **kw: ToMe(6, **kw))]


def _model(layout, reduction=None):
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, **layout, reduction=reduction).eval()
    with torch.no_grad():  # weights large enough that the scores have no near-ties
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return model


def test_layout_attributes_follow_timm():
    m = VisionTransformer(**SMALL, reg_tokens=4, no_embed_class=True)
    assert m.num_prefix_tokens == 5 and m.reg_token.shape == (1, 4, 64)
    assert m.pos_embed.shape == (1, N_PATCHES, 64)  # no_embed_class: patches only
    m = VisionTransformer(**SMALL, class_token=False, reg_tokens=2, global_pool="avg")
    assert m.num_prefix_tokens == 2 and m.cls_token is None
    assert m.pos_embed.shape == (1, N_PATCHES + 2, 64)
    assert isinstance(m.norm, torch.nn.Identity) and isinstance(m.fc_norm, torch.nn.LayerNorm)
    m = VisionTransformer(**SMALL, class_token=False, global_pool="map")
    keys = set(m.state_dict())
    assert {"attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight",
            "attn_pool.norm.weight", "attn_pool.mlp.fc1.weight", "attn_pool.mlp.fc2.weight"} <= keys
    assert not any(k.startswith(("cls_token", "reg_token")) for k in keys)
    assert VisionTransformer(**SMALL, global_pool="none").global_pool == ""


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_token=False), "global_pool='token' needs the class token"),
    (dict(global_pool="max"), "global_pool must be 'token', 'avg', 'map' or ''"),
    (dict(distilled=True, class_token=False, global_pool="avg"), "distilled=True needs the class token"),
    (dict(distilled=True, global_pool="avg"), "distilled=True needs the class token and global_pool='token'"),
    (dict(reg_tokens=-1), "reg_tokens must be >= 0"),
])
def test_bad_layouts_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**SMALL, **kwargs)


@pytest.mark.parametrize("name,make", POLICIES, ids=[p[0] for p in POLICIES])
@pytest.mark.parametrize("layout,prefix", [c[1:] for c in LAYOUTS], ids=LAYOUT_IDS)
def test_reduction_equals_reference_on_every_layout(layout, prefix, name, make):
    model = _model(layout, make(trace_source=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        expected = reference.ReferenceViT(model, make())(x)
        model.reduction = None
        plain = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert model.token_counts[-1] == prefix + N_PATCHES  # (the unreduced pass)
    # global_pool='': one output per token left, fewer than unreduced.
    assert out.shape != plain.shape or not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("name,make", POLICIES, ids=[p[0] for p in POLICIES])
@pytest.mark.parametrize("layout,prefix", [c[1:] for c in LAYOUTS], ids=LAYOUT_IDS)
def test_prefix_tokens_are_never_reduced(layout, prefix, name, make):
    # The prefix stays first, in order, and no other token is pruned or merged into it.
    model = _model(layout, make(trace_source=True))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert model.token_counts[-1] < prefix + N_PATCHES
    for source in model.sources:
        assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(2, prefix))
        assert bool(((source[:, prefix:] >= prefix) | (source[:, prefix:] == -1)).all())


@pytest.mark.parametrize("layout,prefix", [c[1:] for c in LAYOUTS], ids=LAYOUT_IDS)
def test_tome_clamps_r_to_half_the_tokens_after_the_prefix(layout, prefix):
    # (N - P) // 2 merge at most: with no prefix every token may merge, token 0 included.
    model = _model(layout, ToMe(1000, trace_source=True))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert model.token_counts[0] == prefix + N_PATCHES // 2
    merged_into = model.sources[-1][:, prefix:]
    if prefix == 0:  # the first patch is no class token: it merges like any other
        assert bool((merged_into == merged_into[:, :1]).sum(1).gt(1).any())


@pytest.mark.parametrize("layout,prefix", [c[1:] for c in LAYOUTS], ids=LAYOUT_IDS)
def test_keep_rate_one_is_bitwise_the_unreduced_model(layout, prefix):
    model = _model(layout)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        for policy in (TopK(1.0, locs=(0, 2)), EViT(1.0, locs=(1, 3)), ToMe(0)):
            model.reduction = policy
            assert torch.equal(model(x), plain), policy


def test_scores_without_a_class_token_are_the_mean_attention_received():
    # The rule without a class token: each token's score is the attention it receives, averaged
    # over every query and head; with one, the class token's row (the existing fast path).
    torch.manual_seed(1)
    attn_mod = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 11, 32)
    size = torch.rand(3, 11, 1) + 0.5
    for p in (0, 2):
        for s in (None, size):
            _, attn, _ = reference._attention(attn_mod, x, s)
            _, scores, _ = attention_forward(attn_mod, x, s, True, p, False, False)
            torch.testing.assert_close(scores, reference.mean_attention(attn, p))
            torch.testing.assert_close(scores, functional.mean_attention(attn, p))
            _, cls_scores, _ = attention_forward(attn_mod, x, s, True, p if p else 1, False, True)
            torch.testing.assert_close(cls_scores, reference.class_attention(attn, p if p else 1))
    # An explicit count: column j's share of all B * H * N attention rows.
    _, attn, _ = reference._attention(attn_mod, x, None)
    manual = torch.stack([attn[:, :, :, j].sum(dim=(1, 2)) / (4 * 11) for j in range(11)], 1)
    torch.testing.assert_close(functional.mean_attention(attn, 0), manual)


def test_functional_pruning_takes_the_map_of_a_model_without_class_token():
    torch.manual_seed(2)
    x = torch.randn(2, 9, 8)
    attn = torch.rand(2, 3, 9, 9).softmax(-1)
    out, index = functional.topk_prune(x, attn, 4, num_protected=1, class_token=False)
    expect = reference.mean_attention(attn, 1).topk(4, dim=1).indices
    assert torch.equal(index, expect)
    assert torch.equal(out[:, 0], x[:, 0])
    out, index = functional.evit_prune(x, attn, 4, num_protected=0, class_token=False)
    assert torch.equal(index, reference.mean_attention(attn, 0).topk(4, dim=1).indices)
    assert out.shape == (2, 5, 8)
