"""Data: the synthetic spoken-emotion corpus, the MELD and MulT/MMSA loaders (on small files
written here in their formats), and collation."""
from __future__ import annotations

import csv
import hashlib
import pickle

import numpy as np
import pytest
import torch

from crossattn.data import (
    AlignedPickleDataset, EmotionCollator, FeatureCollator, MELDDataset, SyntheticEmotionCorpus,
    espeak_available, iemocap_metrics, mmsa_regression_metrics, read_wav, write_wav,
)
from crossattn.models import EMOTIONS, WordTokenizer

ENGINES = ["builtin"] + (["espeak"] if espeak_available() else [])


def _digest(corpus):
    h = hashlib.sha1()
    for s in corpus.samples:
        h.update((corpus.dir / s["file"]).read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("engine", ENGINES)
def test_synthetic_corpus_is_deterministic_and_cached(tmp_path, engine):
    a = SyntheticEmotionCorpus(tmp_path / "a", per_class=3, seed=4, engine=engine)
    b = SyntheticEmotionCorpus(tmp_path / "b", per_class=3, seed=4, engine=engine)
    assert len(a) == 3 * len(EMOTIONS)
    assert a.samples == b.samples and _digest(a) == _digest(b)
    stamp = (a.dir / "manifest.json").stat().st_mtime_ns
    again = SyntheticEmotionCorpus(tmp_path / "a", per_class=3, seed=4, engine=engine)
    assert (again.dir / "manifest.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    other = SyntheticEmotionCorpus(tmp_path / "a", per_class=3, seed=5, engine=engine)
    assert other.dir != a.dir and other.samples != a.samples
    item = a[0]
    assert set(item) == {"text", "waveform", "label", "text_emotion", "voice_emotion", "congruent", "condition",
                         "words", "metadata"}
    assert item["waveform"].dtype == torch.float32 and item["waveform"].numel() > 8000
    assert item["waveform"].abs().max() <= 1.0 and item["waveform"].abs().max() > 0.01
    assert set(item["metadata"]) == {"age", "gender", "timbre"}
    assert sorted({s["label"] for s in a.samples}) == list(range(len(EMOTIONS)))
    assert {s["metadata"]["gender"] for s in a.samples} == {0, 1}


def test_synthetic_prosody_follows_the_emotion(tmp_path):
    """Happy voices are louder and higher than sad ones (prosody is what carries the label)."""
    c = SyntheticEmotionCorpus(tmp_path, per_class=6, seed=0, incongruent_fraction=0.0, engine=ENGINES[-1])

    def rms(label):
        xs = [c[i]["waveform"] for i, s in enumerate(c.samples) if s["label"] == EMOTIONS.index(label)]
        return float(torch.stack([x.pow(2).mean().sqrt() for x in xs]).mean())

    assert rms("angry") > rms("sad")


def test_incongruent_fraction(tmp_path):
    none = SyntheticEmotionCorpus(tmp_path, per_class=4, seed=1, incongruent_fraction=0.0, engine="builtin")
    assert all(s["congruent"] and s["text_emotion"] == EMOTIONS[s["label"]] for s in none.samples)
    every = SyntheticEmotionCorpus(tmp_path, per_class=4, seed=1, incongruent_fraction=1.0, engine="builtin")
    assert not any(s["congruent"] for s in every.samples)
    assert all(s["text_emotion"] != EMOTIONS[s["label"]] for s in every.samples)
    with pytest.raises(ValueError, match="incongruent_fraction"):
        SyntheticEmotionCorpus(tmp_path, incongruent_fraction=1.5)


@pytest.mark.parametrize("engine", ENGINES)
def test_conditions_place_the_emotion_and_words_are_timed(tmp_path, engine):
    emos = ("neutral", "happy", "sad", "angry")
    c = SyntheticEmotionCorpus(tmp_path, per_class=8, seed=0, engine=engine, emotions=emos,
                               conditions={"words": 1, "voice": 1, "congruent": 1, "incongruent": 1})
    assert len(c) == 32 and {s["condition"] for s in c.samples} == {"words", "voice", "congruent", "incongruent"}
    for s in c.samples:
        label, te, ve = EMOTIONS[s["label"]], s["text_emotion"], s["voice_emotion"]
        assert label in emos
        expected = {"words": (label, "neutral"), "voice": ("neutral", label), "congruent": (label, label)}
        if s["condition"] == "incongruent":  # the voice's emotion wins; the words carry another one
            assert ve == label != te and "neutral" not in (te, ve)
        else:
            assert (te, ve) == expected[s["condition"]]
    item = c[0]
    spoken = [w.strip(",.!?") for w in item["text"].split()]
    assert [w[0] for w in item["words"]] == spoken
    seconds = item["waveform"].numel() / 16000
    starts, ends = [w[1] for w in item["words"]], [w[2] for w in item["words"]]
    assert all(a < b for a, b in zip(starts, ends)) and all(e <= s for e, s in zip(ends, starts[1:]))
    assert ends[-1] <= seconds + 1e-3
    # voiced inside the words, silent in the pauses between them
    x = item["waveform"]
    gap = x[int(ends[0] * 16000) + 8: int(starts[1] * 16000) - 8]
    word = x[int(starts[1] * 16000): int(ends[1] * 16000)]
    assert gap.abs().max() < 1e-3 < word.abs().max()
    with pytest.raises(ValueError, match="conditions must map names"):
        SyntheticEmotionCorpus(tmp_path, emotions=emos, conditions={"both": 1})
    with pytest.raises(ValueError, match="need 'neutral' in emotions"):
        SyntheticEmotionCorpus(tmp_path, emotions=("happy", "sad"), conditions={"words": 1})


def test_split_is_stratified_and_disjoint(tmp_path):
    c = SyntheticEmotionCorpus(tmp_path, per_class=10, seed=2, engine="builtin")
    train, val, test = c.split((0.6, 0.2, 0.2), seed=0)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    assert sorted(train + val + test) == list(range(len(c)))
    for part, n in ((train, 6), (val, 2), (test, 2)):
        counts = np.bincount([c.samples[i]["label"] for i in part], minlength=len(EMOTIONS))
        assert (counts == n).all()


def test_wav_round_trip_and_resampling(tmp_path):
    t = np.arange(22050) / 22050
    x = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    write_wav(tmp_path / "x.wav", x, 22050)
    back = read_wav(tmp_path / "x.wav")
    assert back.numel() == 22050 and float((back - torch.from_numpy(x)).abs().max()) < 1e-4
    assert read_wav(tmp_path / "x.wav", 16000).numel() == 16000


# --------------------------------------------------------------------------- MELD
def _write_meld(tmp_path, rows, with_audio=True):
    csv_path = tmp_path / "train_sent_emo.csv"
    cols = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
            "Season", "Episode", "StartTime", "EndTime"]
    audio = tmp_path / "audio"
    audio.mkdir(exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for n, (text, emotion, dia, utt) in enumerate(rows):
            w.writerow([n + 1, text, "Ross", emotion, "neutral", dia, utt, 1, 1, "00:00:01,000", "00:00:02,000"])
            if with_audio:
                write_wav(audio / f"dia{dia}_utt{utt}.wav", np.full(8000 + 100 * n, 0.1, np.float32), 16000)
    return csv_path, audio


def test_meld_loader(tmp_path):
    csv_path, audio = _write_meld(tmp_path, [("Oh my God!", "surprise", 0, 0), ("I hate this.", "anger", 0, 1),
                                             ("Yeah, great.", "joy", 3, 2)])
    ds = MELDDataset(csv_path, audio)
    assert len(ds) == 3 and ds.skipped == 0
    assert [ds[i]["label"] for i in range(3)] == [EMOTIONS.index(e) for e in ("surprise", "angry", "happy")]
    assert ds[2]["text"] == "Yeah, great." and ds[2]["waveform"].numel() == 8200
    (audio / "dia3_utt2.wav").unlink()
    assert len(MELDDataset(csv_path, audio)) == 2
    with pytest.raises(FileNotFoundError, match="dia3_utt2.wav"):
        MELDDataset(csv_path, audio, missing_audio="error")


def test_meld_loader_skips_or_refuses_unreadable_audio(tmp_path):
    """A clip that exists but cannot be read (not a wav, 8-bit, empty) is skipped and counted
    with the missing ones, or with missing_audio="error" named in a ValueError."""
    rows = [("a", "joy", 0, 0), ("b", "anger", 0, 1), ("c", "fear", 0, 2), ("d", "neutral", 0, 3),
            ("e", "sadness", 0, 4)]
    csv_path, audio = _write_meld(tmp_path, rows)
    (audio / "dia0_utt1.wav").write_bytes(b"ID3\x04 an mp3 renamed to .wav")
    write_wav(audio / "dia0_utt2.wav", np.zeros(0, np.float32), 16000)  # header only, no samples
    (audio / "dia0_utt4.wav").unlink()
    ds = MELDDataset(csv_path, audio)
    assert [r["text"] for r in ds.rows] == ["a", "d"]
    assert ds.skipped == 3 and ds.skip_reasons == {"missing": 1, "unreadable": 2}
    assert ds[1]["waveform"].numel() == 8300
    with pytest.raises(ValueError, match=r"dia0_utt1\.wav: unreadable: Error"):
        MELDDataset(csv_path, audio, missing_audio="error")
    with pytest.raises(ValueError, match="missing_audio must be"):
        MELDDataset(csv_path, audio, missing_audio="ignore")
    # A clip broken after the CSV was read: a clear error naming it, not a crash in numpy
    (audio / "dia0_utt3.wav").write_bytes((audio / "dia0_utt3.wav").read_bytes()[:47])
    with pytest.raises(ValueError, match=r"dia0_utt3\.wav: unreadable audio"):
        ds[1]


def test_meld_splits_read_their_own_audio_folders(tmp_path):
    """MELD.Raw reuses dia/utt names across splits: each split must read its own clips."""
    root = tmp_path / "MELD.Raw"
    for split, folder, length in (("train", "train_splits", 8000), ("dev", "dev_splits_complete", 9000),
                                  ("test", "output_repeated_splits_test", 10000)):
        (root / folder).mkdir(parents=True)
        with open(root / f"{split}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"])
            w.writerow([1, f"{split} line", "Monica", "joy", 0, 0])
        write_wav(root / folder / "dia0_utt0.wav", np.full(length, 0.1, np.float32), 16000)
    sizes = {s: MELDDataset.from_root(root, s)[0]["waveform"].numel() for s in ("train", "dev", "test")}
    assert sizes == {"train": 8000, "dev": 9000, "test": 10000}
    assert MELDDataset.from_root(root, "dev")[0]["text"] == "dev line"
    with pytest.raises(ValueError, match="split must be one of"):
        MELDDataset.from_root(root, "valid")
    (root / "dev_splits_complete" / "dia0_utt0.wav").rename(root / "dia0_utt0.wav")
    import shutil
    shutil.rmtree(root / "dev_splits_complete")
    with pytest.raises(FileNotFoundError, match="no audio folder for MELD's 'dev' split"):
        MELDDataset.from_root(root, "dev")


def test_meld_loader_rejects_bad_files(tmp_path):
    csv_path, audio = _write_meld(tmp_path, [("Hi", "boredom", 0, 0)])
    with pytest.raises(ValueError, match="unknown emotion 'boredom'"):
        MELDDataset(csv_path, audio)
    bad = tmp_path / "bad.csv"
    bad.write_text("Text,Label\nhi,joy\n")
    with pytest.raises(ValueError, match="missing columns"):
        MELDDataset(bad, audio)


# --------------------------------------------------------------------------- MulT / MMSA
def _mult_split(rng, n, L=6):
    return {"text": rng.normal(size=(n, L, 5)).astype(np.float32),
            "audio": rng.normal(size=(n, L, 3)).astype(np.float32),
            "vision": rng.normal(size=(n, L, 4)).astype(np.float32),
            "labels": np.array([-2.6, -0.4, 0.0, 0.4, 1.5, 3.2][:n], np.float32).reshape(n, 1, 1)}


def test_mult_pickle_loader(tmp_path):
    rng = np.random.default_rng(0)
    data = {"train": _mult_split(rng, 6), "valid": _mult_split(rng, 2), "test": _mult_split(rng, 2)}
    data["train"]["audio"][1, 2, 0] = -np.inf  # MOSEI's audio features hold -inf
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(pickle.dumps(data))
    reg = AlignedPickleDataset(path, "train", "regression")
    assert reg.dims == (5, 3, 4) and len(reg) == 6
    torch.testing.assert_close(reg[4]["label"], torch.tensor([1.5]))
    assert np.isfinite(reg[1]["features"][1]).all()
    assert AlignedPickleDataset(path, "train", "acc7").labels.tolist() == [0, 3, 3, 3, 5, 6]
    # scores -2.6 -0.4 0.0 0.4 1.5 3.2: non-0 convention drops the 0; has-0 counts it as non-negative
    non0 = AlignedPickleDataset(path, "train", "acc2")
    assert non0.labels.tolist() == [0, 0, 1, 1, 1] and non0.index.tolist() == [0, 1, 3, 4, 5]
    assert len(non0) == 5 and non0[2]["features"][0].shape == (6, 5)
    np.testing.assert_array_equal(non0[2]["features"][0], data["train"]["text"][3])
    assert AlignedPickleDataset(path, "train", "acc2_has0").labels.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="target='emotions' needs MulT IEMOCAP labels"):
        AlignedPickleDataset(path, "train", "emotions")
    assert len(AlignedPickleDataset(path, "valid")) == 2
    with pytest.raises(ValueError, match="classification_labels"):
        AlignedPickleDataset(path, "train", "classification")


def test_mmsa_pickle_loader_with_lengths(tmp_path):
    rng = np.random.default_rng(1)
    split = _mult_split(rng, 3)
    labels = split.pop("labels").reshape(3)
    split.update(regression_labels=labels, classification_labels=np.array([0, 1, 2]),
                 audio_lengths=np.array([6, 2, 4]), vision_lengths=np.array([1, 6, 3]),
                 raw_text=np.array(["a", "b", "c"]), id=np.array(["x", "y", "z"]))
    path = tmp_path / "unaligned.pkl"
    path.write_bytes(pickle.dumps({"train": split, "dev": split, "test": split}))
    ds = AlignedPickleDataset(path, "valid", "classification")
    assert ds.labels.tolist() == [0, 1, 2]
    assert [f.shape[0] for f in ds[1]["features"]] == [6, 2, 6]
    feats, pads, y = FeatureCollator()([ds[0], ds[1], ds[2]])
    assert [f.shape for f in feats] == [(3, 6, 5), (3, 6, 3), (3, 6, 4)]
    assert pads[1].sum(1).tolist() == [0, 4, 2] and pads[2].sum(1).tolist() == [5, 0, 3]
    assert (feats[1][1, 2:] == 0).all() and y.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="no 'valid' split"):
        p2 = tmp_path / "x.pkl"
        p2.write_bytes(pickle.dumps({"train": split}))
        AlignedPickleDataset(p2, "valid")


def test_mult_iemocap_labels_are_four_one_vs_rest_emotions(tmp_path):
    rng = np.random.default_rng(2)
    present = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    split = _mult_split(rng, 4)
    split["labels"] = np.stack([1 - present, present], -1).astype(np.float32)  # [N, 4, 2] one-hot
    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps({"train": split, "valid": split, "test": split}))
    ds = AlignedPickleDataset(path, "test", "emotions")
    assert ds.labels.tolist() == present.tolist() and ds[1]["label"].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="four one-vs-rest emotions; use target='emotions'"):
        AlignedPickleDataset(path, "test", "regression")
    logits = torch.zeros(4, 4, 2)
    logits[..., 1] = torch.tensor(present, dtype=torch.float32) * 2 - 1  # all right ...
    logits[3, 0, 1] = 1.0  # ... but one: neutral wrongly present in item 3
    m = iemocap_metrics(logits, ds.labels)
    assert m["happy_acc"] == 1.0 and m["neutral_acc"] == 0.75
    # neutral: truth [1,0,0,0], pred [1,0,0,1] -> F1(present) 2/3 (1 item), F1(absent) 4/5 (3 items)
    assert m["neutral_f1"] == pytest.approx((2 / 3 * 1 + 0.8 * 3) / 4)
    assert iemocap_metrics(logits.view(4, 8), ds.labels) == m


def test_mmsa_text_mask_and_metrics(tmp_path):
    rng = np.random.default_rng(3)
    split = _mult_split(rng, 3)
    split["regression_labels"] = split.pop("labels").reshape(3)
    ids = np.zeros((3, 3, 6), np.int64)
    ids[:, 1] = (np.arange(6)[None] < np.array([[6], [2], [4]])).astype(np.int64)  # BERT attention mask
    split["text_bert"] = ids
    path = tmp_path / "mmsa_aligned.pkl"
    path.write_bytes(pickle.dumps({"train": split, "valid": split, "test": split}))
    ds = AlignedPickleDataset(path, "test")
    assert [ds[i]["features"][0].shape[0] for i in range(3)] == [6, 2, 4]
    ids[1, 1, 5] = 1  # a hole in the mask
    path.write_bytes(pickle.dumps({"test": {**split, "text_bert": ids}}))
    with pytest.raises(ValueError, match="not a prefix"):
        AlignedPickleDataset(path, "test")

    truth = np.array([-2.6, -0.4, 0.0, 0.4, 1.5, 3.0])
    pred = np.array([-1.0, 0.2, -0.1, 0.6, 2.4, 2.5])
    m = mmsa_regression_metrics(torch.tensor(pred), torch.tensor(truth))
    assert m["Has0_acc_2"] == pytest.approx(4 / 6)  # item 1 (+0.2 vs -0.4) and item 2 (-0.1 vs 0.0) wrong
    assert m["Non0_acc_2"] == pytest.approx(4 / 5)  # item 2 left out
    # rounded half to even: pred [-1, 0, -0, 1, 2, 2] vs truth [-3, -0, 0, 0, 2, 3] (1.5 -> 2, 2.5 -> 2)
    assert m["Mult_acc_7"] == pytest.approx(3 / 6)
    assert m["Mult_acc_5"] == pytest.approx(4 / 6)  # truth clipped to [-2, 2]: [-2, -0, 0, 0, 2, 2]
    assert m["MAE"] == pytest.approx(np.abs(pred - truth).mean())
    assert m["Corr"] == pytest.approx(np.corrcoef(pred, truth)[0, 1])
    # Has0 F1 (weighted): truth classes {neg: 2, nonneg: 4}; pred neg = items 0, 2
    f_neg = 2 * 0.5 * 0.5 / 1.0
    f_pos = 2 * 0.75 * 0.75 / 1.5
    assert m["Has0_F1_score"] == pytest.approx((2 * f_neg + 4 * f_pos) / 6)
    with pytest.raises(ValueError, match="same number"):
        mmsa_regression_metrics(torch.zeros(3), torch.zeros(4))


def test_emotion_collator(tmp_path):
    c = SyntheticEmotionCorpus(tmp_path, per_class=1, seed=3, engine="builtin")
    tok = WordTokenizer.from_corpus(c.texts())
    items = [c[0], c[1], {**c[2], "metadata": {}}]
    text, audio, meta, labels = EmotionCollator(tok, max_seconds=1.0)(items)
    assert text["input_ids"].shape == text["attention_mask"].shape
    assert audio["input_values"].shape[1] <= 16000
    assert audio["attention_mask"].sum(1).tolist() == [min(16000, it["waveform"].numel()) for it in items]
    assert torch.isnan(meta["age"][2]) and meta["gender"][2] == -1 and torch.isnan(meta["timbre"][2]).all()
    assert labels.tolist() == [it["label"] for it in items]
