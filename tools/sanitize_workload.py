"""A tiny workload for ``compute-sanitizer --tool memcheck`` (tools/gpu_session.sh, phase 4):
every kernel of each fused backend available here (Triton; the CUDA extension when built),
both directions, padding with ragged lengths, odd sizes, pruning, weights and the backward.

    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/sanitize_workload.py
    python tools/sanitize_workload.py --tiny    # CPU: the same calls under the Triton interpreter
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import crossattn  # noqa: E402


def workload(backend: str, device: str, dtype: torch.dtype, dims, need_grad: bool) -> None:
    g = torch.Generator().manual_seed(0)
    B, H, Lx, Ly = 2, 2, 37, 101

    def r(L, D):
        return torch.randn(B, H, L, D, generator=g).to(device, dtype).requires_grad_(need_grad)

    lengths = torch.tensor([[Ly], [60]])
    ym = (torch.arange(Ly)[None, :] >= lengths).to(device)
    for D in dims:
        qx, kx, vx, qy, ky, vy = r(Lx, D), r(Lx, D), r(Lx, D), r(Ly, D), r(Ly, D), r(Ly, D)
        for prune in (None, crossattn.BlockPruning(block_q=16, block_k=32, keep=0.5)):
            for w in (None, "full", "mean"):
                res = crossattn.bidirectional_cross_attention(qx, kx, vx, qy, ky, vy, y_padding_mask=ym,
                                                              prune=prune, need_weights=w, backend=backend)
                if need_grad:
                    sum(t.float().square().sum() for t in res if t is not None).backward()


def main(argv: list[str]) -> int:
    tiny = "--tiny" in argv
    device = "cpu" if tiny else "cuda"
    backends = [name for name in ("triton", "cuda") if crossattn.available_backends()[name] is None]
    if not backends:
        print(f"no fused backend available: {crossattn.available_backends()}")
        return 1
    # bf16 tl.dot is wrong under the interpreter (and refused there): fp16/fp32 on the CPU.
    dtypes = (torch.float32,) if tiny else (torch.float16, torch.bfloat16)
    dims = (16,) if tiny else (64, 128)
    for backend in backends:
        for dtype in dtypes:
            # The CUDA extension's backward runs the Triton kernels: forward only for it.
            workload(backend, device, dtype, dims, need_grad=backend == "triton")
            print(f"sanitize workload: {backend} {str(dtype)[6:]} done", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
