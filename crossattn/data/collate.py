"""Batch collation: padded text/audio inputs with Hugging Face masks (1 = real), metadata."""
from __future__ import annotations

import math

import torch


def _metadata_batch(items):
    """``age`` float (NaN unknown), ``gender`` long (-1 unknown), ``timbre`` float rows (NaN
    unknown); a field is left out when no item has it."""
    metas = [it.get("metadata") or {} for it in items]
    out = {}
    if any(m.get("age") is not None for m in metas):
        out["age"] = torch.tensor([float("nan") if m.get("age") is None else float(m["age"]) for m in metas])
    if any(m.get("gender") is not None for m in metas):
        out["gender"] = torch.tensor([-1 if m.get("gender") is None else int(m["gender"]) for m in metas])
    timbres = [m.get("timbre") for m in metas]
    if any(t is not None for t in timbres):
        dim = len(next(t for t in timbres if t is not None))
        out["timbre"] = torch.tensor([[math.nan] * dim if t is None else list(t) for t in timbres],
                                     dtype=torch.float32)
    return out


class EmotionCollator:
    """Items with ``text``, ``waveform`` [samples], ``label``, optional ``metadata`` ->
    ``(text_input, audio_input, metadata, labels)`` for :class:`TextAudioEmotionModel`.
    ``max_seconds`` crops long audio."""

    def __init__(self, tokenizer, max_text_len: int = 64, sample_rate: int = 16000,
                 max_seconds: float | None = None):
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.max_samples = None if max_seconds is None else int(max_seconds * sample_rate)

    def __call__(self, items):
        text_input = self.tokenizer([it["text"] for it in items], padding=True, truncation=True,
                                    max_length=self.max_text_len, return_tensors="pt")
        text_input = {k: text_input[k] for k in ("input_ids", "attention_mask")}
        waves = [it["waveform"][: self.max_samples] if self.max_samples else it["waveform"] for it in items]
        width = max(w.numel() for w in waves)
        values = torch.zeros(len(waves), width)
        mask = torch.zeros(len(waves), width, dtype=torch.long)
        for i, w in enumerate(waves):
            values[i, : w.numel()] = w
            mask[i, : w.numel()] = 1
        labels = torch.tensor([int(it["label"]) for it in items])
        return text_input, {"input_values": values, "attention_mask": mask}, _metadata_batch(items), labels


class FeatureCollator:
    """Items with per-modality feature arrays ``features`` (list of ``[L_m, D_m]``) and
    ``label`` -> ``(features [B, L_m, D_m] list, pads bool [B, L_m] list (True = padding),
    labels)`` for HCTDMG / FusionBaseline."""

    def __call__(self, items):
        n_mod = len(items[0]["features"])
        feats, pads = [], []
        for m in range(n_mod):
            xs = [torch.as_tensor(it["features"][m], dtype=torch.float32) for it in items]
            width = max(x.shape[0] for x in xs)
            batch = torch.zeros(len(xs), width, xs[0].shape[1])
            pad = torch.ones(len(xs), width, dtype=torch.bool)
            for i, x in enumerate(xs):
                batch[i, : x.shape[0]] = x
                pad[i, : x.shape[0]] = False
            feats.append(batch)
            pads.append(pad)
        labels = torch.stack([torch.as_tensor(it["label"]) for it in items])
        return feats, pads, labels
