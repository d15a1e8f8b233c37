"""tokred_ext.patch.timm: a patched timm ViT equals tokred's model and the reference model.

The timm tests skip where timm is not importable; CI's second job (.ci/timm_job.sh, with the timm
pinned in .ci/requirements-timm.txt) runs them and fails if any skips. A stand-in with timm's
structure and names exercises the patch everywhere.
"""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokred_ext.patch
from tokred_ext import reference
from tokred_ext.models import VisionTransformer, create_model
from tokred_ext.nn import AttentionPoolLatent, EViT, Mlp, PatchEmbed, ToMe, TopK

POLICIES = [("topk", lambda: TopK(0.6, locs=(0, 2))), ("evit", lambda: EViT(0.6, locs=(1, 3))),
            ("tome", lambda: ToMe(6))]
IDS = [p[0] for p in POLICIES]


def _peaked(model):
    """Random weights large enough that class attention has no near-ties."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return model.eval()


# --------------------------------------------------------------------------- timm stand-in

# The stand-in's classes carry timm's names (module and class), which is what the patch checks
# before it reproduces a block's forward.
TIMM_VIT = "timm.models.vision_transformer"


class Attention(nn.Module):
    __module__ = TIMM_VIT

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm, self.norm = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    __module__ = TIMM_VIT

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls1 = self.ls2 = self.drop_path1 = self.drop_path2 = nn.Identity()

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimmLikeViT(nn.Module):
    """timm VisionTransformer's structure: Sequential blocks called with one argument, timm's
    prefix layouts (class token or none, register tokens, position embedding over the prefix or
    not) and heads (``pool``: token, avg, map through ``attn_pool``, or none)."""

    def __init__(self, dim=64, depth=4, heads=4, class_token=True, reg_tokens=0,
                 no_embed_class=False, global_pool="token"):
        super().__init__()
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.global_pool, self.no_embed_class, self.pool_include_prefix = global_pool, no_embed_class, False
        self.patch_embed = PatchEmbed(64, 8, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 64 + (0 if no_embed_class else self.num_prefix_tokens), dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        avg = global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = AttentionPoolLatent(dim, heads, norm_layer=partial(nn.LayerNorm, eps=1e-6)) \
            if global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if avg else nn.Identity()
        self.head = nn.Linear(dim, 10)

    def pool(self, x, pool_type=None):
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1) if pool_type == "avg" else x

    def forward(self, x):
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], 1)
        else:
            x = torch.cat(prefix + [x], 1) + self.pos_embed
        return self.head(self.fc_norm(self.pool(self.norm(self.blocks(x)))))


# The prefix layouts and heads of timm's ViT on the stand-in: (id, TimmLikeViT kwargs, the same
# layout as tokred VisionTransformer kwargs).
LAYOUTS = [
    ("cls", {}, {}),
    ("reg4_noembed", dict(reg_tokens=4, no_embed_class=True), dict(reg_tokens=4, no_embed_class=True)),
    ("gap", dict(class_token=False, global_pool="avg"), dict(class_token=False, global_pool="avg")),
    ("reg2_avg", dict(class_token=False, reg_tokens=2, global_pool="avg"),
     dict(class_token=False, reg_tokens=2, global_pool="avg")),
    ("map", dict(class_token=False, global_pool="map"), dict(class_token=False, global_pool="map")),
]


@pytest.mark.parametrize("name,make", POLICIES, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_patch_timm_like_equals_model_and_reference(layout, name, make):
    _, theirs, ours_kwargs = layout
    timm_like = _peaked(TimmLikeViT(**theirs))
    ours = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4,
                             num_classes=10, **ours_kwargs).eval()
    ours.load_state_dict(timm_like.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = timm_like(x)
        torch.testing.assert_close(ours(x), plain, atol=1e-5, rtol=1e-5)
        tokred_ext.patch.timm(timm_like, make())
        out = timm_like(x)
        ours.reduction = make()
        torch.testing.assert_close(out, ours(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, reference.ReferenceViT(timm_like, make())(x), atol=1e-4,
                                   rtol=1e-4)
    prefix = timm_like.num_prefix_tokens
    assert timm_like.token_counts == ours.token_counts and timm_like.token_counts[-1] < 64 + prefix
    assert not torch.allclose(out, plain, atol=1e-3)
    tokred_ext.patch.remove(timm_like)
    with torch.no_grad():
        torch.testing.assert_close(timm_like(x), plain)


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="ReductionPolicy"):
        tokred_ext.patch.timm(TimmLikeViT(), "tome")
    with pytest.raises(ValueError, match="no 'blocks'"):
        tokred_ext.patch.timm(nn.Linear(2, 2), TopK(0.5))
    model = TimmLikeViT()
    tokred_ext.patch.timm(model, TopK(0.5))
    with pytest.raises(ValueError, match="do not take attention masks"):
        model.blocks[0](torch.randn(1, 65, 64), attn_mask=torch.ones(65, 65, dtype=torch.bool))


def test_patched_model_refuses_torchscript_with_one_message():
    model = TimmLikeViT()
    tokred_ext.patch.timm(model, ToMe(4))
    for obj in (model, model.blocks[0]):
        with pytest.raises(RuntimeError, match="patched by tokred_ext.patch.timm cannot be scripted"):
            torch.jit.script(obj)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(model, x, check_trace=False)(x), model(x),
                                   atol=0, rtol=0)


class ResPostBlock(Block):
    """timm's post-norm block: norm after the residual branch."""

    __module__ = TIMM_VIT

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.norm1(self.attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class ParallelScalingBlock(nn.Module):
    __module__ = TIMM_VIT

    def forward(self, x):
        return x


class RopeAttention(Attention):
    __module__ = "timm.layers.attention"


@pytest.mark.parametrize("swap, named", [
    (lambda blk: ResPostBlock(64, 4), "timm.models.vision_transformer.ResPostBlock"),
    (lambda blk: ParallelScalingBlock(), "timm.models.vision_transformer.ParallelScalingBlock"),
    (lambda blk: setattr(blk, "attn", RopeAttention(64, 4)) or blk, "timm.layers.attention.RopeAttention"),
])
def test_patch_refuses_blocks_it_does_not_reproduce(swap, named):
    model = TimmLikeViT()
    model.blocks[2] = swap(model.blocks[2])
    with pytest.raises(ValueError, match=rf"tokred_ext\.patch\.timm .*block 2 has {named.replace('.', r'[.]')}"):
        tokred_ext.patch.timm(model, ToMe(2))
    assert type(model.blocks[0]) is Block  # nothing was patched


def test_patch_refuses_gated_attention():
    # timm's Attention(gated=True) scales its output by sigmoid(gate(x)), which tokred's
    # attention does not compute: refused, not silently changed.
    model = TimmLikeViT()
    model.blocks[1].attn.gate = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"gated attention .*block 1 has one"):
        tokred_ext.patch.timm(model, ToMe(2))
    assert type(model.blocks[0]) is Block


@pytest.mark.parametrize("layout", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_patch_timm_like_layouts_unreduced_are_bitwise_timm(layout):
    timm_like = _peaked(TimmLikeViT(**layout[1]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = timm_like(x)
        for policy in (TopK(1.0, locs=(0, 2)), EViT(1.0, locs=(1, 3)), ToMe(0)):
            tokred_ext.patch.timm(timm_like, policy)
            assert torch.equal(timm_like(x), plain), policy


@pytest.mark.parametrize("change, match", [
    (lambda m: setattr(m, "global_pool", "max"), "the model has global_pool='max'"),
    (lambda m: setattr(m, "num_prefix_tokens", 3), "declares num_prefix_tokens=3 but has 1 prefix"),
    (lambda m: setattr(m, "pool_include_prefix", True), "pool_include_prefix=True"),
    (lambda m: setattr(m, "cls_token", None), "global_pool='token' needs a class token"),
], ids=["max_pool", "prefix_count", "pool_include_prefix", "token_pool_without_class_token"])
def test_patch_refuses_layouts_it_does_not_reproduce(change, match):
    model = TimmLikeViT()
    change(model)
    if model.cls_token is None:
        model.num_prefix_tokens = 0
    with pytest.raises(ValueError, match=match):
        tokred_ext.patch.timm(model, TopK(0.5))
    assert type(model.blocks[0]) is Block  # nothing was patched


class NoPoolViT(nn.Module):
    """timm before 1.0: average pooling inside forward_head, no ``pool`` to weight by size."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(64, 8, 3, 64)
        self.blocks = nn.Sequential(Block(64, 4))
        self.cls_token, self.num_prefix_tokens, self.global_pool = None, 0, "avg"


def test_patch_refuses_avg_pool_without_timm_pool():
    with pytest.raises(ValueError, match="needs timm's VisionTransformer.pool"):
        tokred_ext.patch.timm(NoPoolViT(), TopK(0.5))


# --------------------------------------------------------------------------- real timm

TIMM_CASES = [("deit_tiny_patch16_224", {}),
              ("deit_tiny_distilled_patch16_224", {}),
              ("vit_small_patch16_224", dict(init_values=0.5, qk_norm=True))]


def _timm_model(name, kwargs):
    timm = pytest.importorskip("timm")
    if kwargs:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        model = TimmViT(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                        **kwargs)
    else:
        model = timm.create_model(name, pretrained=False)
    return _peaked(model)


@pytest.mark.parametrize("block", ["ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"])
def test_timm_patch_refuses_post_norm_and_parallel_blocks(block):
    pytest.importorskip("timm")
    import timm.models.vision_transformer as tv

    model = tv.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                 block_fn=getattr(tv, block))
    with pytest.raises(ValueError, match=f"block 0 has timm.models.vision_transformer.{block}"):
        tokred_ext.patch.timm(model, ToMe(2))


def test_timm_patch_refuses_gated_attention():
    timm = pytest.importorskip("timm")
    import inspect

    import timm.models.vision_transformer as tv
    from timm.layers import Attention as TimmAttention

    if "gated" not in inspect.signature(TimmAttention).parameters:
        pytest.skip(f"timm {timm.__version__} has no gated attention")
    model = tv.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2)
    model.blocks[1].attn = TimmAttention(64, num_heads=2, gated=True)
    with pytest.raises(ValueError, match=r"gated attention .*block 1 has one"):
        tokred_ext.patch.timm(model, ToMe(2))


@pytest.mark.parametrize("case", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_weights_load_into_tokred_model(case):
    name, kwargs = case
    model = _timm_model(name, kwargs)
    distilled = "distilled" in name
    ours = VisionTransformer(embed_dim=192, depth=12, num_heads=3, distilled=distilled,
                             **kwargs).eval()
    ours.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), atol=1e-4, rtol=1e-4)


# The policies at their papers' settings for a 12-block ViT.
TIMM_POLICIES = [("topk", lambda: TopK(0.7)), ("evit", lambda: EViT(0.7)), ("tome", lambda: ToMe(13))]


@pytest.mark.parametrize("name,make", TIMM_POLICIES, ids=[p[0] for p in TIMM_POLICIES])
@pytest.mark.parametrize("case", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_patch_equals_reference(case, name, make):
    model = _timm_model(*case)
    x = torch.randn(2, 3, 224, 224)
    policy = make()
    ref_policy = copy.deepcopy(policy)
    with torch.no_grad():
        tokred_ext.patch.timm(model, policy)
        out = model(x)
        expected = reference.ReferenceViT(model, ref_policy)(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert model.token_counts[-1] < 197


@pytest.mark.parametrize("name,make", POLICIES, ids=IDS)
def test_timm_patch_counts_the_patches_of_the_input(name, make):
    # With dynamic_img_size a timm ViT takes other image sizes than it was built for (resampling
    # its position embedding); the policy must count the patches of the image it is given.
    pytest.importorskip("timm")
    import timm.models.vision_transformer as tv
    from timm.layers import resample_abs_pos_embed

    config = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4)
    dynamic = _peaked(tv.VisionTransformer(img_size=64, dynamic_img_size=True, **config))
    fixed = tv.VisionTransformer(img_size=96, **config).eval()  # 144 patches, as the input below
    state = dynamic.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(dynamic.pos_embed, (12, 12), (8, 8), num_prefix_tokens=1)
    fixed.load_state_dict(state)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), atol=1e-5, rtol=1e-5)  # the same model
        tokred_ext.patch.timm(dynamic, make())
        tokred_ext.patch.timm(fixed, make())
        out = dynamic(x)
        torch.testing.assert_close(out, fixed(x), atol=1e-5, rtol=1e-5)
        expected = reference.ReferenceViT(fixed, make())(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert dynamic.token_counts == fixed.token_counts and dynamic.token_counts[-1] < 145


def test_timm_create_model_names_match_factories():
    timm = pytest.importorskip("timm")
    for name in ["deit_small_patch16_224", "deit_base_distilled_patch16_224",
                 "vit_base_patch16_384", "vit_small_patch14_reg4_dinov2", "vit_base_patch16_gap_224",
                 "vit_base_patch16_siglip_224"]:
        theirs = timm.create_model(name, pretrained=False).state_dict()
        ours = create_model(name).state_dict()
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}, name


# Real timm models of every prefix layout, random init: DINOv2 with 4 register tokens (class
# token, position embedding over the patches only, LayerScale), a class-token-free average-pool
# ViT, and SigLIP (no class token, attention-pool head). (id, timm name, create_model kwargs,
# tokred VisionTransformer kwargs with the same layout; DINOv2 and SigLIP have no classifier in
# timm, num_classes=0.)
TIMM_LAYOUTS = [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=224),
     dict(patch_size=14, embed_dim=384, num_heads=6, init_values=1e-5, reg_tokens=4,
          no_embed_class=True, num_classes=0)),
    ("vit_base_patch16_gap_224", {},
     dict(embed_dim=768, num_heads=16, class_token=False, global_pool="avg", fc_norm=False)),
    ("vit_base_patch16_siglip_224", {}, dict(embed_dim=768, num_heads=12, class_token=False,
                                             global_pool="map", num_classes=0)),
]
TIMM_LAYOUT_IDS = [c[0] for c in TIMM_LAYOUTS]


def _timm_layout_model(name, kwargs):
    timm = pytest.importorskip("timm")
    return _peaked(timm.create_model(name, pretrained=False, **kwargs))


@pytest.mark.parametrize("case", TIMM_LAYOUTS, ids=TIMM_LAYOUT_IDS)
def test_timm_layout_weights_load_into_tokred_model(case):
    name, kwargs, ours_kwargs = case
    model = _timm_layout_model(name, kwargs)
    ours = VisionTransformer(**ours_kwargs).eval()
    ours.load_state_dict(model.state_dict())
    assert ours.num_prefix_tokens == model.num_prefix_tokens
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", TIMM_LAYOUTS, ids=TIMM_LAYOUT_IDS)
def test_timm_layout_patch_unreduced_is_bitwise_timm(case):
    model = _timm_layout_model(*case[:2])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        for policy in (TopK(1.0), EViT(1.0), ToMe(0)):
            tokred_ext.patch.timm(model, policy)
            assert torch.equal(model(x), plain), policy
            tokred_ext.patch.remove(model)


@pytest.mark.parametrize("name,make", TIMM_POLICIES, ids=[p[0] for p in TIMM_POLICIES])
@pytest.mark.parametrize("case", TIMM_LAYOUTS, ids=TIMM_LAYOUT_IDS)
def test_timm_layout_patch_equals_reference(case, name, make):
    model = _timm_layout_model(*case[:2])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        tokred_ext.patch.timm(model, make())
        out = model(x)
        expected = reference.ReferenceViT(model, make())(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert model.token_counts[-1] < 196 + model.num_prefix_tokens
    assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("pool", ["avgmax", "max", "prr"])
def test_timm_patch_refuses_pooling_it_does_not_reproduce(pool):
    pytest.importorskip("timm")
    import timm.models.vision_transformer as tv

    model = tv.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                 class_token=False, global_pool=pool)
    with pytest.raises(ValueError, match=f"global_pool='{pool}'"):
        tokred_ext.patch.timm(model, ToMe(2))
