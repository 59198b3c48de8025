"""Markdown report and matplotlib plots of benchmark rows."""
from __future__ import annotations

from pathlib import Path

from .workloads import KINDS, Workload

METHOD = (
    "Each (workload, mode) times its candidates interleaved: every round runs each candidate once, "
    "in an order rotated from round to round. A round is `torch.utils.benchmark.Timer.blocked_autorange` "
    "on a CPU and `triton.testing.do_bench` (CUDA events, L2 flushed before each run) on a GPU. "
    "`median` and `IQR` are over every timed sample (a CPU block of several runs is one sample, its mean); "
    "`runs` counts the timed runs. `vs eager` / `vs SDPA` = median over rounds of the paired per-round "
    "speed-up (higher is faster), with a 95 % bootstrap interval over the rounds. Peak memory is above the "
    "inputs and parameters: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the RSS high-water mark "
    "of one run (after a warm-up) in a fresh subprocess per workload. TFLOP/s counts the attention "
    "matmuls only (backward as 2.5x forward)."
)

PRUNING_NOTE = (
    "The `torch` backend runs a pruned call over the kept key blocks only (matrix work in proportion "
    "to `keep`), each (head, query block) a head of its own over the blocks it kept (64-row products, "
    "slower per pair than the dense ones; gathers, an element mask, scatters) plus the block selection: "
    "at keep=0.5 that costs about as much as the dense layer or more, below it less. The GPU kernels "
    "skip pruned blocks too."
)


def _fmt(x, spec, suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def _ratio(r: dict, key: str) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    return f"{v['ratio']:.2f}x [{v['ci_low']:.2f}, {v['ci_high']:.2f}]"


def markdown_table(env: dict, peaks: dict, rows: list[dict], skipped: dict, failed: dict | None = None,
                   workloads: list | None = None) -> str:
    """The report; ``workloads`` defaults to those of the rows (``tools/merge_bench.py``)."""
    failed = failed or {}
    if workloads is None:
        fields = Workload.__dataclass_fields__
        seen = {r["workload"]: Workload(**{k: r[k] for k in fields if k in r}) for r in rows}
        workloads = list(seen.values())
    dtype = rows[0]["dtype"] if rows else env.get("dtype", "?")
    lines = [
        f"# crossattn benchmark — {env['device']}",
        "",
        f"- dtype {dtype}; torch {env['torch']}, triton {env['triton']}, crossattn {env['crossattn']}, "
        f"Python {env['python']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        f"- commit {env['commit'] or 'unknown (not a git checkout)'}; {env['date']}; "
        f"{env['threads']} torch threads; load average at start {env.get('load_average_start')}, "
        f"at end {env.get('load_average_end')}",
        f"- measured yardsticks: matmul {peaks['matmul_tflops']:.2f} TFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s",
        "",
        METHOD,
    ]
    for w in workloads:
        wrows = [r for r in rows if r["workload"] == w.name]
        if not wrows:
            continue
        eager = "" if w.kind in ("core", "stats") else " `eager` is the seed's own code for this layer."
        lines += ["", f"## {w.name}", "", f"{w.title()}.{eager}", "",
                  "| workload | mode | implementation | median ms | IQR ms | runs | vs eager [95% CI] "
                  "| vs SDPA [95% CI] | peak MiB | attn TFLOP/s | weights GB/s | note |",
                  "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
        for r in wrows:
            note = f"SDPA picked {r['sdpa_backend']}" if r.get("sdpa_backend") else ""
            lines.append(
                f"| {w.name} | {r['mode']} | {r['impl']} | {r['latency_ms']:.3f} | {r['iqr_ms']:.3f} | {r['runs']} | "
                f"{_ratio(r, 'vs_eager')} | {_ratio(r, 'vs_sdpa')} | {_fmt(r.get('peak_mem_mib'), '.1f')} | "
                f"{r['attention_tflops']:.3f} | {_fmt(r.get('weights_gbps'), '.1f')} | {note} |")
    if any("[torch] prune" in r["impl"] for r in rows):
        lines += ["", "Pruning on the CPU: " + PRUNING_NOTE]
    if failed:
        lines += ["", "**Failed** (the command exits non-zero):", ""]
        lines += [f"- {name}: {why}" for name, why in failed.items()]
    if skipped:
        lines += ["", "Not run here:", ""]
        lines += [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def plot_sweeps(rows: list[dict], out: Path, env: dict) -> list[Path]:
    """One figure per mode over the audio-length sweep: latency (median, IQR bars), speed-up
    over eager (95 % CI bars) and, where measured, peak memory; log axes, hollow markers in
    distinct styles so coinciding lines stay visible, the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sweep = [r for r in rows if r.get("group") == "audio_sweep"]
    written = []
    markers, styles = "osD^vP*Xh<>", ["-", "--", ":", "-."]
    for mode in sorted({r["mode"] for r in sweep}):
        mrows = [r for r in sweep if r["mode"] == mode]
        with_mem = any(r.get("peak_mem_mib") for r in mrows)
        panels = 3 if with_mem else 2
        fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 6.0))
        impls = sorted({r["impl"] for r in mrows})
        for n, impl in enumerate(impls):
            pts = sorted((r for r in mrows if r["impl"] == impl), key=lambda r: r["A"])
            A = [r["A"] for r in pts]
            style = dict(marker=markers[n % len(markers)], linestyle=styles[n % len(styles)],
                         fillstyle="none", markersize=7, capsize=3, label=impl)
            med = [r["latency_ms"] for r in pts]
            axes[0].errorbar(A, med, yerr=[[m - r["latency_q1_ms"] for m, r in zip(med, pts)],
                                           [r["latency_q3_ms"] - m for m, r in zip(med, pts)]], **style)
            ratios = [(a, r["vs_eager"]) for a, r in zip(A, pts) if r.get("vs_eager")]
            if ratios:
                xs, vs = zip(*ratios)
                ys = [v["ratio"] for v in vs]
                axes[1].errorbar(xs, ys, yerr=[[y - v["ci_low"] for y, v in zip(ys, vs)],
                                               [v["ci_high"] - y for y, v in zip(ys, vs)]], **style)
            if with_mem:
                mem = [(a, r["peak_mem_mib"]) for a, r in zip(A, pts) if r.get("peak_mem_mib") is not None]
                if mem:
                    axes[2].plot(*zip(*mem), **{k: v for k, v in style.items() if k != "capsize"})
        axes[1].axhline(1.0, color="grey", linewidth=0.8)
        labels = ["median latency (ms), IQR bars", "speed-up over eager (x), 95% CI", "peak memory above inputs (MiB)"]
        for ax, label in zip(axes, labels):
            ax.set_xscale("log")
            ax.set_xlabel("audio frames A")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            if ys and min(ys) > 0 and max(ys) / min(ys) > 4:  # log where values span decades
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
        w = mrows[0]
        fig.suptitle(f"audio sweep, {mode}, {w['dtype']}, B={w['B']} T={w['T']} E={w['E']} H={w['H']} "
                     f"({KINDS[w['kind']].split(':')[0]}); {env['device']}", fontsize=9)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(impls)),
                   fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04 * -(-len(impls) // 4) + 0.03, 1, 0.95))
        path = out / f"audio_sweep_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
