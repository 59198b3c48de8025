"""Aligned multimodal pickles in the MulT / MMSA format (CMU-MOSI, CMU-MOSEI, IEMOCAP, ...).

The pickle holds a dict of splits (``train``, ``valid`` — or ``dev``/``val`` — and ``test``),
each a dict of arrays: ``text`` ``[N, L, Dt]``, ``audio`` ``[N, L, Da]``, ``vision``
``[N, L, Dv]``, and labels: ``labels`` ``[N, 1, 1]`` (MulT) or ``regression_labels`` ``[N]``
and/or ``classification_labels`` ``[N]`` (MMSA); optional ``audio_lengths`` /
``vision_lengths`` give the valid steps of unaligned data.
"""
from __future__ import annotations

import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["AlignedPickleDataset"]

_SPLITS = {"train": ("train",), "valid": ("valid", "dev", "val"), "test": ("test",)}
TARGETS = ("regression", "acc2", "acc7", "classification")


class AlignedPickleDataset(Dataset):
    """``AlignedPickleDataset(path, split="train", target="regression")``. Items: ``features``
    (text, audio, vision arrays ``[L_m, D_m]``, non-finite values zeroed, cut to their lengths)
    and ``label``: the sentiment score (``regression``, float ``[1]``), ``score > 0``
    (``acc2``), ``round(clip(score, -3, 3)) + 3`` (``acc7``), or the pickle's
    ``classification_labels`` (``classification``)."""

    def __init__(self, path, split: str = "train", target: str = "regression"):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        with open(path, "rb") as f:
            data = pickle.load(f)
        key = next((k for k in _SPLITS[split] if k in data), None)
        if key is None:
            raise ValueError(f"{path}: no {split!r} split; found {sorted(data)}")
        d = data[key]
        for m in ("text", "audio", "vision"):
            if m not in d:
                raise ValueError(f"{path}[{key!r}]: missing {m!r} features; found {sorted(d)}")
        self.features = [np.nan_to_num(np.asarray(d[m], dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                         for m in ("text", "audio", "vision")]
        n = len(self.features[0])
        lengths = [np.full(n, f.shape[1]) for f in self.features]
        for i, m in ((1, "audio"), (2, "vision")):
            if f"{m}_lengths" in d:
                lengths[i] = np.clip(np.asarray(d[f"{m}_lengths"]).astype(int), 1, self.features[i].shape[1])
        self.lengths = lengths
        self.target = target
        if target == "classification":
            if "classification_labels" not in d:
                raise ValueError(f"{path}[{key!r}]: target='classification' needs classification_labels")
            self.labels = torch.as_tensor(np.asarray(d["classification_labels"]).reshape(n)).long()
        else:
            raw = d.get("regression_labels", d.get("labels"))
            if raw is None:
                raise ValueError(f"{path}[{key!r}]: no labels (labels or regression_labels)")
            score = torch.as_tensor(np.asarray(raw, dtype=np.float32).reshape(n, -1)[:, 0])
            if target == "regression":
                self.labels = score[:, None]
            elif target == "acc2":
                self.labels = (score > 0).long()
            else:
                self.labels = (torch.round(score.clamp(-3, 3)) + 3).long()
        self.dims = tuple(f.shape[2] for f in self.features)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return dict(features=[f[i, : int(ln[i])] for f, ln in zip(self.features, self.lengths)],
                    label=self.labels[i])
