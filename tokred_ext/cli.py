"""The ``tokred`` command: ``bench``, ``export``, ``flops``, ``info`` and ``visualize``.

Bad arguments print one line, ``tokred: error: ...``, and exit with status 2.
"""
import argparse
import json
import os
import platform
import sys
from typing import List, Optional

__all__ = ["main"]


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def _csv(value: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return n
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _seconds(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not f >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} seconds must be >= 0")
    return f


def _ratio(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"merge ratio {value} must be in [0, 1]")
    return f


def _rate(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < f <= 1.0:
        raise argparse.ArgumentTypeError(f"keep rate {value} must be in (0, 1]")
    return f


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokred", description="Token reduction for vision transformers.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    b = sub.add_parser("bench", help="throughput of models with each policy, tokred vs reference")
    b.add_argument("--models", type=_csv, default=["deit_small", "deit_base"],
                   help="comma-separated model names (default: deit_small,deit_base)")
    b.add_argument("--policies", type=_csv, default=None,
                   help="comma-separated: none,topk,evit,tome; a value may follow a colon, "
                        "e.g. tome:8,evit:0.5 (default: all four)")
    b.add_argument("--impls", type=_csv, default=["tokred", "reference"],
                   help="tokred,reference (default: both)")
    b.add_argument("--batch-size", type=_positive_int, default=None,
                   help="default: 256 on CUDA, 4 on CPU")
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    b.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present)")
    b.add_argument("--iters", type=_positive_int, default=None,
                   help="at least this many timed rounds (default: 20 on CUDA, 5 on CPU)")
    b.add_argument("--min-time", type=_seconds, default=None,
                   help="and at least this many seconds of timed rounds per model "
                        "(default: 5 on CUDA, 10 on CPU)")
    b.add_argument("--warmup", type=_nonneg_int, default=None,
                   help="warm-up rounds (default: 5 on CUDA, 1 on CPU)")
    b.add_argument("--keep-rate", type=_rate, default=0.7, help="Top-K/EViT keep rate (0.7)")
    b.add_argument("--r", type=_nonneg_int, default=13, help="ToMe tokens merged per layer (13)")
    b.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results and run metadata as JSON ('-': stdout, which then "
                        "holds the JSON alone; the table goes to stderr)")
    b.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    b.add_argument("--no-progress", action="store_true", help="no progress lines")

    f = sub.add_parser("flops", help="FLOPs of a model with a policy, per block")
    f.add_argument("--model", default="deit_small",
                   help="a ViT/DeiT name or biformer_tiny/small/base (default: deit_small)")
    f.add_argument("--policy", default="none",
                   help="none, topk, evit or tome, a value may follow a colon: tome:13, "
                        "evit:0.7 (default: none; ViT models only)")
    f.add_argument("--batch", type=_positive_int, default=1, help="images per pass (default: 1)")
    f.add_argument("--json", action="store_true", help="print JSON instead of the table")

    e = sub.add_parser("export", help="export a model with a policy to ONNX (checked in "
                                      "onnxruntime) or an AOTInductor package")
    e.add_argument("--model", default="deit_small",
                   help="a ViT/DeiT name or biformer_tiny/small/base (default: deit_small)")
    e.add_argument("--policy", default="none",
                   help="none, topk, evit or tome, a value may follow a colon: tome:13 "
                        "(default: none; ViT models only)")
    e.add_argument("--batch", type=_positive_int, default=1,
                   help="batch of the export and of the check (default: 1); the batch axis "
                        "stays dynamic unless --static-batch")
    e.add_argument("-o", "--output", required=True,
                   help="the file to write: .onnx, or .pt2 for an AOTInductor package")
    e.add_argument("--format", choices=["onnx", "aoti"], default=None,
                   help="onnx or aoti (an AOTInductor .pt2 package for this machine's CPU); "
                        "default: the output suffix picks it (.onnx or .pt2), and must agree")
    e.add_argument("--checkpoint", default=None, help="state dict to load (default: random "
                                                      "weights, seeded)")
    e.add_argument("--static-batch", action="store_true", help="fix the batch axis")
    e.add_argument("--no-check", action="store_true",
                   help="skip running the file (in onnxruntime, or with tokred_ext.load_aoti) "
                        "against eager PyTorch")

    sub.add_parser("info", help="versions, CUDA kernels, registered ops, device")

    v = sub.add_parser("visualize", help="draw merged or pruned patches over an image")
    v.add_argument("image", nargs="?", default=None,
                   help="image file (default: the sample shipped with tokred)")
    v.add_argument("-o", "--output", required=True,
                   help="output image; its suffix picks the format (.png, .jpg, .webp, ...)")
    v.add_argument("--method", choices=["tome", "evit", "topk", "dense"], default="tome",
                   help="dense: dense ToMe (ToMe-SD) on a tiny diffusers UNet's first block")
    group = v.add_mutually_exclusive_group()
    group.add_argument("--r", type=_nonneg_int, default=None, help="ToMe: tokens merged per layer")
    group.add_argument("--keep-rate", type=_rate, default=None, help="Top-K/EViT keep rate")
    v.add_argument("--model", default="deit_small", help="model name (default: deit_small)")
    v.add_argument("--checkpoint", default=None, help="state dict to load (e.g. timm weights)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    v.add_argument("--ratio", type=_ratio, default=None, help="dense: share of tokens merged "
                   "(default 0.5)")
    v.add_argument("--sx", type=_positive_int, default=2, help="dense: cell width (default 2)")
    v.add_argument("--sy", type=_positive_int, default=2, help="dense: cell height (default 2)")
    v.add_argument("--draw-seed", type=int, default=None,
                   help="dense: draw the destinations with this seed (default: top-left)")
    return p


def _bench(args) -> int:
    import torch

    from . import bench
    from .models.vit import ALIASES, MODELS
    from .nn.policies import policy_from_spec

    for m in args.models:
        if ALIASES.get(m, m) not in MODELS:
            raise UsageError(f"unknown model {m!r}; choose from "
                             f"{', '.join(list(ALIASES) + list(MODELS))}")
    for i in args.impls:
        if i not in bench.IMPLS:
            raise UsageError(f"unknown impl {i!r}; choose from {', '.join(bench.IMPLS)}")
    policies = args.policies if args.policies is not None else list(bench.POLICY_NAMES)
    for p in policies:
        try:
            policy_from_spec(p, args.keep_rate, args.r)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.json and args.json != "-":
        _check_writable(args.json, "--json")
    device = args.device or bench.best_device()
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"device {device!r} is not usable: {str(e).splitlines()[0]}") from None
    dtype = args.dtype or bench.defaults(device)["dtype"]
    if dtype == "float16" and not device.startswith("cuda"):
        raise UsageError("--dtype float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    report = bench.run(args.models, policies, args.impls, batch_size=args.batch_size, dtype=dtype,
                       device=device, iters=args.iters, min_time=args.min_time,
                       warmup=args.warmup, keep_rate=args.keep_rate, r=args.r,
                       progress=None if args.no_progress else _Progress())
    # With --json - stdout carries the JSON alone, so that it can be piped into a parser.
    table_to = sys.stderr if args.json == "-" else sys.stdout
    print(bench.format_table(report, markdown=args.markdown), file=table_to)
    _note_clamped_merges(report["rows"], args.r)
    for warning in report["warnings"]:
        print(f"tokred: warning: {warning}", file=sys.stderr)
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


class _Progress:
    """Progress on stderr. On a terminal one line rewritten in place; elsewhere (a log, CI) only
    the summary line of each model, so that logs are not flooded with carriage returns."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.width = 0

    def __call__(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self.width) + ("\n" if final else ""))
            sys.stderr.flush()
            self.width = 0 if final else len(text)
        elif final:
            print(text, file=sys.stderr, flush=True)


def _check_input_file(path: Optional[str], what: str) -> None:
    """Refuses an input path that is missing or is a folder, before any work (None: not given)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist")


def _check_writable(path: str, option: str) -> None:
    """Refuses an output path that is a folder, or whose folder is missing or read-only, before
    any work."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a folder; name a file in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r} is not writable")


def _note_clamped_merges(rows, default_r: int) -> None:
    """ToMe merges at most half of a block's unprotected tokens: say so where a block merged
    fewer tokens than its policy's plan asked, with what each block did merge."""
    from .nn.policies import ToMe, policy_from_spec

    for row in rows:
        policy = policy_from_spec(row["policy"], r=default_r)
        if not isinstance(policy, ToMe) or row["impl"] != "tokred":
            continue
        counts = [row["tokens_in"]] + row["tokens_per_block"]
        merged = [a - b for a, b in zip(counts, counts[1:])]
        asked = [r or 0 for r in policy.plan(len(merged), row["tokens_in"])]
        if any(m < a for m, a in zip(merged, asked)):
            print(f"tokred: note: {row['policy']} on {row['model']}: a block merges at most half of "
                  f"its unprotected tokens, so the blocks merged {merged} (r = {policy.r} was asked)",
                  file=sys.stderr)


_BIFORMERS = ("biformer_tiny", "biformer_small", "biformer_base")


def _model_and_size(model_name: str, policy_spec: str):
    """The model a --model/--policy pair names, random weights, and its input image size."""
    from .models import biformer
    from .models.vit import ALIASES, MODELS, create_model
    from .nn.policies import policy_from_spec

    name = ALIASES.get(model_name, model_name)
    if name not in MODELS and name not in _BIFORMERS:
        raise UsageError(f"unknown model {model_name!r}; choose from "
                         f"{', '.join(list(ALIASES) + list(MODELS) + list(_BIFORMERS))}")
    try:
        policy = policy_from_spec(policy_spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name in _BIFORMERS:
        if policy is not None:
            raise UsageError(f"--policy {policy_spec} is for ViT models; BiFormer reduces by its "
                             "own routing")
        return name, getattr(biformer, name)().eval(), 224
    model = create_model(name, reduction=policy).eval()
    return name, model, model.patch_embed.img_size


def _flops(args) -> int:
    import torch

    from .flops import flops

    name, model, img_size = _model_and_size(args.model, args.policy)
    # The count depends on shapes only (the policies' schedules fix the token counts), so any
    # weights and pixels give it; seeded so that runs are identical anyway.
    images = torch.randn(args.batch, 3, img_size, img_size,
                         generator=torch.Generator().manual_seed(0))
    report = flops(model, images)
    if args.json:  # JSON alone on stdout, for pipes
        print(json.dumps({"model": name, "policy": args.policy, **report.as_dict()}, indent=2))
        return 0
    print(f"{name}, policy {args.policy}, batch {args.batch}")
    width = max(len("block"), *(len(b.name) for b in report.blocks))
    print(f"{'block':<{width}}  {'tokens in':>9}  {'tokens out':>10}  {'GFLOPs':>8}")
    for b in report.blocks:
        tokens_in, tokens_out = ("?" if t is None else t for t in (b.tokens_in, b.tokens_out))
        print(f"{b.name:<{width}}  {tokens_in:>9}  {tokens_out:>10}  {b.gflops:>8.4f}")
    print(f"{'outside blocks':<{width + 23}}  {report.outside_blocks / 1e9:>8.4f}")
    print(f"total: {report.gflops:.4f} GFLOPs = {report.gmacs:.4f} GMACs "
          "(a multiply-add is 2 FLOPs; papers' \"FLOPs\" are usually MACs)")
    return 0


def _export(args) -> int:
    import time

    import torch

    _check_writable(args.output, "--output")
    _check_input_file(args.checkpoint, "checkpoint")
    fmt = _export_format(args)
    write = _aoti_writer(args) if fmt == "aoti" else _onnx_writer(args)
    torch.manual_seed(0)
    name, model, img_size = _model_and_size(args.model, args.policy)
    if args.checkpoint is not None:
        from .models import load_checkpoint
        try:
            load_checkpoint(model, args.checkpoint, name)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    images = torch.randn(args.batch, 3, img_size, img_size,
                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    print(f"tokred: exporting {name} (policy {args.policy}) to {args.output} ...",
          file=sys.stderr, flush=True)
    what, runner = write(model, images)
    size = os.path.getsize(args.output) / 2**20
    print(f"tokred: wrote {args.output} ({size:.1f} MiB, {what}, "
          f"{'static' if args.static_batch else 'dynamic'} batch) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if args.no_check:
        return 0
    with torch.inference_mode():
        expected = model(images)
    got = runner()(images)
    diff = (got - expected).abs().max().item()
    ok = diff <= 1e-4 * max(1.0, expected.abs().max().item())
    print(f"tokred: {'onnxruntime' if fmt == 'onnx' else 'load_aoti'} check at batch "
          f"{args.batch}: max |{fmt} - eager| = {diff:.2e} ({'ok' if ok else 'MISMATCH'})",
          file=sys.stderr)
    return 0 if ok else 1


def _onnx_writer(args):
    """Checks the ONNX packages first; returns write(model, images) -> (description, a function
    returning the file's runner)."""
    try:
        from . import onnx as tokred_onnx
        if tokred_onnx.op is None:
            raise ImportError("onnxscript")
        if not args.no_check:
            import onnxruntime
    except ImportError as e:
        raise UsageError(f"tokred export needs onnx, onnxscript and onnxruntime ({e.name or e} "
                         "is missing): pip install onnx onnxscript onnxruntime") from None

    def write(model, images):
        tokred_onnx.export(model, (images,), args.output, dynamic_batch=not args.static_batch,
                           verbose=False)

        def runner():
            import torch
            session = onnxruntime.InferenceSession(args.output,
                                                   providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        return f"opset {tokred_onnx.OPSET}", runner
    return write


EXPORT_SUFFIXES = {"onnx": ".onnx", "aoti": ".pt2"}


def _export_format(args) -> str:
    """The output's suffix picks the format, and --format, when given, must agree with it: a file
    named for one format never holds the other."""
    by_suffix = [f for f, suffix in EXPORT_SUFFIXES.items() if args.output.endswith(suffix)]
    fmt = args.format or (by_suffix[0] if by_suffix else None)
    if fmt is None or by_suffix != [fmt]:
        what = {"onnx": "an ONNX file", "aoti": "a .pt2 package"}
        hint = (f"--format {fmt} writes {what[fmt]}; name the output *{EXPORT_SUFFIXES[fmt]}"
                if fmt else "name the output *.onnx (ONNX) or *.pt2 (AOTInductor)")
        raise UsageError(f"{hint} (got {args.output!r})")
    return fmt


def _aoti_writer(args):
    """The AOTInductor counterpart of _onnx_writer."""
    from .aoti import compile_aoti, load_aoti

    def write(model, images):
        # torch.export would specialize a batch of 1: compile a dynamic package on two images.
        example = images if args.static_batch or len(images) > 1 else images.repeat(2, 1, 1, 1)
        compile_aoti(model, (example,), args.output, dynamic_batch=not args.static_batch)
        return "AOTInductor, CPU", lambda: load_aoti(args.output)
    return write


def _info(args) -> int:
    import torch

    import tokred_ext

    info = tokred_ext.build_info()
    lines = [f"tokred     {tokred_ext.__version__}",
             f"torch      {torch.__version__}",
             f"python     {platform.python_version()}"]
    for mod in ("timm", "PIL"):
        try:
            version = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            version = "not installed"
        lines.append(f"{mod:<10} {version}")
    archs = info["cuda_arch_list"] or "default"
    lines.append("CUDA kernels: " + (f"built (archs: {archs})" if info["cuda_kernels"]
                                     else "not built (CPU kernels only)"))
    if torch.cuda.is_available():
        lines.append(f"device     cuda: {torch.cuda.get_device_name()} "
                     f"(torch CUDA {torch.version.cuda})")
    else:
        lines.append(f"device     cpu ({torch.get_num_threads()} threads; no CUDA device)")
    lines.append(f"ops ({len(info['ops'])}):")
    lines += [f"  {name}" for name in info["ops"]]
    print("\n".join(lines))
    return 0


def _visualize(args) -> int:
    from .models.vit import ALIASES, MODELS
    from .nn.policies import policy_from_spec

    _check_input_file(args.image, "image")
    if args.method == "dense":
        return _visualize_dense(args)
    dense_only = [o for o, v in (("--ratio", args.ratio), ("--draw-seed", args.draw_seed),
                                 ("--sx", args.sx != 2 or None), ("--sy", args.sy != 2 or None))
                  if v is not None]
    if dense_only:
        raise UsageError(f"{', '.join(dense_only)}: for --method dense only")
    _check_input_file(args.checkpoint, "checkpoint")
    if ALIASES.get(args.model, args.model) not in MODELS:
        raise UsageError(f"unknown model {args.model!r}")
    if args.method == "tome" and args.keep_rate is not None:
        raise UsageError("--keep-rate is for topk/evit; ToMe takes --r")
    if args.method != "tome" and args.r is not None:
        raise UsageError(f"--r is for tome; {args.method} takes --keep-rate")
    _check_writable(args.output, "--output")
    from .visualize import image_format, visualize
    try:
        image_format(args.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    given = {name: value for name, value in (("keep_rate", args.keep_rate), ("r", args.r))
             if value is not None}
    policy = policy_from_spec(args.method, trace_source=True, **given)
    try:
        img, panels = visualize(args.image, args.output, policy, args.model, args.checkpoint,
                                args.seed)
    except (OSError, ValueError, RuntimeError) as e:  # unreadable image, wrong checkpoint
        raise UsageError(str(e).splitlines()[0]) from None
    counts = ", ".join(f"block {b + 1}: {t}" for b, t, _ in panels)
    print(f"wrote {args.output} ({img.width}x{img.height}); tokens after {counts}")
    return 0


def _visualize_dense(args) -> int:
    """``tokred visualize --method dense``: a tiny diffusers UNet with random weights."""
    for option, value in (("--r", args.r), ("--keep-rate", args.keep_rate),
                          ("--checkpoint", args.checkpoint)):
        if value is not None:
            raise UsageError(f"{option} is not for --method dense (a tiny UNet with random "
                             "weights; --ratio, --sx, --sy, --draw-seed set the merge)")
    if args.model != "deit_small":
        raise UsageError("--model is not for --method dense (it draws a tiny diffusers UNet)")
    _check_writable(args.output, "--output")
    from .visualize import image_format, visualize_dense
    try:
        image_format(args.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ratio = 0.5 if args.ratio is None else args.ratio
    try:
        img, tr = visualize_dense(args.image, args.output, ratio, args.sx, args.sy, args.draw_seed,
                                  weights_seed=args.seed)
    except (OSError, ValueError, RuntimeError) as e:  # unreadable image, no diffusers
        raise UsageError(str(e).splitlines()[0]) from None
    h, w = tr["grid"]
    print(f"wrote {args.output} ({img.width}x{img.height}); {tr['r']} of {h * w} tokens merged "
          f"into {tr['destinations'].numel()} destinations (random weights)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return {"bench": _bench, "export": _export, "flops": _flops, "info": _info,
                "visualize": _visualize}[args.command](args)
    except UsageError as e:
        print(f"tokred: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokred: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader closed the pipe (tokred info | head): stop quietly, as a Unix filter does,
        # and keep Python's exit-time flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
