"""What every backend declares (xFormers style): whether it can run here at all, whether it
supports a given problem, and the computation itself. The dispatcher reports both reasons."""
from __future__ import annotations

import importlib

import torch

from .._validation import AttentionProblem

# Options a backend may not serve yet: name -> how the problem uses it. A module backend lists
# the ones it serves in its module's ``FEATURES``; any other one in use rejects the problem
# (``auto`` moves on, ``choose_backend`` reports why) -- never a silent fallback or an
# ignored argument.
OPTIONAL_FEATURES = {
    "gqa": lambda p: p.kv_heads != p.q.shape[1],
    "attn_bias": lambda p: p.attn_bias is not None,
    "is_causal": lambda p: p.is_causal,
    "weight_heads": lambda p: p.weight_heads is not None,
    "aux_lse": lambda p: p.aux is not None and p.aux.lse,
    "aux_entropy": lambda p: p.aux is not None and p.aux.entropy,
    "aux_key_mass": lambda p: p.aux is not None and p.aux.key_mass,
    "aux_top_k": lambda p: p.aux is not None and p.aux.top_k > 0,
}
_FEATURE_TEXT = {
    "gqa": "grouped-query heads (k/v with fewer heads than q)",
    "attn_bias": "attn_bias",
    "is_causal": "is_causal",
    "weight_heads": "weight_heads",
    "aux_lse": "return_aux lse",
    "aux_entropy": "return_aux entropy",
    "aux_key_mass": "return_aux key_mass",
    "aux_top_k": "return_aux top_k",
}


def unsupported_features(problem: AttentionProblem, supported, backend: str) -> str | None:
    """Why ``backend`` (serving the option names in ``supported``) cannot take ``problem``."""
    missing = [_FEATURE_TEXT[n] for n, used in OPTIONAL_FEATURES.items() if n not in supported and used(problem)]
    if missing:
        return f"the {backend} backend does not support {', '.join(missing)} yet"
    return None


class Backend:
    name: str = ""

    def unavailable(self) -> str | None:
        """Why this backend cannot run in this process (and how to fix it), or None."""
        raise NotImplementedError

    def unsupported(self, problem: AttentionProblem) -> str | None:
        """Why this backend cannot compute ``problem``, or None."""
        raise NotImplementedError

    def attention(self, problem: AttentionProblem):
        """``(out [B, H, Lq, Dv], weights or None, AuxOutput or None)``."""
        raise NotImplementedError

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        """``(out_x, out_y, weights_xy, weights_yx, aux_xy, aux_yx)``. Kernel backends override
        this to run both directions in one launch; the default runs them one after the other."""
        out_x, w_xy, a_xy = self.attention(xy)
        out_y, w_yx, a_yx = self.attention(yx)
        return out_x, out_y, w_xy, w_yx, a_xy, a_yx


class ModuleBackend(Backend):
    """A backend whose computation lives in a separately built module (Triton kernels, the
    CUDA extension) exposing ``unsupported(problem)``, ``run(problems)`` (one or two
    directions in one launch -> ``(outs, weights)`` or ``(outs, weights, auxes)`` lists) and
    ``FEATURES``, the names of :data:`OPTIONAL_FEATURES` it serves; the module is imported on
    first use."""

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
        why = self.device_unsupported(problem)
        if why:
            return why
        module = self._module()
        return (unsupported_features(problem, getattr(module, "FEATURES", ()), self.name)
                or module.unsupported(problem))

    def _run(self, problems):
        result = self._module().run(problems)
        outs, weights = result[0], result[1]
        auxes = result[2] if len(result) > 2 else [None] * len(problems)
        return outs, weights, auxes

    def attention(self, problem: AttentionProblem):
        outs, weights, auxes = self._run([problem])
        return outs[0], weights[0], auxes[0]

    def bidirectional(self, xy: AttentionProblem, yx: AttentionProblem):
        (out_x, out_y), (w_xy, w_yx), (a_xy, a_yx) = self._run([xy, yx])
        return out_x, out_y, w_xy, w_yx, a_xy, a_yx
