"""Timing, peak memory and the machine's own matmul and copy peaks."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch

from .impls import Impl
from .workloads import Workload, make_inputs


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[int], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn(i)`` over ``repeats`` calls (``i`` rotates the inputs); CUDA
    events on a GPU, the host clock otherwise. Each timed call ends synchronised."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Matmul TFLOP/s and copy GB/s measured now, on this device, as the yardsticks."""
    n = 1024 if device.type == "cpu" or quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda i: torch.matmul(a, b), device, 2, 5 if quick else 20)
    numel = (16 if device.type == "cpu" or quick else 256) * 2**20
    src = torch.empty(numel, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda i: dst.copy_(src), device, 2, 5 if quick else 20)
    return {"matmul_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
            "copy_gbps": 2 * numel / (copy_ms * 1e-3) / 1e9}


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "crossattn": __import__("crossattn").__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": device.type == "cuda"}


def measure(impl: Impl, w: Workload, device: torch.device, dtype: torch.dtype, mode: str,
            warmup: int, repeats: int, rotate: int = 3) -> dict:
    """One row: median latency, peak memory (CUDA), attention TFLOP/s, weights GB/s."""
    train = mode == "fwd+bwd"
    run = impl.build(w, device, dtype)
    sets = [make_inputs(w, device, dtype, seed=s, requires_grad=train) for s in range(rotate)]

    def once(i):
        inputs = sets[i % rotate]
        if train:
            outs = run(inputs, True)
            sum(o.float().mean() for o in outs).backward()
        else:
            with torch.no_grad():
                run(inputs, False)

    ms = median_ms(once, device, warmup, repeats)
    peak = None
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        once(0)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    flops = w.attention_flops() * (3.5 if train else 1.0)  # backward ~2.5x forward
    row = {"latency_ms": ms, "peak_mem_mib": peak, "attention_tflops": flops / (ms * 1e-3) / 1e12}
    if impl.writes_weights:
        per_direction = w.B * w.T * w.A * (w.H if impl.writes_weights == "full" else 1)
        directions = 2 if w.kind == "layer" else 1
        row["weights_gbps"] = per_direction * directions * torch.finfo(dtype).bits / 8 / (ms * 1e-3) / 1e9
    return row
