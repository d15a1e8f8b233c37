"""End-to-end model throughput: tokred's models against the upstream-style reference.

Used by ``tokred bench`` and ``benchmarks/bench_models.py``. For each model and policy it times
tokred's model (SDPA attention, tokred ops) and ``reference.ReferenceViT`` (full attention map,
torch.topk/gather/scatter glue) on the same weights, after a warm-up, and reports images/s, peak
memory and speed-ups over no reduction and over the reference.
"""
import math
import os
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

from . import reference
from .models import create_model
from .nn.policies import POLICY_NAMES, policy_from_spec

__all__ = ["run", "format_table", "best_device", "defaults", "POLICY_NAMES", "IMPLS"]

IMPLS = ("tokred", "reference")


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def defaults(device: str) -> Dict[str, object]:
    """Batch size, dtype, iterations and warm-up: GPU as in ToMe's benchmark (fp16, batch 256);
    CPU small enough to finish in about a minute on two cores."""
    if device.startswith("cuda"):
        return dict(batch_size=256, dtype="float16", iters=20, warmup=5)
    return dict(batch_size=4, dtype="float32", iters=3, warmup=1)


class _PeakRSS:
    """Peak resident memory growth of this process while active, sampled every 2 ms (CPU)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


class _Progress:
    """tqdm where importable, else a one-line counter on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.total, self.n = enabled, total, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="it", leave=False)
            except ImportError:
                pass

    def step(self, desc: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(desc)
            self.bar.update(1)
        else:
            width = 30
            done = int(width * self.n / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {desc}"
                             .ljust(79))
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(fn: Callable, x: torch.Tensor, device: str, iters: int, warmup: int,
             progress: _Progress, desc: str):
    for _ in range(warmup):
        fn(x)
        progress.step(desc + " (warm-up)")
    _sync(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        tracker = None
    else:
        tracker = _PeakRSS() if os.path.exists("/proc/self/statm") else None
    if tracker is not None:
        tracker.__enter__()
    try:
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
            progress.step(desc)
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = tracker.growth if tracker is not None else float("nan")
    return elapsed / iters, peak / 2 ** 20


def run(models: Iterable[str] = ("deit_small", "deit_base"),
        policies: Iterable[str] = POLICY_NAMES, impls: Iterable[str] = IMPLS,
        batch_size: Optional[int] = None, dtype: Optional[str] = None,
        device: Optional[str] = None, iters: Optional[int] = None,
        warmup: Optional[int] = None, keep_rate: float = 0.7, r: int = 13,
        progress: bool = True, seed: int = 0) -> List[Dict[str, object]]:
    """Times every (model, policy, impl); returns one dict per row (see ``format_table``)."""
    device = device or best_device()
    d = defaults(device)
    batch_size = batch_size or d["batch_size"]
    dtype = dtype or d["dtype"]
    iters = iters or d["iters"]
    warmup = d["warmup"] if warmup is None else warmup
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
    models, policies, impls = list(models), list(policies), list(impls)
    built = {p: policy_from_spec(p, keep_rate, r) for p in policies}  # validates before timing
    bar = _Progress(len(models) * len(policies) * len(impls) * (iters + warmup), progress)
    rows: List[Dict[str, object]] = []
    try:
        for model_name in models:
            torch.manual_seed(seed)
            model = create_model(model_name).eval().to(device=device, dtype=torch_dtype)
            size = model.patch_embed.img_size
            x = torch.randn(batch_size, 3, size, size, device=device, dtype=torch_dtype)
            for spec in policies:
                for impl in impls:
                    policy = built[spec]
                    if impl == "tokred":
                        model.reduction = policy
                        fn, counter = model, model
                    else:
                        model.reduction = None
                        fn = counter = reference.ReferenceViT(model, policy)
                    with torch.inference_mode():
                        sec, peak = _measure(fn, x, device, iters, warmup, bar,
                                             f"{model_name} {spec} {impl}")
                    rows.append(dict(model=model_name, policy=spec, impl=impl,
                                     batch_size=batch_size, dtype=dtype, device=device,
                                     tokens_in=model.patch_embed.num_patches + model.num_prefix_tokens,
                                     tokens_per_block=list(counter.token_counts),
                                     tokens_out=counter.token_counts[-1],
                                     images_per_s=batch_size / sec, ms_per_batch=sec * 1e3,
                                     peak_mem_mib=peak))
            model.reduction = None
            del model, x
    finally:
        bar.close()
    _add_speedups(rows)
    return rows


def _add_speedups(rows: List[Dict[str, object]]) -> None:
    """vs_none: over the same model's tokred row without reduction (the plain fast model);
    vs_reference: over the same (model, policy) reference row."""
    index = {(r["model"], r["policy"], r["impl"]): r for r in rows}
    for row in rows:
        none = index.get((row["model"], "none", "tokred"))
        ref = index.get((row["model"], row["policy"], "reference"))
        row["speedup_vs_none"] = row["images_per_s"] / none["images_per_s"] if none else None
        row["speedup_vs_reference"] = (row["images_per_s"] / ref["images_per_s"]
                                       if ref else None)


COLUMNS = [("model", "model", "{}"), ("policy", "policy", "{}"), ("impl", "impl", "{}"),
           ("tokens_out", "tokens", "{}"), ("images_per_s", "images/s", "{:.1f}"),
           ("peak_mem_mib", "peak MiB", "{:.0f}"), ("speedup_vs_none", "x none", "{:.2f}"),
           ("speedup_vs_reference", "x reference", "{:.2f}")]


def _cell(row, key, fmt):
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def format_table(rows: List[Dict[str, object]], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of ``run``'s rows."""
    head = [h for _, h, _ in COLUMNS]
    body = [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths])] +
                     [fmt_row(b) for b in body])
