"""The ``triton`` backend: fused kernels from ``crossattn.kernels`` (the top-level ``kernels/``
folder of the source tree).

The kernels module ``crossattn.kernels.xattn`` provides ``unsupported(problem)`` and
``run(problems)``; this wrapper adds the checks that do
not depend on the kernels: Triton installed, a CUDA device or the interpreter, dtypes.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .._validation import AttentionProblem
from .base import ModuleBackend


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(ModuleBackend):
    name = "triton"
    module_name = "crossattn.kernels.xattn"

    def unavailable(self) -> str | None:
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("Triton is not installed (a CUDA build of torch brings it; to run the kernels on a CPU: "
                           "pip install 'crossattn[interpreter]')")
        try:  # find_spec of a dotted name raises when its parent package is missing
            missing = importlib.util.find_spec(self.module_name) is None
        except ModuleNotFoundError:
            missing = True
        if missing:
            reasons.append(f"this build of crossattn has no Triton kernels ({self.module_name} is missing)")
        if not torch.cuda.is_available() and not interpreting():
            reasons.append(
                "no CUDA device; to run the kernels on the CPU set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        return "; ".join(reasons) or None

    def device_unsupported(self, problem: AttentionProblem) -> str | None:
        device = problem.q.device
        if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
            return f"inputs are on {device}; the Triton kernels need CUDA tensors"
        return None
