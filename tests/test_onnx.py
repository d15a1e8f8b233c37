"""ONNX export: each translation in tokred_ext.onnx against the eager op, run in onnxruntime, and
reduced models end to end with a dynamic batch axis. The graphs must hold standard ONNX only."""
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tokred_ext import ops  # noqa: E402
from tokred_ext._build_info import registered_ops  # noqa: E402
from tokred_ext import onnx as tokred_onnx  # noqa: E402
from tokred_ext.models import VisionTransformer  # noqa: E402
from tokred_ext.models.biformer import BiFormer  # noqa: E402
from tokred_ext.nn import EViT, ToMe, TopK  # noqa: E402

# What TensorRT and other runtimes reject, or what only tokred's runtime would know.
FORBIDDEN = ("ScatterElements", "ScatterND", "Scatter", "NonZero", "Loop", "If")


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _node_types(model):
    graphs = [model.graph] + [f for f in model.functions]
    types = set()
    for g in graphs:
        for node in g.node:
            assert node.domain in ("", "ai.onnx"), f"custom domain {node.domain!r} ({node.op_type})"
            types.add(node.op_type)
    return types


def export_run(fn, export_inputs, *run_inputs, path):
    """Exports fn (dynamic batch) on export_inputs, checks the graph, and runs each input tuple
    of run_inputs in onnxruntime; returns [(eager outputs, onnx outputs)]."""
    module = Call(fn).eval()
    tokred_onnx.export(module, export_inputs, str(path))
    model = onnx.load(str(path))
    used = _node_types(model)
    assert not used & set(FORBIDDEN), used & set(FORBIDDEN)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = []
    for inputs in run_inputs or (export_inputs,):
        eager = module(*inputs)
        eager = eager if isinstance(eager, tuple) else (eager,)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        results.append((eager, [torch.from_numpy(g) for g in got]))
    return results


def assert_same(results, exact=()):
    """Outputs listed in `exact` (indices, plans, copies) equal bitwise; the rest within float32."""
    for eager, got in results:
        assert len(eager) == len(got)
        for i, (e, g) in enumerate(zip(eager, got)):
            assert e.shape == g.shape, (i, e.shape, g.shape)
            if i in exact or not e.is_floating_point():
                assert torch.equal(e, g.to(e.dtype)), i
            else:
                torch.testing.assert_close(g.to(e.dtype), e, atol=1e-5, rtol=1e-5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ ops

@pytest.mark.parametrize("largest", [True, False])
def test_topk(tmp_path, largest):
    g = _gen(0)
    scores = torch.randint(0, 5, (3, 11), generator=g).float() / 4  # ties: the lower index wins
    other = torch.randint(0, 5, (5, 11), generator=g).float() / 4
    res = export_run(lambda s: ops.topk(s, 4, largest), (scores,), (scores,), (other,),
                     path=tmp_path / "topk.onnx")
    assert_same(res, exact=(0,))


def test_topk_lengths(tmp_path):
    scores = torch.rand(3, 9, generator=_gen(1))
    lengths = torch.tensor([9, 2, 0])
    res = export_run(lambda s, n: ops.topk(s, 4, True, n), (scores, lengths),
                     path=tmp_path / "topk_len.onnx")
    assert_same(res, exact=(0,))
    assert (res[0][1][1][1, 2:] == -1).all()


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_tokens(tmp_path, index_dtype):
    g = _gen(20)
    x = torch.randn(2, 9, 5, generator=g)
    x[1, 0, 2] = float("nan")  # row 0 is read only where asked for, not for padding
    index = torch.tensor([[3, 3, -1, 8, 0], [-1, 2, 7, 1, -1]], dtype=index_dtype)
    x3 = torch.randn(3, 9, 5, generator=g)
    i3 = torch.randint(-1, 9, (3, 5), generator=g, dtype=index_dtype)
    res = export_run(ops.gather_tokens, (x, index), (x, index), (x3, i3),
                     path=tmp_path / "gather.onnx")
    for eager, got in res:  # copies and zero rows: bitwise, NaN where eager has it
        assert torch.equal(eager[0].nan_to_num(7.0), got[0].nan_to_num(7.0))
        assert torch.equal(eager[0].isnan(), got[0].isnan())


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_complement(tmp_path, k):
    g = _gen(21)
    index = torch.stack([torch.randperm(9, generator=g)[:k] for _ in range(2)]).to(torch.int32)
    i3 = torch.stack([torch.randperm(9, generator=g)[:k] for _ in range(3)]).to(torch.int32)
    res = export_run(lambda i: ops.complement(i, 9), (index,), (index,), (i3,),
                     path=tmp_path / "complement.onnx")
    assert_same(res)


@pytest.mark.parametrize("fuse,keep_order,num_protected,k",
                         [(False, False, 1, 7), (True, False, 1, 7), (True, True, 2, 1),
                          (True, False, 0, 12), (False, True, 1, 12)])
def test_prune_tokens(tmp_path, fuse, keep_order, num_protected, k):
    g = _gen(2)
    x = torch.randn(2, num_protected + 12, 8, generator=g)
    scores = torch.randint(0, 6, (2, 12), generator=g).float() / 8
    x3 = torch.randn(3, num_protected + 12, 8, generator=g)
    s3 = torch.rand(3, 12, generator=g)

    def fn(x, s):
        return ops.prune_tokens(x, s, k, fuse, num_protected, keep_order)
    res = export_run(fn, (x, scores), (x, scores), (x3, s3), path=tmp_path / "prune.onnx")
    assert_same(res)
    for (eager, got) in res:  # the kept rows are copies
        assert torch.equal(eager[0][:, :num_protected + k], got[0][:, :num_protected + k])


def test_prune_tokens_fused_token_ignores_kept_infinities(tmp_path):
    x = torch.randn(2, 7, 4, generator=_gen(3))
    scores = torch.rand(2, 6, generator=_gen(4))
    x[:, 1:][torch.arange(2), scores.argmax(1)] = float("inf")  # a kept token
    res = export_run(lambda x, s: ops.prune_tokens(x, s, 2, True), (x, scores),
                     path=tmp_path / "prune_inf.onnx")
    assert torch.isfinite(res[0][1][0][:, -1]).all()
    assert_same(res)


@pytest.mark.parametrize("n,r,p", [(17, 4, 1), (16, 5, 0), (18, 3, 2), (19, 4, 5), (9, 20, 1),
                                   (9, 0, 1)])
def test_bipartite_match_and_merge_plan(tmp_path, n, r, p):
    g = _gen(5)
    metric = torch.randn(2, n, 6, generator=g)

    def fn(m):
        unm, src, dst = ops.bipartite_match(m, r, p)
        return (unm, src, dst) + tuple(ops.merge_plan(unm, src, dst, n, p))
    res = export_run(fn, (metric,), (metric,), (torch.randn(3, n, 6, generator=g),),
                     path=tmp_path / "match.onnx")
    assert_same(res)


@pytest.mark.parametrize("side,r", [(4, 5), (6, 100), (5, 0)])
def test_bipartite_match_plan_merge_and_unmerge(tmp_path, side, r):
    # tomesd's step in ONNX: the dense match, the mean merge, a sub-layer, the unmerge.
    g = _gen(9)
    n = side * side
    dst_tokens = torch.tensor([y * side + x for y in range(0, side - 1, 2) for x in range(1, side, 2)])
    metric = torch.randn(2, n, 6, generator=g)
    x = torch.randn(2, n, 8, generator=g)

    def fn(x, m):  # the destinations are a constant of the graph, as in a patched model
        plan = ops.bipartite_match_plan(m, dst_tokens.clone(), r)
        merged, _ = ops.merge_by_plan(x, None, plan, "mean")
        return tuple(plan) + (ops.unmerge_by_plan(torch.tanh(merged), plan),)
    res = export_run(fn, (x, metric), (x, metric),
                     (torch.randn(3, n, 8, generator=g), torch.randn(3, n, 6, generator=g)),
                     path=tmp_path / "dense.onnx")
    assert_same(res)


@pytest.mark.parametrize("mode", ["wavg", "sum", "mean", "amax"])
@pytest.mark.parametrize("with_size,p", [(True, 1), (False, 1), (True, 2), (True, 5)])
def test_merge_by_plan(tmp_path, mode, with_size, p):
    g = _gen(6)
    n, r = 15, 5
    x = torch.randn(2, n, 8, generator=g)
    metric = torch.randn(2, n, 4, generator=g)
    size = torch.rand(2, n, 1, generator=g) + 0.5

    def fn(x, m, s):
        plan = ops.merge_plan(*ops.bipartite_match(m, r, p), n, p)
        return ops.merge_by_plan(x, s if with_size else None, plan, mode)
    res = export_run(fn, (x, metric, size), path=tmp_path / "merge.onnx")
    assert_same(res)


def test_merge_by_plan_nan_propagates_like_eager(tmp_path):
    x = torch.randn(2, 11, 4, generator=_gen(7))
    x[0, 3, 1] = float("nan")
    metric = torch.randn(2, 11, 4, generator=_gen(8))

    def fn(x, m):
        plan = ops.merge_plan(*ops.bipartite_match(m, 4), 11)
        return ops.merge_by_plan(x, None, plan, "amax")[0], ops.merge_by_plan(x, None, plan)[0]
    (eager, got), = export_run(fn, (x, metric), path=tmp_path / "nan.onnx")
    for e, o in zip(eager, got):
        assert torch.equal(e.isnan(), o.isnan())
        torch.testing.assert_close(o.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("mode", ["wavg", "amax"])
@pytest.mark.parametrize("n,r,p", [(15, 5, 1), (14, 4, 3), (9, 0, 1)])
def test_one_off_merge_ops(tmp_path, mode, n, r, p):
    """merge, unmerge and merge_source (which build their plan on every call) against eager,
    with merge_source composed over an earlier source map as a second ToMe step does."""
    g = _gen(22)
    x = torch.randn(2, n, 8, generator=g)
    size = torch.rand(2, n, 1, generator=g) + 0.5
    metric = torch.randn(2, n, 4, generator=g)
    source = torch.randint(0, n, (2, 2 * n), generator=g)

    def fn(x, s, m, source):
        unm, src, dst = ops.bipartite_match(m, r, p)
        merged, size_out = ops.merge(x, s, unm, src, dst, mode, p)
        back = ops.unmerge(merged, unm, src, dst, n, p)
        first = ops.merge_source(None, unm, src, dst, n, p)
        return (merged, size_out, back, first, ops.merge_source(source, unm, src, dst, n, p),
                ops.merge_source_by_plan(source, ops.merge_plan(unm, src, dst, n, p)))
    res = export_run(fn, (x, size, metric, source),
                     path=tmp_path / "one_off.onnx")
    assert_same(res)


@pytest.mark.parametrize("weighted,topk,dtype", [(False, 2, torch.float32), (True, 2, torch.float32),
                                                 (True, 3, torch.float64), (False, 0, torch.float32)])
def test_routed_gather(tmp_path, weighted, topk, dtype):
    g = _gen(23)
    kv = torch.randn(2, 4, 3, 6, generator=g, dtype=dtype)
    r_idx = torch.randint(0, 4, (2, 4, topk), generator=g, dtype=torch.int32)
    weight = torch.rand(2, 4, topk, generator=g)  # float32 weights, as BiFormer's soft routing
    kv3 = torch.randn(3, 4, 3, 6, generator=g, dtype=dtype)
    r3 = torch.randint(0, 4, (3, 4, topk), generator=g, dtype=torch.int32)
    w3 = torch.rand(3, 4, topk, generator=g)
    if weighted:
        res = export_run(ops.routed_gather, (kv, r_idx, weight), (kv, r_idx, weight),
                         (kv3, r3, w3), path=tmp_path / "routed_gather.onnx")
    else:
        res = export_run(lambda kv, r: ops.routed_gather(kv, r), (kv, r_idx), (kv, r_idx),
                         (kv3, r3), path=tmp_path / "routed_gather.onnx")
    for eager, got in res:  # copies, and one product rounded once: bitwise
        assert eager[0].dtype == got[0].dtype and torch.equal(eager[0], got[0])


@pytest.mark.parametrize("topk", [0, 2])
def test_routed_attention(tmp_path, topk):
    g = _gen(9)
    q = torch.randn(2, 4, 3, 8, generator=g)
    k = torch.randn(2, 4, 2, 8, generator=g)
    v = torch.randn(2, 4, 2, 6, generator=g)
    r_idx = torch.randint(0, 4, (2, 4, topk), generator=g, dtype=torch.int32)
    res = export_run(lambda q, k, v, r: ops.routed_attention(q, k, v, r, 2, 0.35),
                     (q, k, v, r_idx), path=tmp_path / "routed.onnx")
    assert_same(res)


# ------------------------------------------------------------------------------------ models

def _tiny_vit(spec):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=10).eval()
    policies = {"topk": TopK(0.7, locs=(1, 2)), "evit": EViT(0.7, locs=(1, 2)), "tome": ToMe(3),
                "none": None}
    model.reduction = policies[spec]
    return model


@pytest.mark.parametrize("spec", ["topk", "evit", "tome", "none"])
def test_vit_with_each_policy_in_onnxruntime(tmp_path, spec):
    model = _tiny_vit(spec)
    images = torch.randn(2, 3, 32, 32, generator=_gen(10))
    path = tmp_path / f"vit_{spec}.onnx"
    tokred_onnx.export(model, (images,), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not _node_types(onnx.load(str(path))) & set(FORBIDDEN)
    for batch in (1, 8):  # a dynamic batch axis
        x = torch.randn(batch, 3, 32, 32, generator=_gen(batch))
        with torch.inference_mode():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("soft_routing", [False, True])
def test_biformer_in_onnxruntime(tmp_path, soft_routing):
    torch.manual_seed(0)
    model = BiFormer(depth=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], head_dim=16, n_win=2,
                     num_classes=10, topks=(2, 2, -1, -1), soft_routing=soft_routing,
                     diff_routing=soft_routing).eval()
    images = torch.randn(2, 3, 64, 64, generator=_gen(11))
    path = tmp_path / "biformer.onnx"
    tokred_onnx.export(model, (images,), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64, generator=_gen(batch))
        with torch.inference_mode():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_every_public_forward_op_has_a_translation():
    """Every op a user may call exports; the _*_backward ops never appear in an inference graph."""
    names = {name.split("::", 1)[1] for name in registered_ops()}
    forward = {name for name in names if not name.startswith("_")}
    translated = {o.name().split("::", 1)[1] for o in tokred_onnx.TRANSLATIONS}
    assert forward == translated, forward ^ translated


def test_every_forward_op_the_models_use_has_a_translation():
    for spec in ("topk", "evit", "tome"):
        program = torch.export.export(_tiny_vit(spec), (torch.randn(1, 3, 32, 32),))
        used = {n.target for n in program.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("tokred.")}
        assert used and used <= set(tokred_onnx.TRANSLATIONS), used


@pytest.mark.parametrize("spec", ["topk", "tome"])
def test_legacy_exporter_refuses_in_one_clear_error(tmp_path, spec):
    """dynamo=False stops at the first tokred op, naming it and the exporter that works."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch: the legacy exporter is old
        with pytest.raises(torch.onnx.errors.OnnxExporterError,
                           match=r"tokred::\w+ cannot be exported by the legacy .*dynamo=True"):
            torch.onnx.export(_tiny_vit(spec), (torch.randn(1, 3, 32, 32),),
                              str(tmp_path / "legacy.onnx"), dynamo=False)
