"""The ``cuda`` backend: CUDA C++ kernels from ``csrc/``, built into ``crossattn._C``.

The extension provides ``unsupported(problem)``, ``attention(problem)`` and
``bidirectional(xy, yx)``; this wrapper adds the checks that do not depend on it.
"""
from __future__ import annotations

import importlib.util

import torch

from .._validation import AttentionProblem
from .base import ModuleBackend

BUILD_HINT = (
    "reinstall on a machine with a CUDA-enabled PyTorch and nvcc: "
    "CROSSATTN_FORCE_CUDA=1 pip install --no-build-isolation ."
)


class CudaBackend(ModuleBackend):
    name = "cuda"
    module_name = "crossattn._C"

    def unavailable(self) -> str | None:
        reasons = []
        if importlib.util.find_spec(self.module_name) is None:
            reasons.append(f"the CUDA extension {self.module_name} is not built ({BUILD_HINT})")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return "; ".join(reasons) or None

    def device_unsupported(self, problem: AttentionProblem) -> str | None:
        if problem.q.device.type != "cuda":
            return f"inputs are on {problem.q.device}; the CUDA kernels need CUDA tensors"
        return None
