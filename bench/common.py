"""Timing and reporting helpers shared by the bench/ scripts."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, min_time_s: float = 0.2) -> float:
    """Median seconds per call. CUDA: events around batches of calls; CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times: List[float] = []
        total = 0.0
        while total < min_time_s or len(times) < 5:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
            times.append(t)
            total += t
    else:
        times = []
        total = 0.0
        while total < min_time_s or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            times.append(t)
            total += t
    times.sort()
    return times[len(times) // 2]


def status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status in MiB: "VmRSS" (now) or "VmHWM" (peak); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_info():
    """(model name, SIMD flags) of this machine's CPU, from /proc/cpuinfo (platform's name elsewhere)."""
    import platform

    model, flags = "", []
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name" and not model:
            model = val.strip()
        if key.strip() == "flags" and not flags:
            flags = sorted(f for f in val.split() if f.startswith(("avx", "fma", "f16c", "sse4", "amx")))
    return model or platform.processor() or platform.machine(), flags


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_info()[0]}, {torch.get_num_threads()} threads)"


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
