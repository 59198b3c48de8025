"""Fusion baselines of arXiv 2501.08085 (seed 003): one transformer per modality, then late
(majority vote), early (concatenation) or multi-head attention fusion.

Shape legend: B batch, L_m length of modality m, C classes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from crossattn.nn import MultiheadAttention, convert_multihead_attention

from ._inputs import check_modalities
from .encoders import TransformerEncoderLayer, masked_mean

__all__ = ["FusionBaseline", "ModalityTransformer"]


class ModalityTransformer(nn.Module):
    """Linear projection + sinusoidal positions + a transformer encoder; masked mean pooled."""

    def __init__(self, in_dim: int, d_model: int = 64, num_heads: int = 4, layers: int = 1,
                 dropout: float = 0.1, max_len: int = 4096):
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        pos = torch.arange(max_len)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)
        layer = TransformerEncoderLayer(d_model, num_heads, 4 * d_model, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} steps is longer than max_len={self.pe.shape[0]}")
        h = self.encoder(self.proj(x) + self.pe[: x.shape[1]], src_key_padding_mask=pad)
        return masked_mean(h, None if pad is None else ~pad)


class FusionBaseline(nn.Module):
    """``FusionBaseline(kind, dims, num_classes)``: a :class:`ModalityTransformer` per modality
    (input widths ``dims`` = (text, audio[, vision])), then

    * ``"late"``: a classifier per modality; prediction = majority vote of their argmaxes
      (ties: the highest mean probability); ``logits`` = log of the mean probabilities;
      training sums the per-modality cross-entropies (:meth:`loss`);
    * ``"early"``: concatenated pooled states -> MLP;
    * ``"attention"``: the pooled states as one token per modality -> multi-head
      self-attention (crossattn's ``MultiheadAttention``) -> mean -> MLP.

    ``forward(text, audio, vision=None, *, text_padding_mask=None, audio_padding_mask=None,
    vision_padding_mask=None)`` (features ``[B, L_m, dims[m]]``, bool masks ``[B, L_m]``, True =
    padding; ``vision`` only when built with three widths) returns a dict with ``logits
    [B, C]`` and ``prediction [B]`` (plus ``modality_logits`` for late fusion and
    ``modality_attention [B, M, M]`` for attention).
    All transformers' attention runs on crossattn's kernels (converted in place).
    """

    KINDS = ("late", "early", "attention")

    def __init__(self, kind: str, dims: Sequence[int], num_classes: int, *, d_model: int = 64,
                 num_heads: int = 4, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if len(dims) not in (2, 3):
            raise ValueError(f"dims needs one input width per modality, (text, audio) or (text, audio, "
                             f"vision), got {list(dims)}")
        self.dims = tuple(int(d) for d in dims)
        self.kind, self.num_classes = kind, num_classes
        self.encoders = nn.ModuleList(ModalityTransformer(d, d_model, num_heads, layers, dropout) for d in dims)
        if kind == "late":
            self.heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in dims)
        else:
            width = d_model * (len(dims) if kind == "early" else 1)
            if kind == "attention":
                self.fusion_attn = MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
            self.head = nn.Sequential(nn.Linear(width, d_model), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(d_model, num_classes))
        convert_multihead_attention(self)

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor | None = None, *,
                text_padding_mask: Tensor | None = None, audio_padding_mask: Tensor | None = None,
                vision_padding_mask: Tensor | None = None) -> dict:
        x, pad = check_modalities(self.dims, dict(text=text, audio=audio, vision=vision),
                                  dict(text=text_padding_mask, audio=audio_padding_mask,
                                       vision=vision_padding_mask))
        pooled = [enc(x[m], pad[m]) for enc, m in zip(self.encoders, x)]
        if self.kind == "late":
            per = torch.stack([head(h) for head, h in zip(self.heads, pooled)], 1)  # [B, M, C]
            probs = per.softmax(-1)
            votes = nn.functional.one_hot(per.argmax(-1), self.num_classes).sum(1).float()  # [B, C]
            # Majority vote; ties broken by the mean probability (< 1 so it never outvotes).
            prediction = (votes + probs.mean(1) * 0.5).argmax(-1)
            return {"logits": torch.log(probs.mean(1).clamp(min=1e-12)), "prediction": prediction,
                    "modality_logits": per}
        if self.kind == "early":
            logits = self.head(torch.cat(pooled, -1))
            return {"logits": logits, "prediction": logits.argmax(-1)}
        tokens = torch.stack(pooled, 1)  # [B, M, d]
        fused, attn = self.fusion_attn(tokens, tokens, tokens, need_weights=True)
        logits = self.head(fused.mean(1))
        return {"logits": logits, "prediction": logits.argmax(-1), "modality_attention": attn}

    def loss(self, outputs: dict, labels: Tensor) -> Tensor:
        if self.kind == "late":
            per = outputs["modality_logits"]
            return sum(nn.functional.cross_entropy(per[:, m], labels) for m in range(per.shape[1]))
        return nn.functional.cross_entropy(outputs["logits"], labels)
