"""Timing helpers shared by the benchmarks: medians from torch.utils.benchmark, one table."""
import json
import platform
import time

import torch
from torch.utils import benchmark


def median_seconds(fn, min_run_time=0.3):
    """Median time of fn() over repeated blocks (syncs CUDA)."""
    fn()  # warm-up, and the first call of a compiled function
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compiled(fn):
    return torch.compile(fn, dynamic=False)


def machine():
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
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
