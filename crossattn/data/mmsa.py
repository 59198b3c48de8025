"""Aligned multimodal pickles in the MulT / MMSA format (CMU-MOSI, CMU-MOSEI, IEMOCAP, ...)
and the metrics those papers report.

The pickle holds a dict of splits (``train``, ``valid`` — or ``dev``/``val`` — and ``test``),
each a dict of arrays: ``text`` ``[N, L, Dt]``, ``audio`` ``[N, L, Da]``, ``vision``
``[N, L, Dv]``, and labels: ``labels`` ``[N, 1, 1]`` (MulT's MOSI/MOSEI sentiment) or
``[N, 4, 2]`` (MulT's IEMOCAP: four one-vs-rest emotions, neutral/happy/sad/angry, each a
one-hot ``[absent, present]`` pair), or ``regression_labels`` ``[N]`` and/or
``classification_labels`` ``[N]`` (MMSA). MMSA also stores ``text_bert`` ``[N, 3, L]``
(token ids, attention mask, segment ids: the mask gives the text's valid steps) and
``audio_lengths`` / ``vision_lengths`` for unaligned data.
"""
from __future__ import annotations

import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["AlignedPickleDataset", "IEMOCAP_EMOTIONS", "iemocap_metrics", "mmsa_regression_metrics"]

_SPLITS = {"train": ("train",), "valid": ("valid", "dev", "val"), "test": ("test",)}
TARGETS = ("regression", "acc2", "acc2_has0", "acc7", "classification", "emotions")
IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")


class AlignedPickleDataset(Dataset):
    """``AlignedPickleDataset(path, split="train", target="regression")``. Items: ``features``
    (text, audio, vision arrays ``[L_m, D_m]``, non-finite values zeroed, cut to their valid
    lengths) and ``label``:

    * ``regression``: the sentiment score, float ``[1]``;
    * ``acc2``: ``score > 0``, items scored exactly 0 left out (the "non-0" convention of
      MulT and MMSA's ``Non0_acc_2``); ``acc2_has0``: ``score >= 0`` (MMSA's ``Has0_acc_2``);
    * ``acc7``: ``round(clip(score, -3, 3)) + 3``;
    * ``classification``: the pickle's ``classification_labels``;
    * ``emotions``: MulT IEMOCAP's four one-vs-rest emotions, long ``[4]`` (1 = present), the
      only target such ``[N, 4, 2]`` labels allow.

    ``index`` holds each item's row in the pickle's split (``acc2`` drops rows)."""

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
        where = f"{path}[{key!r}]"
        for m in ("text", "audio", "vision"):
            if m not in d:
                raise ValueError(f"{where}: missing {m!r} features; found {sorted(d)}")
        features = [np.nan_to_num(np.asarray(d[m], dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    for m in ("text", "audio", "vision")]
        n = len(features[0])
        lengths = [np.full(n, f.shape[1]) for f in features]
        if "text_bert" in d:  # MMSA: row 1 is BERT's attention mask (1 = real token, a prefix)
            mask = np.asarray(d["text_bert"])[:, 1, :]
            if mask.shape != (n, features[0].shape[1]):
                raise ValueError(f"{where}: text_bert mask is {list(mask.shape)}, text is "
                                 f"{list(features[0].shape[:2])}")
            lengths[0] = np.clip(mask.sum(1).astype(int), 1, features[0].shape[1])
            if not (mask == (np.arange(mask.shape[1])[None, :] < lengths[0][:, None])).all():
                raise ValueError(f"{where}: text_bert attention mask is not a prefix of ones")
        for i, m in ((1, "audio"), (2, "vision")):
            if f"{m}_lengths" in d:
                lengths[i] = np.clip(np.asarray(d[f"{m}_lengths"]).astype(int), 1, features[i].shape[1])
        keep = np.arange(n)
        raw = d.get("regression_labels", d.get("labels"))
        is_iemocap = raw is not None and "regression_labels" not in d and np.asarray(raw).shape[1:] == (4, 2)
        if target == "emotions" or is_iemocap:
            if not is_iemocap:
                raise ValueError(f"{where}: target='emotions' needs MulT IEMOCAP labels [N, 4, 2], got "
                                 f"{None if raw is None else list(np.asarray(raw).shape)}")
            if target != "emotions":
                raise ValueError(f"{where}: labels [N, 4, 2] are IEMOCAP's four one-vs-rest emotions; use "
                                 f"target='emotions', got target={target!r}")
            labels = torch.as_tensor(np.asarray(raw).argmax(-1)).long()  # [N, 4]
        elif target == "classification":
            if "classification_labels" not in d:
                raise ValueError(f"{where}: target='classification' needs classification_labels")
            labels = torch.as_tensor(np.asarray(d["classification_labels"]).reshape(n)).long()
        else:
            if raw is None:
                raise ValueError(f"{where}: no labels (labels or regression_labels)")
            raw = np.asarray(raw, dtype=np.float32)
            if raw.size != n:
                raise ValueError(f"{where}: sentiment labels must hold one score per item ({n}), got shape "
                                 f"{list(raw.shape)}")
            score = torch.as_tensor(raw.reshape(n))
            if target == "regression":
                labels = score[:, None]
            elif target == "acc2":
                keep = np.flatnonzero(score.numpy() != 0)
                labels = (score[keep] > 0).long()
            elif target == "acc2_has0":
                labels = (score >= 0).long()
            else:
                labels = (torch.round(score.clamp(-3, 3)) + 3).long()
        self.index = keep
        self.features = [f[keep] for f in features]
        self.lengths = [ln[keep] for ln in lengths]
        self.labels = labels
        self.target = target
        self.dims = tuple(f.shape[2] for f in self.features)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return dict(features=[f[i, : int(ln[i])] for f, ln in zip(self.features, self.lengths)],
                    label=self.labels[i])


# --------------------------------------------------------------------------- metrics
def _weighted_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Support-weighted F1 over the classes present in ``truth`` (scikit-learn's
    ``f1_score(truth, pred, average="weighted")``)."""
    total = 0.0
    for c in np.unique(truth):
        tp = float(np.sum((pred == c) & (truth == c)))
        p, r = tp / max(np.sum(pred == c), 1), tp / max(np.sum(truth == c), 1)
        total += (2 * p * r / (p + r) if p + r > 0 else 0.0) * np.sum(truth == c)
    return total / max(len(truth), 1)


def mmsa_regression_metrics(pred, truth) -> dict:
    """The sentiment metrics MMSA reports for MOSI/MOSEI: ``Has0_acc_2`` / ``Has0_F1_score``
    (negative = score < 0, non-negative = score >= 0), ``Non0_acc_2`` / ``Non0_F1_score``
    (items scored 0 left out, positive = > 0), ``Mult_acc_5`` / ``Mult_acc_7`` (scores clipped
    to [-2, 2] / [-3, 3] and rounded, half to even), ``MAE`` and ``Corr`` (Pearson)."""
    p = np.asarray(torch.as_tensor(pred).detach().cpu().double().flatten())
    t = np.asarray(torch.as_tensor(truth).detach().cpu().double().flatten())
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"pred and truth must hold the same number (> 0) of scores, got {p.size} and {t.size}")
    nz = t != 0
    out = {"Has0_acc_2": float(np.mean((p >= 0) == (t >= 0))),
           "Has0_F1_score": _weighted_f1(p >= 0, t >= 0),
           "Non0_acc_2": float(np.mean((p[nz] > 0) == (t[nz] > 0))) if nz.any() else float("nan"),
           "Non0_F1_score": _weighted_f1(p[nz] > 0, t[nz] > 0) if nz.any() else float("nan")}
    for k, lim in ((5, 2.0), (7, 3.0)):
        out[f"Mult_acc_{k}"] = float(np.mean(np.round(np.clip(p, -lim, lim)) == np.round(np.clip(t, -lim, lim))))
    out["MAE"] = float(np.mean(np.abs(p - t)))
    out["Corr"] = float(np.corrcoef(p, t)[0, 1]) if p.size > 1 and p.std() > 0 and t.std() > 0 else float("nan")
    return out


def iemocap_metrics(logits, labels) -> dict:
    """MulT's IEMOCAP evaluation: per emotion, accuracy and weighted F1 of the present/absent
    decision. ``logits [N, 4, 2]`` (or ``[N, 8]``), ``labels [N, 4]`` (1 = present)."""
    lg = torch.as_tensor(logits).detach().cpu()
    y = np.asarray(torch.as_tensor(labels).cpu().long())
    if lg.dim() == 2 and lg.shape[1] == 8:
        lg = lg.view(-1, 4, 2)
    if lg.dim() != 3 or lg.shape[1:] != (4, 2) or y.shape != (lg.shape[0], 4):
        raise ValueError(f"logits must be [N, 4, 2] or [N, 8] and labels [N, 4], got {list(lg.shape)} and "
                         f"{list(y.shape)}")
    pred = np.asarray(lg.argmax(-1))
    out = {}
    for i, e in enumerate(IEMOCAP_EMOTIONS):
        out[f"{e}_acc"] = float(np.mean(pred[:, i] == y[:, i]))
        out[f"{e}_f1"] = _weighted_f1(pred[:, i], y[:, i])
    return out
