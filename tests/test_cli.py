"""The tokred command end to end, at tiny sizes."""
import datetime
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokred_ext import bench, cli
from tokred_ext import visualize as vis
from tokred_ext.nn import policy_from_spec


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info(capsys):
    rc, out, _ = run(capsys, "info")
    assert rc == 0
    assert torch.__version__ in out and "tokred::prune_tokens" in out
    assert "CUDA kernels:" in out and "device" in out


def test_module_entry_point(tmp_path):
    # The subprocess imports the same tokred_ext as the tests: installed or from PYTHONPATH.
    import tokred_ext
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tokred_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "tokred_ext", "info"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "tokred::topk" in res.stdout, res.stderr


def test_console_script(tmp_path):
    exe = shutil.which("tokred")
    if exe is None:
        pytest.skip("the tokred console script is installed by pip install")
    res = subprocess.run([exe, "info"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "tokred::topk" in res.stdout, res.stderr


# Every bench test times 1-3 rounds of the tiny model at batch 1, with no minimum time.
TINY = ["bench", "--models", "deit_tiny", "--batch-size", "1", "--device", "cpu", "--min-time", "0"]


def test_bench_tiny(capsys, tmp_path):
    policies = "none,topk,evit,tome"
    path = tmp_path / "rows.json"
    rc, out, err = run(capsys, *TINY, "--policies", policies, "--iters", "1", "--warmup", "0",
                       "--json", str(path), "--markdown")
    assert rc == 0, err
    rows = json.loads(path.read_text())["rows"]
    n_pol = len(policies.split(","))
    assert len(rows) == 2 * n_pol
    assert {r["impl"] for r in rows} == {"tokred", "reference"}
    for r in rows:
        assert r["images_per_s"] > 0 and r["speedup_vs_none"] > 0 and r["speedup_vs_reference"] > 0
    tokens = {(r["policy"], r["impl"]): r["tokens_out"] for r in rows}
    assert tokens[("topk", "tokred")] == tokens[("topk", "reference")] == 68
    assert tokens[("evit", "tokred")] == 72 and tokens[("none", "tokred")] == 197
    assert out.startswith("| model | policy | impl |")
    assert out.count("\n| deit_tiny") == 2 * n_pol


META_KEYS = {"tokred", "torch", "device", "cpu", "gpu", "dtype", "batch_size", "threads",
             "git_revision", "date", "memory"}
SPREAD_KEYS = {"ms_per_batch", "ms_iqr", "ms_min", "ms_max", "spread", "rounds", "times_ms",
               "speedup_vs_none_iqr", "speedup_vs_reference_iqr"}


def test_bench_json_to_stdout_alone(capsys):
    rc, out, err = run(capsys, *TINY, "--policies", "none,topk:0.5", "--impls", "tokred",
                       "--iters", "3", "--warmup", "0", "--json", "-")
    assert rc == 0, err
    report = json.loads(out)  # the whole of stdout: the table and progress went to stderr
    assert "images/s" in err and "x reference" in err and "peak RSS MiB" in err
    meta = report["meta"]
    assert META_KEYS <= set(meta), META_KEYS - set(meta)
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads()
    assert meta["device"] == "cpu" and meta["batch_size"] == 1 and meta["dtype"] == "float32"
    datetime.datetime.fromisoformat(meta["date"])
    rows = report["rows"]
    assert rows[1]["tokens_out"] == 1 + 24  # int(0.5**3 * 196)
    for r in rows:
        assert SPREAD_KEYS <= set(r), SPREAD_KEYS - set(r)
        assert r["rounds"] == len(r["times_ms"]) == 3
        assert r["ms_iqr"][0] <= r["ms_per_batch"] <= r["ms_iqr"][1]
    assert isinstance(report["warnings"], list)


def _clock(step):
    """A fake bench clock: each reading advances by step(n) seconds, n = 1, 2, ..."""
    state = {"t": 0.0, "n": 0}

    def now():
        state["n"] += 1
        state["t"] += step(state["n"])
        return state["t"]
    return now


@pytest.mark.parametrize("step,noisy", [(lambda n: 1e-3 * n, True), (lambda n: 1e-3, False)],
                         ids=["growing", "steady"])
def test_bench_warns_of_a_large_spread(capsys, monkeypatch, step, noisy):
    # Readings that grow make each round slower than the last (a spread of 50%); steady ones
    # give every round the same time.
    monkeypatch.setattr(bench, "_now", _clock(step))
    rc, out, err = run(capsys, *TINY, "--policies", "none", "--impls", "tokred", "--iters", "3",
                       "--warmup", "0", "--no-progress", "--json", "-")
    assert rc == 0, err
    report = json.loads(out)
    assert (report["rows"][0]["spread"] > bench.SPREAD_LIMIT) == noisy
    assert bool(report["warnings"]) == noisy
    assert ("tokred: warning: 1 of 1 rows vary by more than 10%" in err) == noisy


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
def test_bench_progress(capsys, monkeypatch, tty):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    rc, _, err = run(capsys, *TINY, "--policies", "none,tome", "--iters", "3", "--warmup", "1")
    assert rc == 0, err
    if tty:  # the line is rewritten in place, and the model's summary stays
        assert err.count("\r") > 3 and "deit_tiny: 4 candidates x 3 rounds" in err
    else:  # a log gets one line for the model, no carriage returns
        assert "\r" not in err
        lines = [ln for ln in err.splitlines() if ln.startswith("deit_tiny:")]
        assert len(lines) == 1 and lines[0].startswith("deit_tiny: 4 candidates x 3 rounds"), err


BAD = [
    ["bench", "--models", "resnet50"],
    ["bench", "--policies", "dynamicvit"],
    ["bench", "--policies", "topk:abc"],
    ["bench", "--batch-size", "0"],
    ["bench", "--keep-rate", "1.5"],
    ["bench", "--device", "cuda:7", "--models", "deit_tiny"],
    ["bench", "--impls", "triton"],
    ["bench", "--dtype", "float8"],
    ["visualize", "-o", "x.png", "--method", "topk", "--r", "3"],
    ["visualize", "-o", "x.png", "--method", "magic"],
    ["visualize", "/does/not/exist.png", "-o", "x.png", "--method", "evit"],
    ["visualize", "-o", "/does/not/exist/x.png", "--method", "evit"],
    ["visualize", "--method", "evit"],
    ["visualize", "-o", "x.png", "--method", "evit", "--model", "nope"],
    ["frobnicate"],
    # Refused before any work (issue 10): an output folder that does not exist, a format the
    # suffix does not name, a fractional ToMe r.
    ["bench", "--models", "deit_tiny", "--json", "/nonexistent/x.json"],
    ["bench", "--models", "deit_tiny", "--json", "/"],  # a folder: refused before the benchmark
    ["visualize", "-o", "x.bmpx", "--method", "evit"],
    ["bench", "--models", "deit_tiny", "--policies", "tome:2.7"],
    ["flops", "--model", "resnet50"],
    ["flops", "--policy", "dynamicvit"],
    ["flops", "--policy", "evit:x"],
    ["flops", "--batch", "0"],
    ["flops", "--model", "biformer_tiny", "--policy", "tome:13"],  # BiFormer takes no policy
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_arguments_one_line(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokred: error: "), err
    assert "Traceback" not in err


def test_bad_checkpoint_one_line(capsys, tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save({"model": {"not_a_weight": torch.zeros(1)}}, ckpt)
    rc, _, err = run(capsys, "visualize", "-o", str(tmp_path / "o.png"), "--method", "evit",
                     "--model", "deit_tiny", "--checkpoint", str(ckpt))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    # The one line says what was expected: the missing keys and the unexpected ones.
    assert "does not fit deit_tiny: missing " in err and "blocks.0.attn.proj.bias" in err
    assert "unexpected 1 keys: not_a_weight" in err


@pytest.mark.parametrize("argv", [
    ["visualize", "{folder}", "-o", "{out}", "--method", "evit"],
    ["visualize", "-o", "{out}", "--method", "evit", "--checkpoint", "{folder}"],
    ["export", "--policy", "none", "-o", "{out}.onnx", "--checkpoint", "{folder}"],
], ids=["image", "visualize-checkpoint", "export-checkpoint"])
def test_a_folder_given_as_an_input_file_is_named(capsys, tmp_path, argv):
    argv = [a.format(folder=tmp_path, out=tmp_path / "o.png") for a in argv]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{str(tmp_path)!r} is a folder, not a file" in err


def test_corrupt_checkpoint_one_line(capsys, tmp_path):
    ckpt = tmp_path / "corrupt.pth"
    ckpt.write_bytes(b"not a checkpoint at all")
    rc, _, err = run(capsys, "visualize", "-o", str(tmp_path / "o.png"), "--method", "evit",
                     "--model", "deit_tiny", "--checkpoint", str(ckpt))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "is not a readable PyTorch state dict" in err and "Traceback" not in err


def test_info_into_a_closed_pipe(tmp_path):
    # tokred info | head -1: the reader leaves early; no BrokenPipeError traceback.
    import tokred_ext
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tokred_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=package_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(f"'{sys.executable}' -m tokred_ext info | head -1", shell=True, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.stdout.startswith("tokred") and "Traceback" not in res.stderr, res.stderr


def test_bench_says_what_a_large_tome_r_merged(capsys):
    rc, out, err = run(capsys, *TINY, "--policies", "tome:500", "--impls", "tokred", "--iters", "1",
                       "--warmup", "0", "--no-progress")
    assert rc == 0, err
    assert "tokred: note: tome:500 on deit_tiny" in err and "[98, 49, 24," in err


def test_visualize_honours_the_suffix(capsys, tmp_path):
    from PIL import Image

    out = tmp_path / "evit.jpg"
    rc, _, err = run(capsys, "visualize", "-o", str(out), "--method", "evit", "--model", "deit_tiny")
    assert rc == 0, err
    assert Image.open(out).format == "JPEG"


def _check_png(path, panels, method, num_prefix=1, patch=16, size=224):
    from PIL import Image
    png = Image.open(path)
    png.load()
    assert png.format == "PNG"
    assert png.size == (size * (1 + len(panels)), size + vis.LABEL_HEIGHT + vis.LEGEND_HEIGHT)
    png = png.convert("RGB")
    original = vis.load_image(vis.DEFAULT_IMAGE, size)
    grid = size // patch
    for i, (_, _, source) in enumerate(panels):
        groups = vis.patch_groups(source, num_prefix)
        ids, counts = torch.unique(groups, return_counts=True)
        count = dict(zip(ids.tolist(), counts.tolist()))
        colour_of = {}
        for p, g in enumerate(groups.tolist()):
            row, col = divmod(p, grid)
            cx, cy = col * patch + patch // 2, row * patch + patch // 2
            px = png.getpixel((size * (i + 1) + cx, vis.LABEL_HEIGHT + cy))
            if g < 0:
                assert px == vis.PRUNED
            elif count[g] >= 2:
                assert colour_of.setdefault(g, px) == px  # one colour per group
            else:
                assert px == tuple(original[cy, cx].tolist())
        assert len(set(colour_of.values())) == len(colour_of)  # groups are told apart
        n_groups = sum(1 for g, c in count.items() if g >= 0 and c >= 2)
        assert len(colour_of) == n_groups
    return png


@pytest.mark.parametrize("method,args", [("evit", ["--keep-rate", "0.5"]), ("topk", []),
                                         ("tome", ["--r", "16"])])
def test_visualize_png_matches_source_maps(capsys, tmp_path, method, args):
    out = tmp_path / f"{method}.png"
    rc, stdout, err = run(capsys, "visualize", "-o", str(out), "--method", method,
                          "--model", "deit_tiny", *args)
    assert rc == 0, err
    assert "wrote" in stdout
    kr = float(args[1]) if method != "tome" and args else None
    r = int(args[1]) if method == "tome" else None
    given = {k: v for k, v in (("keep_rate", kr), ("r", r)) if v is not None}
    policy = policy_from_spec(method, trace_source=True, **given)
    _, panels = vis.trace(vis.load_image(vis.DEFAULT_IMAGE, 224), policy, "deit_tiny")
    _check_png(out, panels, method)
    if method == "topk":
        pruned = sum(int((s[1:] < 0).sum()) for _, _, s in panels)
        assert pruned == (196 - 137) + (196 - 96) + (196 - 67)
    if method == "evit":
        fused = [int(torch.unique(s[1:], return_counts=True)[1].max()) for _, _, s in panels]
        assert fused[0] == 196 - 98 and all(f > 1 for f in fused)  # the fused token's group


def test_policy_from_spec():
    from tokred_ext.nn import EViT, ToMe, TopK
    assert policy_from_spec("none") is None
    p = policy_from_spec("tome:8", trace_source=True)
    assert isinstance(p, ToMe) and p.r == 8 and p.trace_source
    assert policy_from_spec("tome", r=5).r == 5
    p = policy_from_spec("topk:0.5")
    assert isinstance(p, TopK) and p.keep_rate == 0.5
    p = policy_from_spec("evit", keep_rate=0.6)
    assert isinstance(p, EViT) and p.keep_rate == 0.6
    for bad, match in (("magic", "unknown policy"), ("tome:1.5", "whole number"), ("tome:-1", ">= 0"),
                       ("evit:x", "not a number"), ("topk:2", "keep rate")):
        with pytest.raises(ValueError, match=match):
            policy_from_spec(bad)


def test_export_writes_a_checked_onnx_file(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "m.onnx"
    rc, out, err = run(capsys, "export", "--model", "deit_tiny", "--policy", "topk:0.7",
                       "-o", str(path))
    assert rc == 0, err
    assert path.stat().st_size > 0 and "onnxruntime check at batch 1" in err and "(ok)" in err


def test_export_writes_a_checked_aoti_package(capsys, tmp_path, monkeypatch):
    # A tiny ViT in place of the named model: compiling DeiT-Ti takes minutes on 2 cores.
    from tokred_ext.models import VisionTransformer
    from tokred_ext.nn import TopK
    torch.manual_seed(0)
    tiny = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=10, reduction=TopK(0.7, locs=(1, 2))).eval()
    monkeypatch.setattr(cli, "_model_and_size", lambda model, policy: ("tiny", tiny, 32))
    path = tmp_path / "m.pt2"
    rc, _, err = run(capsys, "export", "-o", str(path))  # the suffix picks the format
    assert rc == 0, err
    assert "AOTInductor, CPU, dynamic batch" in err
    assert "load_aoti check at batch 1: max |aoti - eager|" in err and "(ok)" in err
    assert path.stat().st_size > 0


def test_export_bad_arguments_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "export", "--format", "aoti", "-o", str(tmp_path / "m.onnx"))
    assert rc == 2 and err.count("\n") == 1 and "--format aoti writes a .pt2 package" in err
    rc, _, err = run(capsys, "export", "--format", "onnx", "-o", str(tmp_path / "m.pt2"))
    assert rc == 2 and err.count("\n") == 1 and "--format onnx writes an ONNX file" in err
    rc, _, err = run(capsys, "export", "-o", str(tmp_path / "m.xyz"))
    assert rc == 2 and err.count("\n") == 1 and "name the output *.onnx (ONNX) or *.pt2" in err
    rc, _, err = run(capsys, "export", "--model", "nope", "-o", str(tmp_path / "m.onnx"))
    assert rc == 2 and err.count("\n") == 1 and "unknown model 'nope'" in err
    rc, _, err = run(capsys, "export", "--model", "biformer_tiny", "--policy", "tome:3",
                     "-o", str(tmp_path / "m.onnx"))
    assert rc == 2 and "is for ViT models" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    rc, _, err = run(capsys, "export", "--model", "deit_tiny", "--checkpoint", str(junk),
                     "-o", str(tmp_path / "m.onnx"))
    assert rc == 2 and err.count("\n") == 1 and "is not a readable PyTorch state dict" in err


def test_visualize_register_token_model_shows_groups_in_a_legend(capsys, tmp_path):
    # DINOv2 with 4 register tokens (518 px, 14 px patches): the prefix is 5 tokens, none drawn;
    # each panel's largest groups appear in the legend with their panel colour.
    out = tmp_path / "reg4.png"
    rc, _, err = run(capsys, "visualize", "-o", str(out), "--method", "tome", "--r", "60",
                     "--model", "vit_small_patch14_reg4_dinov2")
    assert rc == 0, err
    policy = policy_from_spec("tome:60", trace_source=True)
    model, panels = vis.trace(vis.load_image(vis.DEFAULT_IMAGE, 518), policy,
                              "vit_small_patch14_reg4_dinov2")
    assert model.num_prefix_tokens == 5 and vis.prefix_words(model) == "1 class + 4 register tokens"
    for _, _, source in panels:  # the prefix stays first, unmerged
        assert source[:5].tolist() == [0, 1, 2, 3, 4] and bool((source[5:] >= 5).all())
    png = _check_png(out, panels, "tome", num_prefix=5, patch=14, size=518)
    top = 518 + vis.LABEL_HEIGHT + 3 * vis.LEGEND_LINE  # under the two notes and the colour key
    for i, (_, _, source) in enumerate(panels):
        groups = vis.patch_groups(source, 5)
        ids, counts = torch.unique(groups, return_counts=True)
        largest = int(ids[counts == counts.max()].min())  # ties: the lower token first
        p = int((groups == largest).nonzero()[0])
        row, col = divmod(p, 518 // 14)
        in_panel = png.getpixel((518 * (i + 1) + col * 14 + 7, vis.LABEL_HEIGHT + row * 14 + 7))
        assert png.getpixel((518 * (i + 1) + 6, top + 6)) == in_panel


def test_visualize_says_on_the_picture_when_the_weights_are_random(capsys, tmp_path):
    torch.manual_seed(0)  # the weights visualize builds for seed 0, saved as a checkpoint
    from tokred_ext.models import create_model
    ckpt = tmp_path / "w.pt"
    torch.save(create_model("deit_tiny").state_dict(), ckpt)
    from PIL import Image
    images = []
    for extra in ([], ["--checkpoint", str(ckpt)]):
        out = tmp_path / f"v{len(extra)}.png"
        rc, _, err = run(capsys, "visualize", "-o", str(out), "--method", "evit",
                         "--model", "deit_tiny", *extra)
        assert rc == 0, err
        images.append(Image.open(out).convert("RGB"))
    random, loaded = (torch.tensor(list(im.getdata())).view(im.height, im.width, 3) for im in images)
    top = 224 + vis.LABEL_HEIGHT
    assert torch.equal(random[:top], loaded[:top])  # the same weights: the same panels
    first_note = slice(top, top + vis.LEGEND_LINE)
    assert not torch.equal(random[first_note], loaded[first_note])  # "weights: RANDOM" vs the file
    assert torch.equal(random[top + vis.LEGEND_LINE:], loaded[top + vis.LEGEND_LINE:])
