"""routed_attention (fused) against upstream's gather + matmul (tokred_ext.reference).

Shapes: BiFormer-S stages 1, 2 and 3 (the routed ones) at 224^2 (batch 64) and a dense-prediction shape (one 512^2
image, n_win 8, BiFormer-S stage 2). Reports median forward and forward+backward times, their
ratio, and memory: on CUDA the peak allocated during the call; on the CPU the reference's
gathered K/V buffer and attention matrix (computed from the shapes) against tokred's only extra
tensor, the log-sum-exp.

With --flex, each shape also times FlexAttention with a region block mask (forward only, the
best of several block sizes): what a user would run instead on the CPU.

    python benchmarks/bench_routing.py [--quick] [--json out.json] [--device cpu|cuda] [--model]
                                       [--flex]
"""
import argparse
import json
import statistics
import sys
import time

import torch

from tokred_ext import ops, reference

# name, batch, P (n_win^2), tokens per window, topk, channels (qk = v), heads
SHAPES = [
    ("BiFormer-S stage 1 (56x56, b64)", 64, 49, 64, 1, 64, 2),
    ("BiFormer-S stage 2 (28x28, b64)", 64, 49, 16, 4, 128, 4),
    ("BiFormer-S stage 3 (14x14, b64)", 64, 49, 4, 16, 256, 8),
    ("512x512 image, n_win 8, stage 2", 1, 64, 64, 4, 128, 4),
]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps):
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak(fn, device):
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


FLEX_BLOCK_SIZES = (16, 32, 64, 128)


def flex_forward(q, k, v, r, H, scale, block_size):
    """What a user would pick instead: torch's FlexAttention with a region block mask (tokens
    ordered window-major, query window i sees the key windows r[b, i]), compiled, forward only
    (it has no CPU backward). The mask is built once, outside the timed call, which favours
    Flex: routing changes with every input. Returns the timed callable, or None where this
    torch or block size cannot run it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    n, P, w2, C = q.shape
    routed = torch.zeros(n, P, P, dtype=torch.bool, device=q.device)
    routed.scatter_(2, r, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // w2, kv_idx // w2]

    def heads(t):
        return t.reshape(n, P * w2, H, t.shape[-1] // H).transpose(1, 2)

    qh, kh, vh = heads(q), heads(k), heads(v)
    try:
        mask = create_block_mask(mask_mod, n, None, P * w2, P * w2, device=str(q.device),
                                 BLOCK_SIZE=block_size)
        torch._dynamo.reset()  # one fresh compile per shape and block size, never the eager fallback
        attend = torch.compile(flex_attention, dynamic=False)

        def run():
            with torch.no_grad():
                attend(qh, kh, vh, block_mask=mask, scale=scale)
        run()  # compiles
    except Exception as e:  # a block size the CPU backend refuses
        print(f"  flex block {block_size}: not run ({type(e).__name__})", file=sys.stderr)
        return None
    return run


def bench_shape(name, n, P, w2, topk, C, H, dtype, device, reps, quick, flex=False):
    if quick:
        n = max(1, n // 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, P, w2, C, generator=g).to(dtype=dtype, device=device)
               for _ in range(3))
    r = torch.stack([torch.randperm(P, generator=g)[:topk] for _ in range(n * P)])
    r = r.view(n, P, topk).to(device)
    scale = C ** -0.5
    grad = torch.randn(n, P, w2, C, generator=g).to(dtype=dtype, device=device)

    def fwd(impl):
        def run():
            with torch.no_grad():
                impl(q, k, v, r, H, scale)
        return run

    def fwd_bwd(impl):
        def run():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = impl(qq, kk, vv, r, H, scale)[0]
            torch.autograd.grad(out, (qq, kk, vv), grad)
        return run

    row = dict(shape=name, batch=n, regions=P, window_tokens=w2, topk=topk, channels=C, heads=H,
               dtype=str(dtype).split(".")[-1], device=device)
    for mode, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        t_ref = _time(make(reference.routed_attention), device, reps)
        t_ours = _time(make(ops.routed_attention), device, reps)
        row[f"{mode}_ref_ms"] = 1e3 * t_ref
        row[f"{mode}_tokred_ms"] = 1e3 * t_ours
        row[f"{mode}_speedup"] = t_ref / t_ours
        if device == "cuda":
            row[f"{mode}_ref_peak_mib"] = _peak(make(reference.routed_attention), device) / 2**20
            row[f"{mode}_tokred_peak_mib"] = _peak(make(ops.routed_attention), device) / 2**20
    if flex:
        best = None
        for block in FLEX_BLOCK_SIZES:
            run = flex_forward(q, k, v, r, H, scale, block)
            if run is not None:
                t = _time(run, device, reps)
                row[f"flex_block{block}_ms"] = 1e3 * t
                best = t if best is None else min(best, t)
        if best is not None:
            row["flex_best_ms"] = 1e3 * best
            row["fwd_vs_flex"] = best / (row["fwd_tokred_ms"] / 1e3)  # > 1: tokred is faster
    # routed_gather alone (upstream's KVGather of the concatenated K/V), forward only.
    kv = torch.cat([k, v], dim=-1)
    t_ref = _time(lambda: reference.routed_gather(kv, r), device, reps)
    t_ours = _time(lambda: ops.routed_gather(kv, r), device, reps)
    row["gather_ref_ms"], row["gather_tokred_ms"] = 1e3 * t_ref, 1e3 * t_ours
    row["gather_speedup"] = t_ref / t_ours
    elem = torch.empty(0, dtype=dtype).element_size()
    row["ref_gathered_kv_mib"] = n * P * topk * w2 * 2 * C * elem / 2**20
    row["ref_attn_matrix_mib"] = n * P * H * w2 * topk * w2 * elem / 2**20
    row["tokred_extra_mib"] = n * P * H * w2 * 4 / 2**20  # lse, float32
    row["kv_input_mib"] = n * P * w2 * 2 * C * elem / 2**20
    return row


def bench_model(device, dtype, batch, reps):
    """BiFormer-S forward+backward, tokred backend against the reference backend."""
    from tokred_ext.models import biformer_small
    from tokred_ext.models.biformer import set_backend
    torch.manual_seed(0)
    model = biformer_small().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = dtype != torch.float32

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    row = dict(shape=f"BiFormer-S fwd+bwd (224, b{batch})", batch=batch,
               dtype=str(dtype).split(".")[-1], device=device)
    for backend in ("reference", "tokred"):
        set_backend(model, backend)
        row[f"{backend}_ms"] = 1e3 * _time(step, device, reps)
    row["speedup"] = row["reference_ms"] / row["tokred_ms"]
    print(f"{row['shape']:34s} {row['dtype']:8s} reference {row['reference_ms']:.1f} ms, "
          f"tokred {row['tokred_ms']:.1f} ms, x{row['speedup']:.2f}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch / 8 and fewer repetitions")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON ('-' = stdout)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: float32 "
                    "on CPU; float16 and bfloat16 on CUDA)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--flex", action="store_true",
                    help="also time FlexAttention with a region block mask (forward, best of "
                    "several block sizes; compiles, slow the first time)")
    ap.add_argument("--model", action="store_true",
                    help="also time BiFormer-S forward+backward end to end (both backends)")
    ap.add_argument("--model-batch", type=int, default=None,
                    help="batch of the --model run (default 64 on CUDA, 4 on CPU)")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    if args.dtype:
        dtypes = [getattr(torch, args.dtype)]
    else:
        dtypes = [torch.float32] if args.device == "cpu" else [torch.float16, torch.bfloat16]
    rows = []
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}"
          + (", quick" if args.quick else ""))
    hdr = (f"{'shape':34s} {'dtype':8s} {'fwd ref':>9s} {'fwd ours':>9s} {'x':>5s} "
           f"{'f+b ref':>9s} {'f+b ours':>9s} {'x':>5s} {'ref gather MiB':>14s} {'ours extra MiB':>14s} "
           f"{'gather ref':>10s} {'gather ours':>11s} {'x':>5s}")
    print(hdr)
    for dtype in dtypes:
        for shape in SHAPES:
            row = bench_shape(*shape, dtype=dtype, device=args.device, reps=reps,
                              quick=args.quick, flex=args.flex)
            rows.append(row)
            print(f"{row['shape']:34s} {row['dtype']:8s} {row['fwd_ref_ms']:9.1f} "
                  f"{row['fwd_tokred_ms']:9.1f} {row['fwd_speedup']:5.2f} "
                  f"{row['fwd_bwd_ref_ms']:9.1f} {row['fwd_bwd_tokred_ms']:9.1f} "
                  f"{row['fwd_bwd_speedup']:5.2f} {row['ref_gathered_kv_mib']:14.1f} "
                  f"{row['tokred_extra_mib']:14.2f} {row['gather_ref_ms']:10.1f} "
                  f"{row['gather_tokred_ms']:11.1f} {row['gather_speedup']:5.2f}", flush=True)
            if "flex_best_ms" in row:
                blocks = ", ".join(f"{b}: {row[f'flex_block{b}_ms']:.1f}" for b in FLEX_BLOCK_SIZES
                                   if f"flex_block{b}_ms" in row)
                print(f"{'':34s} flex forward ms by block size ({blocks}); tokred fwd vs best "
                      f"flex x{row['fwd_vs_flex']:.2f}", flush=True)
    if args.model:
        batch = args.model_batch or (64 if args.device == "cuda" else 4)
        for dtype in dtypes:
            rows.append(bench_model(args.device, dtype, batch, reps))
    if args.json:
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
