"""The statistics and ragged-key benchmark suites (issues 17, 16) at tiny size, on a CPU."""
from __future__ import annotations

import json

import pytest
import torch

from crossattn.bench import __main__ as cli
from crossattn.bench import impls as impls_mod
from crossattn.bench import workloads as W

TINY = ["--threads", "1", "--rounds", "2", "--round-time", "0.001", "--no-memory", "--device", "cpu"]


def _tiny_suites(monkeypatch):
    monkeypatch.setitem(W.SUITES, "stats", lambda: [W.Workload("stats_tiny", 2, 8, 50, 32, 2, kind="stats")])
    monkeypatch.setitem(W.SUITES, "ragged", lambda: [
        W.Workload("ragged_tiny", 4, 8, 64, 32, 2, kind="core", kv_fractions=(0.1, 0.4, 0.7, 1.0))])


def _main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_suites_hold_the_asked_shapes():
    stats = {w.name: w for w in W.SUITES["stats"]()}
    assert {w.A for w in stats.values()} == {1000, 16000, 100000}
    assert all(w.kind == "stats" and "entropy" in w.title() for w in stats.values())
    for w in W.SUITES["ragged"]():
        lengths = w.kv_lengths()
        assert len(lengths) == w.B and min(lengths) == round(0.1 * w.A) and max(lengths) == w.A
        assert "ragged keys" in w.title()


def test_stats_suite_rows(capsys, monkeypatch, tmp_path):
    _tiny_suites(monkeypatch)
    rc, out, err = _main(capsys, "--suite", "stats", "--output", str(tmp_path), *TINY)
    assert rc == 0, err
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["failed"]
    assert {(r["impl"], r["mode"]) for r in data["rows"]} == {
        (i, m) for i in ("eager", "crossattn[torch] weights=full", "crossattn[torch] statistics (return_aux)")
        for m in ("fwd", "fwd+bwd")}
    assert data["skipped"]["sdpa"] == "returns no weights to take statistics of"
    assert "## stats_tiny" in out and "top-4" in out


def test_ragged_suite_rows(capsys, monkeypatch, tmp_path):
    _tiny_suites(monkeypatch)
    rc, out, err = _main(capsys, "--suite", "ragged", "--output", str(tmp_path), "--modes", "fwd",
                         "--impls", "weights=off,unpadded,packed", *TINY)
    assert rc == 0, err
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["failed"]
    assert {r["impl"] for r in data["rows"]} == {
        "eager", "sdpa", "crossattn[torch] weights=off", "crossattn[torch] same batch unpadded (full length)",
        "crossattn[torch] packed (each example at its length)"}
    assert "lengths 6..64 of A" in out


def _core_inputs(w):
    inputs = W.make_inputs(w, "cpu", torch.float64)
    key_pad = None if inputs.audio_mask is None else inputs.audio_mask == 0
    return inputs.text, inputs.audio, inputs.value, key_pad


def test_every_stats_row_computes_the_same_statistics():
    w = W.Workload("stats_tiny", 2, 8, 50, 32, 2, kind="stats")
    q, k, v, _ = _core_inputs(w)
    out_e, weights = impls_mod.eager_core(q, k, v, None, 0.0, False)
    eager = impls_mod.stats_from_weights(weights)
    out_s, none, fused = impls_mod.crossattn_stats_core("torch")(q, k, v, None, 0.0, False)
    assert none is None
    torch.testing.assert_close(out_s, out_e)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a.double(), b)


def test_packed_rows_compute_what_the_padded_call_does():
    w = W.Workload("ragged_tiny", 4, 8, 64, 32, 2, kind="core", kv_fractions=(0.1, 0.4, 0.7, 1.0))
    q, k, v, key_pad = _core_inputs(w)
    assert (~key_pad).sum(-1).tolist() == [6, 26, 45, 64]
    padded, _ = impls_mod.crossattn_core("torch", False)(q, k, v, key_pad, 0.0, False)
    packed, _ = impls_mod.crossattn_packed_core("torch")(q, k, v, key_pad, 0.0, False)
    torch.testing.assert_close(packed, padded)


def test_kv_fractions_must_match_the_batch():
    with pytest.raises(ValueError, match="kv_fractions has 2 entries for B = 3"):
        W.make_inputs(W.Workload("bad", 3, 4, 8, 8, 2, kind="core", kv_fractions=(0.5, 1.0)), "cpu", torch.float32)
