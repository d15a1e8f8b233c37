"""torch.jit.script on whole models: DeiT with each policy and BiFormer script, equal eager
bitwise (the scripted graph runs the same ops in the same order; the CPU executor fuses
nothing), survive torch.jit.save/load, and load in a fresh process that imports tokred_ext."""
import io
import os
import subprocess
import sys

import pytest
import torch

import tokred_ext
from tokred_ext.models import VisionTransformer
from tokred_ext.models.biformer import BiFormer
from tokred_ext.nn import EViT, ToMe, TopK
from tokred_ext.nn.routing import BiLevelRoutingAttention

POLICIES = [("none", lambda: None),
            ("topk", lambda: TopK(0.6, locs=(0, 2))),
            ("topk_rates_source", lambda: TopK([0.9, 0.5], locs=(1, 2), trace_source=True)),
            ("evit", lambda: EViT(0.6, locs=(0, 2))),
            ("evit_nofuse_source", lambda: EViT(0.6, locs=(1, 3), fuse=False, trace_source=True)),
            ("tome", lambda: ToMe(3)),
            ("tome_source", lambda: ToMe(3, trace_source=True)),
            ("tome_sched_noprop", lambda: ToMe((3, -0.5), prop_attn=False)),
            ("tome_list", lambda: ToMe([4, 2, 0, 3]))]
IDS = [n for n, _ in POLICIES]
# The profiling executor runs a scripted graph as is once (profiling it), then optimised
# (torch._C._jit_get_num_profiled_runs() is 1): compare both.
RUNS = 2


def tiny_vit(policy, distilled=False, **layout):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              num_classes=5, distilled=distilled, reduction=policy, **layout).eval()
    # Larger weights than the default init make attention peaked, so no two tokens tie.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return model


def tiny_biformer(**kw):
    torch.manual_seed(0)
    cfg = dict(depth=[1, 1, 1, 1], embed_dim=[32, 32, 32, 32], head_dim=16, n_win=2,
               topks=(1, 2, 2, -2), kv_downsample_mode="identity", kv_per_wins=(-1,) * 4,
               mlp_ratios=(2, 2, 2, 2), num_classes=5)
    cfg.update(kw)
    return BiFormer(**cfg).eval()


def roundtrip(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def check_same(model, scripted, x):
    with torch.no_grad():
        expected = model(x)
        for _ in range(RUNS):
            assert torch.equal(scripted(x), expected)
    return expected


# Every policy with a class token; a distillation token (two protected tokens, two heads) with a
# pruning and a merging policy.
VIT_CASES = ([(name, make, False) for name, make in POLICIES]
             + [(name, make, True) for name, make in POLICIES if name in ("evit", "tome_source")])


@pytest.mark.parametrize("name,make,distilled", VIT_CASES,
                         ids=[n + ("-distilled" if d else "") for n, _, d in VIT_CASES])
def test_vit_scripts_and_equals_eager(name, make, distilled):
    model = tiny_vit(make(), distilled)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    check_same(model, scripted, x)
    assert scripted.token_counts == model.token_counts
    if make() is not None:
        assert model.token_counts[-1] < 17 + distilled
    assert len(scripted.sources) == len(model.sources)
    for got, want in zip(scripted.sources, model.sources):
        assert torch.equal(got, want)
    loaded = roundtrip(scripted)
    check_same(model, loaded, x)
    assert loaded.token_counts == model.token_counts


# The prefix layouts: no class token with register tokens and average pooling (the scores are the
# mean attention received), register tokens outside the position embedding, SigLIP's
# attention-pool head without any prefix.
LAYOUTS = {"reg2_avg": dict(class_token=False, reg_tokens=2, global_pool="avg"),
           "cls_reg4_noembed": dict(reg_tokens=4, no_embed_class=True),
           "map": dict(class_token=False, global_pool="map")}
LAYOUT_CASES = [(layout, name, make) for layout in LAYOUTS for name, make in POLICIES
                if name in ("none", "topk_rates_source", "evit", "tome_source")]


@pytest.mark.parametrize("layout,name,make", LAYOUT_CASES,
                         ids=[f"{lay}-{n}" for lay, n, _ in LAYOUT_CASES])
def test_vit_layouts_script_and_equal_eager(layout, name, make):
    model = tiny_vit(make(), **LAYOUTS[layout])
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    check_same(model, scripted, x)
    assert scripted.token_counts == model.token_counts
    if make() is not None:
        assert model.token_counts[-1] < 16 + model.num_prefix_tokens
    for got, want in zip(scripted.sources, model.sources, strict=True):
        assert torch.equal(got, want)
    check_same(model, roundtrip(scripted), x)


def test_vit_scripts_after_the_policy_is_removed():
    model = tiny_vit(ToMe(3))
    model.reduction = None  # now a None entry among the submodules
    check_same(model, torch.jit.script(model), torch.randn(2, 3, 32, 32))
    assert model.token_counts == [17] * 4


BIFORMERS = [("released_like", {}),
             ("layer_scale_soft_conv_global", dict(layer_scale_init_value=0.5, soft_routing=True,
                                                   topks=(1, 2, 0, -1))),
             ("reference_backend", dict(backend="reference")),
             ("avgpool_postnorm", dict(kv_downsample_mode="avgpool",
                                       kv_downsample_ratios=(2, 1, 1, 1), pre_norm=False))]


@pytest.mark.parametrize("name,kw", BIFORMERS, ids=[n for n, _ in BIFORMERS])
def test_biformer_scripts_and_equals_eager(name, kw):
    model = tiny_biformer(**kw)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 64)
    check_same(model, scripted, x)
    check_same(model, roundtrip(scripted), x)


def test_routing_attention_mask_output_is_eager_only():
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2).eval()
    x = torch.randn(2, 8, 8, 32)
    scripted = torch.jit.script(attn)
    with torch.no_grad():
        assert torch.equal(scripted(x), attn(x))
        assert len(attn(x, ret_attn_mask=True)) == 4
        with pytest.raises(torch.jit.Error, match="ret_attn_mask=True is not supported in TorchScript"):
            scripted(x, True)


def test_trace_equals_eager():
    model = tiny_vit(ToMe(3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)  # check_same compares
    check_same(model, traced, x)


LOAD = """
import sys, torch
path = sys.argv[1]
try:
    torch.jit.load(path + "/model.pt")
except Exception as e:
    assert "tokred" in str(e), e
else:
    raise SystemExit("loaded without tokred_ext imported")
import tokred_ext
model = torch.jit.load(path + "/model.pt")
x, expected = torch.load(path + "/io.pt")
with torch.no_grad():
    assert torch.equal(model(x), expected)
print(model.token_counts)
"""


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    model = tiny_vit(EViT(0.6, locs=(0, 2)))
    x = torch.randn(2, 3, 32, 32)
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    with torch.no_grad():
        torch.save((x, model(x)), tmp_path / "io.pt")
    # The subprocess imports the same tokred_ext as the tests: installed or from PYTHONPATH.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tokred_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(model.token_counts)


@pytest.mark.parametrize("name,make", [POLICIES[1], POLICIES[3], POLICIES[5]],
                         ids=["topk", "evit", "tome"])
def test_backward_through_scripted_model_equals_eager(name, make):
    # The ops' autograd is registered from Python; the scripted graph dispatches to it.
    model = tiny_vit(make())
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x)
    for _ in range(RUNS):
        (got,) = torch.autograd.grad(scripted(x).square().sum(), x)
        assert torch.equal(got, grad)
