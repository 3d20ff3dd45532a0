"""Benchmark harness shared by bench/: a JSON summary of the run, and side-by-side comparisons of op forms.

- `record_bench_result(name, result)`: adds a named result dict to the run's summary.
- `side_by_side(forms, ...)`: several forms of one op timed and memory-profiled in interleaved rounds.
  pytest-benchmark times the subject form (the fused op); the harness measures every form itself, the same way, in
  the same rounds, and stores time and peak-memory ratios (with shapes, dtype, device) in the benchmark's
  `extra_info` and in the summary. HSCR_BENCH_ROUNDS overrides the number of rounds (the tests read it).
Set HSCR_BENCH_RESULTS=path/to/file.json to write the summary (e.g. bench/results/kernels-<device>-<date>.json).

CPU threads during side-by-side comparisons: 1 by default (HSCR_BENCH_THREADS=n to change, 0 for torch's setting).
On a CPU shared with other processes every OpenMP parallel region waits for whichever of its threads was descheduled;
that charges a form for its number of ops rather than its work (a tiled form issues many more, smaller ops than the
plain one) and makes the ratios irreproducible. Every form of a comparison runs with the same setting.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call. On CPU, the peak
resident set size above the resident size before the call (Linux: /proc/self/clear_refs resets the peak; free heap
is handed back with malloc_trim first so that earlier frees do not hide new allocations). Elsewhere it is not
measured. This file does not import triton.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from hscr_fast.runtime.provenance import source_commit

_RESULTS: list[dict] = []
_COMPARISON_THREADS = int(os.environ.get("HSCR_BENCH_THREADS", 1))


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def _reset_peak_rss() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak bytes allocated above the starting point, or None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - before
    can_measure = _reset_peak_rss()
    before = _proc_status_kib("VmRSS") if can_measure else 0
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return elapsed, ((_proc_status_kib("VmHWM") - before) * 1024 if can_measure else None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} of {os.cpu_count()} threads)"


@pytest.fixture
def record_bench_result():
    """record(name, result): adds `result` (a JSON-serialisable dict) to the run's summary under `name`."""

    def record(name: str, result: dict) -> None:
        _RESULTS.append({"name": name, **result})

    return record


@pytest.fixture
def step_measure():
    """measure(fn, device) -> (seconds, peak bytes above the start or None), as `measure`; `.device_label(device)`
    names the device as every result does."""
    def run(fn, device):
        return measure(fn, device)

    run.device_label = device_name
    run.cpu_threads = _COMPARISON_THREADS  # what side-by-side comparisons use on CPU (0: torch's setting)
    return run


@pytest.fixture
def side_by_side(benchmark, record_bench_result):
    """compare(forms, subject=..., baseline=..., case=..., rounds=..., device=...) -> summary dict.

    Every round runs each non-subject form (as pytest-benchmark's setup, untimed by it) and then the subject (timed by
    pytest-benchmark); the harness measures all of them. Time is the best round, peak memory the largest.
    `derived(summary)` may add figures computed from the measurements (e.g. the fraction of a device's matmul rate).
    """

    def compare(forms: dict[str, Callable[[], None]], *, subject: str, baseline: str, case: dict, rounds: int,
                device: torch.device, warmup: bool = False, derived: Callable[[dict], dict] | None = None) -> dict:
        samples = {name: [] for name in forms}

        def run_others():
            for name, fn in forms.items():
                if name != subject:
                    samples[name].append(measure(fn, device))

        def run_subject():
            samples[subject].append(measure(forms[subject], device))

        threads = torch.get_num_threads()
        if _COMPARISON_THREADS and device.type == "cpu":
            torch.set_num_threads(_COMPARISON_THREADS)
        try:
            device_label = device_name(device)
            if warmup:  # compilation / autotuning / cuBLAS heuristics out of the way
                for fn in forms.values():
                    fn()
            benchmark.pedantic(run_subject, setup=run_others, rounds=rounds, iterations=1, warmup_rounds=0)
        finally:
            torch.set_num_threads(threads)

        forms_summary = {}
        for name, runs in samples.items():
            times = [seconds for seconds, _ in runs]
            peaks = [peak for _, peak in runs if peak is not None]
            forms_summary[name] = {
                "time_s": min(times),
                "time_median_s": statistics.median(times),
                "peak_mib": max(peaks) / 2**20 if peaks else None,
            }
        ratios = {}
        for name, summary in forms_summary.items():
            if name == baseline:
                continue
            base = forms_summary[baseline]
            ratios[name] = {
                "time_ratio": summary["time_s"] / base["time_s"],
                "memory_ratio": (summary["peak_mib"] / base["peak_mib"]
                                 if summary["peak_mib"] is not None and base["peak_mib"] else None),
            }
        summary = {"case": case, "device": device_label, "baseline": baseline, "rounds": rounds,
                   "forms": forms_summary, "vs_baseline": ratios}
        if derived is not None:
            summary.update(derived(summary))
        benchmark.extra_info.update(summary)
        record_bench_result("side_by_side:" + str(case.get("op", "")), summary)
        return summary

    return compare


_COMMIT_AT_START = source_commit()  # the code the run loaded, whatever is edited while it runs


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("HSCR_BENCH_RESULTS")
    if not path or not _RESULTS:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _COMMIT_AT_START,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "results": _RESULTS,
    }
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)


def pytest_terminal_summary(terminalreporter):
    comparisons = [result for result in _RESULTS if result["name"].startswith("side_by_side:")]
    if not comparisons:
        return
    terminalreporter.section("side-by-side ratios vs baseline (time = best round, memory = peak above start)")
    for summary in comparisons:
        case = ", ".join(f"{key}={value}" for key, value in summary["case"].items())
        for name, ratio in summary["vs_baseline"].items():
            memory = f"{ratio['memory_ratio']:.3f}" if ratio["memory_ratio"] is not None else "n/a"
            form, base = summary["forms"][name], summary["forms"][summary["baseline"]]
            terminalreporter.write_line(
                f"{case} [{summary['device']}]: {name} vs {summary['baseline']}: time x{ratio['time_ratio']:.2f} "
                f"({form['time_s']:.3f}s vs {base['time_s']:.3f}s), peak memory x{memory} "
                f"({form['peak_mib'] or 0:.0f} MiB vs {base['peak_mib'] or 0:.0f} MiB)"
            )
