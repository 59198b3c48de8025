"""MELD (Poria et al., 2019): the utterance CSV + one audio file per utterance.

The CSV has (at least) ``Utterance``, ``Speaker``, ``Emotion``, ``Dialogue_ID`` and
``Utterance_ID`` columns; the audio of an utterance is ``dia{Dialogue_ID}_utt{Utterance_ID}.wav``
in ``audio_dir`` (MELD ships mp4 clips: extract 16-bit PCM wav once, e.g. with
``ffmpeg -i dia0_utt0.mp4 -ac 1 -ar 16000 dia0_utt0.wav``).

Each split has its own clips, and the same ``dia{D}_utt{U}`` names recur across splits, so
each split needs its own audio folder: :meth:`MELDDataset.from_root` finds MELD.Raw's layout
(``{split}_sent_emo.csv`` with ``train_splits/``, ``dev_splits_complete/``,
``output_repeated_splits_test/``).
"""
from __future__ import annotations

import csv
from pathlib import Path

from torch.utils.data import Dataset

from crossattn.models.emotion import EMOTIONS

from .synthetic import read_wav

__all__ = ["MELD_EMOTIONS", "MELDDataset"]

# MELD's label names -> crossattn.models.EMOTIONS
MELD_EMOTIONS = {"neutral": "neutral", "joy": "happy", "sadness": "sad", "anger": "angry",
                 "fear": "fear", "surprise": "surprise", "disgust": "disgust"}
_REQUIRED = ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")
# MELD.Raw's clip folder per split
SPLIT_AUDIO = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}


class MELDDataset(Dataset):
    """Items: ``text``, ``waveform`` (float32 at ``sample_rate``), ``label`` (index into
    EMOTIONS), ``speaker``, ``metadata`` (empty: MELD has no age/gender/timbre).
    ``missing_audio="skip"`` drops utterances without a wav (counted in ``skipped``);
    ``"error"`` raises."""

    def __init__(self, csv_path, audio_dir, sample_rate: int = 16000, missing_audio: str = "skip"):
        if missing_audio not in ("skip", "error"):
            raise ValueError(f"missing_audio must be 'skip' or 'error', got {missing_audio!r}")
        self.audio_dir, self.sample_rate = Path(audio_dir), sample_rate
        self.rows, self.skipped = [], 0
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_path}: not a MELD CSV, missing columns {missing}")
            for row in reader:
                emotion = row["Emotion"].strip().lower()
                if emotion not in MELD_EMOTIONS:
                    raise ValueError(f"{csv_path}: unknown emotion {row['Emotion']!r}; expected one of "
                                     f"{sorted(MELD_EMOTIONS)}")
                wav = self.audio_dir / f"dia{row['Dialogue_ID'].strip()}_utt{row['Utterance_ID'].strip()}.wav"
                if not wav.exists():
                    if missing_audio == "error":
                        raise FileNotFoundError(f"no audio for utterance: {wav}")
                    self.skipped += 1
                    continue
                self.rows.append(dict(text=row["Utterance"], label=EMOTIONS.index(MELD_EMOTIONS[emotion]),
                                      speaker=row.get("Speaker", ""), wav=wav))

    @classmethod
    def from_root(cls, root, split: str, **kwargs) -> MELDDataset:
        """The ``split`` (``"train"``, ``"dev"`` or ``"test"``) of an extracted MELD.Raw
        directory: ``root/{split}_sent_emo.csv`` and its own clip folder, found as
        ``root/<folder>``, ``root/{split}/<folder>`` or ``root/{split}``."""
        if split not in SPLIT_AUDIO:
            raise ValueError(f"split must be one of {sorted(SPLIT_AUDIO)}, got {split!r}")
        root = Path(root)
        csv_path = next((p for p in (root / f"{split}_sent_emo.csv", root / split / f"{split}_sent_emo.csv")
                         if p.exists()), None)
        if csv_path is None:
            raise FileNotFoundError(f"no {split}_sent_emo.csv in {root} or {root / split}")
        folders = (root / SPLIT_AUDIO[split], root / split / SPLIT_AUDIO[split], root / split)
        audio_dir = next((p for p in folders if p.is_dir()), None)
        if audio_dir is None:
            raise FileNotFoundError(f"no audio folder for MELD's {split!r} split; looked for "
                                    f"{[str(p) for p in folders]}")
        return cls(csv_path, audio_dir, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return dict(text=r["text"], waveform=read_wav(r["wav"], self.sample_rate), label=r["label"],
                    speaker=r["speaker"], metadata={})

    def texts(self) -> list[str]:
        return [r["text"] for r in self.rows]
