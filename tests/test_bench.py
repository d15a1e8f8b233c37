"""The measurements behind ``tokred bench``: interleaved rounds, quartiles, the spread warning and
the CPU peak memory."""
import pytest
import torch

from tokred_ext import bench

MiB = 1 << 20


def test_quartiles():
    assert bench.quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert bench.quartiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (2.0, 3.0, 4.0)


def test_interleaved_rotates_the_order():
    calls = []
    candidates = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bench.interleaved(candidates, min_rounds=4, min_time=0.0)
    assert "".join(calls) == "abc" "bca" "cab" "abc"
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_interleaved_runs_for_the_longer_of_count_and_time(monkeypatch):
    # A fake clock that moves one second per reading: a round of one candidate reads it three
    # times (before, after, elapsed), so 10 seconds take four rounds where 2 were asked.
    clock = iter(range(1000))
    monkeypatch.setattr(bench, "_now", lambda: float(next(clock)))
    times = bench.interleaved({"a": lambda: None}, min_rounds=2, min_time=10.0)
    assert len(times["a"]) == 4
    clock = iter(range(1000))
    times = bench.interleaved({"a": lambda: None}, min_rounds=6, min_time=10.0)
    assert len(times["a"]) == 6


def _row(spread):
    return dict(model="deit_tiny", policy="tome", impl="tokred", spread=spread)


def test_spread_warning():
    assert bench.spread_warning([_row(0.02), _row(0.1)]) is None
    text = bench.spread_warning([_row(0.02), _row(0.25), _row(0.5)])
    assert text.startswith("2 of 3 rows vary by more than 10% of their median")
    assert "deit_tiny tome tokred, 50%" in text and "--iters" in text


needs_peak = pytest.mark.skipif(bench.memory_measure("cpu") is None,
                                reason="the CPU peak needs Linux's clear_refs and glibc")


@needs_peak
def test_peak_memory_sees_a_call_that_reuses_freed_memory():
    # Six 4 MiB tensors alive at once: the call's peak is 24 MiB. After the warm-up calls the
    # allocator holds freed memory that later calls reuse, so the resident size barely grows
    # during a call (the old "growth after warm-up" read 4-16 MiB here); every repeat must still
    # see the whole 24 MiB.
    def call():
        tensors = [torch.ones(MiB) for _ in range(6)]
        return sum(float(t[-1]) for t in tensors)
    for _ in range(3):
        call()
    for _ in range(3):
        assert bench.peak_memory(call, "cpu") >= 23.5 * MiB


@needs_peak
def test_peak_memory_is_the_calls_own():
    # Not the process's resident size: a call that allocates nothing has (almost) no peak.
    big = torch.ones(16 * MiB)  # resident before and during the call: not the call's
    assert bench.peak_memory(lambda: float(big[0]), "cpu") < 2 * MiB


def test_run_reports_spread_memory_and_per_round_speedups():
    report = bench.run(["deit_tiny"], ["none", "tome"], batch_size=1, device="cpu", iters=3,
                       min_time=0.0, warmup=0)
    rows = {(r["policy"], r["impl"]): r for r in report["rows"]}
    assert len(rows) == 4
    tome, base = rows[("tome", "tokred")], rows[("none", "tokred")]
    # The speed-up is the median of the ratios within each round, not a ratio of medians.
    ratios = sorted(b / a for a, b in zip(tome["times_ms"], base["times_ms"]))
    assert tome["speedup_vs_none"] == pytest.approx(ratios[1])
    assert tome["speedup_vs_none_iqr"][0] <= ratios[1] <= tome["speedup_vs_none_iqr"][1]
    if report["meta"]["memory"] is not None:
        # A forward of deit_tiny holds at least its [1, 197, 768] MLP activation (0.6 MiB).
        assert all(r["peak_mem_mib"] >= 0.5 for r in report["rows"])
