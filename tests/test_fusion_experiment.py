"""The fusion experiment's machinery at a tiny size (the committed results come from a full
run of the same script), its statistics, and the alignment-to-word-timings check."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from crossattn.models.alignment import frame_centres, token_spans, word_alignment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _experiment():
    spec = importlib.util.spec_from_file_location("fusion_experiment", ROOT / "benchmarks" / "fusion_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_bootstrap_and_verdicts():
    fe = _experiment()
    rng = np.random.default_rng(0)
    b = rng.random((5, 400)) < 0.7
    a = b | (rng.random((5, 400)) < 0.2)  # a is right wherever b is, and more often
    diff, lo, hi = fe.paired_bootstrap(a, b)
    assert diff == pytest.approx(100 * (a.mean() - b.mean())) and 0 < lo < diff < hi
    same_diff, same_lo, same_hi = fe.paired_bootstrap(b, b)
    assert same_diff == same_lo == same_hi == 0
    assert fe.verdict(3.0, 1.0, 5.0, 12.3).startswith("supported in direction; the claimed +12.3 is above")
    assert fe.verdict(3.0, 1.0, 5.0, None) == "supported"
    assert fe.verdict(-3.0, -5.0, -1.0, 7.8).startswith("contradicted")
    assert fe.verdict(0.5, -2.0, 3.0, 7.8) == ("inconclusive at this resolution; an effect as large as the "
                                              "claimed +7.8 is excluded")
    assert fe.verdict(0.5, -2.0, 9.0, 7.8) == "inconclusive at this resolution"


@pytest.mark.slow
def test_experiment_runs_end_to_end_at_a_tiny_size(tmp_path):
    fe = _experiment()
    out = tmp_path / "fe"
    variants = ["text only", "bidirectional attention", "HCT-DMG", "late fusion (majority vote)",
                "early fusion (concatenation)"]
    assert fe.main(["--per-class", "8", "--epochs", "1", "--seeds", "0", "1", "--engine", "builtin", "--jobs", "1",
                    "--width", "16", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                    "--variants", *variants]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["engine"] == "builtin" and set(saved["results"]) == set(variants)
    n_test = saved["n_test"]
    for name in variants:
        runs = saved["results"][name]["runs"]
        assert [r["seed"] for r in runs] == [0, 1] and all(len(r["predictions"]) == n_test for r in runs)
    claims = {(c["a"], c["b"]) for c in saved["claims"]}
    assert ("early fusion (concatenation)", "late fusion (majority vote)") in claims
    assert ("bidirectional attention", "text only") in claims
    assert all(c["lo"] <= c["diff"] <= c["hi"] for c in saved["claims"])
    assert saved["hctdmg"]["primary"][0] in ("text", "audio", "vision")
    assert saved["results"]["HCT-DMG"]["runs"][0]["parameters"]["per_step"] < \
        saved["results"]["HCT-DMG"]["runs"][0]["parameters"]["total"]
    assert "bidirectional attention" in saved["alignment"] and "bidirectional attention" in saved["gates"]
    md = out.with_suffix(".md").read_text()
    assert "**Speech engine: builtin.**" in md and "early fusion (concatenation) − late fusion" in md
    assert (tmp_path / "fe_attention.png").stat().st_size > 1000
    before = md
    out.with_suffix(".md").unlink()
    assert fe.main(["--from-json", "--out", str(out)]) == 0 and out.with_suffix(".md").read_text() == before
    # A supplement (seed 002's fixed-hierarchy ablation) on the same corpus and split: the
    # re-run HCT-DMG reproduces its predictions, the new claims get intervals of their own.
    common = ["--per-class", "8", "--epochs", "1", "--seeds", "0", "1", "--engine", "builtin", "--jobs", "1",
              "--width", "16", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert fe.main([*common, "--supplement", "--note", "Why.", "--variants", "HCT-DMG",
                    "HCT, fixed primary: audio"]) == 0
    sup = json.loads(out.with_suffix(".json").read_text())["supplements"][0]
    assert sup["reproduced"] == {"HCT-DMG": [True, True]} and set(sup["results"]) == {"HCT-DMG",
                                                                                     "HCT, fixed primary: audio"}
    assert [(c["a"], c["b"]) for c in sup["claims"]] == [("HCT-DMG", "HCT, fixed primary: audio")]
    assert all(r["primary"] == "audio" for r in sup["results"]["HCT, fixed primary: audio"]["runs"])
    md = out.with_suffix(".md").read_text()
    assert md.startswith(before) and "## Added run: HCT, fixed primary: audio" in md and "2 of 2 seeds" in md
    with pytest.raises(SystemExit):  # other settings: not the stored run's corpus
        fe.main([*common[2:], "--per-class", "9", "--supplement", "--variants", "HCT-DMG"])


def test_token_spans_skip_cls_and_punctuation():
    words = [["the", 0.05, 0.40], ["day", 0.45, 0.80], ["it", 0.90, 1.10]]
    spans = token_spans(["[CLS]", "the", "day", ",", "it"], words)
    assert spans == [None, (0.05, 0.40), (0.45, 0.80), None, (0.90, 1.10)]


def test_token_spans_keep_matching_after_an_unknown_word():
    words = [["the", 0.05, 0.40], ["gloomy", 0.45, 0.80], ["day", 0.90, 1.10]]
    assert token_spans(["[CLS]", "the", "[UNK]", "day"], words) == [None, (0.05, 0.40), None, (0.90, 1.10)]


def test_frame_geometry_of_the_audio_encoders():
    """Frame k is centred at first + k * step: log-mel (10 ms hop, two stride-2 convs, 512-point
    window) and Wav2Vec2's conv stack (stride 320, receptive field 400 samples)."""
    from crossattn.models import LogMelEncoder
    from crossattn.models.alignment import frame_geometry
    from crossattn.models.encoders import tiny_wav2vec2

    assert frame_geometry(LogMelEncoder()) == pytest.approx((0.04, 0.016))
    assert frame_geometry(LogMelEncoder(layers=0)) == pytest.approx((0.01, 0.016))
    w2v = tiny_wav2vec2(hidden=16, layers=1)
    step, first = frame_geometry(w2v)
    assert step == pytest.approx(320 / 16000) and first == pytest.approx(199.5 / 16000)
    # the receptive field it implies gives Wav2Vec2's own frame count
    for samples in (400, 719, 720, 16000):
        frames = int(w2v._get_feat_extract_output_lengths(torch.tensor(samples)))
        assert frames == (samples - 400) // 320 + 1
    assert frame_geometry(torch.nn.Linear(2, 2)) is None


def test_word_alignment_tells_aligned_from_uniform_and_misaligned():
    centres = frame_centres(30, 0.04, 0.016)  # frames centred at 16, 56, ... ms
    spans = [None, (0.0, 0.4), (0.4, 0.8), (0.8, 1.2)]
    aligned = torch.full((4, 30), 1e-3)
    for i, s in enumerate(spans):
        if s is not None:
            aligned[i, (centres >= s[0]) & (centres < s[1])] = 1.0
    aligned = aligned / aligned.sum(-1, keepdim=True)
    res = word_alignment(aligned, spans, centres)
    assert res["tokens"] == 3 and res["mass"] > 0.95 and res["hit"] == 1.0 and res["chance"] == pytest.approx(1 / 3)
    uniform = word_alignment(torch.full((4, 30), 1 / 30), spans, centres)
    assert uniform["mass"] == pytest.approx(uniform["chance"])
    shifted = word_alignment(aligned[[0, 2, 3, 1]], spans, centres)  # each word token looks at another word
    assert shifted["mass"] < shifted["chance"] and shifted["hit"] == 0.0
    with pytest.raises(ValueError, match=r"weights must be \[T, A\] = \[4, 30\]"):
        word_alignment(aligned[:, :10], spans, centres)


def test_heat_map_shows_near_uniform_weights_as_uniform(tmp_path):
    """A fixed scale relative to 1/A: noise around uniform stays white; a peaked map does not."""
    import matplotlib.image as mpimg

    from crossattn.attention_map import render

    g = torch.Generator().manual_seed(0)
    near = torch.full((5, 40), 1 / 40) * (1 + 0.07 * torch.rand(5, 40, generator=g))  # 0.0215..0.0248-like
    near = near / near.sum(-1, keepdim=True)
    peaked = torch.full((5, 40), 1e-4)
    peaked[torch.arange(5), torch.arange(5) * 8] = 1.0
    spans = [None, (0.0, 0.3), (0.3, 0.6), (0.6, 1.0), (1.0, 1.6)]

    def saturated(w):
        path = tmp_path / "map.png"
        render(w, ["[CLS]", "a", "b", "c", "d"], 0.04, "t", path, word_spans=spans)
        rgb = mpimg.imread(path)[..., :3]
        return (rgb.max(-1) - rgb.min(-1) > 0.25).mean()  # coloured pixels (not white, grey or black)

    # only the colour bar is saturated (the same in every map) unless the weights leave uniform
    base = saturated(torch.full((5, 40), 1 / 40))
    assert abs(saturated(near) - base) < 5e-4 and saturated(peaked) > base + 0.01
