"""Timing the way kernel engineers do it, peak memory, and the machine's own yardsticks.

Candidates of one (workload, mode) are timed **interleaved**: each round times every
candidate once, in an order rotated from round to round, so drifting load on a shared
machine hits all of them alike. One round of one candidate is
``torch.utils.benchmark.Timer.blocked_autorange`` on a CPU and ``triton.testing.do_bench``
(CUDA events, L2 flushed before every run, warm-up and repetitions chosen by time) on a GPU.
Rows report the median and interquartile range of every timed run; ratios to a baseline are
the median of per-round ratios with a bootstrap confidence interval over the paired rounds.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from .impls import Impl
from .workloads import Workload, make_inputs


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[int], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn(i)`` over ``repeats`` calls (``i`` rotates the inputs): a plain
    yardstick for the machine peaks and the demo; benchmark rows use ``time_interleaved``."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Step:
    """One run of an implementation on a workload: forward (no grad) or forward+backward,
    rotating between input sets so caches do not flatter repeated calls."""

    def __init__(self, impl: Impl, w: Workload, device, dtype, mode: str, rotate: int = 3):
        self.train = mode == "fwd+bwd"
        self.run = impl.build(w, device, dtype)
        self.sets = [make_inputs(w, device, dtype, seed=s, requires_grad=self.train) for s in range(rotate)]
        self.grads = [t for s in self.sets for t in s.tensors()] + list(getattr(self.run, "parameters", []))
        self.i = 0

    def clear_grads(self):
        for t in self.grads:
            t.grad = None  # no accumulation: every run allocates its gradients afresh

    def __call__(self):
        inputs = self.sets[self.i % len(self.sets)]
        self.i += 1
        if self.train:
            self.clear_grads()
            outs = self.run(inputs, True)
            sum(o.float().mean() for o in outs).backward()
        else:
            with torch.no_grad():
                self.run(inputs, False)


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, *, rounds: int | None,
                     budget_s: float, min_rounds: int, max_rounds: int, block_s: float,
                     log: Callable[[str], None] = lambda s: None) -> tuple[dict, dict]:
    """Per candidate, per round, the timed samples in ms, and per candidate the number of timed
    runs (a CPU block of n runs is one sample, its mean). ``rounds=None`` chooses the number
    of rounds from ``budget_s`` and the warm-up's round time, within [min_rounds, max_rounds]."""
    names = list(steps)
    if device.type == "cuda":
        from triton.testing import do_bench

        def one(name, warm):  # do_bench flushes L2 before every run and times with CUDA events
            kw = dict(warmup=25 if warm else 5, rep=max(1, int(block_s * 1e3)))
            try:
                times = list(do_bench(steps[name], return_mode="all", **kw))
            except (AssertionError, ValueError):  # Triton before "all": its quartiles stand in
                times = list(do_bench(steps[name], quantiles=[0.25, 0.5, 0.75], **kw))
            return times, len(times)
    else:
        from torch.utils.benchmark import Timer

        timers = {n: Timer("step()", globals={"step": steps[n]}, num_threads=torch.get_num_threads()) for n in names}

        def one(name, warm):
            m = timers[name].blocked_autorange(min_run_time=block_s)
            return [t * 1e3 for t in m.times], len(m.times) * m.number_per_run

    t0 = time.perf_counter()
    for n in names:  # warm-up round (compilation, allocator, caches); not recorded
        steps[n]()
        one(n, True)
    round_s = max(time.perf_counter() - t0, 1e-6) / 2
    if rounds is None:
        rounds = max(min_rounds, min(max_rounds, int(budget_s / round_s)))
    log(f"    {rounds} interleaved rounds of {len(names)} candidates (~{round_s:.2f} s per round)")
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    runs = dict.fromkeys(names, 0)
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:  # rotate so no candidate always runs first
            times, count = one(n, False)
            samples[n].append(times)
            runs[n] += count
    return samples, runs


def summarize(samples: list[list[float]], runs: int) -> dict:
    """Median and quartiles of the timed samples (a CPU block counts as its per-run mean)."""
    pooled = sorted(t for s in samples for t in s)
    if len(pooled) >= 2:
        q1, q2, q3 = statistics.quantiles(pooled, n=4, method="inclusive")
    else:
        q1 = q2 = q3 = pooled[0]
    return {"latency_ms": q2, "latency_q1_ms": q1, "latency_q3_ms": q3, "iqr_ms": q3 - q1,
            "runs": runs, "samples": len(pooled), "rounds": len(samples)}


def paired_ratio(base: list[list[float]], cand: list[list[float]], resamples: int = 2000,
                 seed: int = 0) -> dict:
    """Speed-up of ``cand`` over ``base``: the median over rounds of (base round median /
    candidate round median), with a 95 % bootstrap interval resampling the paired rounds."""
    ratios = [statistics.median(b) / statistics.median(c) for b, c in zip(base, cand)]
    est = statistics.median(ratios)
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"ratio": est, "ci_low": boot[int(0.025 * resamples)], "ci_high": boot[int(0.975 * resamples) - 1],
            "rounds": len(ratios)}


def cuda_peak_mib(step: Step, device: torch.device) -> float:
    """Peak allocated memory of one run above what existed before it (inputs, parameters)."""
    step.clear_grads()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_memory(w: Workload, impls: list[str], modes: list[str], dtype: torch.dtype, quick: bool,
                    timeout: float = 600) -> dict:
    """RSS high-water mark of each case above the process's RSS just before the run, measured
    in a fresh subprocess (``crossattn.bench.memory``) per workload: one run to warm up, the
    kernel's peak-RSS counter reset, one measured run. Returns {(impl, mode): MiB or None}
    and, under "error", why nothing was measured."""
    import json
    import sys

    spec = {"workload": w.describe(), "impls": impls, "modes": modes, "dtype": str(dtype)[6:], "quick": quick}
    # Large blocks come from mmap and go back on free: the RSS then follows what is live.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    try:
        res = subprocess.run([sys.executable, "-m", "crossattn.bench.memory", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"memory subprocess timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    out = {}
    for line in res.stdout.splitlines():
        rec = json.loads(line)
        out[(rec["impl"], rec["mode"])] = rec["peak_mib"]
    return out


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


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The project's commit (with ``+dirty`` for uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        # Only a checkout of this project: an installed copy inside some other repository
        # (a venv in a user's project) must not report that repository's commit.
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({_cpu_name()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "crossattn": __import__("crossattn").__version__, "commit": git_commit(),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if on_gpu else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": load_average(), "gpu": on_gpu}
