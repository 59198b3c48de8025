"""CPU peak memory of benchmark cases, run by ``measure.cpu_peak_memory`` in a subprocess:
``python -m crossattn.bench.memory SPEC_JSON`` prints one JSON line per (impl, mode).

Peak = the RSS high-water mark (``VmHWM``) during one run minus the RSS just before it. The
high-water mark is reset through ``/proc/self/clear_refs`` (Linux), after a warm-up run, so
one-off allocations (thread pools, caches) do not count; the parent sets
``MALLOC_MMAP_THRESHOLD_`` so that freed tensors go back to the kernel and the RSS follows
what is live.
"""
from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import torch

from .impls import registry
from .measure import Step
from .workloads import Workload

_STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1))


def peak_mib(step: Step) -> float:
    step()  # warm-up
    step.clear_grads()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - base) / 1024


def main(argv=None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    fields = {k: v for k, v in spec["workload"].items() if k != "D"}
    w = Workload(**fields)
    dtype = getattr(torch, spec["dtype"])
    impls = {i.name: i for i in registry(quick=spec["quick"])}
    device = torch.device("cpu")
    for name in spec["impls"]:
        for mode in spec["modes"]:
            try:
                peak = peak_mib(Step(impls[name], w, device, dtype, mode))
            except Exception as exc:  # noqa: BLE001 -- the timing pass reports the failure itself
                print(f"{name} {mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
                peak = None
            print(json.dumps({"impl": name, "mode": mode, "peak_mib": peak}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
