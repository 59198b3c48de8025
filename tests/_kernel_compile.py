"""Compile the Triton kernels for NVIDIA targets without a GPU (Triton ships ptxas).

Used by tests/test_kernels_compile.py; also runnable as a script to print a survey:
    python tests/_kernel_compile.py
"""
from __future__ import annotations

import os

POINTER_ARGS = {
    "Q": "data", "K": "data", "V": "data", "O": "data", "W": "data", "DW": "data", "DO": "data",
    "DQ": "data", "DK": "data", "DVG": "data",
    "M": "fp32", "R": "fp32", "T": "fp32", "DELTA": "fp32", "DT": "fp32", "OP": "fp32", "MP": "fp32",
    "RP": "fp32", "QV": "u8", "KV": "u8", "BM": "i32", "LT": "i32", "SEED": "i64",
    # selection kernels
    "X": "data", "VALID": "u8", "MEAN": "fp32", "COUNT": "fp32", "PQ": "fp32", "PQN": "fp32",
    "PK": "fp32", "PKN": "fp32", "SCORES": "fp32", "NKEEP": "i32", "MASK": "u8", "LAYOUT": "i32",
}
STRIDE_ARGS = {"sq", "sk", "sv"}
# The weights pass tests the dense kept-bit mask; the other passes walk the compact layout.
DENSE_MASK_KERNELS = {"_xattn_weights_kernel"}
FLOAT_ARGS = {"scale", "drop_scale", "mass"}
INT64_ARGS = {"drop_threshold"}
TRITON_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _tuple_fields(kernel, base):
    """Field names of a per-direction tuple argument (kernels/xattn_fwd.py, xattn_bwd.py)."""
    from crossattn.kernels import xattn_bwd, xattn_fwd

    if base == "dir":
        return xattn_fwd.PROBLEM
    if base == "g":
        return xattn_bwd.GRAD
    if base == "part":
        return ("OP", "MP", "RP", "O", "M", "R", "Lq", "DV")
    if base == "res":
        return ("W", "M", "R", "nkb") if kernel.fn.__name__ in DENSE_MASK_KERNELS else ("O", "M", "R")
    return None


def _arg_type(kernel, name: str, dtype: str):
    base = name.rstrip("01")
    fields = _tuple_fields(kernel, base)
    if fields is not None:
        return tuple(_arg_type(kernel, f, dtype) for f in fields)
    if base in STRIDE_ARGS:
        return ("i32",) * 4
    if base in POINTER_ARGS:
        kind = POINTER_ARGS[base]
        if base == "BM" and kernel.fn.__name__ in DENSE_MASK_KERNELS:
            kind = "u8"
        return "*" + (TRITON_DTYPE[dtype] if kind == "data" else kind)
    if base in FLOAT_ARGS:
        return "fp32"
    if base in INT64_ARGS:
        return "i64"
    return "i32"


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    return {name: "constexpr" if name in constexprs else _arg_type(kernel, name, dtype)
            for name in kernel.arg_names}


def kernel_variants(dtype: str, d: int):
    """(name, kernel, constexprs, launch options) for every kernel at head dim ``d`` with the
    config the launcher picks and every optional feature switched on (the worst case)."""
    import torch

    from crossattn.kernels import xattn, xattn_bwd, xattn_fwd, xattn_select

    bd = xattn._block_dim(d)
    prec = "ieee" if dtype == "float32" else "tf32"
    flags = dict(HAS_QV=True, HAS_KV=True, HAS_T=True, PRUNE=True)
    for kind in ("fwd", "bwd"):
        cfg = xattn._config(d, d, getattr(torch, dtype), kind)
        blocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bd, PREC=prec)
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if kind == "fwd":
            for split in (False, True):
                yield (f"fwd{'_split' if split else ''}", xattn_fwd._xattn_fwd_kernel,
                       dict(flags, DROPOUT=True, SPLIT=split, **blocks), opts)
            yield ("combine", xattn_fwd._xattn_fwd_combine_kernel,
                   dict(BLOCK_M=cfg.block_m, BLOCK_DV=bd), dict(num_warps=cfg.num_warps))
            wblocks = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, PREC=prec)
            for mean in (False, True):
                yield (f"weights_{'mean' if mean else 'full'}", xattn_fwd._xattn_weights_kernel,
                       dict(MEAN=mean, **flags, **wblocks), opts)
        else:
            yield ("bwd_delta", xattn_bwd._xattn_bwd_delta_kernel,
                   dict(HAS_DW=True, MEAN=False, **flags, **blocks), opts)
            for name, kernel in (("bwd_dkdv", xattn_bwd._xattn_bwd_dkdv_kernel),
                                 ("bwd_dq", xattn_bwd._xattn_bwd_dq_kernel)):
                yield name, kernel, dict(HAS_DW=True, MEAN=False, **flags, DROPOUT=True, **blocks), opts
    # Block selection (launched with fixed block shapes and the default warps).
    yield ("select_pool", xattn_select._xattn_pool_kernel,
           dict(HAS_VALID=True, BLOCK_R=64, BLOCK_D=bd), {})
    yield ("select_rank", xattn_select._xattn_select_kernel,
           dict(MASS=True, HAS_T=True, BLOCK_J=64, BLOCK_I=32, BLOCK_D=bd), {})
    yield ("select_compact", xattn_select._xattn_blocks_compact_kernel, dict(BLOCK_C=256), {})


def compile_kernel(kernel, dtype: str, constexprs: dict, options: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, signature(kernel, dtype, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _job(job):
    arch, dtype, d, name = job
    variant = next(v for v in kernel_variants(dtype, d) if v[0] == name)
    compiled = compile_kernel(variant[1], dtype, variant[2], variant[3], arch)
    return {"arch": arch, "dtype": dtype, "d": d, "kernel": name, "shared": compiled.metadata.shared}


def survey(jobs, workers: int = 2):
    """Compile every job (arch, dtype, head dim, kernel name) in worker processes."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_job, jobs))


def default_jobs():
    names = [v[0] for v in kernel_variants("float16", 64)]
    jobs = [(86, dt, d, n) for dt in ("float16", "float32") for d in (64, 128, 256) for n in names]
    jobs += [(86, "bfloat16", 128, n) for n in names]
    jobs += [(90, "float16", 128, n) for n in names]  # Hopper codegen
    return jobs


if __name__ == "__main__":
    import json
    import sys

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = survey(default_jobs())
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"sm_{r['arch']} {r['dtype']:8s} d={r['d']:3d} {r['kernel']:14s} shared={r['shared']:6d}")
