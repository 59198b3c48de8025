"""The ``cuda`` backend: CUDA C++ kernels from ``csrc/`` (the ``crossattn._C`` extension, or
a JIT build with ``CROSSATTN_CUDA_JIT=1``), driven by ``crossattn._cuda``.

``crossattn._cuda`` provides ``unsupported(problem)`` and ``run(problems)``; this wrapper adds the checks that need neither the extension nor
a GPU.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .._validation import AttentionProblem
from .base import ModuleBackend


class CudaBackend(ModuleBackend):
    name = "cuda"
    module_name = "crossattn._cuda"

    def unavailable(self) -> str | None:
        from .._cuda import build_hint

        reasons = []
        if importlib.util.find_spec("crossattn._C") is None and os.environ.get("CROSSATTN_CUDA_JIT") != "1":
            reasons.append(f"the CUDA extension crossattn._C is not built ({build_hint()})")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return "; ".join(reasons) or None

    def device_unsupported(self, problem: AttentionProblem) -> str | None:
        if problem.q.device.type != "cuda":
            return f"inputs are on {problem.q.device}; the CUDA kernels need CUDA tensors"
        return None
