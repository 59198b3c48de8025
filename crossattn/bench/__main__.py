"""``python -m crossattn.bench`` / ``crossattn-bench``: latency and peak memory of crossattn
against eager PyTorch and the fast-attention peers, side by side in one process.

    python -m crossattn.bench --quick --output bench-out      # CPU-sized, < 2 minutes
    python -m crossattn.bench --output benchmarks/results/h100 # the full GPU suite

Writes ``results.json``, ``results.md`` (the table) and PNG plots (latency, and peak memory on
a GPU, against audio length) to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .impls import registry, sdpa_backend_picked
from .measure import environment, machine_peaks, measure
from .report import markdown_table, plot_sweeps
from .workloads import gpu_workloads, make_inputs, quick_workloads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossattn.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench-out", help="folder for results.json, results.md and PNGs")
    parser.add_argument("--quick", action="store_true", help="small CPU-sized workloads (< 2 minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all of the set)")
    parser.add_argument("--impls", default=None, help="comma-separated substrings of implementation names")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    workloads = quick_workloads() if args.quick or not on_gpu else gpu_workloads()
    if args.workloads:
        wanted = set(args.workloads.split(","))
        workloads = [w for w in workloads if w.name in wanted]
    impls = registry(quick=args.quick or not on_gpu)
    if args.impls:
        keys = args.impls.split(",")
        impls = [i for i in impls if i.name.startswith("eager") or any(k in i.name for k in keys)]
    modes = args.modes.split(",")
    warmup, repeats = (1, 3) if not on_gpu else (5, 30)

    env = environment(device)
    print(f"crossattn benchmark | {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    if not on_gpu:
        print("No GPU here: comparing the torch backend with eager PyTorch on the CPU "
              "(the Triton and CUDA kernels need a GPU).")
    peaks = machine_peaks(device, dtype, args.quick or not on_gpu)
    print(f"measured peaks: matmul {peaks['matmul_tflops']:.2f} TFLOP/s ({str(dtype)[6:]}), "
          f"copy {peaks['copy_gbps']:.1f} GB/s")

    rows, skipped = [], {}
    for w in workloads:
        probe = make_inputs(w, device, dtype)
        if w.kind == "core":
            q, k, v = probe.text, probe.audio, probe.value
        else:
            H, D = w.H, w.D
            q = probe.text.view(w.B, w.T, H, D).transpose(1, 2)
            k = v = probe.audio.view(w.B, w.A, H, D).transpose(1, 2)
        pad = None if probe.audio_mask is None else probe.audio_mask == 0
        sdpa_backend = sdpa_backend_picked(q, k, v, pad)
        for impl in impls:
            reason = impl.why_not(w, device, dtype)
            if reason:
                skipped.setdefault(impl.name, reason)
                continue
            for mode in modes:
                try:
                    result = measure(impl, w, device, dtype, mode, warmup, repeats)
                except Exception as exc:  # a peer failing must not stop the suite; say why
                    skipped[f"{impl.name} on {w.name} {mode}"] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                row = {"workload": w.name, "impl": impl.name, "mode": mode, "dtype": str(dtype)[6:],
                       **w.describe(), **result}
                if impl.name == "sdpa":
                    row["sdpa_backend"] = sdpa_backend
                row["attention_tflops_frac_of_matmul_peak"] = result["attention_tflops"] / peaks["matmul_tflops"]
                if "weights_gbps" in result:
                    row["weights_gbps_frac_of_copy"] = result["weights_gbps"] / peaks["copy_gbps"]
                rows.append(row)
                print(f"  {w.name:24s} {mode:8s} {impl.name:44s} {result['latency_ms']:9.3f} ms", flush=True)

    eager = {(r["workload"], r["mode"]): r["latency_ms"] for r in rows if r["impl"].startswith("eager")}
    for r in rows:
        base = eager.get((r["workload"], r["mode"]))
        r["speedup_vs_eager"] = base / r["latency_ms"] if base else None

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "peaks": peaks, "rows": rows, "skipped": skipped}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(env, peaks, rows, skipped)
    (out / "results.md").write_text(table)
    pngs = plot_sweeps(rows, out, env)
    print()
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
