"""``python -m crossattn.bench`` / ``crossattn-bench``: latency and peak memory of crossattn
against eager PyTorch and the fast-attention peers, side by side in one process.

    python -m crossattn.bench --quick --output bench-out      # CPU-sized, about two minutes
    python -m crossattn.bench --suite cpu --output DIR         # where the CPU path stands
    python -m crossattn.bench --suite stats --output DIR       # weight statistics vs weights vs eager
    python -m crossattn.bench --suite ragged --output DIR      # ragged key lengths vs full / packed
    python -m crossattn.bench --output benchmarks/results/h100 # the full GPU suite

The report (markdown) goes to stdout, progress to stderr; ``results.json``, ``results.md``
and PNG plots (when matplotlib is installed) go to ``--output``. Exit status: 0, 1 when a
benchmark case failed, 2 for bad arguments. ``python -m crossattn.bench`` skips the plots
when matplotlib is missing; the ``crossattn-bench`` script asks for ``crossattn[bench]``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PROG = "crossattn-bench"
MODES = ("fwd", "fwd+bwd")


class UsageError(Exception):
    """A bad argument: one line on stderr, exit status 2."""


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _parse(argv):
    from .._cli import ArgumentParser  # one-line argparse errors, exit 2
    from .workloads import SUITES

    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench-out", help="folder for results.json, results.md and PNGs")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="workload set (default: gpu on a CUDA device, quick otherwise)")
    parser.add_argument("--quick", action="store_true", help="same as --suite quick")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all of the suite)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated substrings of implementation names (eager and sdpa always run)")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per (workload, mode) (default: chosen by time)")
    parser.add_argument("--round-time", type=float, default=None,
                        help="seconds each candidate is timed per round (default 0.05 CPU, 0.03 GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice); 1 gives steadier numbers "
                             "on a loaded machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    return parser.parse_args(argv)


def _configure(args):
    """Validated device, dtype, suite, workloads, implementations and modes."""
    from .._cli import check_device  # exits 2 with one line for an unusable device
    from .impls import registry
    from .workloads import SUITES

    device = check_device(PROG, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.quick and args.suite not in (None, "quick"):
        raise UsageError(f"--quick contradicts --suite {args.suite}")
    suite = "quick" if args.quick else (args.suite or ("gpu" if on_gpu else "quick"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    workloads = SUITES[suite]()
    if args.workloads:
        wanted = [n for n in args.workloads.split(",") if n]
        valid = [w.name for w in workloads]
        unknown = [n for n in wanted if n not in valid]
        if unknown or not wanted:
            raise UsageError(f"--workloads: unknown {', '.join(unknown) or '(none given)'}; "
                             f"the {suite} suite has: {', '.join(valid)}")
        workloads = [w for w in workloads if w.name in wanted]
    impls = registry(quick=suite != "gpu")
    if args.impls:
        keys = [k for k in args.impls.split(",") if k]
        unmatched = [k for k in keys if not any(k in i.name for i in impls)]
        if unmatched or not keys:
            raise UsageError(f"--impls: {', '.join(unmatched) or '(none given)'} matches no implementation; "
                             f"valid: {', '.join(i.name for i in impls)}")
        impls = [i for i in impls if i.name in ("eager", "sdpa") or any(k in i.name for k in keys)]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise UsageError(f"--modes {args.modes!r}: expected a comma-separated subset of {', '.join(MODES)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected a positive integer")
    if args.rounds is not None and args.rounds < 2:
        raise UsageError(f"--rounds {args.rounds}: expected at least 2 (the interval needs paired rounds)")
    return device, dtype, suite, workloads, impls, modes


def _bench_workload(w, impls, device, dtype, modes, args, suite, skipped, failed):
    """Rows of one workload: every runnable implementation, per mode, timed interleaved."""
    from .impls import sdpa_backend_picked
    from .measure import Step, cpu_peak_memory, cuda_peak_mib, paired_ratio, summarize, time_interleaved
    from .workloads import make_inputs

    on_gpu = device.type == "cuda"
    probe = make_inputs(w, device, dtype)
    if w.kind in ("core", "stats"):
        q, k, v = probe.text, probe.audio, probe.value
    else:
        q = probe.text.view(w.B, w.T, w.H, w.D).transpose(1, 2)
        k = v = probe.audio.view(w.B, w.A, w.H, w.D).transpose(1, 2)
    sdpa_backend = sdpa_backend_picked(q, k, v, None if probe.audio_mask is None else probe.audio_mask == 0)
    runnable = []
    for impl in impls:
        reason = impl.why_not(w, device, dtype)
        if reason:
            skipped.setdefault(impl.name, reason)
        else:
            runnable.append(impl)
    quick = suite != "gpu"
    budget, min_rounds, max_rounds = {"quick": (3.0, 5, 20), "cpu": (60.0, 7, 15), "gpu": (4.0, 10, 30),
                                      "stats": (30.0, 5, 10), "ragged": (30.0, 5, 10)}[suite]
    round_time = args.round_time or (0.03 if on_gpu else 0.05)
    rows = []
    for mode in modes:
        steps, mems = {}, {}
        for impl in runnable:
            try:
                step = Step(impl, w, device, dtype, mode)
                step()  # fail here, alone, rather than inside the interleaved rounds
                if on_gpu and not args.no_memory:
                    mems[impl.name] = cuda_peak_mib(step, device)
                steps[impl.name] = step
            except Exception as exc:  # a peer failing must not stop the suite; say why
                failed[f"{impl.name} on {w.name} {mode}"] = f"{type(exc).__name__}: {exc}"[:300]
        if not steps:
            continue
        samples, runs = time_interleaved(steps, device, rounds=args.rounds, budget_s=budget, min_rounds=min_rounds,
                                         max_rounds=max_rounds, block_s=round_time, log=_log)
        del steps
        for name, s in samples.items():
            impl = next(i for i in runnable if i.name == name)
            row = {"workload": w.name, "impl": name, "mode": mode, "dtype": str(dtype)[6:], **w.describe(),
                   **summarize(s, runs[name]), "peak_mem_mib": mems.get(name)}
            for base, key in (("eager", "vs_eager"), ("sdpa", "vs_sdpa")):
                row[key] = paired_ratio(samples[base], s) if base in samples else None
            if name == "sdpa":
                row["sdpa_backend"] = sdpa_backend
            seconds = row["latency_ms"] * 1e-3
            row["attention_tflops"] = w.attention_flops() * (3.5 if mode == "fwd+bwd" else 1.0) / seconds / 1e12
            if impl.writes_weights:
                per_direction = w.B * w.T * w.A * (w.H if impl.writes_weights == "full" else 1)
                row["weights_gbps"] = per_direction * w.directions * torch.finfo(dtype).bits / 8 / seconds / 1e9
            rows.append(row)
            ratio = row["vs_eager"]
            _log(f"  {w.name:22s} {mode:8s} {name:42s} {row['latency_ms']:10.3f} ms "
                 f"(IQR {row['iqr_ms']:.3f}, {row['runs']} runs)"
                 + (f"  {ratio['ratio']:.2f}x eager [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}]" if ratio else ""))
    if not on_gpu and not args.no_memory and rows:
        names = sorted({r["impl"] for r in rows})
        _log(f"    peak memory: {len(names)} implementations in a subprocess")
        mem = cpu_peak_memory(w, names, modes, dtype, quick)
        if "error" in mem:
            failed[f"CPU peak memory on {w.name}"] = mem["error"]
        for r in rows:
            r["peak_mem_mib"] = mem.get((r["impl"], r["mode"]))
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        device, dtype, suite, workloads, impls, modes = _configure(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from .measure import environment, load_average, machine_peaks
    from .report import markdown_table, plot_sweeps

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses

    env = environment(device)
    env["suite"], env["dtype"] = suite, str(dtype)[6:]
    _log(f"crossattn benchmark | {suite} suite | {env['device']} | {env['dtype']} | torch {env['torch']} | "
         f"triton {env['triton']} | commit {env['commit']} | load {env['load_average_start']}")
    if device.type != "cuda":
        _log("No GPU here: comparing the torch backend with eager PyTorch and SDPA on the CPU "
             "(the Triton and CUDA kernels need a GPU).")
    try:
        import matplotlib  # noqa: F401  (plots are optional: the bench extra brings matplotlib)

        can_plot = True
    except ImportError:
        can_plot = False
    if not can_plot:
        _log('matplotlib is not installed: no plots this time (pip install "crossattn[bench]")')
    peaks = machine_peaks(device, dtype, suite != "gpu")
    _log(f"measured yardsticks: matmul {peaks['matmul_tflops']:.2f} TFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s")

    rows, skipped, failed = [], {}, {}
    for n, w in enumerate(workloads, 1):
        _log(f"[{n}/{len(workloads)}] {w.name}: {w.title()}")
        rows += _bench_workload(w, impls, device, dtype, modes, args, suite, skipped, failed)
    env["load_average_end"] = load_average()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "peaks": peaks,
               "workloads": [dict(w.describe(), title=w.title()) for w in workloads],
               "rows": rows, "skipped": skipped, "failed": failed}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    table = markdown_table(env, peaks, rows, skipped, failed, workloads)
    (out / "results.md").write_text(table)
    pngs = plot_sweeps(rows, out, env) if can_plot else []
    sys.stdout.write(table)
    sys.stdout.flush()
    written = ", ".join(str(p) for p in [out / "results.json", out / "results.md", *pngs])
    if failed:
        _log(f"{PROG}: {len(failed)} case(s) failed (listed in results.md); wrote {written}")
        return 1
    _log(f"{PROG}: wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
