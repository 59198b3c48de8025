"""crossattn-train and crossattn-attention-map on the CPU at tiny scale."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from crossattn import attention_map, train  # noqa: E402


def _common(tmp_path, out, *extra):
    return ["--output", str(tmp_path / out), "--data-dir", str(tmp_path / "data"), "--per-class", "6",
            "--batch-size", "6", "--no-progress", "--d-model", "32", *extra]


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_train_emotion_model_checkpoint_metrics_and_heat_map(tmp_path, monkeypatch, capsys):
    assert train.main(_common(tmp_path, "run", "--epochs", "2", "--diversity-weight", "0.01",
                              "--alignment-weight", "0.1")) == 0
    run = tmp_path / "run"
    # Results on stdout, 4 decimals; the last line says where the files went.
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1] == f"wrote {run / 'checkpoint.pt'} and {run / 'metrics.jsonl'}"
    for epoch, line in enumerate(out[:2], 1):
        assert re.fullmatch(rf"epoch {epoch}/2 step {5 * epoch} loss=\d+\.\d{{4}} validation: "
                            r"accuracy=\d\.\d{4} weighted_f1=\d\.\d{4}", line), line
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 0 and ckpt["step"] == 2 * 5  # 29 train items / 6
    assert not (run / "checkpoint.pt.tmp").exists()
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    val = metrics[-1]["validation"]
    cm = np.array(val["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == val["n"] == 7
    assert abs(val["accuracy"] - np.trace(cm) / cm.sum()) < 1e-12
    assert 0.0 <= val["weighted_f1"] <= 1.0 and "accuracy_congruent" in val
    assert "test" in metrics[-1]
    png = tmp_path / "map.png"
    assert attention_map.main(["--checkpoint", str(run / "checkpoint.pt"), "--index", "0", "--output", str(png)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and re.fullmatch(rf"predicted \w+ \(label \w+\); wrote {re.escape(str(png))} "
                                              r"\(\d+ tokens x \d+ frames; \d+ tokens placed on their words\)",
                                              printed[0]), printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # Any utterance: text + a 16-bit PCM wav.
    from crossattn.data import write_wav

    t = np.arange(24000) / 16000
    write_wav(tmp_path / "u.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    png2 = tmp_path / "map2.png"
    assert attention_map.main(["--checkpoint", str(run / "checkpoint.pt"), "--text", "I am so happy",
                               "--wav", str(tmp_path / "u.wav"), "--output", str(png2)]) == 0
    assert png2.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        attention_map.main(["--checkpoint", str(run / "checkpoint.pt"), "--text", "x", "--output", str(png2)])
    _heat_map_cli_draws_the_word_boundaries(tmp_path, str(run / "checkpoint.pt"), monkeypatch, capsys)


def _heat_map_cli_draws_the_word_boundaries(tmp_path, ckpt, monkeypatch, capsys):
    """--index draws the corpus's word timings, --words a given alignment, on a time axis where
    log-mel frame k is centred at 40 ms * k + 16 ms; the boundaries change the picture. (Part
    of the test above: it reuses that run.)"""
    from crossattn.data import SyntheticEmotionCorpus
    from crossattn.models.alignment import token_spans

    calls = []
    real = attention_map.render
    monkeypatch.setattr(attention_map, "render", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    assert attention_map.main(["--checkpoint", ckpt, "--index", "1", "--output", str(tmp_path / "a.png")]) == 0
    (w, tokens, per_frame, _, _), kw = calls[-1]
    state = torch.load(ckpt, weights_only=True)
    corpus = SyntheticEmotionCorpus(tmp_path / "data", per_class=6, seed=0)
    item = corpus[corpus.split((0.7, 0.15, 0.15), seed=0)[2][1]]
    assert item["words"] and kw["word_spans"] == token_spans(tokens, item["words"]) and state["args"]["seed"] == 0
    assert sum(s is not None for s in kw["word_spans"]) == len(item["words"])  # every spoken word placed
    assert per_frame == pytest.approx(0.04) and kw["offset"] == pytest.approx(-0.004)
    # Any utterance with --words; without it nothing is drawn, and the two pictures differ.
    words = tmp_path / "w.json"
    words.write_text(json.dumps([["so", 0.1, 0.4], ["happy", 0.45, 0.9]]))
    base = ["--checkpoint", ckpt, "--text", "so happy", "--wav", str(tmp_path / "u.wav")]
    assert attention_map.main([*base, "--words", str(words), "--output", str(tmp_path / "b.png")]) == 0
    assert calls[-1][1]["word_spans"] == [None, (0.1, 0.4), (0.45, 0.9)]
    assert attention_map.main([*base, "--output", str(tmp_path / "c.png")]) == 0
    assert calls[-1][1]["word_spans"] is None
    assert (tmp_path / "b.png").read_bytes() != (tmp_path / "c.png").read_bytes()
    capsys.readouterr()
    for bad, needle in (("[]", "expected a non-empty JSON list of [word, start_s, end_s], got an empty list"),
                        ('{"so": 1}', "got a JSON dict"), ('[["so", 0.5, 0.1]]', "entry 0 must be"),
                        ('[["so", 0.1]]', "entry 0 must be"), ("{", "not valid JSON")):
        words.write_text(bad)
        with pytest.raises(SystemExit) as info:
            attention_map.main([*base, "--words", str(words), "--output", str(tmp_path / "d.png")])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"--words {words}: " in err and needle in err, err


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    args = ["--epochs", "2", "--seed", "3"]
    assert train.main(_common(tmp_path, "straight", *args)) == 0
    # Interrupted after 3 steps (mid-epoch), then resumed.
    assert train.main(_common(tmp_path, "resumed", *args, "--max-steps", "3", "--save-every", "1")) == 0
    mid = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (mid["epoch"], mid["batch_in_epoch"], mid["step"]) == (0, 3, 3)
    assert train.main(_common(tmp_path, "resumed", *args, "--resume")) == 0
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert b["step"] == a["step"] == 10
    for name, t in a["model"].items():
        torch.testing.assert_close(b["model"][name], t, rtol=0, atol=0, msg=name)


def test_config_file_and_argument_errors(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"epochs": 1, "fusion": "concat", "max-steps": 2, "per_class": 6}))
    assert train.main(["--config", str(cfg), "--output", str(tmp_path / "c"), "--data-dir",
                       str(tmp_path / "data"), "--no-progress", "--d-model", "32"]) == 0
    state = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert state["args"]["fusion"] == "concat" and state["step"] == 2
    cfg.write_text(json.dumps({"epochz": 1}))
    with pytest.raises(SystemExit):
        train.main(["--config", str(cfg), "--output", str(tmp_path / "d")])
    assert "unknown options ['epochz']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--data", "mmsa", "--output", str(tmp_path / "e")])
    assert "--data mmsa needs --pickle" in capsys.readouterr().err


def _pickle(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        return {"text": rng.normal(size=(n, 8, 12)).astype(np.float32),
                "audio": rng.normal(size=(n, 8, 5)).astype(np.float32),
                "vision": rng.normal(size=(n, 8, 6)).astype(np.float32),
                "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)}

    path = tmp_path / "aligned.pkl"
    path.write_bytes(pickle.dumps({"train": split(12), "valid": split(4), "test": split(4)}))
    return path


@pytest.mark.parametrize("model, target", [("hctdmg", "acc7"), ("hctdmg", "regression"), ("early", "acc2"),
                                           ("late", "acc7"), ("attention", "acc2_has0"), ("attention", "regression")])
def test_feature_models_train_on_an_aligned_pickle(tmp_path, model, target):
    from crossattn.data import mmsa_regression_metrics

    out = tmp_path / "m"
    assert train.main(["--data", "mmsa", "--pickle", str(_pickle(tmp_path)), "--model", model, "--target", target,
                       "--epochs", "1", "--batch-size", "4", "--output", str(out), "--no-progress",
                       "--d-model", "16", "--heads", "2"]) == 0
    val = _metrics(out)[0]["validation"]
    assert val["n"] == 4
    if target == "regression":  # MMSA's metrics, from the one implementation
        assert set(val) == set(mmsa_regression_metrics(torch.zeros(2), torch.ones(2))) | {"n"}
    else:
        assert "MAE" not in val and len(val["confusion_matrix"]) == (7 if target == "acc7" else 2)


def test_iemocap_emotions_train_as_four_binary_decisions(tmp_path, capsys):
    rng = np.random.default_rng(1)

    def split(n):
        present = rng.integers(0, 2, size=(n, 4))
        return {"text": rng.normal(size=(n, 5, 6)).astype(np.float32),
                "audio": rng.normal(size=(n, 5, 3)).astype(np.float32),
                "vision": rng.normal(size=(n, 5, 4)).astype(np.float32),
                "labels": np.stack([1 - present, present], -1).astype(np.float32)}

    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps({"train": split(8), "valid": split(4), "test": split(4)}))
    out = tmp_path / "iemo"
    assert train.main(["--data", "mmsa", "--pickle", str(path), "--model", "early", "--target", "emotions",
                       "--epochs", "1", "--batch-size", "4", "--output", str(out), "--no-progress",
                       "--d-model", "16", "--heads", "2"]) == 0
    val = _metrics(out)[0]["validation"]
    accs = [val[f"{e}_acc"] for e in ("neutral", "happy", "sad", "angry")]
    assert val["n"] == 4 and val["accuracy"] == pytest.approx(sum(accs) / 4)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["num_outputs"] == 8
    capsys.readouterr()
    with pytest.raises(SystemExit):  # those labels allow no other target: the loader says so
        train.main(["--data", "mmsa", "--pickle", str(path), "--model", "early", "--output", str(tmp_path / "x"),
                    "--no-progress"])
    assert "use target='emotions'" in capsys.readouterr().err


def test_meld_root_trains_on_its_splits_and_reports_skipped_clips(tmp_path, capsys):
    """MELD.Raw's layout: each split its own clip folder; an unreadable clip is skipped with a
    note on stderr; the test split is evaluated."""
    import csv

    from crossattn.data import write_wav

    root = tmp_path / "MELD.Raw"
    lines = ["I am so happy", "this is sad", "leave me alone", "what a surprise"]
    for split, folder in (("train", "train_splits"), ("dev", "dev_splits_complete"),
                          ("test", "output_repeated_splits_test")):
        (root / folder).mkdir(parents=True)
        with open(root / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"])
            for i, emo in enumerate(("joy", "sadness", "anger", "surprise")):
                w.writerow([i + 1, lines[i], "Ross", emo, 0, i])
                write_wav(root / folder / f"dia0_utt{i}.wav", np.full(6000, 0.1, np.float32), 16000)
    (root / "train_splits" / "dia0_utt3.wav").write_bytes(b"not a wav")
    out = tmp_path / "meld"
    assert train.main(["--data", "meld", "--meld-root", str(root), "--epochs", "1", "--batch-size", "2",
                       "--output", str(out), "--no-progress", "--d-model", "16", "--heads", "2"]) == 0
    assert "MELD train: skipped 1 of 4 utterances (1 unreadable)" in capsys.readouterr().err
    m = _metrics(out)[0]
    assert m["validation"]["n"] == 4 and m["test"]["n"] == 4 and m["step"] == 2  # 3 train items, batches of 2


@pytest.mark.parametrize("model", ["late", "early", "attention"])
def test_fusion_baselines_train_on_the_synthetic_corpus(tmp_path, model):
    assert train.main(_common(tmp_path, model, "--model", model, "--epochs", "1", "--heads", "2")) == 0
    assert _metrics(tmp_path / model)[0]["validation"]["n"] == 7


@pytest.mark.slow
def test_training_under_torchrun_ddp(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "crossattn.train", *_common(tmp_path, "ddp", "--epochs", "1", "--device", "cpu")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 3  # 29 items over 2 ranks, batches of 6
    assert len(_metrics(tmp_path / "ddp")) == 1
