"""The committed pruning accuracy study reproduces, and its findings hold."""
from __future__ import annotations

import importlib.util
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "pruning_accuracy.py"


def load():
    spec = importlib.util.spec_from_file_location("pruning_accuracy", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_reproduces_the_committed_table(tmp_path):
    load().main(["--output", str(tmp_path / "t.md")])
    committed = (STUDY.parent / "results" / "pruning_accuracy.md").read_text()
    assert (tmp_path / "t.md").read_text() == committed


def test_findings():
    rows = {(kind, rule): (kept, err, lost) for kind, rule, kept, err, lost in load().study()}
    # Structured, speech-like alignment: half the blocks lose almost nothing ...
    assert rows[("aligned", "keep=0.5")][1] < 1e-4
    # ... but the loss grows fast below that, and mass lost only grows as keep shrinks.
    for kind in ("aligned", "aligned_noisy", "gaussian"):
        losses = [rows[(kind, f"keep={r}")][2] for r in (0.5, 0.25, 0.1)]
        assert losses == sorted(losses)
    # Unstructured inputs attend nearly uniformly: pruning hurts at any ratio.
    assert rows[("gaussian", "keep=0.5")][2] > 0.4
    # A mass rule adapts: it keeps (almost) everything where attention is flat.
    assert rows[("gaussian", "mass=0.99")][0] > 0.99
