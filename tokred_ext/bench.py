"""End-to-end model throughput: tokred's models against the upstream-style reference.

Used by ``tokred bench`` and ``benchmarks/bench_models.py``. For each model, every (policy, impl)
pair is a candidate: tokred's model (SDPA attention, tokred ops) or ``reference.ReferenceViT``
(full attention map, torch.topk/gather/scatter glue) on the same weights. After a warm-up the
candidates run in interleaved rounds, one call each per round and the order rotated every round,
so a burst of load on a shared machine hits all of them alike; rounds go on until both a minimum
count and a minimum time are reached. A row reports the median time per batch with its
interquartile range, and its speed-ups as the median of the per-round ratios (each ratio taken
within one round). Peak memory is measured on one more call per candidate (``peak_memory``).
"""
import ctypes
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import __version__, reference
from .models import create_model
from .nn.policies import POLICY_NAMES, policy_from_spec

__all__ = ["run", "format_table", "best_device", "defaults", "quartiles", "interleaved",
           "peak_memory", "memory_measure", "spread_warning", "metadata", "POLICY_NAMES",
           "IMPLS", "SPREAD_LIMIT"]

IMPLS = ("tokred", "reference")
# A row whose interquartile range exceeds this fraction of its median is flagged: its figures
# move with the machine's load more than the differences the table is meant to show.
SPREAD_LIMIT = 0.10

_now = time.perf_counter  # the timer; tests put a fake clock here to get a known spread


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def defaults(device: str) -> Dict[str, object]:
    """Batch size, dtype, minimum rounds (``iters``), minimum timed seconds per model
    (``min_time``) and warm-up rounds. GPU as in ToMe's benchmark (fp16, batch 256); on the CPU the
    default models (DeiT-S, DeiT-B) take about a minute on two cores."""
    if device.startswith("cuda"):
        return dict(batch_size=256, dtype="float16", iters=20, min_time=5.0, warmup=5)
    return dict(batch_size=4, dtype="float32", iters=5, min_time=10.0, warmup=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile); one value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, statistics.median(values), q3


def interleaved(candidates: Dict[str, Callable[[], object]], min_rounds: int, min_time: float,
                device: str = "cpu",
                on_round: Optional[Callable[[int, float], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each candidate, one entry per round: rounds run until there are at
    least ``min_rounds`` and ``min_time`` seconds have passed; each round starts one candidate
    later than the one before. ``on_round(rounds done, seconds)`` follows every round."""
    names = list(candidates)
    times: Dict[str, List[float]] = {n: [] for n in names}
    start = _now()
    done = 0
    while done < min_rounds or _now() - start < min_time:
        k = done % len(names)
        for name in names[k:] + names[:k]:
            t0 = _now()
            candidates[name]()
            _sync(device)
            times[name].append(_now() - t0)
        done += 1
        if on_round is not None:
            on_round(done, _now() - start)
    return times


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim where the CPU peak can be measured (Linux >= 4.0: /proc/self/clear_refs
    takes "5", which resets VmHWM), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (AttributeError, OSError):
        return None
    return trim


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_measure(device: str) -> Optional[str]:
    """What ``peak_memory`` measures on ``device``, in words; None where it cannot."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated during one call above memory_allocated before it"
    if _malloc_trim() is None:
        return None
    return ("peak resident set (VmHWM) during one call above the resident set before it, "
            "after malloc_trim returned freed memory")


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Bytes: the highest memory in use during one call of ``fn`` above what was in use before it
    (see ``memory_measure``); None where it cannot be measured.

    On the CPU, memory freed by earlier calls stays resident in the allocator and would be reused
    without raising the resident size, so a sampled growth reads near zero after a warm-up; hence
    the trim before the call and the kernel's own high-water mark, reset, instead of sampling."""
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    trim = _malloc_trim()
    if trim is None:
        return None
    trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> Tuple[Optional[str], Optional[bool]]:
    """(HEAD, whether tracked files differ from it) of the checkout this package runs from;
    (None, None) for an installed copy, or where git is missing."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        # Only if this very file is tracked: an installed copy may sit inside some other checkout
        # (a virtual environment in a project folder), whose HEAD says nothing about tokred.
        git("ls-files", "--error-unmatch", os.path.basename(__file__))
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def metadata(device: str, dtype: str, batch_size: int, iters: int, min_time: float,
             warmup: int) -> Dict[str, object]:
    """What a result depends on: versions, machine, settings, source revision, date."""
    revision, dirty = _git_revision()
    cuda = device.startswith("cuda")
    return dict(tokred=__version__, torch=torch.__version__, python=platform.python_version(),
                device=device, cpu=_cpu_name(),
                gpu=torch.cuda.get_device_name(device) if cuda else None,
                threads=torch.get_num_threads(), dtype=dtype, batch_size=batch_size,
                min_rounds=iters, min_time_s=min_time, warmup_rounds=warmup,
                git_revision=revision, git_dirty=dirty,
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                time="median seconds per batch over interleaved rounds; iqr: interquartile range",
                speedup="median over rounds of (baseline time / this row's time) in the same round",
                spread="(third quartile - first quartile) / median of the times; above "
                       f"{SPREAD_LIMIT:g} a warning is given",
                memory=memory_measure(device))


def _candidates(model, policies: Dict[str, object], impls: List[str]):
    """{(policy, impl): a function returning the module to call, with its ``token_counts``}.
    The candidates share one model, so each function first sets the model's policy."""
    out = {}
    for spec, policy in policies.items():
        for impl in impls:
            if impl == "tokred":
                def call(p=policy):
                    model.reduction = p
                    return model
                out[(spec, impl)] = call
            else:
                ref = reference.ReferenceViT(model, policy)

                def call(r=ref):
                    model.reduction = None
                    return r
                out[(spec, impl)] = call
    return out


def run(models: Iterable[str] = ("deit_small", "deit_base"),
        policies: Iterable[str] = POLICY_NAMES, impls: Iterable[str] = IMPLS,
        batch_size: Optional[int] = None, dtype: Optional[str] = None,
        device: Optional[str] = None, iters: Optional[int] = None,
        min_time: Optional[float] = None, warmup: Optional[int] = None, keep_rate: float = 0.7,
        r: int = 13, progress: Optional[Callable[[str, bool], None]] = None,
        seed: int = 0) -> Dict[str, object]:
    """Times every (model, policy, impl). Returns ``{"meta": metadata(...), "rows": [...],
    "warnings": [...]}`` (see ``format_table`` for the rows). ``progress(text, final)`` hears
    what is running; ``final`` marks the one summary line of each model."""
    device = device or best_device()
    d = defaults(device)
    batch_size = batch_size or d["batch_size"]
    dtype = dtype or d["dtype"]
    iters = iters or d["iters"]
    min_time = d["min_time"] if min_time is None else min_time
    warmup = d["warmup"] if warmup is None else warmup
    say = progress or (lambda text, final: None)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
    specs = list(dict.fromkeys(policies))
    built = {p: policy_from_spec(p, keep_rate, r) for p in specs}  # validates before timing
    impls = list(impls)
    rows: List[Dict[str, object]] = []
    for model_name in models:
        torch.manual_seed(seed)
        model = create_model(model_name).eval().to(device=device, dtype=torch_dtype)
        rows += _time_model(model, model_name, built, impls, batch_size, dtype, device, iters,
                            min_time, warmup, say)
    _add_speedups(rows)
    warning = spread_warning(rows)
    return dict(meta=metadata(device, dtype, batch_size, iters, min_time, warmup), rows=rows,
                warnings=[warning] if warning else [])


def _time_model(model, model_name, policies, impls, batch_size, dtype, device, iters, min_time,
                warmup, say) -> List[Dict[str, object]]:
    """The rows of one model: warm-up rounds, interleaved timed rounds, then one call each for
    the peak memory (after the timing, so that its trimming cannot slow a timed call)."""
    size = model.patch_embed.img_size
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=next(model.parameters()).dtype)
    pick = _candidates(model, policies, impls)
    calls = {k: (lambda f=f: f()(x)) for k, f in pick.items()}
    rows = []
    with torch.inference_mode():
        for i in range(warmup):
            say(f"{model_name}: warm-up {i + 1}/{warmup}", False)
            for call in calls.values():
                call()
        _sync(device)
        times = interleaved(calls, iters, min_time, device,
                            lambda n, s: say(f"{model_name}: round {n} ({s:.0f} s)", False))
        say(f"{model_name}: peak memory", False)
        for key, call in calls.items():
            peak = peak_memory(call, device)
            counter = pick[key]()  # its token_counts are those of the call just made
            rows.append(_row(model, model_name, key, times[key], peak, counter.token_counts,
                             batch_size, dtype, device))
    model.reduction = None
    rounds = len(next(iter(times.values())))
    say(f"{model_name}: {len(calls)} candidates x {rounds} rounds in "
        f"{sum(map(sum, times.values())):.1f} s", True)
    return rows


def _row(model, model_name, key, seconds, peak, token_counts, batch_size, dtype, device):
    q1, med, q3 = quartiles(seconds)
    return dict(model=model_name, policy=key[0], impl=key[1], batch_size=batch_size, dtype=dtype,
                device=device, tokens_in=model.patch_embed.num_patches + model.num_prefix_tokens,
                tokens_per_block=list(token_counts), tokens_out=token_counts[-1],
                rounds=len(seconds), images_per_s=batch_size / med, ms_per_batch=med * 1e3,
                ms_iqr=[q1 * 1e3, q3 * 1e3], ms_min=min(seconds) * 1e3, ms_max=max(seconds) * 1e3,
                spread=(q3 - q1) / med if med > 0 else 0.0,
                peak_mem_mib=None if peak is None else peak / 2 ** 20,
                times_ms=[s * 1e3 for s in seconds])


def _add_speedups(rows: List[Dict[str, object]]) -> None:
    """vs_none: over the same model's tokred row without reduction (the plain fast model);
    vs_reference: over the same (model, policy) reference row. Each is the median of the
    per-round ratios, with their interquartile range."""
    index = {(r["model"], r["policy"], r["impl"]): r for r in rows}
    for row in rows:
        for name, key in (("none", (row["model"], "none", "tokred")),
                          ("reference", (row["model"], row["policy"], "reference"))):
            base = index.get(key)
            if base is None:
                row[f"speedup_vs_{name}"] = row[f"speedup_vs_{name}_iqr"] = None
                continue
            ratios = [b / a for a, b in zip(row["times_ms"], base["times_ms"])]
            lo, med, hi = quartiles(ratios)
            row[f"speedup_vs_{name}"], row[f"speedup_vs_{name}_iqr"] = med, [lo, hi]


def spread_warning(rows: List[Dict[str, object]], limit: float = SPREAD_LIMIT) -> Optional[str]:
    """One sentence naming the rows whose interquartile range exceeds ``limit`` of the median;
    None where there are none."""
    noisy = [r for r in rows if r["spread"] > limit]
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: r["spread"])
    return (f"{len(noisy)} of {len(rows)} rows vary by more than {limit:.0%} of their median "
            f"(interquartile range; worst: {worst['model']} {worst['policy']} {worst['impl']}, "
            f"{worst['spread']:.0%}): the figures are unstable; use more --iters or --min-time, "
            f"or a quieter machine")


def _mem_header(device: str) -> str:
    return "peak CUDA MiB" if device.startswith("cuda") else "peak RSS MiB"


def _columns(device: str):
    return [("model", "model", "{}"), ("policy", "policy", "{}"), ("impl", "impl", "{}"),
            ("tokens_out", "tokens", "{}"), ("images_per_s", "images/s", "{:.1f}"),
            ("ms_per_batch", "ms/batch", "{:.1f}"), ("ms_iqr", "IQR ms", "{0[0]:.1f}-{0[1]:.1f}"),
            ("peak_mem_mib", _mem_header(device), "{:.0f}"),
            ("speedup_vs_none", "x none", "{:.2f}"), ("speedup_vs_reference", "x reference", "{:.2f}")]


def _cell(row, key, fmt):
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def format_table(report: Dict[str, object], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of ``run``'s report, and what its columns measure."""
    meta, rows = report["meta"], report["rows"]
    columns = _columns(meta["device"])
    head = [h for _, h, _ in columns]
    body = [[_cell(r, k, f) for k, _, f in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
                  for i, h in enumerate(head)]
        fmt_row = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths)))
        lines = [fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]
    revision = (meta["git_revision"] or "")[:12] + ("+changes" if meta["git_dirty"] else "")
    lines += ["", f"{meta['device']} ({meta['gpu'] or meta['cpu']}), {meta['threads']} threads, "
                  f"{meta['dtype']}, batch {meta['batch_size']}; torch {meta['torch']}, "
                  f"tokred {meta['tokred']}{' ' + revision if revision else ''}; {meta['date']}",
              f"ms/batch: median over >= {meta['min_rounds']} interleaved rounds and >= "
              f"{meta['min_time_s']:g} s, IQR: its interquartile range; x: median of per-round "
              f"speed-ups",
              f"{_mem_header(meta['device'])}: {meta['memory'] or 'not measurable here'}"]
    return "\n".join(lines)
