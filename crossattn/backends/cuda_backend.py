"""The ``cuda`` backend: CUDA C++ kernels from ``csrc/``, built into ``crossattn._C``.

The extension module provides ``unsupported(problem)``, ``attention(problem)`` and
``bidirectional(xy, yx)`` through ``crossattn._C``'s Python side; this wrapper adds the checks
that do not depend on it.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from .._validation import AttentionProblem
from .base import Backend

EXTENSION_MODULE = "crossattn._C"
BUILD_HINT = (
    "reinstall on a machine with a CUDA-enabled PyTorch and nvcc: "
    "CROSSATTN_FORCE_CUDA=1 pip install --no-build-isolation ."
)


class CudaBackend(Backend):
    name = "cuda"

    def unavailable(self) -> str | None:
        reasons = []
        if importlib.util.find_spec(EXTENSION_MODULE) is None:
            reasons.append(f"the CUDA extension {EXTENSION_MODULE} is not built ({BUILD_HINT})")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        return "; ".join(reasons) or None

    def _ext(self):
        return importlib.import_module(EXTENSION_MODULE)

    def unsupported(self, problem: AttentionProblem) -> str | None:
        q = problem.q
        if q.dtype == torch.float64:
            return "float64 is supported by the torch backend only"
        if q.device.type != "cuda":
            return f"inputs are on {q.device}; the CUDA kernels need CUDA tensors"
        return self._ext().unsupported(problem)

    def attention(self, problem: AttentionProblem):
        return self._ext().attention(problem)

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        return self._ext().bidirectional(xy, yx)
