"""pytest-benchmark suite: the bidirectional layer and the attention core, forward and
forward+backward, with and without weights, dense and pruned, against eager and SDPA.

    python -m pytest benchmarks --benchmark-enable          # measure
    python -m pytest benchmarks                             # CI: one run each (smoke test)

The timed function synchronises the device; ``extra_info`` carries the attention TFLOP/s,
the weights bandwidth and (on a GPU) the peak memory above the inputs.
"""
from __future__ import annotations

import pytest
import torch

from crossattn.bench.impls import registry
from crossattn.bench.measure import environment, sync
from crossattn.bench.workloads import Workload, make_inputs

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
NAMES = ["eager (seed 000)", "sdpa"] + [
    f"crossattn[{b}] {v}" for b in ("torch", "triton")
    for v in ("weights=off", "weights=mean", "weights=full", "prune keep=0.25")
]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: w.name)
def test_attention(benchmark, workload, name, mode):
    impl = IMPLS[name]
    reason = impl.why_not(workload, DEVICE, DTYPE)
    if reason:
        pytest.skip(reason)
    train = mode == "fwd+bwd"
    run = impl.build(workload, DEVICE, DTYPE)
    sets = [make_inputs(workload, DEVICE, DTYPE, seed=s, requires_grad=train) for s in range(3)]
    state = {"i": 0}

    def step():
        inputs = sets[state["i"] % len(sets)]
        state["i"] += 1
        if train:
            sum(o.float().mean() for o in run(inputs, True)).backward()
        else:
            with torch.no_grad():
                run(inputs, False)
        sync(DEVICE)

    step()  # warm-up (compilation, caches)
    peak = None
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark(step)
    info = {"device": environment(DEVICE)["device"], "dtype": str(DTYPE), **workload.describe(),
            "peak_mem_mib": peak}
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        seconds = stats.stats.median
        info["attention_tflops"] = workload.attention_flops() * (3.5 if train else 1) / seconds / 1e12
    benchmark.extra_info.update(info)
