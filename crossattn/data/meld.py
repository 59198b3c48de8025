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
import wave
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


def _audio_problem(wav: Path) -> str | None:
    """Why ``wav`` cannot be used (``"missing"`` or ``"unreadable: ..."``), or None. Reads the
    header only: MELD has ~14k clips, and a few extracted ones are known to be broken."""
    if not wav.is_file():
        return "missing"
    try:
        with wave.open(str(wav), "rb") as w:
            if w.getsampwidth() != 2:
                return f"unreadable: {8 * w.getsampwidth()}-bit samples, expected 16-bit PCM"
            if w.getnframes() == 0:
                return "unreadable: no samples"
    except (wave.Error, EOFError, OSError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    return None


class MELDDataset(Dataset):
    """Items: ``text``, ``waveform`` (float32 at ``sample_rate``), ``label`` (index into
    EMOTIONS), ``speaker``, ``metadata`` (empty: MELD has no age/gender/timbre).

    Utterances whose wav is missing or unreadable (not a 16-bit PCM wav, or empty; checked
    from the header when the CSV is read): ``missing_audio="skip"`` leaves them out and counts
    them (``skipped``, and ``skip_reasons``: ``{"missing": n, "unreadable": m}``);
    ``"error"`` raises ``FileNotFoundError`` / ``ValueError`` naming the file."""

    def __init__(self, csv_path, audio_dir, sample_rate: int = 16000, missing_audio: str = "skip"):
        if missing_audio not in ("skip", "error"):
            raise ValueError(f"missing_audio must be 'skip' or 'error', got {missing_audio!r}")
        self.audio_dir, self.sample_rate = Path(audio_dir), sample_rate
        self.rows, self.skip_reasons = [], {"missing": 0, "unreadable": 0}
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
                problem = _audio_problem(wav)
                if problem is not None:
                    if missing_audio == "error":
                        if problem == "missing":
                            raise FileNotFoundError(f"no audio for utterance: {wav}")
                        raise ValueError(f"{wav}: {problem}")
                    self.skip_reasons[problem.split(":")[0]] += 1
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

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        try:
            waveform = read_wav(r["wav"], self.sample_rate)
        except (wave.Error, EOFError, OSError, ValueError) as exc:  # e.g. truncated after a valid header
            raise ValueError(f"{r['wav']}: unreadable audio ({type(exc).__name__}: {exc})") from None
        return dict(text=r["text"], waveform=waveform, label=r["label"], speaker=r["speaker"], metadata={})

    def texts(self) -> list[str]:
        return [r["text"] for r in self.rows]
