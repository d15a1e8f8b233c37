"""tokred_ext.patch.diffusers: dense ToMe (merge, compute, unmerge) on tiny diffusers models.

The patched models are compared with an oracle built here from ``tokred_ext.reference``
(``tomesd_patch``: tomesd's algorithm in pure PyTorch with tokred's tie rule), run on a copy of
the same model. Tiny models with random weights come
from configs; nothing is downloaded.
"""
import copy
import types

import pytest
import torch

import tokred_ext.patch
from tokred_ext import functional, ops, reference

# Skips where diffusers is missing; CI's main job installs diffusers==0.42.1 and fails if any test
# of this file skips (.ci/run).
pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8).eval()


def tiny_dit(cls=None):
    torch.manual_seed(0)
    cls = cls or DiTTransformer2DModel
    model = cls(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero").eval()
    with torch.no_grad():  # adaLN-Zero starts at zero gates: give them weights that matter
        for name, p in model.named_parameters():
            if "norm1" in name or "proj_out" in name:
                p.normal_(0, 0.2)
    return model


def unet_inputs(b=2, hw=(16, 16)):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, *hw, generator=g), torch.arange(b) * 400 + 10,
            torch.randn(b, 7, 32, generator=g))


def dit_inputs(b=2, hw=(16, 16)):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, 4, *hw, generator=g), torch.arange(b) * 400 + 10, torch.arange(b) + 1


def run_unet(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def run_dit(model, inputs):
    x, t, labels = inputs
    with torch.no_grad():
        return model(x, t, labels).sample


def run_dit2d(model, inputs):
    x, t, labels = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


MODELS = {"unet": (tiny_unet, unet_inputs, run_unet), "dit": (tiny_dit, dit_inputs, run_dit),
          # The legacy DiT: a Transformer2DModel with patched input.
          "dit2d": (lambda: tiny_dit(Transformer2DModel), dit_inputs, run_dit2d)}


def oracle(model, ratio, **kw):
    """tomesd's algorithm from the reference, on a copy of ``model``."""
    return reference.tomesd_patch(copy.deepcopy(model), ratio, **kw)


# --------------------------------------------------------------------------- the partition

@pytest.mark.parametrize("h,w,sx,sy", [(4, 4, 2, 2), (5, 7, 2, 2), (7, 9, 3, 2), (6, 5, 1, 1),
                                       (3, 8, 4, 1), (1, 5, 2, 2)])
def test_grid_destinations_match_tomesd_partition(h, w, sx, sy):
    assert torch.equal(functional.grid_destinations(h, w, sx, sy),
                       reference.grid_destinations(h, w, sx, sy))
    for seed in range(3):
        choice = functional.grid_choice(h, w, sx, sy, torch.Generator().manual_seed(seed))
        # The same draw as tomesd's randint(sx*sy, (h//sy, w//sx, 1)) on a generator seeded alike.
        tomesd = torch.randint(sx * sy, (h // sy, w // sx, 1), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(choice, tomesd[..., 0])
        dst = functional.grid_destinations(h, w, sx, sy, choice)
        assert torch.equal(dst, reference.grid_destinations(h, w, sx, sy, choice))
        # One destination per whole cell, none in the leftover rows and columns.
        rows, cols = dst // w, dst % w
        assert dst.numel() == (h // sy) * (w // sx)
        assert bool((rows < (h // sy) * sy).all()) and bool((cols < (w // sx) * sx).all())
        cells = (rows // sy) * (w // sx) + cols // sx
        assert torch.equal(cells.sort().values, torch.arange(dst.numel()))


def test_grid_destinations_bad_choice():
    with pytest.raises(ValueError, match=r"choice must have shape \[2, 2\]"):
        functional.grid_destinations(4, 4, 2, 2, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"choice values must lie in \[0, 4\)"):
        functional.grid_destinations(4, 4, 2, 2, torch.full((2, 2), 4))
    with pytest.raises(ValueError, match="strides sx, sy must be positive"):
        functional.grid_destinations(4, 4, 0, 2)


def _metric_cases():
    g = torch.Generator().manual_seed(4)
    plain = torch.randn(3, 30, 8, generator=g)
    tied = plain.clone()
    tied[:, 10:20] = tied[:, :10]        # duplicated tokens: exact cosine ties
    tied[1, 7] = 0                        # a zero vector: NaN similarities
    return [("plain", plain), ("ties_nan", tied)]


@pytest.mark.parametrize("case,metric", _metric_cases(), ids=[c for c, _ in _metric_cases()])
@pytest.mark.parametrize("r", [0, 1, 7, 15, 100])
def test_dense_merge_plan_equals_tomesd(case, metric, r):
    choice = functional.grid_choice(5, 6, 2, 2, torch.Generator().manual_seed(r))
    dst = functional.grid_destinations(5, 6, 2, 2, choice)
    x = torch.randn(3, 30, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    merge, unmerge, _ = reference.tomesd_match(metric, dst, r)
    plan = functional.dense_merge_plan(metric, dst, r)
    out, size = ops.merge_by_plan(x, None, plan, "mean")
    torch.testing.assert_close(out, merge(x))
    assert torch.equal(size[..., 0].sum(1), torch.full((3,), 30.0, dtype=x.dtype))
    assert torch.equal(ops.unmerge_by_plan(out, plan), unmerge(out))


# --------------------------------------------------------------------------- the models

@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [None, 0])
def test_patched_model_equals_reference(name, seed):
    make, inputs, run = MODELS[name]
    model, x = make(), inputs()
    ref_out = run(oracle(model, 0.5, seed=seed), x)
    tokred_ext.patch.diffusers(model, ratio=0.5, seed=seed)
    out = run(model, x)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert model._tokred_dense.last is not None  # some block merged


@pytest.mark.parametrize("kw", [dict(cross_attn=True, mlp=True, max_downsample=2),
                                dict(attn=False, mlp=True, sx=3, sy=1, ratio=0.7),
                                dict(ratio=1.0, sx=4, sy=4, seed=5, cross_attn=True)])
def test_unet_options_equal_reference(kw):
    kw = dict(dict(ratio=0.5, seed=None), **kw)
    model, x = tiny_unet(), unet_inputs()
    ref_out = run_unet(oracle(model, **kw), x)
    tokred_ext.patch.diffusers(model, **kw)
    torch.testing.assert_close(run_unet(model, x), ref_out, **TOL)


def test_odd_latent_leftover_rows_and_columns():
    # A 15x21 latent: the full-resolution blocks see 15x21 tokens, the next level 8x11 (tomesd's
    # ceil rule); with 5x3 cells, 15 % 5 = 0 rows and 21 % 3 = 0 columns, then 8 % 5 = 3 rows
    # and 11 % 3 = 2 columns hold no destination.
    model, x = tiny_unet(), unet_inputs(hw=(15, 21))
    kw = dict(ratio=0.6, sx=3, sy=5, seed=3, mlp=True, max_downsample=2)
    ref_out = run_unet(oracle(model, **kw), x)
    tokred_ext.patch.diffusers(model, **kw)
    torch.testing.assert_close(run_unet(model, x), ref_out, **TOL)
    # The 8x11 block (the mid block) merged too: without it the output differs (no draws, so
    # only max_downsample differs).
    outs = [run_unet(tokred_ext.patch.diffusers(model, **dict(kw, seed=None, max_downsample=d)), x)
            for d in (1, 2)]
    assert not torch.allclose(*outs)


@pytest.mark.parametrize("name", list(MODELS))
def test_ratio_zero_and_remove_are_bitwise(name):
    make, inputs, run = MODELS[name]
    model, x = make(), inputs()
    plain = run(model, x)
    tokred_ext.patch.diffusers(model, ratio=0.0, mlp=True, cross_attn=True)
    assert torch.equal(run(model, x), plain)
    tokred_ext.patch.diffusers(model, ratio=0.5, seed=1)
    assert not torch.equal(run(model, x), plain)
    keys = set(model.state_dict())
    assert tokred_ext.patch.remove(model) is model
    assert torch.equal(run(model, x), plain)
    assert set(model.state_dict()) == keys
    assert not any(type(m).__name__.startswith("Tokred") for m in model.modules())
    assert not model._forward_pre_hooks


def test_seeded_run_is_reproducible():
    model, x = tiny_unet(), unet_inputs()
    tokred_ext.patch.diffusers(model, ratio=0.5, seed=7)
    first, second = run_unet(model, x), run_unet(model, x)
    # One draw per merging block call: the second pass continues the sequence...
    assert not torch.equal(first, second)
    # ...and patching anew with the seed starts it again.
    tokred_ext.patch.diffusers(model, ratio=0.5, seed=7)
    assert torch.equal(run_unet(model, x), first)
    # A copy of the unpatched model, patched alike, gives the same bits.
    other = tokred_ext.patch.remove(copy.deepcopy(model))
    tokred_ext.patch.diffusers(other, ratio=0.5, seed=7)
    assert torch.equal(run_unet(other, x), first)


def test_pipeline_is_patched_through_its_denoiser():
    unet, x = tiny_unet(), unet_inputs()
    plain = run_unet(unet, x)
    pipe = types.SimpleNamespace(unet=unet)
    assert tokred_ext.patch.diffusers(pipe, ratio=0.5, seed=None) is pipe
    assert tokred_ext.patch._diffusers.owns(pipe)
    assert not torch.equal(run_unet(unet, x), plain)
    tokred_ext.patch.remove(pipe)
    assert torch.equal(run_unet(unet, x), plain)


def test_unsupported_configurations_are_refused():
    class Holder(torch.nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.block = BasicTransformerBlock(16, 2, 8, **kw)

    with pytest.raises(ValueError, match="norm_type 'layer_norm' or 'ada_norm_zero'.*'ada_norm_single'"):
        tokred_ext.patch.diffusers(Holder(norm_type="ada_norm_single"))
    with pytest.raises(ValueError, match="positional embeddings"):
        tokred_ext.patch.diffusers(Holder(positional_embeddings="sinusoidal",
                                          num_positional_embeddings=64))
    with pytest.raises(ValueError, match="no diffusers BasicTransformerBlock"):
        tokred_ext.patch.diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipeline with .unet or .transformer"):
        tokred_ext.patch.diffusers(object())
    for bad in (dict(ratio=1.5), dict(ratio="0.5"), dict(ratio=None)):
        with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\]"):
            tokred_ext.patch.diffusers(tiny_dit(), **bad)
    with pytest.raises(ValueError, match="sx must be a positive int, got True"):
        tokred_ext.patch.diffusers(tiny_dit(), sx=True)
    for seed in ("a", 1.5):
        with pytest.raises(ValueError, match="seed must be an int or None"):
            tokred_ext.patch.diffusers(tiny_dit(), seed=seed)
    model = tokred_ext.patch.diffusers(tiny_unet(), ratio=0.5, mlp=True)
    for m in model.modules():
        if isinstance(m, BasicTransformerBlock):
            m.set_chunk_feed_forward(64, 1)
    with pytest.raises(ValueError, match="merged feed-forward cannot be chunked"):
        run_unet(model, unet_inputs())
    # A refused model is left as it was.
    holder = Holder(norm_type="ada_norm_single")
    with pytest.raises(ValueError):
        tokred_ext.patch.diffusers(holder)
    assert type(holder.block) is BasicTransformerBlock


# --------------------------------------------------------------------------- visualize

def test_dense_trace_groups_follow_the_plan():
    from tokred_ext import visualize as vis

    model = vis.tiny_unet()
    latent = vis.image_latent(vis.load_image(vis.DEFAULT_IMAGE, 64))
    assert latent.shape == (1, 4, 8, 8)
    tr = vis.dense_trace(model, latent, ratio=0.4, sx=2, sy=2, seed=3)
    dst, dest = tr["destinations"], tr["dest"]
    choice = functional.grid_choice(8, 8, 2, 2, torch.Generator().manual_seed(3))
    assert torch.equal(dst, functional.grid_destinations(8, 8, 2, 2, choice))
    assert tr["r"] == int(64 * 0.4) and tr["grid"] == (8, 8)
    # Outputs: the u unmerged A tokens first, then the 16 destinations in ascending order; the
    # r merged tokens map to a destination's output.
    u = 64 - 16 - tr["r"]
    assert torch.equal(dest[dst], torch.arange(u, u + 16))
    is_a = torch.ones(64, dtype=torch.bool)
    is_a[dst] = False
    assert int((dest[is_a] >= u).sum()) == tr["r"]
    assert torch.equal(dest[is_a & (dest < u)].sort().values, torch.arange(u))


def test_cli_visualize_dense(tmp_path, capsys):
    from tokred_ext import cli

    out = tmp_path / "dense.png"
    assert cli.main(["visualize", "--method", "dense", "-o", str(out), "--ratio", "0.6",
                     "--sx", "4", "--sy", "2", "--draw-seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "153 of 256 tokens merged into 32 destinations (random weights)" in printed
    from PIL import Image
    assert Image.open(out).size[0] == 768
    for bad, msg in [(["--r", "4"], "--r is not for --method dense"),
                     (["--ratio", "1.5"], "must be in \\[0, 1\\]"),
                     (["--sx", "17"], "sx and sy must be in \\[1, 16\\] for a 128-pixel picture")]:
        assert cli.main(["visualize", "--method", "dense", "-o", str(out)] + bad) == 2
        assert msg.replace("\\", "") in capsys.readouterr().err
    assert cli.main(["visualize", "--method", "tome", "-o", str(out), "--draw-seed", "2"]) == 2
    assert "--draw-seed: for --method dense only" in capsys.readouterr().err


# --------------------------------------------------------------------------- export

class _Sample(torch.nn.Module):
    """A DiT's ``.sample``, for the exporter (which wants tensors out)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, labels):
        return self.model(x, t, labels).sample


def test_onnx_export_of_a_patched_dit(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from test_onnx import FORBIDDEN, _node_types

    from tokred_ext import onnx as tokred_onnx

    model = _Sample(tokred_ext.patch.diffusers(tiny_dit(), ratio=0.5, seed=None, mlp=True)).eval()
    x, t, labels = dit_inputs(hw=(8, 8))  # 16 tokens, r = 8: merge_by_plan's graph is r + 1 gathers
    path = str(tmp_path / "dit.onnx")
    tokred_onnx.export(model, (x, t, labels), path)
    used = _node_types(onnx.load(path))
    assert not used & set(FORBIDDEN), used & set(FORBIDDEN)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b in (2, 3):  # the batch axis is dynamic
        inputs = dit_inputs(b, hw=(8, 8))
        with torch.no_grad():
            expected = model(*inputs)
        got = session.run(None, {n: v.numpy() for n, v in zip(names, inputs)})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
    # The patch merged in the exported graph: the same model unpatched gives another output.
    with torch.no_grad():
        assert not torch.allclose(tokred_ext.patch.remove(model.model)(x, t, labels).sample,
                                  torch.from_numpy(session.run(None, dict(zip(names, (
                                      x.numpy(), t.numpy(), labels.numpy()))))[0]), atol=1e-3)
