"""Compile the Triton kernels for NVIDIA targets without a GPU (Triton ships ptxas) and read
ptxas's resource report: registers, spills, shared memory, occupancy.

The kernel configurations are not written down here: they are *recorded* from the launchers.
A capture process runs the public API at tiny sizes under the Triton interpreter with the
launchers' GPU configs (``xattn._config`` as on a GPU), and ``record_launches`` notes every
kernel launch (kernel, argument types, constexprs, num_warps/num_stages). A compile process
(no interpreter) then specialises each recorded launch exactly as Triton's JIT would
(Triton's own argument specialisation: types, 16-byte divisibility) and compiles it per
architecture. Kernel argument lists can change without touching this file.

    python tests/_kernel_compile.py [--full | --archs 86,90 --dtypes float16 --dims 128 --features all]
                                    [--json | --markdown]

Used by tests/test_kernels_compile.py; ``--markdown`` prints the table of benchmarks/README.md.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 86, 89, 90)
HEAD_DIMS = (64, 96, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")
FEATURES = ("plain", "all")
KERNEL_MODULES = ("crossattn.kernels.xattn_fwd", "crossattn.kernels.xattn_bwd", "crossattn.kernels.xattn_select",
                  "crossattn.kernels.xattn_stats")
# sm_86/sm_89 (RTX 3060/4080 class): per SM 64 K registers, 48 warps, 16 blocks, 100 KB of
# shared memory (99 KB per block, 1 KB reserved per block).
SM86 = dict(regs=65536, warps=48, blocks=16, smem=100 * 1024, smem_block=99 * 1024, reserved=1024)


# ----------------------------------------------------------------------------- recording
@contextlib.contextmanager
def record_launches():
    """Every Triton kernel launch of crossattn inside the block, as dicts
    ``{"module", "kernel", "args": {name: value or {"tensor": dtype, "aligned": bool}}, "options"}``;
    the launches still run (interpreter or GPU)."""
    from triton.runtime.jit import KernelInterface

    launches, patched = [], []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for attr, kernel in vars(mod).items():
            # A kernel imported into several modules is wrapped once.
            if isinstance(kernel, KernelInterface) and all(kernel is not k for k, _ in patched):
                names = list(inspect.signature(kernel.fn).parameters)
                kernel.run = _recording_run(kernel, kernel.run, names, mod_name, attr, launches)
                patched.append((kernel, attr))
    try:
        yield launches
    finally:
        for kernel, _ in patched:
            del kernel.run  # the class's run again


def _recording_run(kernel, run, names, module, attr, launches):
    def wrapper(*args, grid, warmup, **kwargs):
        bound = dict(zip(names, args))
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound.update({k: v for k, v in kwargs.items() if k in names})
        launches.append({"module": module, "kernel": attr, "args": {k: _describe(v) for k, v in bound.items()},
                         "options": options})
        return run(*args, grid=grid, warmup=warmup, **kwargs)
    return wrapper


def _describe(value):
    if isinstance(value, tuple):  # a tuple argument (per-direction pointers, strides, lengths)
        return [_describe(v) for v in value]
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    return value


# ----------------------------------------------------------------------------- capture
def capture(dtype: str, d: int, features: str) -> list[dict]:
    """The distinct launches (forward, weights, backward, selection) the launchers make for head
    dim ``d``: ``features="plain"`` (no option) or ``"all"`` (padding both sides, per-head
    temperature, dropout, pruning, weights full and mean with a loss on them), each with and
    without the key split. Runs under the interpreter with the GPU configs."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import crossattn
    from crossattn.kernels import xattn, xattn_configs

    if not isinstance(xattn._xattn_fwd_kernel, InterpretedFunction):
        raise RuntimeError("capture() needs a process where triton was first imported with TRITON_INTERPRET=1")
    xattn_configs.interpreting = lambda: False  # the launch configs a GPU gets (unsupported() unaffected)
    # bf16 has fp16's configs (by element size); the interpreter's bf16 dot is refused.
    tdtype = getattr(torch, "float16" if dtype == "bfloat16" else dtype)
    g = torch.Generator().manual_seed(0)
    B, H, Lx, Ly = 1, 2, 70, 135

    def r(L):
        return torch.randn(B, H, L, d, generator=g).to(tdtype).requires_grad_(True)

    calls = []
    if features == "plain":  # both directions in one launch, and one direction (BIDIR=False)
        calls += [dict(need_weights=False), dict(need_weights=False, single=True)]
    else:
        opts = dict(x_padding_mask=torch.arange(Lx)[None] >= 50, y_padding_mask=torch.arange(Ly)[None] >= 99,
                    temperature=torch.tensor([0.7, 1.3], requires_grad=True), dropout_p=0.3,
                    prune=crossattn.BlockPruning(block_q=64, block_k=64, keep=0.5))
        calls += [dict(opts, need_weights="full"), dict(opts, need_weights="mean")]
        # The options one direction takes on top: grouped kv heads, a learnable bias, causality,
        # ragged lengths, a head subset for the weights, every statistic (return_aux, k = 16).
        calls.append(dict(opts, need_weights="full", single=True, ragged=True, is_causal=True, weight_heads=(1,),
                          attn_bias=torch.randn(1, H, 1, Ly, generator=g, requires_grad=True),
                          return_aux=crossattn.AuxRequest(lse=True, entropy=True, key_mass=True, top_k=16)))
    seen = {}
    for splits in ("1", "2"):
        os.environ["CROSSATTN_TRITON_SPLITS"] = splits
        for kw in calls:
            with record_launches() as launches:
                if kw.get("single"):
                    lengths = torch.tensor([99]) if kw.get("ragged") else None
                    kw = {n: x for n, x in kw.items()
                          if n not in ("single", "ragged", "x_padding_mask", "y_padding_mask")}
                    res = crossattn.cross_attention(r(Lx), r(Ly)[:, :1], r(Ly)[:, :1], backend="triton",
                                                    kv_lengths=lengths, **kw)
                    if "return_aux" in kw:
                        aux = res[2]
                        res = (res[0], res[1], aux.lse.masked_fill(aux.lse.isinf(), 0.0), aux.entropy, aux.key_mass)
                else:
                    res = crossattn.bidirectional_cross_attention(r(Lx), r(Lx), r(Lx), r(Ly), r(Ly), r(Ly),
                                                                  backend="triton", **kw)
                sum(t.float().square().sum() for t in res if t is not None).backward()
            for launch in launches:
                seen.setdefault(json.dumps(launch, sort_keys=True), launch)
    os.environ.pop("CROSSATTN_TRITON_SPLITS", None)
    out = list(seen.values())
    if dtype == "bfloat16":
        out = json.loads(json.dumps(out).replace('"float16"', '"bfloat16"'))
    return out


def short_name(launch: dict) -> str:
    """A readable variant name: the kernel plus the flags that distinguish its variants."""
    a = launch["args"]
    name = launch["kernel"].removeprefix("_xattn_").removesuffix("_kernel")
    if name == "fwd" and a.get("SPLIT"):
        name += "_split"
    if name == "weights" or (name.startswith("bwd") and a.get("HAS_DW")):
        name += "_mean" if a.get("MEAN") else ("_full" if name == "weights" else "_dw")
    if a.get("ENTROPY") or a.get("TOPK") or a.get("HAS_DH") or a.get("HAS_DKM"):
        name += "_stats"  # return_aux statistics (or their gradients) fused in
    if a.get("BIDIR") is False:
        name += "_1dir"  # one direction: the direction select compiled away
    return name


# ----------------------------------------------------------------------------- compiling
def _value(desc):
    import torch

    if isinstance(desc, list):  # a recorded tuple argument
        return tuple(_value(d) for d in desc)
    if isinstance(desc, dict) and "tensor" in desc:
        t = torch.empty(16, dtype=getattr(torch, desc["tensor"]))
        return t if desc["aligned"] else t[1:]
    return desc


def _specialize(arg, is_const, specialize):
    """Triton's own (type, attribute) for a launch argument."""
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl

        return native_specialize_impl(BaseBackend, arg, is_const, specialize, True)
    except ImportError:  # older Triton: the Python implementation
        from triton.runtime.jit import specialize_impl

        return specialize_impl(BaseBackend, arg, is_const, specialize, True)


def _leaves(path, ty, attr, value):
    """(path, type, attribute, value) of each element of a (possibly nested tuple) argument."""
    if isinstance(ty, tuple):
        for j, (t, a, v) in enumerate(zip(ty, attr, value)):
            yield from _leaves((*path, j), t, a, v)
    else:
        yield path, ty, attr, value


def compile_launch(launch: dict, arch: int) -> dict:
    """Compile one recorded launch for ``sm_{arch}`` and parse ptxas's ``-v`` report."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = _value(launch["args"][p.name]) if p.name in launch["args"] else p.default
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, attr = _specialize(value, p.is_const, not p.do_not_specialize)
        signature[p.name] = ty
        # Tuple arguments specialise per element: paths (i, j, ...) as Triton's JIT keys them.
        for path, t, a, v in _leaves((i,), ty, attr, value):
            if t == "constexpr":
                constexprs[path] = v
            elif isinstance(a, str) and a:
                attrs[path] = backend.parse_attr(a)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(launch["options"]))
    report = parse_ptxas(log.getvalue()) or ptxas_report(compiled.asm["ptx"], arch)
    warps = launch["options"].get("num_warps", 4)
    report.update(shared=compiled.metadata.shared, num_warps=warps, num_stages=launch["options"].get("num_stages"))
    report["occupancy_sm86"] = occupancy_sm86(report["regs"], report["shared"], warps)
    return report


_PTXAS = {
    "regs": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def parse_ptxas(log: str) -> dict | None:
    found = {k: re.search(p, log) for k, p in _PTXAS.items()}
    if found["regs"] is None:
        return None
    return {k: int(m.group(1)) if m else 0 for k, m in found.items()}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Run the bundled ptxas -v on the PTX (where Triton printed no log)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    return parse_ptxas(res.stderr)


def occupancy_sm86(regs: int, shared: int, warps: int) -> dict:
    """Resident warps per SM on sm_86 and what limits them (registers, shared memory, warps)."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by = {  # on a tie the warp limit is named: nothing else to gain
        "warps": SM86["warps"] // warps,
        "registers": SM86["regs"] // warp_regs // warps,
        "shared memory": SM86["smem"] // (shared + SM86["reserved"]) if shared else SM86["blocks"],
    }
    blocks = min(min(by.values()), SM86["blocks"])
    limit = min(by, key=by.get) if blocks < SM86["blocks"] else "blocks"
    return {"warps": blocks * warps, "limit": limit}


# ----------------------------------------------------------------------------- the survey
def _capture_job(job):
    return job, capture(*job)


def _compile_job(job):
    arch, dtype, d, features, launch = job
    return {"arch": arch, "dtype": dtype, "d": d, "features": features, "kernel": short_name(launch),
            "pass": PASS_OF.get(launch["kernel"]),
            "block_m": launch["args"].get("BLOCK_M"), "block_n": launch["args"].get("BLOCK_N"),
            **compile_launch(launch, arch)}


# The pass (xattn_configs.SPACE) each tiled kernel belongs to.
PASS_OF = {"_xattn_fwd_kernel": "fwd", "_xattn_fwd_combine_kernel": "fwd", "_xattn_weights_kernel": "fwd",
           "_xattn_key_mass_kernel": "fwd", "_xattn_bwd_delta_kernel": "bwd", "_xattn_bwd_dkdv_kernel": "bwd",
           "_xattn_bwd_dq_kernel": "bwd"}


def retiled(launch: dict, dtype: str, d: int) -> list[dict]:
    """The launch re-tiled with each autotuning alternative of its pass (xattn_configs.SPACE after
    the default), as the launchers would make it: a running top-k caps the forward's rows."""
    import torch

    from crossattn.kernels import xattn_configs as C

    kind = PASS_OF.get(launch["kernel"])
    if kind is None:
        return []
    out = []
    for alt in C._table(kind, getattr(torch, dtype), d, d)[1:]:
        cfg = C.Config(*alt)
        if launch["args"].get("TOPK"):
            cfg = cfg.capped(block_m=C.TOPK_BLOCK_M)
        new = json.loads(json.dumps(launch))
        for name, value in (("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)):
            if name in new["args"]:
                new["args"][name] = value
        new["options"].update(num_warps=cfg.num_warps, maxnreg=cfg.maxnreg)
        if "num_stages" in new["options"]:
            new["options"]["num_stages"] = cfg.num_stages
        if new != launch:
            out.append(new)
    return out


def survey(archs=ARCHS, dtypes=DTYPES, dims=HEAD_DIMS, features=FEATURES, workers: int = 2,
           candidates: bool = False) -> list[dict]:
    """Every recorded launch of every (dtype, head dim, feature set), compiled for each arch
    (``candidates``: re-tiled with the autotuner's alternatives instead, see ``retiled``).
    Capture and compile run in separate worker processes (interpreter on / off)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    jobs = [(dt, d, f) for dt in dtypes for d in dims for f in features]
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        captured = dict(pool.map(_capture_job, jobs))
    compile_jobs, seen = [], set()
    for (dt, d, f), launches in captured.items():
        if candidates:
            launches = [alt for launch in launches for alt in retiled(launch, dt, d)]
        for launch in launches:
            for arch in archs:
                # The same variant recorded by both feature sets is compiled once.
                key = (arch, json.dumps(launch, sort_keys=True))
                if key not in seen:
                    seen.add(key)
                    compile_jobs.append((arch, dt, d, f, launch))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_job, compile_jobs))


def fast_subset() -> dict:
    """What CI compiles on every run: sm_86 (the tightest register and smem budget), fp16 and
    fp32, D = 128 (the largest head dim with the zero-spill guarantee), every option on."""
    return dict(archs=(86,), dtypes=("float16", "float32"), dims=(128,), features=("all",))


def markdown(results: list[dict]) -> str:
    """One row per (kernel, dtype, head dim) with the worst case over archs and feature sets."""
    rows = {}
    for r in results:
        key = (r["kernel"], r["dtype"], r["d"])
        row = rows.setdefault(key, dict(r, archs=set(), occ=r["occupancy_sm86"]))
        row["archs"].add(r["arch"])
        for k in ("regs", "spill_stores", "spill_loads", "shared"):
            row[k] = max(row[k], r[k])
        if r["arch"] == 86 and r["occupancy_sm86"]["warps"] < row["occ"]["warps"]:
            row["occ"] = r["occupancy_sm86"]
    lines = ["| kernel | dtype | D | tile (M×N, warps) | regs | spill st/ld (B) | smem (KB) | sm_86 occupancy "
             "| archs |",
             "|---|---|---:|---|---:|---:|---:|---|---|"]
    for (kernel, dtype, d), r in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        tile = f"{r['block_m']}×{r['block_n']}, {r['num_warps']}" if r["block_m"] else f"{r['num_warps']} warps"
        lines.append(f"| {kernel} | {dtype} | {d} | {tile} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['shared'] / 1024:.1f} | {r['occ']['warps']} of 48 ({r['occ']['limit']}) | "
                     f"{','.join(f'sm_{a}' for a in sorted(r['archs']))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every arch, dtype, head dim and option set")
    parser.add_argument("--archs", help="comma-separated, e.g. 86,90")
    parser.add_argument("--dtypes", help="comma-separated, e.g. float16,float32")
    parser.add_argument("--dims", help="comma-separated head dims, e.g. 64,128")
    parser.add_argument("--features", help="plain,all")
    parser.add_argument("--candidates", action="store_true", help="the autotuner's alternative tiles instead")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kwargs = {} if args.full else fast_subset()
    for name, conv in (("archs", int), ("dtypes", str), ("dims", int), ("features", str)):
        if getattr(args, name):
            kwargs[name] = tuple(conv(x) for x in getattr(args, name).split(","))
    results = survey(**kwargs, candidates=args.candidates)
    if args.json:
        print(json.dumps(results))
    elif args.markdown:
        print(markdown(results))
    else:
        for r in results:
            print(f"sm_{r['arch']} {r['dtype']:8s} d={r['d']:3d} {r['features']:5s} {r['kernel']:16s} "
                  f"regs={r['regs']:3d} spills={r['spill_stores']}/{r['spill_loads']} smem={r['shared']:6d} "
                  f"occ86={r['occupancy_sm86']['warps']} ({r['occupancy_sm86']['limit']})")
