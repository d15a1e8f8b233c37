"""One ToMe step (bipartite matching + size-weighted merge) vs the reference composition.

Times tokred (ops.bipartite_match + ops.merge "wavg") against tokred_ext.reference.tome_step
(upstream's bipartite_soft_matching + merge_wavg), eager and torch.compile'd, at ViT-S/B/L sizes.
A second table times each ToMe op on its own (bipartite_match, merge, unmerge, merge_source) against
its reference at ViT-B size. Prints medians (ms) and speed-ups; --json writes the rows.

    python benchmarks/bench_merge.py [--quick] [--json out.json] [--device cpu|cuda]
"""
import argparse
import json
import platform
import statistics
import time

import torch

import tokred_ext
from tokred_ext import ops
from tokred_ext import reference as R

# (model, C, r); every model runs at N = 197 tokens, metric width D = 64 (head dim).
MODELS = [("ViT-S", 384, 13), ("ViT-B", 768, 16), ("ViT-L", 1024, 8)]
N, D = 197, 64


def tokred_step(x, metric, r, size):
    idx = ops.bipartite_match(metric, r, 1)
    return ops.merge(x, size, *idx, "wavg", 1)


def median_ms(fn, args, reps, warmup, device):
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(device, batches, dtypes, reps, warmup, compile_ref):
    rows = []
    for model, c, r in MODELS:
        for b in batches:
            for dtype in dtypes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(b, N, c, generator=g).to(device=device, dtype=dtype)
                metric = torch.randn(b, N, D, generator=g).to(device=device, dtype=dtype)
                size = torch.ones(b, N, 1, device=device, dtype=dtype)
                args = (x, metric, r, size)
                row = dict(device=device, model=model, B=b, N=N, D=D, C=c, r=r,
                           dtype=str(dtype).split(".")[-1])
                row["tokred_ms"] = median_ms(tokred_step, args, reps, warmup, device)
                row["reference_ms"] = median_ms(R.tome_step, args, reps, warmup, device)
                if compile_ref:
                    torch._dynamo.reset()
                    compiled = torch.compile(R.tome_step, dynamic=False)
                    row["compiled_ms"] = median_ms(compiled, args, reps, warmup + 1, device)
                    row["vs_compiled"] = row["compiled_ms"] / row["tokred_ms"]
                row["vs_eager"] = row["reference_ms"] / row["tokred_ms"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def per_op_rows(device, batches, dtype, reps, warmup):
    """Each ToMe op alone against its reference, at ViT-B size (C = 768, r = 16)."""
    rows = []
    c, r = 768, 16
    for b in batches:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, N, c, generator=g).to(device=device, dtype=dtype)
        metric = torch.randn(b, N, D, generator=g).to(device=device, dtype=dtype)
        size = torch.ones(b, N, 1, device=device, dtype=dtype)
        idx = ops.bipartite_match(metric, r)
        merged = ops.merge(x, size, *idx, "wavg")[0]
        cases = {
            "bipartite_match": (ops.bipartite_match, R.bipartite_match, (metric, r)),
            "merge (wavg)": (ops.merge, R.merge, (x, size, *idx, "wavg")),
            "unmerge": (ops.unmerge, R.unmerge, (merged, *idx, N)),
            "merge_source": (ops.merge_source, R.merge_source, (None, *idx, N)),
        }
        for name, (mine, ref, args) in cases.items():
            row = dict(device=device, op=name, B=b, C=c, r=r, dtype=str(dtype).split(".")[-1])
            row["tokred_ms"] = median_ms(mine, args, reps, warmup, device)
            row["reference_ms"] = median_ms(ref, args, reps, warmup, device)
            row["vs_eager"] = row["reference_ms"] / row["tokred_ms"]
            rows.append(row)
            print("| %-4s | %-15s | %4d | %-8s | %9.3f | %9.3f | %6.1fx |" % (
                device, name, b, row["dtype"], row["tokred_ms"], row["reference_ms"],
                row["vs_eager"]), flush=True)
    return rows


def format_row(row):
    comp = ("%10.2f %7.1fx" % (row["compiled_ms"], row["vs_compiled"])
            if "compiled_ms" in row else "%10s %8s" % ("-", "-"))
    return "| %-4s | %-5s | %4d | %4d | %2d | %-8s | %9.2f | %9.2f | %6.1fx | %s |" % (
        row["device"], row["model"], row["B"], row["C"], row["r"], row["dtype"],
        row["tokred_ms"], row["reference_ms"], row["vs_eager"], comp)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", action="append", choices=["cpu", "cuda"],
                   help="default: cpu, and cuda when a GPU and tokred's CUDA kernels exist")
    p.add_argument("--quick", action="store_true", help="small batch, few repetitions")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled reference")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args()
    devices = a.device or (["cpu"] + (["cuda"] if torch.cuda.is_available()
                                      and tokred_ext.build_info()["cuda_kernels"] else []))
    print("| dev  | model |    B |    C |  r | dtype    | tokred ms |    ref ms | vs ref  "
          "| compiled ms | vs comp |")
    rows = []
    for device in devices:
        batches = [8] if a.quick else [64, 256]
        dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.float16]
        reps, warmup = (3, 1) if a.quick else ((5, 1) if device == "cpu" else (50, 10))
        rows += run(device, batches, dtypes, reps, warmup, not a.no_compile)
    print("\n| dev  | op (ViT-B)      |    B | dtype    | tokred ms |    ref ms | vs ref  |")
    for device in devices:
        batches = [8] if a.quick else [64, 256]
        reps, warmup = (3, 1) if a.quick else ((5, 1) if device == "cpu" else (50, 10))
        dtype = torch.float32 if device == "cpu" else torch.float16
        rows += per_op_rows(device, batches, dtype, reps, warmup)
    if a.json:
        meta = dict(torch=torch.__version__, machine=platform.machine(),
                    threads=torch.get_num_threads(),
                    gpu=torch.cuda.get_device_name() if "cuda" in devices else None)
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
