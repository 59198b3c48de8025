"""The demo's word timestamps (issue 17): frame -> seconds conversion, top-k trimming, and the
corpus path at tiny size (builtin voice, CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from crossattn import alignment


def test_perfect_alignment_gives_the_true_timings():
    hop, offset = 0.01, 0.011
    frame_runs = [(0, 4), (5, 5), (6, 19), (20, 31)]  # token i covers frames lo..hi
    truth = [(f"w{i}", offset + lo * hop, offset + (hi + 1) * hop) for i, (lo, hi) in enumerate(frame_runs)]
    tokens = torch.cat([torch.full((hi - lo + 1,), i) for i, (lo, hi) in enumerate(frame_runs)])
    frames = torch.arange(32)
    al = alignment.Alignment(tokens, frames, *alignment._spans(tokens, frames, 4))
    spans = alignment.word_spans(al, [0, 1, 2, 3], frame_seconds=hop, offset=offset)
    pred = [(truth[w][0], s, e) for w, s, e in spans]
    assert alignment.boundary_error(pred, truth) < 1e-12
    # Timings off the frame grid are read to the nearest frame slot: at most half a hop off.
    shifted = [(w, s + 0.004, e - 0.003) for w, s, e in truth]
    assert math.isclose(alignment.boundary_error(pred, shifted), 0.0035, rel_tol=1e-9)
    with pytest.raises(ValueError, match="same words"):
        alignment.boundary_error(pred[:2], truth)


def test_trim_to_top_k_keeps_the_frames_on_each_run():
    tokens, frames = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.arange(8)
    al = alignment.Alignment(tokens, frames, torch.tensor([0, 4]), torch.tensor([3, 7]))
    # Token 0 attends frames 1, 2 (and 6, off its run); token 1 frame 6 (and 0-2, off its run).
    idx = torch.tensor([[[1, 6], [6, 0]], [[2, 6], [1, 2]]])  # [h=2, T=2, k=2]
    trimmed = alignment.trim_to_top_k(al, idx)
    assert trimmed.starts.tolist() == [1, 6] and trimmed.ends.tolist() == [2, 6]
    none_on_run = torch.tensor([[[5, 6], [0, 1]]])
    kept = alignment.trim_to_top_k(al, none_on_run)
    assert kept.starts.tolist() == [0, 4] and kept.ends.tolist() == [3, 7]


def test_demo_timestamps_at_tiny_size(tmp_path):
    pytest.importorskip("numpy")
    from crossattn import demo_timestamps

    lines = []
    res = demo_timestamps.run(tmp_path, per_class=2, steps=3, held_out=4, print_fn=lines.append)
    text = "\n".join(lines)
    assert "true start" in text and "pred end" in text and "mean |boundary error|" in text
    assert len(res["rows"]) >= 3 and len(res["losses"]) == 3
    for name in ("trained", "untrained", "proportional"):
        assert math.isfinite(res["errors_ms"][name]) and res["errors_ms"][name] >= 0
    for _word, ts, te, ps, pe in res["rows"]:
        assert 0 <= ts < te and ps < pe


def test_demo_rejects_bad_timestamp_steps(capsys):
    from crossattn import demo

    with pytest.raises(SystemExit) as e:
        demo.main(["--timestamp-steps", "-2"])
    assert e.value.code == 2
    assert "--timestamp-steps must be" in capsys.readouterr().err
