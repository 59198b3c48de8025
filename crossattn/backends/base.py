"""What every backend declares (xFormers style): whether it can run here at all, whether it
supports a given problem, and the computation itself. The dispatcher reports both reasons."""
from __future__ import annotations

import importlib

import torch

from .._validation import AttentionProblem


class Backend:
    name: str = ""

    def unavailable(self) -> str | None:
        """Why this backend cannot run in this process (and how to fix it), or None."""
        raise NotImplementedError

    def unsupported(self, problem: AttentionProblem) -> str | None:
        """Why this backend cannot compute ``problem``, or None."""
        raise NotImplementedError

    def attention(self, problem: AttentionProblem):
        """``(out [B, H, Lq, Dv], weights or None)``."""
        raise NotImplementedError

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        """``(out_x, out_y, weights_xy, weights_yx)``. Kernel backends override this to run
        both directions in one launch; the default runs them one after the other."""
        out_x, w_xy = self.attention(xy)
        out_y, w_yx = self.attention(yx)
        return out_x, out_y, w_xy, w_yx


class ModuleBackend(Backend):
    """A backend whose computation lives in a separately built module (Triton kernels, the
    CUDA extension) exposing ``unsupported(problem)`` and ``run(problems)`` (one or two
    directions in one launch -> ``(outs, weights)`` lists); the module is imported on first
    use."""

    module_name: str = ""
    _loaded = None

    def _module(self):
        # Cached: torch.compile cannot trace import_module, only the attribute read.
        if self._loaded is None:
            self._loaded = importlib.import_module(self.module_name)
        return self._loaded

    def device_unsupported(self, problem: AttentionProblem) -> str | None:
        """Checks that do not need the module (dtype, device)."""
        raise NotImplementedError

    def unsupported(self, problem: AttentionProblem) -> str | None:
        if problem.q.dtype == torch.float64:
            return "float64 is supported by the torch backend only"
        return self.device_unsupported(problem) or self._module().unsupported(problem)

    def attention(self, problem: AttentionProblem):
        outs, weights = self._module().run([problem])
        return outs[0], weights[0]

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        (out_x, out_y), (w_xy, w_yx) = self._module().run([xy, yx])
        return out_x, out_y, w_xy, w_yx
