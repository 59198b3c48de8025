"""The console scripts fail like Unix tools: exit status 2 and one line on stderr naming what
was wrong (bad arguments, missing files, a missing extra, an unusable device), no traceback."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from crossattn import _cli, attention_map, demo, train

NO_CUDA = not torch.cuda.is_available()


def _fails(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_train_bad_arguments_and_missing_files(tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")]
    _fails(train.main, ["--epochs", "0", *out], capsys, "--epochs must be at least 1, got 0")
    _fails(train.main, ["--model", "nosuch", *out], capsys, "--model", "nosuch")
    _fails(train.main, ["--config", str(tmp_path / "none.json")], capsys, "none.json", "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{epochs: 1")
    _fails(train.main, ["--config", str(bad)], capsys, "not valid JSON")
    bad.write_text("[1, 2]")
    _fails(train.main, ["--config", str(bad)], capsys, "expected a JSON object")
    _fails(train.main, ["--data", "mmsa", "--model", "early", "--pickle", str(tmp_path / "x.pkl"), *out],
           capsys, "--pickle", "does not exist")
    _fails(train.main, ["--data", "meld", "--meld-csv", str(tmp_path), "--meld-audio", str(tmp_path), *out],
           capsys, "--meld-csv", "is a directory")
    _fails(train.main, ["--device", "tpu9", *out], capsys, "--device 'tpu9'")
    csv = tmp_path / "meld.csv"
    csv.write_text("Sentence,Label\nhello,joy\n")
    _fails(train.main, ["--data", "meld", "--meld-csv", str(csv), "--meld-audio", str(tmp_path), "--no-progress",
                        "--output", str(tmp_path / "meld")], capsys, "cannot load the meld data", "not a MELD CSV")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x04junk")
    _fails(train.main, ["--data", "mmsa", "--model", "early", "--pickle", str(junk), "--no-progress",
                        "--output", str(tmp_path / "mmsa")], capsys, "cannot load the mmsa data")
    assert not (tmp_path / "run").exists()  # nothing written before the arguments are known good


def test_train_target_must_fit_the_data_and_the_model(tmp_path, capsys):
    """--target offers what some data set can give; a combination the data or the model cannot
    do is one line, exit 2, before anything is loaded or written."""
    from crossattn.data import mmsa

    assert train.TARGETS == mmsa.TARGETS  # the CLI's copy (no numpy at --help time) is the loader's list
    out = ["--output", str(tmp_path / "run")]
    for target in ("regression", "acc7", "acc2", "emotions"):
        _fails(train.main, ["--target", target, *out], capsys, f"--target {target}: the synthetic data has "
               "emotion classes only", "--target classification")
    meld = ["--data", "meld", "--meld-csv", str(tmp_path / "m.csv"), "--meld-audio", str(tmp_path)]
    _fails(train.main, [*meld, "--target", "regression", *out], capsys, "the meld data has emotion classes only")
    pkl = tmp_path / "x.pkl"
    pkl.write_bytes(b"")
    for target in ("regression", "emotions"):
        _fails(train.main, ["--data", "mmsa", "--pickle", str(pkl), "--model", "late", "--target", target, *out],
               capsys, f"--target {target}: late fusion is a majority vote", "--model early, attention or hctdmg")
    _fails(train.main, ["--target", "acc5", *out], capsys, "--target", "invalid choice: 'acc5'")
    (tmp_path / "m.csv").write_text("x")
    _fails(train.main, [*meld, "--meld-valid-csv", str(tmp_path / "m.csv"), *out], capsys,
           "--meld-valid-csv needs --meld-valid-audio")
    _fails(train.main, [*meld, "--meld-root", str(tmp_path), *out], capsys,
           "--meld-root, or --meld-csv with --meld-audio (not both)")
    _fails(train.main, ["--data", "meld", "--meld-root", str(tmp_path / "none"), *out], capsys,
           "--meld-root", "not a directory")
    (tmp_path / "m.csv").write_text("Utterance,Emotion,Dialogue_ID,Utterance_ID\nhi,joy,0,0\n")  # no clip at all
    _fails(train.main, [*meld, "--no-progress", "--output", str(tmp_path / "meld")], capsys,
           "cannot load the meld data", "the MELD train split has no utterance with readable audio", "(1 missing)")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not NO_CUDA, reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    _fails(train.main, ["--device", "cuda", "--output", str(tmp_path / "r")], capsys, "--device cuda", "CUDA")
    _fails(demo.main, ["--device", "cuda"], capsys, "--device cuda", "--device cpu")


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _fails(train.main, ["--output", str(run), "--resume", "--no-progress"], capsys, "not a crossattn checkpoint")


class _Payload:
    """Stands for an object a malicious checkpoint would unpickle (and run code through)."""


def test_attention_map_refuses_missing_unsafe_and_foreign_checkpoints(tmp_path, capsys):
    png = str(tmp_path / "map.png")
    _fails(attention_map.main, ["--checkpoint", str(tmp_path / "none.pt"), "--index", "0", "--output", png],
           capsys, "--checkpoint", "does not exist")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "args": {}, "num_outputs": 7, "payload": _Payload()}, unsafe)
    _fails(attention_map.main, ["--checkpoint", str(unsafe), "--index", "0", "--output", png],
           capsys, "weights_only=True) refused it")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    _fails(attention_map.main, ["--checkpoint", str(foreign), "--index", "0", "--output", png],
           capsys, "expected the keys model, args, num_outputs")
    _fails(attention_map.main, ["--checkpoint", str(foreign), "--output", png], capsys, "either --index")
    _fails(attention_map.main, ["--checkpoint", str(foreign), "--text", "hi", "--wav", str(tmp_path / "no.wav"),
                                "--output", png], capsys, "--wav", "does not exist")
    _fails(attention_map.main, ["--checkpoint", str(foreign), "--index", "0", "--output",
                                str(tmp_path / "no" / "map.png")], capsys, "its directory does not exist")
    assert not (tmp_path / "map.png").exists()


def test_demo_bad_arguments(tmp_path, capsys):
    _fails(demo.main, ["--repeats", "0"], capsys, "--repeats must be at least 1")
    _fails(demo.main, ["--dtype", "float8"], capsys, "--dtype")
    _fails(demo.main, ["--plot", str(tmp_path / "no" / "x.png")], capsys, "its directory does not exist")


def _without(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_a_missing_extra_names_what_to_install(tmp_path, monkeypatch, capsys):
    _without(monkeypatch, "transformers", "matplotlib")
    _fails(train.main, ["--output", str(tmp_path / "r"), "--no-progress"], capsys,
           "transformers not installed", "pip install 'crossattn[models]'")
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    _fails(attention_map.main, ["--checkpoint", str(ckpt), "--index", "0", "--output", str(tmp_path / "m.png")],
           capsys, "crossattn[models]")
    _fails(_cli.bench, ["--quick"], capsys, "matplotlib not installed", "pip install 'crossattn[bench]'")
    _fails(demo.main, ["--plot", str(tmp_path / "x.png")], capsys, "crossattn[bench]")
    # --help needs no extra.
    with pytest.raises(SystemExit) as info:
        _cli.bench(["--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "crossattn.train", "--config", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"crossattn-train: error: --config {tmp_path / 'missing.json'}: no such file or directory "
        "(--help for usage)"]
