"""What every backend declares (xFormers style): whether it can run here at all, whether it
supports a given problem, and the computation itself. The dispatcher reports both reasons."""
from __future__ import annotations

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
