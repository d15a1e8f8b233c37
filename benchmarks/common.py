"""Timing helpers shared by the benchmarks: medians from torch.utils.benchmark, one table."""
import json
import os
import platform
import sys
import time

import torch
from torch.utils import benchmark

from tokred_ext.bench import interleaved


def median_seconds(fn, min_run_time=0.3):
    """Median time of fn() over repeated blocks (syncs CUDA)."""
    fn()  # warm-up, and the first call of a compiled function
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_calls(candidates, rounds, inner, device="cpu"):
    """{name: fn} -> {name: [seconds per call, one per round]}: tokred_ext.bench.interleaved's
    rotated rounds, each round timing `inner` calls of every candidate, after one warm-up call."""
    for fn in candidates.values():
        fn()
    repeated = {name: (lambda fn=fn: [fn() for _ in range(inner)]) for name, fn in candidates.items()}
    times = interleaved(repeated, rounds, 0.0, device=device)
    return {name: [t / inner for t in ts] for name, ts in times.items()}


def compiled(fn):
    return torch.compile(fn, dynamic=False)


# glibc returns freed memory above its trim threshold to the OS, so the next large allocation
# page-faults every page again, and interleaved candidates pay for each other's frees (seen: 500
# faults and 1.4 ms of system time in a 2 ms call). PyTorch's CPU tuning guide answers this with a
# caching allocator; these glibc settings do the same (the mmap threshold at its 32 MiB maximum).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def steady_allocator():
    """Re-executes this script with STEADY_MALLOC unless the caller set the variables; call it
    first in main(). TOKRED_BENCH_RAW_MALLOC=1 keeps glibc's defaults."""
    if os.environ.get("TOKRED_BENCH_RAW_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return
    if all(k in os.environ for k in STEADY_MALLOC):
        return
    os.execve(sys.executable, [sys.executable] + sys.argv, {**STEADY_MALLOC, **os.environ})


def machine():
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "malloc": {k: os.environ.get(k, "default") for k in STEADY_MALLOC},
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return str(v)


def write_json(path, meta, rows):
    with open(path, "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=1)
