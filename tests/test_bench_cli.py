"""The benchmark CLI (the README's main job) on a CPU-only machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def test_quick_benchmark_writes_table_json_and_plots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "crossattn.bench", "--quick", "--output", str(tmp_path),
         "--workloads", "seed001,sweep_A100,sweep_A200", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"].startswith("CPU") and data["environment"]["date"]
    assert data["peaks"]["matmul_tflops"] > 0 and data["peaks"]["copy_gbps"] > 0
    impls = {r["impl"] for r in data["rows"]}
    assert "eager (seed 000)" in impls and "crossattn[torch] weights=full" in impls
    assert {r["mode"] for r in data["rows"]} == {"fwd", "fwd+bwd"}
    eager = [r for r in data["rows"] if r["impl"].startswith("eager")]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    assert all(r["latency_ms"] > 0 for r in data["rows"])
    sdpa = [r for r in data["rows"] if r["impl"] == "sdpa"]
    assert sdpa and all(r["sdpa_backend"] for r in sdpa)
    assert "crossattn[triton] weights=off" in data["skipped"]  # and it says why
    table = (tmp_path / "results.md").read_text()
    assert "| eager (seed 000) |" in table and "crossattn[torch]" in table
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["sweep_latency_fwd.png", "sweep_latency_fwd_bwd.png"]
    assert "No GPU here" in res.stdout
