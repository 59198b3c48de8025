"""The ``triton`` backend: fused kernels from ``crossattn.kernels`` (the top-level ``kernels/``
folder of the source tree).

The kernels module ``crossattn.kernels.xattn`` provides ``unsupported(problem)``,
``attention(problem)`` and ``bidirectional(xy, yx)``; this wrapper adds the checks that do
not depend on the kernels: Triton installed, a CUDA device or the interpreter, dtypes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .._validation import AttentionProblem
from .base import Backend

KERNELS_MODULE = "crossattn.kernels.xattn"


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"

    def unavailable(self) -> str | None:
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("Triton is not installed (pip install triton; Linux only)")
        if importlib.util.find_spec(KERNELS_MODULE) is None:
            reasons.append(f"this build of crossattn has no Triton kernels ({KERNELS_MODULE} is missing)")
        if not torch.cuda.is_available() and not interpreting():
            reasons.append(
                "no CUDA device; to run the kernels on the CPU set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        return "; ".join(reasons) or None

    def _kernels(self):
        return importlib.import_module(KERNELS_MODULE)

    def unsupported(self, problem: AttentionProblem) -> str | None:
        q = problem.q
        if q.dtype == torch.float64:
            return "float64 is supported by the torch backend only"
        if q.device.type != "cuda" and not interpreting():
            return f"inputs are on {q.device}; the Triton kernels need CUDA tensors"
        return self._kernels().unsupported(problem)

    def attention(self, problem: AttentionProblem):
        return self._kernels().attention(problem)

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        return self._kernels().bidirectional(xy, yx)
