"""The benchmark CLI (the README's main job) and its statistics, on a CPU-only machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from crossattn.bench import __main__ as cli
from crossattn.bench import impls as impls_mod
from crossattn.bench.measure import paired_ratio, summarize

TINY = ["--threads", "1", "--rounds", "2", "--round-time", "0.001", "--no-memory"]


def _run_main(capsys, *argv):
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse and the shared device check exit directly
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_quick_benchmark_writes_results_with_statistics_metadata_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "crossattn.bench", "--quick", "--output", str(tmp_path), "--threads", "1",
         "--rounds", "3", "--round-time", "0.01", "--workloads", "seed001,audio_sweep_100", "--device", "cpu",
         "--impls", "weights=full,weights=off"],
        capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    env_ = data["environment"]
    assert env_["device"].startswith("CPU") and env_["date"] and env_["torch"] == torch.__version__
    assert env_["dtype"] == "float32" and env_["suite"] == "quick" and env_["threads"] == 1
    assert "commit" in env_ and "triton" in env_
    assert {w["name"]: (w["B"], w["T"], w["A"], w["E"], w["H"]) for w in data["workloads"]} == {
        "seed001": (4, 20, 196, 256, 8), "audio_sweep_100": (2, 32, 100, 256, 4)}
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"eager", "sdpa", "crossattn[torch] weights=full",
                                        "crossattn[torch] weights=off"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and len(rows) == 16
    for r in rows:
        assert 0 < r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"]
        assert r["rounds"] == 3 and r["runs"] >= 3 and r["samples"] >= 3
        v = r["vs_eager"]
        assert v["ci_low"] <= v["ratio"] <= v["ci_high"] and v["rounds"] == 3
        assert r["peak_mem_mib"] is not None and r["peak_mem_mib"] >= 0  # RSS of a subprocess
        assert r["dtype"] == "float32"
    assert all(r["vs_eager"]["ratio"] == 1.0 for r in rows if r["impl"] == "eager")
    assert all(r["sdpa_backend"] for r in rows if r["impl"] == "sdpa")
    assert "crossattn[triton] weights=off" in data["skipped"] and not data["failed"]
    table = (tmp_path / "results.md").read_text()
    assert res.stdout == table  # the report on stdout, everything else on stderr
    assert "## seed001" in table and "seed 001's one-direction" in table and "| seed001 | fwd+bwd | eager |" in table
    assert "sweep_A" not in table and "eager (seed 000)" not in table
    assert "No GPU here" in res.stderr and "wrote" in res.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["audio_sweep_fwd.png", "audio_sweep_fwd_bwd.png"]


def test_unknown_workload_is_one_line_listing_the_valid_names(capsys):
    rc, out, err = _run_main(capsys, "--workloads", "nosuch", "--device", "cpu")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "nosuch" in err and "seed000_small" in err and "audio_sweep_100" in err


@pytest.mark.parametrize("argv, needle", [
    (["--impls", "nosuch"], "--impls"),
    (["--modes", "backward"], "--modes"),
    (["--device", "tpu"], "--device"),
    (["--rounds", "1"], "--rounds"),
    (["--rounds", "many"], "--rounds"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    rc, out, err = _run_main(capsys, *argv)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    rc, out, err = _run_main(capsys, "--device", "cuda")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--device cuda" in err and "--device cpu" in err


def _registry_with_a_broken_impl(quick):
    def boom(w, device, dtype):
        def run(inputs, train):
            raise RuntimeError("kernel exploded")
        return run

    keep = [i for i in _REAL_REGISTRY(quick) if i.name in ("eager", "sdpa")]
    return keep + [impls_mod.Impl("broken", boom)]


_REAL_REGISTRY = impls_mod.registry


def test_a_failing_case_makes_the_exit_status_non_zero(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(impls_mod, "registry", _registry_with_a_broken_impl)
    rc, out, err = _run_main(capsys, "--device", "cpu", "--workloads", "seed001", "--modes", "fwd",
                             "--output", str(tmp_path), *TINY)
    assert rc == 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert "kernel exploded" in data["failed"]["broken on seed001 fwd"]
    assert {r["impl"] for r in data["rows"]} == {"eager", "sdpa"}  # the others still ran
    assert "Failed" in out and "failed" in err.strip().splitlines()[-1]


def test_without_matplotlib_the_run_skips_plots_and_says_how_to_get_them(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, out, err = _run_main(capsys, "--device", "cpu", "--workloads", "audio_sweep_100", "--modes", "fwd",
                             "--impls", "weights=off", "--output", str(tmp_path), *TINY)
    assert rc == 0, err
    assert 'pip install "crossattn[bench]"' in err
    assert (tmp_path / "results.md").exists() and not list(tmp_path.glob("*.png"))


def test_paired_ratio_is_the_median_round_ratio_with_an_interval():
    base = [[10.0, 10.2], [11.0, 11.0], [9.0, 9.1], [10.0, 10.0], [12.0, 12.0]]
    twice_as_fast = [[t / 2 for t in r] for r in base]
    exact = paired_ratio(base, twice_as_fast)
    assert exact["ratio"] == pytest.approx(2.0) and exact["ci_low"] == pytest.approx(2.0)
    assert exact["ci_high"] == pytest.approx(2.0) and exact["rounds"] == 5
    noisy = paired_ratio(base, [[5.0], [6.0], [4.0], [5.5], [8.0]])
    assert noisy["ci_low"] < noisy["ratio"] < noisy["ci_high"]
    assert noisy["ratio"] == pytest.approx(sorted([10.1 / 5, 11 / 6, 9.05 / 4, 10 / 5.5, 12 / 8])[2])


def test_summarize_reports_median_quartiles_and_counts():
    s = summarize([[1.0, 2.0], [3.0], [4.0, 5.0]], runs=50)
    assert (s["latency_q1_ms"], s["latency_ms"], s["latency_q3_ms"]) == (2.0, 3.0, 4.0)
    assert s["iqr_ms"] == 2.0 and s["runs"] == 50 and s["samples"] == 5 and s["rounds"] == 3


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_what_a_run_allocates():
    from crossattn.bench.memory import peak_mib

    class Alloc:
        def clear_grads(self):
            pass

        def __call__(self):  # 64 MiB, touched so that it is resident
            torch.ones(16 * 2**20).sum()

    assert 60 < peak_mib(Alloc()) < 80


def test_labels_say_what_each_workload_is():
    from crossattn.bench.workloads import SUITES

    names = [w.name for suite in SUITES.values() for w in suite()]
    assert not any(n.startswith("sweep_A") for n in names)  # an "A100" that is not a GPU
    seed001 = [w for suite in SUITES.values() for w in suite() if w.name == "seed001"]
    assert seed001 and all(w.kind == "layer1" and "seed 001" in w.title() for w in seed001)
    assert "eager" in [i.name for i in impls_mod.registry(quick=True)]


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="needs git")
def test_commit_is_this_projects_never_an_enclosing_repositorys(tmp_path, monkeypatch):
    from pathlib import Path

    from crossattn.bench import measure

    root = Path(measure.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (root / ".git").exists():  # a checkout of the project: its HEAD
        assert measure.git_commit().split("+")[0] == head.stdout.strip()
    # An installed copy (site/crossattn/bench/measure.py) inside another repository: no commit.
    outer = tmp_path / "someone_elses_project"
    fake = outer / "site" / "crossattn" / "bench" / "measure.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    git = ["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    monkeypatch.setattr(measure, "__file__", str(fake))
    assert measure.git_commit() is None
