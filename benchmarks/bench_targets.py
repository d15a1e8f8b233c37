"""Issue 11's CPU performance targets, each measured in one run against its baselines.

Every target times tokred and its baselines in interleaved rounds (the order rotates each round),
so a burst of load on a shared machine hits all of them alike. Each round gives one time per
candidate (the mean of `inner` calls) and one ratio per baseline; the table reports the median
time with its interquartile range and the median ratio with its interquartile range.

Targets (ViT-S / DeiT-S sizes: N = 197 tokens, C = 384):
  tome_step      match + wavg merge (no source tracking), r = 13: >= 5x upstream's eager
                 bipartite_soft_matching + merge_wavg at B = 64; <= 1.5 x.clone() at B = 256
  prune_fuse     prune_tokens(fuse=True), keep 0.7, B = 64: <= 2 x.clone(), >= 5x EViT's glue
  batch1         DeiT-S at batch 1 with each policy: never slower than no reduction
  deit_tome      DeiT-S, ToMe r = 13, batch 8: >= 1.15x the reference ToMe model (same weights)

    python benchmarks/bench_targets.py [--quick] [--only tome_step,...] [--json out.json]
"""
import argparse
import math

import torch

import tokred_ext  # noqa: F401
from tokred_ext import ops, reference as ref
from tokred_ext.bench import quartiles
from tokred_ext.models import create_model
from tokred_ext.nn import policy_from_spec

from bench_ops import upstream_evit
from common import interleaved_calls, machine, steady_allocator, write_json

N, C, D = 197, 384, 64


def summarise(target, case, times, goals):
    """One row per candidate; goals: {baseline: (op, bound)} with ratio = baseline / tokred
    ('>=': tokred at least bound times faster) or tokred / baseline ('<=': at most bound times)."""
    rows = []
    mine = times["tokred"]
    for name, ts in times.items():
        lo, med, hi = quartiles(ts)
        row = dict(target=target, case=case, candidate=name, median_ms=med * 1e3,
                   iqr_ms=[lo * 1e3, hi * 1e3])
        if name in goals:
            op, bound = goals[name]
            ratios = [b / a if op == ">=" else a / b for a, b in zip(mine, ts)]
            rlo, rmed, rhi = quartiles(ratios)
            row.update(ratio=rmed, ratio_iqr=[rlo, rhi], goal=f"{op} {bound}",
                       met=(rmed >= bound) if op == ">=" else (rmed <= bound))
        rows.append(row)
    return rows


def tome_step(x, metric, r, size):
    unm, src, dst = ops.bipartite_match(metric, r, 1)
    plan = ops.merge_plan(unm, src, dst, x.shape[1], 1)
    return ops.merge_by_plan(x, size, plan, "wavg")


def target_tome_step(quick, rounds, inner):
    rows = []
    for b, goals in [(64, {"upstream": (">=", 5.0)}), (256, {"clone": ("<=", 1.5)})]:
        b = 8 if quick else b
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, N, C, generator=g)
        metric = torch.randn(b, N, D, generator=g)
        size = torch.ones(b, N, 1)
        times = interleaved_calls({
            "tokred": lambda: tome_step(x, metric, 13, size),
            "upstream": lambda: ref.tome_step(x, metric, 13, size, 1),
            "clone": lambda: x.clone(),
        }, rounds, inner)
        rows += summarise("tome_step", f"ViT-S B={b}", times, goals)
    return rows


def target_prune_fuse(quick, rounds, inner):
    b = 8 if quick else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, N, C, generator=g)
    scores = torch.rand(b, N - 1, generator=g).softmax(-1)
    k = math.ceil(0.7 * (N - 1))
    times = interleaved_calls({
        "tokred": lambda: ops.prune_tokens(x, scores, k, True, 1, False),
        "upstream": lambda: upstream_evit(x, scores, k),
        "clone": lambda: x.clone(),
    }, rounds, inner)
    return summarise("prune_fuse", f"DeiT-S B={b} k={k}", times,
                     {"upstream": (">=", 5.0), "clone": ("<=", 2.0)})


def _deit(batch):
    torch.manual_seed(0)
    model = create_model("deit_small").eval()
    return model, torch.randn(batch, 3, 224, 224)


def target_batch1(quick, rounds, inner):
    model, img = _deit(1)
    rows = []
    for spec in ["topk:0.7", "evit:0.7", "tome:13"]:
        policy = policy_from_spec(spec)

        def run(p):
            def call():
                model.reduction = p
                with torch.inference_mode():
                    model(img)
            return call
        times = interleaved_calls({"tokred": run(policy), "no reduction": run(None)}, rounds, inner)
        rows += summarise("batch1", f"DeiT-S {spec}", times, {"no reduction": (">=", 1.0)})
    model.reduction = None
    return rows


def deit_tome_forwards(batch, r=13):
    """{"tokred": ..., "reference": ...}: a forward of tokred's DeiT-S with ToMe and one of the
    reference ToMe model on the same weights (profile_deit_tome.py profiles the same pair)."""
    model, img = _deit(batch)
    policy = policy_from_spec(f"tome:{r}")
    reference = ref.ReferenceViT(model, policy)

    def mine():
        model.reduction = policy
        with torch.inference_mode():
            model(img)

    def theirs():
        model.reduction = None
        with torch.inference_mode():
            reference(img)
    return {"tokred": mine, "reference": theirs}


def target_deit_tome(quick, rounds, inner):
    batch = 2 if quick else 8
    times = interleaved_calls(deit_tome_forwards(batch), rounds, inner)
    return summarise("deit_tome", f"DeiT-S ToMe r=13 B={batch}", times, {"reference": (">=", 1.15)})


TARGETS = {"tome_step": target_tome_step, "prune_fuse": target_prune_fuse,
           "batch1": target_batch1, "deit_tome": target_deit_tome}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batches, few rounds")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    p.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--json", help="write the rows and the machine to this file")
    a = p.parse_args()
    steady_allocator()
    rounds = a.rounds or (3 if a.quick else 15)
    inner = {"tome_step": 5, "prune_fuse": 10, "batch1": 3, "deit_tome": 2}
    rows = []
    print("| target | case | candidate | median ms [IQR] | ratio [IQR] | goal | met |")
    print("|---|---|---|---|---|---|---|")
    for name in a.only.split(","):
        for row in TARGETS[name](a.quick, rounds, 1 if a.quick else inner[name]):
            rows.append(row)
            ratio = (f"{row['ratio']:.2f} [{row['ratio_iqr'][0]:.2f}, {row['ratio_iqr'][1]:.2f}]"
                     if "ratio" in row else "")
            print(f"| {row['target']} | {row['case']} | {row['candidate']} | "
                  f"{row['median_ms']:.3f} [{row['iqr_ms'][0]:.3f}, {row['iqr_ms'][1]:.3f}] | "
                  f"{ratio} | {row.get('goal', '')} | {row.get('met', '')} |", flush=True)
    if a.json:
        write_json(a.json, machine(), rows)


if __name__ == "__main__":
    main()
