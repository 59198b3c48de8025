"""pytest-benchmark suite: the seed layers and the attention core, forward and
forward+backward, with and without weights, dense and pruned, against eager and SDPA.

    python -m pytest benchmarks --benchmark-enable          # measure
    python -m pytest benchmarks                             # CI: one run each (smoke test)

For ratios with confidence intervals, interleaved in one process, use ``crossattn-bench``;
this suite gives pytest-benchmark's per-case statistics. The timed function synchronises the
device; ``extra_info`` carries the workload, dtype, device, versions and commit, the
attention TFLOP/s and (on a GPU) the peak memory above the inputs.
"""
from __future__ import annotations

import pytest
import torch

from crossattn.bench.impls import registry
from crossattn.bench.measure import Step, cuda_peak_mib, environment, sync
from crossattn.bench.workloads import Workload

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
WORKLOADS = (
    [Workload("seed000", 4, 512, 1000, 768, 8), Workload("long_audio", 2, 128, 16000, 768, 8),
     Workload("compute_bound", 2, 8192, 8192, 2048, 16, kind="core")]
    if ON_GPU else
    [Workload("seed000_small", 2, 64, 400, 256, 4), Workload("core_small", 1, 256, 256, 256, 4, kind="core")]
)
IMPLS = {impl.name: impl for impl in registry(quick=not ON_GPU)}
NAMES = ["eager", "sdpa"] + [
    f"crossattn[{b}] {v}" for b in ("torch", "triton")
    for v in ("weights=off", "weights=mean", "weights=full", "prune keep=0.25")
]
ENV = environment(DEVICE)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_attention(benchmark, workload, name, mode):
    impl = IMPLS[name]
    reason = impl.why_not(workload, DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    step = Step(impl, workload, DEVICE, DTYPE, mode)

    def timed():
        step()
        sync(DEVICE)

    timed()  # warm-up (compilation, caches)
    peak = cuda_peak_mib(step, DEVICE) if ON_GPU else None
    benchmark(timed)
    info = {k: ENV[k] for k in ("device", "torch", "triton", "commit")}
    info.update(dtype=str(DTYPE)[6:], workload=workload.title(), peak_mem_mib=peak, **workload.describe())
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        flops = workload.attention_flops() * (3.5 if mode == "fwd+bwd" else 1)
        info["attention_tflops"] = flops / stats.stats.median / 1e12
    benchmark.extra_info.update(info)
