"""Markdown table and matplotlib plots of benchmark rows."""
from __future__ import annotations

from pathlib import Path


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_table(env: dict, peaks: dict, rows: list[dict], skipped: dict) -> str:
    lines = [
        f"# crossattn benchmark — {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, crossattn {env['crossattn']}, {env['date']}. "
        f"Measured peaks: matmul {peaks['matmul_tflops']:.2f} TFLOP/s, copy {peaks['copy_gbps']:.1f} GB/s. "
        "Latency is the median; memory is the peak allocated above the inputs (CUDA only); "
        "TFLOP/s counts the attention matmuls only.",
        "",
        "| workload | mode | implementation | ms | vs eager | peak MiB | attn TFLOP/s | weights GB/s | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = f"SDPA picked {r['sdpa_backend']}" if "sdpa_backend" in r else ""
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['impl']} | {r['latency_ms']:.3f} | "
            f"{_fmt(r.get('speedup_vs_eager'), '.2f')}x | {_fmt(r.get('peak_mem_mib'), '.1f')} | "
            f"{r['attention_tflops']:.3f} | {_fmt(r.get('weights_gbps'), '.1f')} | {note} |"
        )
    if skipped:
        lines += ["", "Not run:", ""]
        lines += [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def plot_sweeps(rows: list[dict], out: Path, env: dict) -> list[Path]:
    """Latency (and, on a GPU, peak memory) against audio length: one line per
    implementation, per mode, log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in rows if r.get("group") == "audio_sweep"]
    written = []
    metrics = [("latency_ms", "median latency (ms)")]
    if env.get("gpu"):
        metrics.append(("peak_mem_mib", "peak memory above inputs (MiB)"))
    for mode in sorted({r["mode"] for r in sweep}):
        for key, label in metrics:
            fig, ax = plt.subplots(figsize=(8, 5))
            for impl in sorted({r["impl"] for r in sweep}):
                pts = sorted((r["A"], r[key]) for r in sweep if r["impl"] == impl and r["mode"] == mode
                             and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("audio frames A")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}, {env['device']}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"sweep_{key.split('_')[0]}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
