"""Timing, memory and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

# dense bf16 tensor-core peaks (TFLOP/s), for the "fraction of peak" column
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def run_settings(device: str, config: str | None = None, dtype: str | None = None,
                 threads: int | None = None) -> tuple[torch.device, str, torch.dtype]:
    """(device, preset, dtype) with the benchmarks' defaults: the 3B shapes in bf16 on CUDA, the small
    real-geometry config in float32 on a CPU; ``threads`` sets torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return (dev, config or ("3b" if cuda else "cpu-small"),
            getattr(torch, dtype) if dtype else (torch.bfloat16 if cuda else torch.float32))


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device, warmup: int = 2, reps: int = 5) -> dict:
    """Median and spread of wall time (s) over ``reps`` runs after ``warmup`` runs, synchronising on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def time_fns(fns: dict[str, Callable[[], object]], device, warmup: int = 2, reps: int = 5) -> dict[str, dict]:
    """``time_fn`` for several implementations, interleaved (a, b, c, b, c, a, ...) so that drifts in machine
    load hit all of them alike. Returns {name: stats}: wall seconds (median, p90, min, max) and the median process
    CPU seconds (``cpu_s``: what a CPU run costs when the machine is shared)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: {"median_s": statistics.median(t), "p90_s": _p90(t), "min_s": min(t), "max_s": max(t),
                "cpu_s": statistics.median(cpu[n]), "reps": reps} for n, t in times.items()}


def _p90(t: list[float]) -> float:
    """90th percentile (linear interpolation between the closest ranks)."""
    return statistics.quantiles(t, n=10, method="inclusive")[-1] if len(t) > 1 else t[0]


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) on Linux
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Peak memory of one call: CUDA allocator peak over the baseline, or peak RSS growth on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not _rss_reset():
        return None
    base = _rss_peak_bytes()
    fn()
    peak = _rss_peak_bytes()
    return None if base is None or peak is None else max(peak - base, 0)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def bf16_peak_tflops(device) -> float | None:
    name = device_name(device)
    for key, val in BF16_PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


def git_commit() -> str:
    """The commit measured: $QWEN_BATCHED_COMMIT when the caller knows it (a copied tree's .git may be stale)."""
    if os.environ.get("QWEN_BATCHED_COMMIT"):
        return os.environ["QWEN_BATCHED_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def header(device) -> dict:
    return {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
    }


def fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    """rows: dicts; cols: (key, title). Floats get 3 significant digits."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:  # whole or not at all: a part killed by its time limit leaves no half file
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
