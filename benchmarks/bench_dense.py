"""Dense ToMe (ToMe for Stable Diffusion) on tiny diffusers models with random weights.

One forward pass of a tiny UNet2DConditionModel (64x64 latents: 4096 tokens in its full-resolution
transformer blocks) or a tiny DiT block stack (64x64 latents, patch 2: 1024 tokens), three ways:
unpatched; patched with ``tokred_ext.patch.diffusers`` (ops.bipartite_match_plan +
merge_by_plan/unmerge_by_plan); and patched with the reference composition
(``tokred_ext.reference.tomesd_patch``: tomesd's gather/scatter_reduce algorithm in PyTorch).
Candidates run in interleaved rounds (``tokred_ext.bench.interleaved``); the table gives the
median time per call with its interquartile range, and the median peak memory of one call
(``tokred_ext.bench.peak_memory``) over the rounds, with its range.

    python benchmarks/bench_dense.py [--model unet|dit] [--quick] [--json out.json]
"""
import argparse
import copy

import torch

import tokred_ext.patch
from tokred_ext import reference
from tokred_ext.bench import interleaved, memory_measure, peak_memory, quartiles
from tokred_ext.visualize import tiny_unet

from common import machine, markdown_table, steady_allocator, write_json


def tiny_dit(depth: int):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                 out_channels=4, num_layers=depth, sample_size=64, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()


def make_case(name: str, batch: int, latent: int, depth: int):
    """(model, call) with call(model) one forward pass without gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.arange(batch) * 100 + 10
    if name == "unet":
        model = tiny_unet()
        enc = torch.randn(batch, 77, model.config.cross_attention_dim, generator=g)
        return model, lambda m: m(x, t, enc).sample
    labels = torch.arange(batch) % 1000
    return tiny_dit(depth), lambda m: m(x, t, labels).sample


def run(name, batch, latent, depth, ratio, rounds, min_time):
    model, call = make_case(name, batch, latent, depth)
    models = {
        "unpatched": model,
        "tokred": tokred_ext.patch.diffusers(copy.deepcopy(model), ratio=ratio, seed=0),
        "reference": reference.tomesd_patch(copy.deepcopy(model), ratio, seed=0),
    }
    fns = {k: (lambda m=m: call(m)) for k, m in models.items()}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        times = interleaved(fns, rounds, min_time)
        peaks = {k: [peak_memory(fn, "cpu") for _ in range(rounds)] for k, fn in fns.items()}
    rows = []
    base = quartiles(times["unpatched"])[1]
    for k in fns:
        lo, med, hi = quartiles(times[k])
        row = dict(model=name, B=batch, latent=f"{latent}x{latent}", ratio=ratio, candidate=k,
                   median_ms=med * 1e3, iqr_ms=f"[{lo * 1e3:.0f}, {hi * 1e3:.0f}]",
                   speedup=base / med)
        if all(p is not None for p in peaks[k]):
            plo, pmed, phi = quartiles([p / 2**20 for p in peaks[k]])
            row.update(peak_mib=pmed, peak_iqr_mib=f"[{plo:.0f}, {phi:.0f}]")
        rows.append(row)
    return rows


def main():
    steady_allocator()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["unet", "dit"], default="unet")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4, help="DiT blocks")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds of timed rounds, at least")
    ap.add_argument("--quick", action="store_true", help="16x16 latents, 3 rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.latent, args.rounds, args.min_time = 16, 3, 0.0
    rows = run(args.model, args.batch, args.latent, args.depth, args.ratio, args.rounds,
               args.min_time)
    meta = machine()
    print(meta)
    print(f"peak memory: {memory_measure('cpu')}")
    print(markdown_table(rows, ["model", "B", "latent", "ratio", "candidate", "median_ms",
                                "iqr_ms", "speedup", "peak_mib", "peak_iqr_mib"]))
    if args.json:
        write_json(args.json, meta, rows)


if __name__ == "__main__":
    main()
