"""Every public op, backward ops included, against bad and unusual inputs, on every backend here.

One table: for each op a valid call, then each argument with its bad values (wrong rank, dtype,
device or batch; negative or oversized sizes; out-of-range indices) and its unusual ones (NaN,
inf). A bad value must raise a RuntimeError that names the argument; an unusual value must give
the reference's result. Backends: the CPU kernels, the Meta kernels (shape checks only: they see
no values), and the emulated CUDA kernels when tests/simt's library is loaded (TOKRED_SIMT_LIB,
as .ci/simt_check.sh does).
"""
import os
import re

import pytest
import torch

import tokred_ext  # noqa: F401
from tokred_ext import reference as R

OPS = torch.ops.tokred
NAN, INF = float("nan"), float("inf")

BACKENDS = ["cpu", "meta"]
if os.environ.get("TOKRED_SIMT_LIB"):
    torch.ops.load_library(os.environ["TOKRED_SIMT_LIB"])
    BACKENDS.append("cuda-emulated")


def _g():
    return torch.Generator().manual_seed(0)


def _match():
    metric = torch.randn(2, 10, 4, generator=_g())
    return OPS.bipartite_match(metric, 3, 1)  # unm [2, 2], src/dst [2, 3]


def _valid():
    """A valid call of every op, as {op: {argument: value}} in schema order."""
    g = _g()
    unm, src, dst = _match()
    plan = dict(zip(("dest", "offsets", "members"), OPS.merge_plan(unm, src, dst, 10, 1)))
    x10 = torch.randn(2, 10, 4, generator=g)
    q = torch.randn(1, 3, 2, 8, generator=g)
    ridx = torch.tensor([[[0, 1], [1, 2], [2, 0]]])
    out, lse = OPS.routed_attention(q, q, q, ridx, 2, 0.5)
    pruned, kept = OPS.prune_tokens(torch.randn(2, 7, 4, generator=g), torch.rand(2, 6, generator=g),
                                    3, True, 1, False)
    return {
        "topk": dict(scores=torch.randn(3, 6, generator=g), k=2, largest=True, lengths=None),
        "_topk_backward": dict(grad_values=torch.randn(3, 2, generator=g),
                               indices=torch.tensor([[0, 1], [2, 3], [4, -1]]), n=6),
        "gather_tokens": dict(x=torch.randn(2, 5, 4, generator=g), index=torch.tensor([[0, 4], [-1, 2]])),
        "_gather_tokens_backward": dict(grad=torch.randn(2, 2, 4, generator=g),
                                        index=torch.tensor([[0, 4], [-1, 2]]), n=5),
        "complement": dict(index=torch.tensor([[0, 3], [1, 2]]), n=5),
        "prune_tokens": dict(x=torch.randn(2, 7, 4, generator=g), scores=torch.rand(2, 6, generator=g), k=3,
                             fuse=True, num_protected=1, keep_order=False),
        "_prune_tokens_backward": dict(grad_out=torch.randn(pruned.shape, generator=g),
                                       x=torch.randn(2, 7, 4, generator=g), scores=torch.rand(2, 6, generator=g),
                                       index=kept, fuse=True, num_protected=1),
        "bipartite_match": dict(metric=torch.randn(2, 10, 4, generator=g), r=3, num_protected=1),
        "merge": dict(x=x10, size=torch.rand(2, 10, 1, generator=g) + 0.5, unm_idx=unm, src_idx=src,
                      dst_idx=dst, mode="wavg", num_protected=1),
        "_merge_backward": dict(grad_out=torch.randn(2, 7, 4, generator=g), x=x10, size=None, unm_idx=unm,
                                src_idx=src, dst_idx=dst, mode="amax", num_protected=1),
        "unmerge": dict(x=torch.randn(2, 7, 4, generator=g), unm_idx=unm, src_idx=src, dst_idx=dst, n=10,
                        num_protected=1),
        "_unmerge_backward": dict(grad=torch.randn(2, 10, 4, generator=g), unm_idx=unm, src_idx=src,
                                  dst_idx=dst, num_protected=1),
        "merge_source": dict(source=torch.randint(0, 10, (2, 12), generator=g), unm_idx=unm, src_idx=src,
                             dst_idx=dst, n=10, num_protected=1),
        "merge_plan": dict(unm_idx=unm, src_idx=src, dst_idx=dst, n=10, num_protected=1),
        "bipartite_match_plan": dict(metric=torch.randn(2, 10, 4, generator=g),
                                     dst_tokens=torch.tensor([1, 4, 7]), r=3),
        "merge_by_plan": dict(x=x10, size=torch.rand(2, 10, 1, generator=g) + 0.5, **plan, mode="wavg"),
        "_merge_by_plan_backward": dict(grad_out=torch.randn(2, 7, 4, generator=g), x=x10, size=None, **plan,
                                        mode="amax"),
        "unmerge_by_plan": dict(x=torch.randn(2, 7, 4, generator=g), **plan),
        "merge_source_by_plan": dict(source=torch.randint(0, 10, (2, 12), generator=g), **plan),
        "routed_gather": dict(kv=torch.randn(1, 3, 2, 4, generator=g), r_idx=ridx,
                              r_weight=torch.rand(1, 3, 2, generator=g)),
        "_routed_gather_backward": dict(grad=torch.randn(1, 3, 2, 2, 4, generator=g),
                                        kv=torch.randn(1, 3, 2, 4, generator=g), r_idx=ridx,
                                        r_weight=torch.rand(1, 3, 2, generator=g)),
        "routed_attention": dict(q=q, k=q.clone(), v=q.clone(), r_idx=ridx, num_heads=2, scale=0.5),
        "_routed_attention_backward": dict(grad_out=torch.randn(out.shape, generator=g), q=q, k=q.clone(),
                                           v=q.clone(), r_idx=ridx, out=out, lse=lse, num_heads=2,
                                           scale=0.5),
    }


def _set(arg, value):
    return lambda a: a.__setitem__(arg, value(a[arg]) if callable(value) else value)


def _meta_one(arg):
    return _set(arg, lambda t: t.to("meta"))


def _swap_members_of_a_merged_output(a):
    """Breaks the ascending order inside the first output with two or more members."""
    members, offsets = a["members"].clone(), a["offsets"]
    o = int(((offsets[0, 1:] - offsets[0, :-1]) > 1).nonzero()[0])
    i = int(offsets[0, o])
    members[0, i], members[0, i + 1] = members[0, i + 1].clone(), members[0, i].clone()
    a["members"] = members


def _edit(arg, index, value):
    def edit(a):
        t = a[arg].clone()
        t[index] = value
        a[arg] = t
    return edit


def V(regex=""):
    """A check on values (index ranges, duplicates), which the Meta kernels cannot make. The CUDA
    kernels check values with device asserts, whose text is fixed: it names the bound (`[0, P)`)
    where the CPU's message gives its value (`[0, 3)`)."""
    return ("values", regex)


REGIONS = r"\[0, (3|P)\)"  # r_idx's range: the CPU gives P = 3, a device assert names the bound

# (op, argument, what is wrong, mutation, what the message must also match: a regex, or V(regex))
BAD = [
    ("topk", "scores", "a scalar", _set("scores", torch.tensor(1.0)), "at least 1 dimension"),
    ("topk", "scores", "an integer dtype", _set("scores", lambda t: t.long()), "float32"),
    ("topk", "k", "negative", _set("k", -1), ">= 0"),
    ("topk", "k", "over n", _set("k", 7), "<="),
    ("topk", "lengths", "a float dtype", _set("lengths", torch.ones(3)), "index tensor"),
    ("topk", "lengths", "the wrong shape", _set("lengths", torch.ones(2, dtype=torch.long)), "leading shape"),
    ("topk", "lengths", "over n", _set("lengths", torch.tensor([1, 7, 2])), V()),
    ("topk", "lengths", "negative", _set("lengths", torch.tensor([1, -1, 2])), V()),
    ("topk", "lengths", "on another device", _set("lengths", torch.ones(3, dtype=torch.long, device="meta")),
     "same device"),
    ("_topk_backward", "grad_values", "an integer dtype", _set("grad_values", lambda t: t.long()), "float32"),
    ("_topk_backward", "indices", "another shape", _set("indices", torch.zeros(3, 3, dtype=torch.long)), "shape"),
    ("_topk_backward", "indices", "out of range", _set("indices", torch.tensor([[0, 1], [2, 6], [4, -1]])), V()),
    ("_topk_backward", "indices", "below -1", _set("indices", torch.tensor([[0, 1], [2, -2], [4, -1]])), V()),
    ("_topk_backward", "indices", "on another device", _meta_one("indices"), "same device"),
    ("_topk_backward", "n", "below k", _set("n", 1), ">= k"),
    ("gather_tokens", "x", "2-D", _set("x", lambda t: t[0]), "3-D"),
    ("gather_tokens", "index", "3-D", _set("index", lambda t: t[None]), "2-D"),
    ("gather_tokens", "index", "another batch", _set("index", lambda t: t[:1]), "batch size"),
    ("gather_tokens", "index", "out of range", _set("index", torch.tensor([[0, 5], [1, 2]])), V()),
    ("gather_tokens", "index", "below -1", _set("index", torch.tensor([[0, -2], [1, 2]])), V()),
    ("gather_tokens", "index", "on another device", _meta_one("index"), "same device"),
    ("_gather_tokens_backward", "index", "another shape", _set("index", torch.zeros(2, 3, dtype=torch.long)),
     "shape"),
    ("_gather_tokens_backward", "index", "out of range", _set("index", torch.tensor([[0, 5], [1, 2]])), V()),
    ("_gather_tokens_backward", "n", "negative", _set("n", -1), ">= 0"),
    ("_gather_tokens_backward", "grad", "on another device", _meta_one("grad"), "same device"),
    ("complement", "index", "a float dtype", _set("index", lambda t: t.float()), "index tensor"),
    ("complement", "index", "a duplicate", _set("index", torch.tensor([[0, 0], [1, 2]])), V("twice|duplicate")),
    ("complement", "index", "out of range", _set("index", torch.tensor([[0, 5], [1, 2]])), V()),
    ("complement", "n", "below k", _set("n", 1), ">="),
    ("prune_tokens", "x", "2-D", _set("x", lambda t: t[0]), "3-D"),
    ("prune_tokens", "x", "an integer dtype", _set("x", lambda t: t.long()), "float32"),
    ("prune_tokens", "scores", "another batch", _set("scores", lambda t: t[:1]), "batch size"),
    ("prune_tokens", "scores", "too few tokens", _set("scores", lambda t: t[:, 1:]), "every unprotected"),
    ("prune_tokens", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("prune_tokens", "k", "over N", _set("k", 7), "<="),
    ("prune_tokens", "scores", "on another device", _meta_one("scores"), "same device"),
    ("_prune_tokens_backward", "grad_out", "another batch", _set("grad_out", lambda t: t[:1]), V()),
    ("_prune_tokens_backward", "x", "another batch", _set("x", lambda t: t[:1]), "batch size"),
    ("_prune_tokens_backward", "x", "other channels", _set("x", lambda t: t[..., :3]), "channels"),
    ("_prune_tokens_backward", "x", "another dtype", _set("x", lambda t: t.double()), "dtype"),
    ("_prune_tokens_backward", "scores", "another batch", _set("scores", lambda t: t[:1]), "batch size"),
    ("_prune_tokens_backward", "index", "another batch", _set("index", lambda t: t[:1]), "batch size"),
    ("_prune_tokens_backward", "index", "out of range", _set("index", lambda t: t.clone().fill_(6)), V()),
    ("_prune_tokens_backward", "index", "a token twice", _set("index", lambda t: t[:, :1].repeat(1, t.shape[1])),
     V("twice|duplicate")),
    ("_prune_tokens_backward", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("_prune_tokens_backward", "x", "on another device", _meta_one("x"), "same device"),
    ("_prune_tokens_backward", "scores", "on another device", _meta_one("scores"), "same device"),
    ("bipartite_match", "metric", "2-D", _set("metric", lambda t: t[0]), "3-D"),
    ("bipartite_match", "metric", "an integer dtype", _set("metric", lambda t: t.long()), "float32"),
    ("merge", "mode", "unknown", _set("mode", "max"), "one of"),
    ("merge", "size", "another dtype", _set("size", lambda t: t.double()), "dtype"),
    ("merge", "size", "another shape", _set("size", lambda t: t[..., :1, :]), "shape"),
    ("merge", "unm_idx", "another batch", _set("unm_idx", lambda t: t[:1]), "batch size"),
    ("merge", "unm_idx", "too few tokens", _set("unm_idx", lambda t: t[:, :1]), "ceil"),
    ("merge", "dst_idx", "another shape", _set("dst_idx", lambda t: t[:, :2]), "shape"),
    ("merge", "dst_idx", "out of range", _set("dst_idx", lambda t: t.clone().fill_(5)), V()),
    ("merge", "src_idx", "out of range", _set("src_idx", lambda t: t.clone().fill_(-1)), V()),
    ("merge", "unm_idx", "a token twice", _set("unm_idx", lambda t: t[:, :1].repeat(1, 2)), V()),
    ("merge", "unm_idx", "fewer than the prefix's A tokens",
     lambda a: a.update(unm_idx=torch.zeros(2, 0, dtype=torch.long),
                        src_idx=torch.tensor([[0, 1, 2, 3, 4]] * 2),
                        dst_idx=torch.tensor([[0, 1, 2, 3, 4]] * 2), num_protected=2),
     "prefix tokens"),
    ("merge", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("bipartite_match", "num_protected", "negative", _set("num_protected", -2), ">= 0"),
    ("unmerge", "unm_idx", "fewer than the prefix's A tokens", _set("num_protected", 7), "prefix tokens"),
    ("merge_plan", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("_merge_backward", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("_unmerge_backward", "num_protected", "negative", _set("num_protected", -3), ">= 0"),
    ("unmerge", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("merge_source", "num_protected", "negative", _set("num_protected", -1), ">= 0"),
    ("merge_source", "unm_idx", "fewer than the prefix's A tokens", _set("num_protected", 9), "prefix tokens"),
    ("merge", "x", "on another device", _meta_one("x"), "same device"),
    ("_merge_backward", "grad_out", "another shape", _set("grad_out", lambda t: t[:, 1:]), "shape"),
    ("_merge_backward", "grad_out", "on another device", _meta_one("grad_out"), "same device"),
    ("unmerge", "unm_idx", "a float dtype", _set("unm_idx", lambda t: t.float()), "index tensor"),
    ("unmerge", "dst_idx", "3-D", _set("dst_idx", lambda t: t[None]), "2-D"),
    ("unmerge", "x", "another token count", _set("x", lambda t: t[:, 1:]), "n - r"),
    ("unmerge", "n", "negative", _set("n", -1), ">= 0"),
    ("unmerge", "src_idx", "out of range", _set("src_idx", lambda t: t.clone().fill_(9)), V()),
    ("_unmerge_backward", "unm_idx", "a token twice", _set("unm_idx", lambda t: t[:, :1].repeat(1, 2)), V()),
    ("merge_source", "src_idx", "a float dtype", _set("src_idx", lambda t: t.float()), "index tensor"),
    ("merge_source", "dst_idx", "out of range", _set("dst_idx", lambda t: t.clone().fill_(7)), V()),
    ("merge_source", "source", "another batch", _set("source", torch.zeros(64, 8, dtype=torch.long)),
     "batch size"),
    ("merge_source", "source", "out of range", _set("source", torch.full((2, 3), 10)), V()),
    ("merge_source", "source", "a float dtype", _set("source", torch.zeros(2, 3)), "index tensor"),
    ("merge_source", "unm_idx", "a token twice", _set("unm_idx", lambda t: t[:, :1].repeat(1, 2)), V()),
    ("merge_plan", "unm_idx", "a token twice", _set("unm_idx", lambda t: t[:, :1].repeat(1, 2)), V()),
    ("merge_plan", "src_idx", "another shape", _set("src_idx", lambda t: t[:1]), "shape"),
    ("merge_plan", "dst_idx", "out of range", _set("dst_idx", lambda t: t.clone().fill_(5)), V()),
    ("merge_plan", "n", "negative", _set("n", -1), ">= 0"),
    ("merge_plan", "unm_idx", "a scalar", _set("unm_idx", torch.tensor(1)), "2-D"),
    ("merge_source", "unm_idx", "a scalar with no source map",
     lambda a: a.update(source=None, unm_idx=torch.tensor(1)), "2-D"),
    ("bipartite_match_plan", "metric", "2-D", _set("metric", lambda t: t[0]), "3-D"),
    ("bipartite_match_plan", "metric", "an integer dtype", _set("metric", lambda t: t.long()), "float32"),
    ("bipartite_match_plan", "dst_tokens", "a float dtype", _set("dst_tokens", lambda t: t.float()),
     "index tensor"),
    ("bipartite_match_plan", "dst_tokens", "2-D", _set("dst_tokens", lambda t: t[None]), "1-D"),
    ("bipartite_match_plan", "dst_tokens", "more than N", _set("dst_tokens", torch.arange(11)), "at most"),
    ("bipartite_match_plan", "dst_tokens", "not ascending", _edit("dst_tokens", 0, 5), V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "a token twice", _edit("dst_tokens", 1, 1), V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "out of range", _edit("dst_tokens", 2, 10), V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "negative", _edit("dst_tokens", 0, -1), V("ascend")),
    # The last token first, or repeated at the end: every entry is checked, not those the
    # partition reaches before the last token.
    ("bipartite_match_plan", "dst_tokens", "the last token first", _edit("dst_tokens", 0, 9), V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "the last token twice", _set("dst_tokens", torch.tensor([1, 9, 9])),
     V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "the last token, then one out of range",
     _set("dst_tokens", torch.tensor([9, 100])), V("ascend")),
    ("bipartite_match_plan", "dst_tokens", "on another device", _meta_one("dst_tokens"), "same device"),
    ("merge_plan", "n", "another token count", _set("n", 12), "ceil"),
    ("merge_by_plan", "x", "another token count", _set("x", lambda t: t[:, 1:]), "leading sizes"),
    ("merge_by_plan", "x", "an integer dtype", _set("x", lambda t: t.long()), "float32"),
    ("merge_by_plan", "size", "another shape", _set("size", lambda t: t[:, 1:]), "shape"),
    ("merge_by_plan", "size", "another dtype", _set("size", lambda t: t.double()), "dtype"),
    ("merge_by_plan", "mode", "unknown", _set("mode", "max"), "one of"),
    ("merge_by_plan", "dest", "3-D", _set("dest", lambda t: t[None]), "2-D"),
    ("merge_by_plan", "dest", "a float dtype", _set("dest", lambda t: t.float()), "index tensor"),
    ("merge_by_plan", "dest", "on another device", _meta_one("dest"), "same device"),
    ("merge_by_plan", "dest", "a member's output wrong", _edit("dest", (0, 0), 1), V("map each member")),
    ("merge_by_plan", "offsets", "another batch", _set("offsets", lambda t: t[:1]), "batch size"),
    ("merge_by_plan", "offsets", "more outputs than tokens", _set("offsets", torch.zeros(2, 12, dtype=torch.long)),
     "N - r \\+ 1"),
    ("merge_by_plan", "offsets", "not from 0", _edit("offsets", (1, 0), 1), V("start at 0")),
    ("merge_by_plan", "offsets", "not to N", _edit("offsets", (0, -1), 9), V("end at N")),
    # Emptying output 0 also hands its member to output 1: two faults, and a device assert may name
    # either one first.
    ("merge_by_plan", "offsets", "an empty output", _edit("offsets", (0, 1), 0), V("not a merge plan")),
    ("merge_by_plan", "offsets", "past N", _edit("offsets", (0, 3), 99), V("offsets")),
    ("merge_by_plan", "members", "another shape", _set("members", lambda t: t[:, 1:]), "shape of dest"),
    ("merge_by_plan", "members", "out of range", _edit("members", (1, 4), 10), V(r"\[0, N\)")),
    ("merge_by_plan", "members", "negative", _edit("members", (0, 0), -1), V(r"\[0, N\)")),
    ("merge_by_plan", "members", "out of order", _swap_members_of_a_merged_output, V("ascend")),
    ("_merge_by_plan_backward", "grad_out", "another shape", _set("grad_out", lambda t: t[:, 1:]), "shape"),
    ("_merge_by_plan_backward", "members", "out of range", _edit("members", (1, 4), 10), V()),
    ("unmerge_by_plan", "x", "another token count", _set("x", lambda t: t[:, 1:]), "leading sizes"),
    ("unmerge_by_plan", "dest", "a member's output wrong", _edit("dest", (0, 0), 1), V()),
    ("unmerge_by_plan", "offsets", "an empty output", _edit("offsets", (0, 1), 0), V()),
    ("unmerge_by_plan", "members", "out of range", _edit("members", (1, 4), 10), V()),
    ("merge_source_by_plan", "source", "another batch", _set("source", torch.zeros(64, 8, dtype=torch.long)),
     "batch size"),
    ("merge_source_by_plan", "source", "out of range", _set("source", torch.full((2, 3), 10)), V()),
    ("merge_source_by_plan", "source", "a float dtype", _set("source", torch.zeros(2, 3)), "index tensor"),
    ("merge_source_by_plan", "dest", "a member's output wrong", _edit("dest", (0, 0), 1), V()),
    ("merge_source_by_plan", "offsets", "not from 0", _edit("offsets", (1, 0), 1), V()),
    ("merge_source_by_plan", "members", "out of order", _swap_members_of_a_merged_output, V()),
    ("routed_gather", "r_idx", "out of range", _set("r_idx", torch.tensor([[[0, 3], [1, 2], [2, 0]]])), V(REGIONS)),
    ("routed_gather", "r_idx", "negative", _set("r_idx", torch.tensor([[[0, -1], [1, 2], [2, 0]]])), V(REGIONS)),
    ("routed_gather", "r_idx", "another batch", _set("r_idx", lambda t: t.repeat(2, 1, 1)), "batch size"),
    ("routed_gather", "r_weight", "another shape", _set("r_weight", lambda t: t[..., :1]), "shape"),
    ("routed_gather", "r_weight", "on another device", _meta_one("r_weight"), "same device"),
    ("_routed_gather_backward", "grad", "another shape", _set("grad", lambda t: t[:, :, :1]), "shape"),
    ("_routed_gather_backward", "kv", "another dtype", _set("kv", lambda t: t.double()), "dtype"),
    ("_routed_gather_backward", "r_idx", "negative", _set("r_idx", torch.tensor([[[0, -1], [1, 2], [2, 0]]])),
     V(REGIONS)),
    ("routed_gather", "kv", "3-D", _set("kv", lambda t: t[0]), "4-D"),
    ("routed_attention", "q", "an integer dtype", _set("q", lambda t: t.long()), "float32"),
    ("routed_attention", "num_heads", "zero", _set("num_heads", 0), ">= 1"),
    ("routed_attention", "num_heads", "not dividing", _set("num_heads", 3), "divide"),
    ("routed_attention", "k", "another dtype", _set("k", lambda t: t.double()), "dtype"),
    ("routed_attention", "v", "other windows", _set("v", lambda t: t[:, :, :1]), "match k"),
    ("routed_attention", "r_idx", "out of range", _set("r_idx", torch.tensor([[[0, 3], [1, 2], [2, 0]]])),
     V(REGIONS)),
    ("routed_attention", "q", "on another device", _meta_one("q"), "same device"),
    ("_routed_attention_backward", "r_idx", "out of range",
     _set("r_idx", torch.tensor([[[0, 3], [1, 2], [2, 0]]])), V(REGIONS)),
    ("_routed_attention_backward", "lse", "another dtype", _set("lse", lambda t: t.double()), "lse"),
    ("_routed_attention_backward", "out", "another shape", _set("out", lambda t: t[..., :4]), "shape"),
    ("_routed_attention_backward", "lse", "on another device", _meta_one("lse"), "same device"),
]


def _call(backend, op, args):
    schema = [a.name for a in getattr(OPS, op).default._schema.arguments]
    assert list(args) == schema, (op, list(args), schema)
    values = list(args.values())
    if backend == "meta":
        values = [v.to("meta") if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
                  for v in values]
    ns = torch.ops.tokred_simt if backend == "cuda-emulated" else OPS
    return getattr(ns, op)(*values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,arg,what,mutate,extra", BAD, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in BAD])
def test_bad_input_raises_naming_the_argument(backend, op, arg, what, mutate, extra):
    args = _valid()[op]
    mutate(args)
    mixed_devices = any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in args.values())
    if isinstance(extra, tuple):
        if backend == "meta":
            pytest.skip("the Meta kernels see no values")
        extra = extra[1]
    if backend != "cpu" and mixed_devices:
        pytest.skip("a CPU call with one meta argument is the mixed case (it reaches the Meta kernel)")
    with pytest.raises(RuntimeError) as info:
        _call(backend, op, args)
    message = str(info.value)
    assert "tokred" in message and arg in message, f"{op}({arg} {what}): unclear error: {message}"
    assert re.search(extra, message), f"{op}({arg} {what}): {message}"


def test_every_op_and_argument_has_bad_cases():
    covered = {(op, arg) for op, arg, *_ in BAD}
    for op, args in _valid().items():
        tensors = [a for a, v in args.items() if isinstance(v, torch.Tensor)]
        missing = [a for a in tensors if (op, a) not in covered]
        # Every op has cases, and every tensor argument of a forward op has at least one.
        assert any(o == op for o, _ in covered), f"{op} has no bad-input case"
        if not op.startswith("_"):
            assert not missing, f"{op}: tensor arguments without a bad-input case: {missing}"


def test_valid_calls_pass_on_every_backend():
    for backend in BACKENDS:
        for op, args in _valid().items():
            _call(backend, op, args)


# --------------------------------------------------------------------------- NaN and inf

def _nan_cases():
    """(op, arguments, reference function) for inputs holding NaN and inf."""
    g = _g()
    scores = torch.rand(3, 9, generator=g)
    scores[0, 2], scores[1, 4], scores[2, 1] = NAN, INF, -INF
    x = torch.randn(2, 10, 4, generator=g)
    x[0, 3, 1], x[1, 4, 2], x[1, 6, 0] = NAN, INF, -INF
    metric = torch.randn(2, 10, 4, generator=g)
    metric[0, 2] = NAN
    unm, src, dst = R.bipartite_match(torch.randn(2, 10, 4, generator=g), 3, 1)
    size = torch.rand(2, 10, 1, generator=g) + 0.5
    size[0, 1, 0], size[0, 3, 0], size[1, 5, 0] = 0.0, NAN, INF
    q = torch.randn(1, 3, 4, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    q[0, 0, 1, 0] = NAN      # a NaN query row
    k[0, 1] = NAN            # a window whose keys are all NaN
    v[0, 2, 0, 3] = INF
    ridx = torch.tensor([[[0, 2], [2, 0], [0, 1]]])
    cases = [("topk", (scores, 4, largest, None), R.topk) for largest in (True, False)]
    cases.append(("gather_tokens", (x, torch.tensor([[0, 3], [4, 6]])), R.gather_tokens))
    for fuse in (False, True):
        xp = torch.cat([x[:, :1], x], dim=1)[:, :10]
        cases.append(("prune_tokens", (xp, scores[:2], 4, fuse, 1, False), R.prune_tokens))
    cases.append(("bipartite_match", (metric, 3, 1), R.bipartite_match))
    for mode in ("sum", "mean", "amax", "wavg"):
        for sz in (None, size):
            cases.append(("merge", (x, sz, unm, src, dst, mode, 1), R.merge))
    cases.append(("routed_attention", (q, k, v, ridx, 2, 0.5), R.routed_attention))
    cases.append(("routed_attention", (q.nan_to_num(0), k.nan_to_num(0), v, ridx, 2, NAN), R.routed_attention))
    cases.append(("routed_gather", (v, ridx, torch.tensor([[[1.0, NAN], [0.5, 1], [INF, 1]]])), R.routed_gather))
    # Scores that overflow float32 from finite inputs: window 1's queries see only window 0's
    # keys, whose every score is -inf (the softmax is NaN, lse -inf).
    cases.append(("routed_attention", _overflowing_scores()[:3] + (torch.tensor([[[1], [0]]]), 1, 1.0),
                  R.routed_attention))
    return cases


def _overflowing_scores():
    """q, k, v with window 0's keys at -3e38: q·k overflows float32 for q = 2."""
    g = _g()
    q = torch.full((1, 2, 2, 2), 2.0)
    k = torch.cat([torch.full((1, 1, 2, 2), -3e38), torch.rand(1, 1, 2, 2, generator=g)], dim=1)
    return q, k, torch.randn(1, 2, 2, 2, generator=g)


NAN_CASES = _nan_cases()


def _assert_same(got, want, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        if a.is_floating_point():
            torch.testing.assert_close(a, b.to(a.dtype), equal_nan=True, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{what} output {i}: {m}")
        else:
            assert torch.equal(a, b), (what, i, a, b)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "meta"])
@pytest.mark.parametrize("case", range(len(NAN_CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(NAN_CASES)])
def test_nan_and_inf_give_the_reference_result(backend, case):
    op, args, reference = NAN_CASES[case]
    ns = torch.ops.tokred_simt if backend == "cuda-emulated" else OPS
    _assert_same(getattr(ns, op)(*args), reference(*args), op)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "meta"])
def test_routed_attention_scales_q_before_the_product(backend):
    """(q·scale)·k as upstream: finite where q·k alone overflows float32 (2 · 3e38). Forward
    only: the gradients of a saturated softmax cancel to rounding noise times 3e38."""
    q, k, v = _overflowing_scores()
    args = (q, k.neg(), v, torch.tensor([[[0], [0]]]), 1, 0.25)
    ns = torch.ops.tokred_simt if backend == "cuda-emulated" else OPS
    got = ns.routed_attention(*args)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    _assert_same(got, R.routed_attention(*args), "routed_attention")


GRAD_CASES = [i for i, c in enumerate(NAN_CASES) if c[0] in ("merge", "routed_attention", "prune_tokens",
                                                            "routed_gather", "gather_tokens")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"{NAN_CASES[i][0]}-{i}" for i in GRAD_CASES])
def test_nan_and_inf_gradients_follow_the_reference(case):
    """NaN reaches the same gradients as the reference composition's autograd."""
    from tokred_ext import ops

    op, args, reference = NAN_CASES[case]
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              and i == 0 else a for i, a in enumerate(args)]
    ref_leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad
                  else a for a in leaves]
    out = getattr(ops, op)(*leaves)
    ref = reference(*ref_leaves)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    g = torch.randn(out.shape, generator=_g(), dtype=out.dtype)
    got, = torch.autograd.grad(out, leaves[0], g)
    want, = torch.autograd.grad(ref, ref_leaves[0], g.to(ref.dtype))
    torch.testing.assert_close(got, want.to(got.dtype), equal_nan=True, atol=1e-5, rtol=1e-5)


def _strided(t):
    """The same values as t in a non-contiguous view (every other element of a larger tensor)."""
    big = torch.zeros(t.shape + (2,), dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "meta"])
@pytest.mark.parametrize("op", sorted(_valid()))
def test_views_read_only_their_elements(backend, op):
    """Every tensor argument as a strided view of a larger buffer (its other elements zero) gives
    the contiguous result: kernels read views through their strides, never past them."""
    args = _valid()[op]
    want = _call(backend, op, args)
    views = {a: _strided(v) if isinstance(v, torch.Tensor) else v for a, v in args.items()}
    got = _call(backend, op, views)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(0), b.nan_to_num(0)) and torch.equal(a.isnan(), b.isnan()), op


def test_reference_is_right_on_edge_cases_the_ops_accept():
    # Regressions: the oracle gave size [B, N, 0] for C = 0 and raised for N = 0.
    unm, src, dst = _match()
    x = torch.randn(2, 10, 0)
    for mode in ("sum", "mean", "amax", "wavg"):
        _assert_same(OPS.merge(x, None, unm, src, dst, mode, 1), R.merge(x, None, unm, src, dst, mode, 1),
                     f"merge C=0 {mode}")
    index = torch.full((2, 3), -1)
    _assert_same(OPS.gather_tokens(torch.randn(2, 0, 4), index), R.gather_tokens(torch.randn(2, 0, 4), index),
                 "gather_tokens N=0")


# --------------------------------------------------------------------------- second order

def _first_order_calls():
    """(name, forward returning one tensor, float64 inputs to differentiate) per op with a
    gradient, on the valid arguments."""
    from tokred_ext import ops

    a = _valid()

    def leaf(t):
        return t.detach().double().requires_grad_()
    sel, mrg, gat, rga = a["prune_tokens"], a["merge"], a["gather_tokens"], a["routed_gather"]
    x, s = leaf(sel["x"]), leaf(sel["scores"])
    xm, xg, kv, w = leaf(mrg["x"]), leaf(gat["x"]), leaf(rga["kv"]), leaf(rga["r_weight"])
    q = leaf(a["routed_attention"]["q"])
    plan = ops.merge_plan(mrg["unm_idx"], mrg["src_idx"], mrg["dst_idx"], 10, 1)
    ridx = a["routed_attention"]["r_idx"]
    return [
        ("topk", lambda: ops.topk(s, 2)[0], [s]),
        ("gather_tokens", lambda: ops.gather_tokens(xg, gat["index"]), [xg]),
        ("prune_tokens", lambda: ops.prune_tokens(x, s, 3, True)[0], [x, s]),
        ("merge", lambda: ops.merge(xm, None, mrg["unm_idx"], mrg["src_idx"], mrg["dst_idx"])[0], [xm]),
        ("unmerge", lambda: ops.unmerge(xm[:, :7], mrg["unm_idx"], mrg["src_idx"], mrg["dst_idx"], 10),
         [xm]),
        ("merge_by_plan", lambda: ops.merge_by_plan(xm, None, plan, "amax")[0], [xm]),
        ("routed_gather", lambda: ops.routed_gather(kv, rga["r_idx"], w), [kv, w]),
        ("routed_attention", lambda: ops.routed_attention(q, q, q, ridx, 2, 0.5)[0], [q]),
    ]


@pytest.mark.parametrize("case", range(8), ids=lambda i: _first_order_calls()[i][0])
def test_double_backward_raises_instead_of_being_silently_wrong(case):
    """A gradient of a gradient through any backward op raises, naming it; first order works."""
    name, forward, inputs = _first_order_calls()[case]
    out = forward()
    weights = torch.rand(out.shape, dtype=out.dtype, generator=_g()).requires_grad_()
    grads = torch.autograd.grad(out, inputs, weights, create_graph=True)
    with pytest.raises(RuntimeError, match=r"tokred::_\w+_backward: .*first-order gradients only"):
        torch.autograd.grad(sum(g.sum() for g in grads), [weights] + inputs, allow_unused=True)


def test_unmerge_by_plan_has_second_order_gradients():
    """Its backward is a differentiable sum-merge, so a gradient of its gradient is exact."""
    from tokred_ext import ops

    a = _valid()["merge"]
    plan = ops.merge_plan(a["unm_idx"], a["src_idx"], a["dst_idx"], 10, 1)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=_g(), requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: ops.unmerge_by_plan(x, plan), (x,))


def test_every_backward_op_refuses_double_backward():
    from tokred_ext import ops

    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tokred::")}
    assert set(ops.BACKWARD_OPS) == {n for n in registered if n.startswith("_")}
