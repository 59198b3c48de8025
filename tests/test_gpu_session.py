"""tools/gpu_session.sh --dry-run: every phase of the GPU session runs on the CPU (Triton
interpreter, tiny sizes), so the script cannot rot before a GPU reaches it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_session_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CROSSATTN_BACKEND", "TRITON_INTERPRET")}
    env["OUT"] = str(tmp_path)
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "--dry-run"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    ran = [line.split()[1] for line in summary if line.startswith("phase ")]
    assert ran == ["1", "2", "3", "4"], summary
    assert all("rc=0" in line for line in summary if line.startswith("phase ")), summary
    # What cannot run on a CPU says so.
    assert any(line.startswith("SKIP phase 3") for line in summary), summary
    assert any(line.startswith("SKIP phase 4") for line in summary), summary
    # The benchmark phase's merged results and the tests' reports are where the device tool
    # fetches them (at most 8 files).
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["rows"] and {r["workload"] for r in bench["rows"]} == {"seed001"}
    assert "| seed001 |" in (tmp_path / "bench.md").read_text()
    for name in ("phase1-triton.xml", "phase3-cuda.xml", "session.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8
    assert "sanitize workload: triton float32 done" in log


def test_gpu_session_rejects_unknown_arguments(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), "--bogus"], capture_output=True,
                         text=True, env=dict(os.environ, OUT=str(tmp_path)), cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "unknown argument: --bogus" in res.stderr


def test_merge_bench_keeps_failures_and_each_runs_environment(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_bench", ROOT / "tools" / "merge_bench.py")
    mb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mb)
    src = json.loads((ROOT / "benchmarks" / "results" / "cpu_float32.json").read_text())
    a, b, cut = tmp_path / "a", tmp_path / "b", tmp_path / "cut"
    for folder, commit, failed in ((a, "abc123", {"flex on seed000 fwd": "RuntimeError: boom"}), (b, None, {})):
        folder.mkdir()
        env = dict(src["environment"], commit=commit)
        folder.joinpath("results.json").write_text(json.dumps(
            {"environment": env, "peaks": src["peaks"], "rows": src["rows"][:2], "skipped": {}, "failed": failed}))
    cut.mkdir()  # a run cut off before writing anything
    assert mb.main([str(tmp_path / "merged"), str(a), str(b), str(cut)]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["failed"] == {"flex on seed000 fwd": "RuntimeError: boom"}
    assert [r["run"] for r in merged["rows"]] == [0, 0, 1, 1]
    assert [r["commit"] for r in merged["runs"]] == ["abc123", None]
    assert merged["environment"]["commit"] == "abc123, unknown"
    md = (tmp_path / "merged.md").read_text()
    assert "**Failed**" in md and "flex on seed000 fwd: RuntimeError: boom" in md
