"""Times every selection op against its reference composition, eager and compiled.

Sizes: DeiT-S and DeiT-B (C = 384, 768) at B = 64 and 256, N = 197 tokens, keep rate 0.7.
A second table times topk alone against torch.topk over row lengths and k: BiFormer's region
routing (rows of 49 or 64 regions, k = 4 or 8), a DeiT row (196) and long rows, small and large k.
Baselines per row:
  reference  tokred_ext.reference (tie-exact: stable sort)
  upstream   the glue code users run today (torch.topk, gather, EViT's complement_idx)
  compiled   torch.compile of the upstream glue
Prints medians (ms) and ratios (baseline time / tokred time; > 1 means tokred is faster).

    python benchmarks/bench_ops.py [--device cuda] [--quick] [--json out.json] [--markdown]
"""
import argparse
import math
import sys

import torch

import tokred_ext  # noqa: F401
from tokred_ext import ops, reference as ref
from tokred_ext.bench import quartiles

from common import (compiled, interleaved_calls, machine, markdown_table, median_seconds,
                    steady_allocator, write_json)


# --------------------------------------------------------------------------- upstream glue

def upstream_complement(idx, dim):
    """EViT helpers.complement_idx: arange, scatter 0 at idx, sort, drop the first K."""
    a = torch.arange(dim, device=idx.device).expand(idx.shape[0], dim)
    a = a.scatter(-1, idx, 0)
    return torch.sort(a, dim=-1).values[:, idx.shape[1]:]


def upstream_topk_prune(x, scores, k):
    _, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    kept = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], kept], dim=1)


def upstream_evit(x, scores, k):
    C = x.shape[-1]
    _, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    non_cls = x[:, 1:]
    kept = torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    compl = upstream_complement(idx, scores.shape[1])
    dropped = torch.gather(non_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
    w = torch.gather(scores, 1, compl)
    extra = torch.sum(dropped * w.unsqueeze(-1), dim=1, keepdim=True)
    return torch.cat([x[:, :1], kept, extra], dim=1)


# --------------------------------------------------------------------------- cases

def cases(x, scores, k):
    idx = ops.topk(scores, k)[1]
    n = scores.shape[1]
    expand = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return {
        "topk": (lambda: ops.topk(scores, k), lambda: ref.topk(scores, k),
                 lambda: torch.topk(scores, k, dim=1)),
        "gather_tokens": (lambda: ops.gather_tokens(x, idx), lambda: ref.gather_tokens(x, idx),
                          lambda: torch.gather(x, 1, expand)),
        "complement": (lambda: ops.complement(idx, n), lambda: ref.complement(idx, n),
                       lambda: upstream_complement(idx, n)),
        "prune (Top-K)": (lambda: ops.prune_tokens(x, scores, k),
                          lambda: ref.prune_tokens(x, scores, k),
                          lambda: upstream_topk_prune(x, scores, k)),
        "prune (EViT)": (lambda: ops.prune_tokens(x, scores, k, fuse=True),
                         lambda: ref.prune_tokens(x, scores, k, fuse=True),
                         lambda: upstream_evit(x, scores, k)),
    }


def backward_cases(x, scores, k):
    """Forward+backward pairs (tokred, upstream glue): EViT's gradients to x and scores, and
    gather_tokens' gradient to x (tokred's segmented sum against torch.gather's scatter-add)."""
    xr, sr = x.clone().requires_grad_(), scores.clone().requires_grad_()
    g = torch.randn(x.shape[0], k + 2, x.shape[-1], device=x.device, dtype=x.dtype)
    idx = ops.topk(scores, k)[1]
    g_kept = torch.randn(x.shape[0], k, x.shape[-1], device=x.device, dtype=x.dtype)

    def tokred_evit():
        out, _ = ops.prune_tokens(xr, sr, k, fuse=True)
        return torch.autograd.grad(out, (xr, sr), g)

    def upstream_evit_grad():
        return torch.autograd.grad(upstream_evit(xr, sr, k), (xr, sr), g)

    def tokred_gather():
        return torch.autograd.grad(ops.gather_tokens(xr, idx), xr, g_kept)

    def upstream_gather():
        expand = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.autograd.grad(torch.gather(xr, 1, expand), xr, g_kept)

    return {"EViT fwd+bwd": (tokred_evit, upstream_evit_grad),
            "gather_tokens fwd+bwd": (tokred_gather, upstream_gather)}


# (rows, row length, k): routing shapes (B * regions rows), a DeiT row, long rows.
TOPK_GRID = [(4096, 49, 4), (4096, 64, 8), (64, 196, 1), (64, 196, 5), (64, 196, 138),
             (64, 1024, 1), (64, 1024, 16), (64, 1024, 512), (64, 4096, 1), (64, 4096, 16),
             (64, 4096, 64), (64, 4096, 1024), (64, 16384, 16), (64, 16384, 4096)]
TOPK_GRID_QUICK = [(4096, 49, 4), (64, 196, 5), (64, 4096, 1), (64, 4096, 1024)]


def topk_grid(args):
    """tokred's topk against torch.topk in interleaved rounds of 5 calls each: median ms with
    quartiles, and the median of the per-round ratios."""
    device, rows = torch.device(args.device), []
    g = torch.Generator().manual_seed(0)
    for R, n, k in TOPK_GRID_QUICK if args.quick else TOPK_GRID:
        s = torch.randn(R, n, generator=g).to(device=device, dtype=getattr(torch, args.dtype))
        fns = {"tokred": lambda: ops.topk(s, k), "torch.topk": lambda: torch.topk(s, k, dim=-1)}
        t = interleaved_calls(fns, rounds=30, inner=5, device=args.device)
        (q1, m, q3), (p1, pm, p3) = quartiles(t["tokred"]), quartiles(t["torch.topk"])
        ratio = quartiles([b / a for a, b in zip(t["tokred"], t["torch.topk"])])[1]
        rows.append({"rows": R, "N": n, "k": k, "tokred ms": f"{m * 1e3:.4g} ({q1 * 1e3:.3g}-{q3 * 1e3:.3g})",
                     "torch.topk ms": f"{pm * 1e3:.4g} ({p1 * 1e3:.3g}-{p3 * 1e3:.3g})",
                     "vs torch.topk": ratio})
        print(f"  topk rows={R} N={n} k={k}: {m * 1e3:.3f} ms, torch.topk {pm * 1e3:.3f} ms",
              file=sys.stderr)
    return rows


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = [(64, 384), (256, 768)] if args.quick else [(64, 384), (64, 768), (256, 384), (256, 768)]
    rows = []
    for B, C in sizes:
        N = 197
        k = math.ceil(0.7 * (N - 1))
        x = torch.randn(B, N, C, device=device, dtype=dtype)
        scores = torch.softmax(torch.randn(B, N - 1, device=device), -1).to(dtype)
        clone_ms = median_seconds(lambda: x.clone()) * 1e3
        for name, (mine, reference, upstream) in cases(x, scores, k).items():
            t = median_seconds(mine) * 1e3
            t_ref = median_seconds(reference) * 1e3
            t_up = median_seconds(upstream) * 1e3
            t_comp = median_seconds(compiled(upstream)) * 1e3 if not args.no_compile else float("nan")
            rows.append({"op": name, "B": B, "C": C, "tokred ms": t, "reference ms": t_ref,
                         "upstream ms": t_up, "compiled ms": t_comp,
                         "vs reference": t_ref / t, "vs upstream": t_up / t,
                         "vs compiled": t_comp / t, "x.clone() ms": clone_ms,
                         "/ clone": t / clone_ms})
            print(f"  {name:14s} B={B:3d} C={C}: tokred {t:.3f} ms, upstream {t_up:.3f} ms, "
                  f"compiled {t_comp:.3f} ms", file=sys.stderr)
        for name, (mine, upstream) in backward_cases(x, scores, k).items():
            t, t_up = median_seconds(mine) * 1e3, median_seconds(upstream) * 1e3
            rows.append({"op": name, "B": B, "C": C, "tokred ms": t, "upstream ms": t_up,
                         "vs upstream": t_up / t})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="two sizes instead of four")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--json", help="write rows and machine info to this file")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args()
    steady_allocator()
    meta = machine() | {"device": args.device, "dtype": args.dtype}
    rows = run(args)
    grid = topk_grid(args)
    cols = ["op", "B", "C", "tokred ms", "upstream ms", "compiled ms", "reference ms",
            "vs upstream", "vs compiled", "vs reference", "/ clone"]
    print(meta)
    print(markdown_table(rows, cols))
    print()
    print(markdown_table(grid, ["rows", "N", "k", "tokred ms", "torch.topk ms", "vs torch.topk"]))
    if args.json:
        write_json(args.json, meta, rows + [{"op": "topk grid"} | r for r in grid])


if __name__ == "__main__":
    main()
