"""AOTInductor packages (tokred_ext.aoti): a reduced ViT and a single op, compiled once each into
a .pt2 (tens of seconds on a CPU, so module-scoped) and loaded with load_aoti, against eager. A
fresh interpreter that has not imported tokred_ext cannot load them: the compiled code calls the
tokred ops by name through the dispatcher, which knows them only once tokred's library is loaded."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import tokred_ext
from tokred_ext import aoti
from tokred_ext.models import VisionTransformer
from tokred_ext.nn import ToMe

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tokred_ext.__file__)))


class PruneFuse(nn.Module):
    """EViT's step as one op: keep the 5 best-scored tokens after the class token, fuse the rest."""

    def forward(self, x, scores):
        return torch.ops.tokred.prune_tokens(x, scores, 5, True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=10, reduction=ToMe(3)).eval()


def _tokred_ops(model, args):
    program = torch.export.export(model, args)
    return {n.target.name().split(".")[0] for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("tokred.")}


@pytest.fixture(scope="module")
def vit_package(tmp_path_factory):
    model = _tiny_vit()
    path = tmp_path_factory.mktemp("aoti") / "vit_tome.pt2"
    images = torch.randn(2, 3, 32, 32, generator=_gen(0))
    assert tokred_ext.compile_aoti(model, (images,), path) == str(path)
    return model, str(path)


@pytest.fixture(scope="module")
def op_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "prune.pt2"
    args = (torch.randn(2, 11, 8, generator=_gen(1)), torch.rand(2, 10, generator=_gen(2)))
    tokred_ext.compile_aoti(PruneFuse(), args, path)
    return str(path)


def _rewrite(src, dst, edit):
    """Copies the package src to dst, passing each member's bytes through edit(name, data)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            b.writestr(info, edit(info.filename, a.read(info)))
    return str(dst)


# ------------------------------------------------------------------------------ in this process

@pytest.mark.parametrize("batch", [1, 2, 5])  # the batch axis is dynamic
def test_reduced_vit_equals_eager(vit_package, batch):
    model, path = vit_package
    runner = tokred_ext.load_aoti(path)
    images = torch.randn(batch, 3, 32, 32, generator=_gen(batch))
    with torch.inference_mode():
        expected = model(images)
        got = runner(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.token_counts[-1] < 17  # ToMe merged tokens: the package ran the tokred ops


@pytest.mark.parametrize("batch", [1, 3])
def test_single_op_equals_eager_bitwise(op_package, batch):
    runner = tokred_ext.load_aoti(op_package)
    x = torch.randn(batch, 11, 8, generator=_gen(10 + batch))
    scores = torch.rand(batch, 10, generator=_gen(20 + batch))
    out, kept = runner(x, scores)
    expected_out, expected_kept = PruneFuse()(x, scores)
    # The package calls the same kernel: the outputs are the eager op's, bit for bit.
    assert torch.equal(out, expected_out) and torch.equal(kept, expected_kept)


def test_package_contents_name_device_and_ops(vit_package, op_package):
    model, path = vit_package
    images = torch.randn(1, 3, 32, 32)
    assert aoti.package_contents(path) == {
        aoti.MODEL_NAME: {"device": "cpu", "ops": _tokred_ops(model, (images,))}}
    assert aoti.package_contents(op_package)[aoti.MODEL_NAME]["ops"] == {"tokred::prune_tokens"}


# ------------------------------------------------------------------------------ fresh processes

def _python(code, cwd):
    """Runs code in a fresh interpreter that can import the same tokred_ext as these tests."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_a_fresh_process_without_tokred_cannot_load(vit_package, tmp_path):
    # torch alone: the dispatcher has no tokred::* schema, and the loader looks each op up.
    _, path = vit_package
    res = _python(f"import torch; torch._inductor.aoti_load_package({path!r})", tmp_path)
    assert res.returncode != 0
    assert "Could not find schema for tokred::" in res.stderr, res.stderr


def test_a_fresh_process_with_load_aoti_runs(vit_package, tmp_path):
    model, path = vit_package
    images = torch.randn(3, 3, 32, 32, generator=_gen(30))
    with torch.inference_mode():
        torch.save({"images": images, "expected": model(images)}, tmp_path / "io.pt")
    res = _python(
        "import torch, tokred_ext\n"
        f"runner = tokred_ext.load_aoti({path!r})\n"
        "io = torch.load('io.pt')\n"
        "torch.testing.assert_close(runner(io['images']), io['expected'], atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n", tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------------ clear errors

def test_a_missing_package_is_named(tmp_path):
    missing = str(tmp_path / "nope.pt2")
    with pytest.raises(FileNotFoundError, match=f"AOTInductor package '{missing}' does not exist"):
        tokred_ext.load_aoti(missing)


def test_a_file_that_is_not_a_package(tmp_path):
    text = tmp_path / "model.pt2"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="is not an AOTInductor package"):
        tokred_ext.load_aoti(str(text))
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("archive/data/weights.bin", b"")
    with pytest.raises(ValueError, match="holds no AOTInductor model"):
        tokred_ext.load_aoti(str(other))


def test_a_package_without_the_default_model(op_package, tmp_path):
    path = tmp_path / "renamed.pt2"
    with zipfile.ZipFile(op_package) as a, zipfile.ZipFile(path, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename.replace("/aotinductor/model/", "/aotinductor/other/"),
                       a.read(info))
    with pytest.raises(ValueError, match="has no model named 'model' \\(it holds other\\)"):
        tokred_ext.load_aoti(str(path))


def _with_device(data, device):
    content = json.loads(data)
    content["AOTI_DEVICE_KEY"] = device
    return json.dumps(content).encode()


@pytest.mark.skipif(torch.cuda.is_available() and tokred_ext.build_info()["cuda_kernels"],
                    reason="this process can run CUDA packages")
def test_a_cuda_package_on_a_machine_without_cuda(op_package, tmp_path):
    path = _rewrite(op_package, tmp_path / "cuda.pt2", lambda name, data: _with_device(data, "cuda")
                    if name.endswith("_metadata.json") and b"AOTI_DEVICE_KEY" in data else data)
    assert aoti.package_contents(path)[aoti.MODEL_NAME]["device"] == "cuda"
    with pytest.raises(ValueError, match="it was built for CUDA and this (process has no CUDA "
                                         "device|tokred_ext has no CUDA kernels)"):
        tokred_ext.load_aoti(path)


def test_a_package_for_another_device(op_package, tmp_path):
    path = _rewrite(op_package, tmp_path / "xpu.pt2", lambda name, data: _with_device(data, "xpu")
                    if name.endswith("_metadata.json") and b"AOTI_DEVICE_KEY" in data else data)
    with pytest.raises(ValueError, match="built for 'xpu'; tokred has CPU and CUDA kernels only"):
        tokred_ext.load_aoti(path)


def test_a_package_calling_an_op_this_tokred_lacks(op_package, tmp_path):
    path = _rewrite(op_package, tmp_path / "newer.pt2", lambda name, data: data.replace(
        b'"tokred::prune_tokens"', b'"tokred::prune_tokens_v2"') if name.endswith(".json")
        else data)
    with pytest.raises(ValueError, match="it calls tokred::prune_tokens_v2, which this "
                                         "tokred_ext does not define"):
        tokred_ext.load_aoti(path)


def test_compile_aoti_wants_a_pt2_path(tmp_path):
    with pytest.raises(ValueError, match="must end in .pt2"):
        tokred_ext.compile_aoti(PruneFuse(), (torch.randn(2, 11, 8), torch.rand(2, 10)),
                                tmp_path / "model.zip")


def test_compile_aoti_wants_two_examples_for_a_dynamic_batch(tmp_path):
    with pytest.raises(ValueError, match="example batch must be 2 or more"):
        tokred_ext.compile_aoti(PruneFuse(), (torch.randn(1, 11, 8), torch.rand(1, 10)),
                                tmp_path / "model.pt2")
