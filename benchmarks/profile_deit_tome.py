"""Where DeiT-S with ToMe spends a CPU forward pass: tokred's model against the reference.

bench_targets.py's deit_tome target asks tokred to be 1.15x the reference ToMe model (the same
weights and layers, upstream's glue). This script shows what that ratio is made of. It profiles
single forwards of both models, interleaved, and reports each op's median self time per forward.
It then computes a ceiling: the ratio tokred would reach if its attention ran at the linear
layers' FLOP rate and its matching and merge cost nothing. Nothing else in the model is token
reduction: both models run the same linear layers, GELU, layer norms and patch embedding.

    python benchmarks/profile_deit_tome.py [--batch 8] [--r 13] [--pairs 12] [--rows 14]
"""
import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import tokred_ext  # noqa: F401  (registers the ops and their FLOP formulas)

from bench_targets import deit_tome_forwards
from common import steady_allocator

ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"
LINEAR = "aten::addmm"


def self_times(forward):
    """{op: self ms} of one forward, and its total under "total"."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    events = prof.key_averages()
    times = {event.key: event.self_cpu_time_total / 1e3 for event in events}
    times["total"] = sum(e.self_cpu_time_total for e in events) / 1e3
    return times


def flops_by_op(forward):
    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    return {str(op): count for op, count in counter.get_flop_counts()["Global"].items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=13)
    p.add_argument("--pairs", type=int, default=12, help="interleaved forwards of each model")
    p.add_argument("--rows", type=int, default=14, help="ops listed, the costliest first")
    a = p.parse_args()
    steady_allocator()
    candidates = deit_tome_forwards(a.batch, a.r)
    for forward in candidates.values():
        forward()
    times = {name: defaultdict(list) for name in candidates}
    for _ in range(a.pairs):  # interleaved, so load on a shared machine hits both alike
        for name, forward in candidates.items():
            for op, ms in self_times(forward).items():
                times[name][op].append(ms)
    median = {name: {op: statistics.median(v) for op, v in t.items()} for name, t in times.items()}

    ops = sorted(set(median["tokred"]) | set(median["reference"]),
                 key=lambda op: -max(median["tokred"].get(op, 0.0), median["reference"].get(op, 0.0)))
    print(f"DeiT-S ToMe r={a.r} B={a.batch}, median self ms per forward over {a.pairs} interleaved "
          f"pairs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| op | tokred | reference |\n|---|---|---|")
    for op in ops[:a.rows + 1]:
        print(f"| {op} | {median['tokred'].get(op, 0.0):.2f} | {median['reference'].get(op, 0.0):.2f} |")

    flops = flops_by_op(candidates["tokred"])
    linear_rate = flops["aten.addmm"] / (median["tokred"][LINEAR] / 1e3)
    attention_flops = sum(v for op, v in flops.items() if "scaled_dot_product" in op)
    attention_floor = attention_flops / linear_rate * 1e3
    reduction = sum(v for op, v in median["tokred"].items() if op.startswith("tokred::"))
    tokred, reference_total = median["tokred"]["total"], median["reference"]["total"]
    ceiling = tokred - median["tokred"].get(ATTENTION, 0.0) + attention_floor - reduction
    print(f"\nratio now: {reference_total / tokred:.3f} ({reference_total:.1f} / {tokred:.1f} ms)")
    print(f"linear layers: {linear_rate / 1e9:.0f} GFLOP/s; attention: {attention_flops / 1e9:.2f} "
          f"GFLOP, {median['tokred'].get(ATTENTION, 0.0):.1f} ms now, {attention_floor:.1f} ms at "
          f"that rate; tokred's own ops: {reduction:.1f} ms")
    print(f"ceiling (attention at the linear layers' rate, tokred's ops free): "
          f"{reference_total / ceiling:.3f} ({reference_total:.1f} / {ceiling:.1f} ms)")


if __name__ == "__main__":
    main()
