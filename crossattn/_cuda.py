"""Interface to the CUDA extension (``crossattn._C``, built from ``csrc/``).

The extension registers one op through PyTorch's stable ABI,
``crossattn_cuda::xattn_fwd`` (see ``OP_SCHEMA``): the forward of one or two directions in
one launch, returning ``(out0, lse0, weights0, out1, lse1, weights1)``. This module loads
it, adds its fake implementation (``torch.compile``) and autograd (the backward runs the
Triton backward kernels from the saved LSE), and provides the backend API
(``unsupported``, ``run``).

Loading: ``import crossattn._C`` finds the built library (``pip install`` with a CUDA
PyTorch and nvcc, see csrc/README.md); with ``CROSSATTN_CUDA_JIT=1`` a source checkout is
compiled on first use instead (``torch.utils.cpp_extension.load``, ninja).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ._build_flags import CXX_FLAGS, NVCC_FLAGS, nvcc_arch_flags

OP = "crossattn_cuda::xattn_fwd"
WEIGHTS_MODES = {None: 0, "full": 1, "mean": 2}
MAX_HEAD_DIM = 256
CSRC = Path(__file__).resolve().parent.parent / "csrc"

_state = {"registered": False}


# --------------------------------------------------------------------------- loading
def _op_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(OP, "")
        return True
    except RuntimeError:
        return False


def jit_load(verbose: bool = False) -> None:
    """Compile ``csrc/*.cu`` now and load them (needs a source checkout, nvcc and ninja)."""
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in CSRC.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"CROSSATTN_CUDA_JIT=1 needs the CUDA sources, but {CSRC} has none: "
                           "use a source checkout of crossattn")
    load(name="crossattn_cuda_jit", sources=sources, extra_cflags=CXX_FLAGS,
         extra_cuda_cflags=NVCC_FLAGS + nvcc_arch_flags(), is_python_module=False, verbose=verbose)


def load_extension() -> None:
    """Make ``crossattn_cuda::xattn_fwd`` available and add its Python parts (idempotent)."""
    if not _op_defined():
        spec = importlib.util.find_spec("crossattn._C")
        if spec is not None and spec.origin:
            try:
                torch.ops.load_library(spec.origin)
            except OSError as e:  # e.g. built on a CPU machine, loaded into a CPU-only PyTorch
                raise RuntimeError(f"crossattn._C is built but does not load into this PyTorch "
                                   f"({torch.__version__}, CUDA {torch.version.cuda}): {e}") from e
        elif os.environ.get("CROSSATTN_CUDA_JIT") == "1":
            jit_load()
        else:
            raise RuntimeError("the CUDA extension crossattn._C is not built: " + build_hint())
    register()


def build_hint() -> str:
    return ("reinstall with a CUDA-enabled PyTorch and nvcc present "
            "(CROSSATTN_FORCE_CUDA=1 pip install --no-build-isolation .), or set CROSSATTN_CUDA_JIT=1 "
            "in a source checkout to compile csrc/ on first use")


def register() -> None:
    """Fake implementation and autograd of the op (once per process)."""
    if _state["registered"]:
        return
    torch.library.register_fake(OP)(_fake)
    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
    _state["registered"] = True


# --------------------------------------------------------------------------- fake + autograd
def _fake(q0, k0, v0, qv0, kv0, t0, layout0, dense0, scale0, q1, k1, v1, qv1, kv1, t1, layout1, dense1,
          scale1, weights, block_q, block_k):
    res = []
    for q, k, v in ((q0, k0, v0), (q1, k1, v1)):
        if q is None:
            res += [q0.new_empty(0), q0.new_empty(0, dtype=torch.float32), q0.new_empty(0)]
            continue
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        res += [q.new_empty(B, H, Lq, v.shape[3]), q.new_empty(B, H, Lq, dtype=torch.float32),
                q.new_empty((B, Lq, Lk) if weights == 2 else (B, H, Lq, Lk) if weights == 1 else (0,))]
    return tuple(res)


_DIR_ARGS = ("q", "k", "v", "qv", "kv", "t", "layout", "dense", "scale")


def _split(inputs):
    """The op's flat arguments as two per-direction dicts and the shared tail."""
    n = len(_DIR_ARGS)
    d0 = dict(zip(_DIR_ARGS, inputs[:n]))
    d1 = dict(zip(_DIR_ARGS, inputs[n:2 * n]))
    weights, block_q, block_k = inputs[2 * n:]
    dirs = [d0] if d1["q"] is None else [d0, d1]
    return dirs, weights, block_q, block_k


_SAVED = ("q", "k", "v", "qv", "kv", "t", "layout", "dense")


def _setup_context(ctx, inputs, output):
    dirs, weights, block_q, block_k = _split(inputs)
    ctx.ndir, ctx.weights, ctx.block = len(dirs), weights, (block_q, block_k)
    ctx.scale = [d["scale"] for d in dirs]
    ctx.present = [[d[name] is not None for name in _SAVED] for d in dirs]
    saved = []
    for i, d in enumerate(dirs):
        saved += [d[name] for name in _SAVED if d[name] is not None]
        saved += [output[3 * i], output[3 * i + 1]]  # out, lse
    ctx.save_for_backward(*saved)


def _backward(ctx, dout0, dlse0, dw0, dout1, dlse1, dw1):
    from crossattn.kernels.xattn import stats_from_lse, xattn_bwd

    saved = list(ctx.saved_tensors)
    dirs, outs, lses = [], [], []
    for present in ctx.present:
        d = {}
        for name, has in zip(_SAVED, present):
            d[name] = saved.pop(0) if has else None
        dirs.append(d)
        outs.append(saved.pop(0))
        lses.append(saved.pop(0))
    douts = [dout0, dout1][: ctx.ndir]
    douts = [g if g is not None else torch.zeros_like(o) for g, o in zip(douts, outs)]
    dws = [None] * ctx.ndir
    if ctx.weights:
        given = [dw0, dw1][: ctx.ndir]
        if any(g is not None for g in given):
            mean = ctx.weights == 2
            dws = [g if g is not None else d["q"].new_zeros(
                (d["q"].shape[0],) + (() if mean else (d["q"].shape[1],)) + (d["q"].shape[2], d["k"].shape[2]))
                for g, d in zip(given, dirs)]
    masks = [None if d["dense"] is None else d["dense"].view(torch.bool) if d["dense"].dtype == torch.uint8
             else d["dense"] for d in dirs]
    dq, dk, dv, dt, _ = xattn_bwd(
        douts, dws, [d["q"] for d in dirs], [d["k"] for d in dirs], [d["v"] for d in dirs], outs,
        [stats_from_lse(lse) for lse in lses],
        [None if d["qv"] is None else d["qv"].bool() for d in dirs],
        [None if d["kv"] is None else d["kv"].bool() for d in dirs],
        [d["t"] for d in dirs], ctx.scale, None, 0.0, ctx.weights, masks,
        [d["layout"] for d in dirs], *ctx.block, [None] * ctx.ndir, False, False, [], [None] * ctx.ndir,
        [None] * ctx.ndir, [None] * ctx.ndir)  # no statistics (return_aux) on this backend
    grads = []
    for i in range(2):
        if i < ctx.ndir:
            t_grad = dt[i].to(dirs[i]["t"].dtype) if dirs[i]["t"] is not None else None
            grads += [dq[i], dk[i], dv[i], None, None, t_grad, None, None, None]
        else:
            grads += [None] * len(_DIR_ARGS)
    return tuple(grads) + (None, None, None)


# --------------------------------------------------------------------------- backend API
def unsupported(problem) -> str | None:
    B, H, Lq, Lk, D, Dv = problem.dims
    if problem.q.dtype not in (torch.float16, torch.bfloat16):
        return (f"the CUDA kernels take float16/bfloat16 (tensor cores), got {problem.q.dtype}; "
                "float32 runs on backend='triton' or 'torch'")
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}"
    if problem.dropout_p > 0:
        return "dropout is not implemented in the CUDA kernels (an inference backend); use backend='triton'"
    if problem.q.is_cuda and torch.cuda.get_device_capability(problem.q.device) < (8, 0):
        return "the CUDA kernels need compute capability 8.0 or newer (bfloat16/fp16 WMMA)"
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and isinstance(t, torch.Tensor) and t.requires_grad
        for t in (problem.q, problem.k, problem.v, problem.temperature))
    no_triton = importlib.util.find_spec("triton") is None
    if needs_grad and no_triton:
        return "the CUDA backend's backward runs the Triton kernels, and Triton is not installed"
    if problem.pruning is not None and no_triton:
        return "pruning selects its blocks with the Triton selection kernel, and Triton is not installed"
    return None


def _temperature(t, H, device):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=torch.float32).reshape(-1).expand(H).contiguous()
    return torch.full((H,), float(t), device=device, dtype=torch.float32)


def _pruning(problems):
    """(dense uint8 masks, compact layouts, block_q, block_k): both directions or neither."""
    from crossattn.kernels.xattn import _pruning_args
    from crossattn.kernels.xattn_select import compact

    masks, layouts, block_q, block_k = _pruning_args(problems)
    if all(m is None for m in masks):
        return [None] * len(problems), [None] * len(problems), 0, 0
    dense, lays = [], []
    for m, lay, p in zip(masks, layouts, problems):
        B, H, Lq, Lk, _, _ = p.dims
        nqb, nkb = -(-Lq // block_q), -(-Lk // block_k)
        if m is None:
            m = torch.ones(1, 1, nqb, nkb, device=p.q.device, dtype=torch.bool)
            lay = compact(m, B, H)
        dense.append(m.expand(B, H, nqb, nkb).contiguous().view(torch.uint8))
        lays.append(lay)
    return dense, lays, block_q, block_k


def run(problems):
    """One or two directions in one launch per pass: ``(outs, weights)`` lists."""
    load_extension()
    first = problems[0]
    H = first.q.shape[1]
    dense, layouts, block_q, block_k = _pruning(problems)
    args = []
    for i in range(2):
        if i < len(problems):
            p = problems[i]
            qv, kv = p.query_valid(), p.key_valid()
            args += [p.q, p.k, p.v,
                     None if qv is None else qv.to(torch.uint8).contiguous(),
                     None if kv is None else kv.to(torch.uint8).contiguous(),
                     _temperature(p.temperature, H, p.q.device), layouts[i], dense[i], float(p.scale)]
        else:
            args += [None] * 8 + [1.0]
    res = torch.ops.crossattn_cuda.xattn_fwd(*args, WEIGHTS_MODES[first.need_weights], block_q, block_k)
    outs = [res[0], res[3]][: len(problems)]
    weights = [res[2], res[5]][: len(problems)] if first.need_weights else [None] * len(problems)
    return outs, weights

