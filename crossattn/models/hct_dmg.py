"""HCT-DMG: hierarchical crossmodal transformer with dynamic modality gating
(arXiv 2305.13583, seed 002), built on crossattn's CrossModalAttention.

Shape legend: B batch, L_m length of modality m (text, audio, vision), d model width.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from crossattn.nn import CrossModalAttention

from ._inputs import MODALITIES, check_modalities
from .encoders import TransformerEncoderLayer, masked_mean

__all__ = ["CrossmodalTransformer", "HCTDMG"]


class CrossmodalTransformer(nn.Module):
    """Pre-LayerNorm blocks: ``target += CrossAttn(LN(target) -> LN(source))``, then
    ``target += FFN(LN(target))``. Padding masks: bool ``[B, L]``, True = padding."""

    def __init__(self, d_model: int, num_heads: int, layers: int = 2, dropout: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.attn = nn.ModuleList(CrossModalAttention(d_model, num_heads, dropout=dropout, backend=backend)
                                  for _ in range(layers))
        self.ln_q = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.ln_kv = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                               nn.Dropout(dropout), nn.Linear(4 * d_model, d_model))
                                 for _ in range(layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, target: Tensor, source: Tensor, target_pad: Tensor | None = None,
                source_pad: Tensor | None = None) -> Tensor:
        for attn, ln_q, ln_kv, ffn in zip(self.attn, self.ln_q, self.ln_kv, self.ffn):
            out, _ = attn(ln_q(target), ln_kv(source), context_padding_mask=source_pad,
                          query_padding_mask=target_pad)
            target = target + self.drop(out)
            target = target + self.drop(ffn(target))
        return target


class _Projection(nn.Module):
    """Conv1d (local context) then a GRU (global context) to ``d_model``."""

    def __init__(self, in_dim: int, d_model: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, d_model, kernel_size, padding=kernel_size // 2)
        self.gru = nn.GRU(d_model, d_model, batch_first=True)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        if pad is not None:  # padded steps are zeros, as the conv's padding beyond an unpadded end
            x = x.masked_fill(pad[..., None], 0.0)
        return self.gru(self.conv(x.transpose(1, 2)).transpose(1, 2))[0]


class HCTDMG(nn.Module):
    """Hierarchical Crossmodal Transformer with Dynamic Modality Gating (seed 002).

    1. Feature projection per modality: Conv1d + GRU.
    2. Dynamic modality gating: a trainable logit per modality (``gate_logits``; softmax =
       each modality's probability of being primary). Each forward picks ONE primary modality
       for the whole batch and computes that hierarchy only. Training: ``gating="gumbel"``
       samples the choice (Gumbel-max, temperature ``tau``), ``"straight_through"`` takes the
       argmax; both pass gradients to the logits by the straight-through estimator (the
       forward multiplies by 1, the backward sees the softmax). Evaluation: the argmax.
    3. Stage 1: the two auxiliary modalities enhance each other (crossmodal transformers).
       Stage 2: each enhanced auxiliary augments the primary modality.
    4. Weighted concatenation of the two augmented primaries (trainable weights), a
       self-attention transformer layer, masked mean pooling and the output head
       (``num_outputs`` = 1 for regression, C logits for classification).

    Every hierarchy has its own crossmodal transformers; only the chosen one runs, so a step
    costs (and trains) a third of them: :meth:`parameter_count` reports both numbers.

    ``forward(text, audio, vision, *, text_padding_mask=None, audio_padding_mask=None,
    vision_padding_mask=None, primary=None)`` (features ``[B, L_m, dim_m]``, bool masks, True =
    padding; ``primary`` forces a hierarchy by name, e.g. for a fixed-hierarchy ablation)
    returns a dict: ``output`` (also under ``logits``) ``[B, num_outputs]``,
    ``modality_weights [3]`` (softmax of the gate logits), ``primary`` (name of the modality
    used), ``primary_index``, ``pooled``.
    """

    GATINGS = ("gumbel", "straight_through")

    def __init__(self, text_dim: int, audio_dim: int, vision_dim: int, num_outputs: int, *,
                 d_model: int = 40, num_heads: int = 4, layers: int = 2, dropout: float = 0.1,
                 gating: str = "gumbel", tau: float = 1.0, backend: str = "auto"):
        super().__init__()
        if gating not in self.GATINGS:
            raise ValueError(f"gating must be one of {self.GATINGS}, got {gating!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.gating, self.tau = gating, float(tau)
        self.dims = (int(text_dim), int(audio_dim), int(vision_dim))
        self.proj = nn.ModuleDict({m: _Projection(d, d_model) for m, d in zip(MODALITIES, self.dims)})
        self.gate_logits = nn.Parameter(torch.zeros(len(MODALITIES)))

        def cmt():
            return CrossmodalTransformer(d_model, num_heads, layers, dropout, backend)

        # Per hierarchy (primary p, auxiliaries a, b): stage 1 a<-b, b<-a; stage 2 p<-a', p<-b'.
        self.stage1 = nn.ModuleDict({p: nn.ModuleList([cmt(), cmt()]) for p in MODALITIES})
        self.stage2 = nn.ModuleDict({p: nn.ModuleList([cmt(), cmt()]) for p in MODALITIES})
        self.concat_weights = nn.Parameter(torch.ones(len(MODALITIES), 2))
        self.self_attn = TransformerEncoderLayer(2 * d_model, num_heads, 4 * d_model, dropout,
                                                 batch_first=True, norm_first=True)
        self.head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(d_model, num_outputs))

    @property
    def primary(self) -> str:
        """The modality evaluation uses (argmax of the gate logits)."""
        return MODALITIES[int(self.gate_logits.argmax())]

    def parameter_count(self) -> dict:
        """``total`` parameters and ``per_step``: those one forward uses (one hierarchy)."""
        total = sum(p.numel() for p in self.parameters())
        idle = sum(p.numel() for m in MODALITIES[1:] for s in (self.stage1, self.stage2)
                   for p in s[m].parameters())
        return {"total": total, "per_step": total - idle}

    def _choose(self, primary: str | None) -> tuple[int, Tensor]:
        """(index of the primary modality, its straight-through weight: 1 in value)."""
        probs = torch.softmax(self.gate_logits, 0)
        if primary is not None:
            if primary not in MODALITIES:
                raise ValueError(f"primary must be one of {MODALITIES} or None, got {primary!r}")
            return MODALITIES.index(primary), torch.ones((), device=probs.device)
        if not self.training:
            return int(self.gate_logits.argmax()), torch.ones((), device=probs.device)
        if self.gating == "gumbel":
            g = -torch.log(-torch.log(torch.rand_like(probs).clamp(1e-10, 1 - 1e-7)))
            soft = torch.softmax((self.gate_logits + g) / self.tau, 0)
        else:
            soft = probs
        i = int(soft.argmax())
        return i, 1.0 + soft[i] - soft[i].detach()

    def _hierarchy(self, p: str, x: dict, pad: dict) -> Tensor:
        a, b = (m for m in MODALITIES if m != p)
        s1a, s1b = self.stage1[p]
        a_enh = s1a(x[a], x[b], pad[a], pad[b])
        b_enh = s1b(x[b], x[a], pad[b], pad[a])
        s2a, s2b = self.stage2[p]
        pa = s2a(x[p], a_enh, pad[p], pad[a])
        pb = s2b(x[p], b_enh, pad[p], pad[b])
        w = self.concat_weights[MODALITIES.index(p)]
        h = torch.cat([w[0] * pa, w[1] * pb], dim=-1)
        h = self.self_attn(h, src_key_padding_mask=pad[p])
        return masked_mean(h, None if pad[p] is None else ~pad[p])

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor, *, text_padding_mask: Tensor | None = None,
                audio_padding_mask: Tensor | None = None, vision_padding_mask: Tensor | None = None,
                primary: str | None = None) -> dict:
        if vision is None:
            raise ValueError("vision: HCTDMG needs three modalities, got vision=None")
        inputs, pad = check_modalities(self.dims, dict(text=text, audio=audio, vision=vision),
                                       dict(text=text_padding_mask, audio=audio_padding_mask,
                                            vision=vision_padding_mask))
        x = {m: self.proj[m](t, pad[m]) for m, t in inputs.items()}
        i, weight = self._choose(primary)
        pooled = weight * self._hierarchy(MODALITIES[i], x, pad)
        out = self.head(pooled)
        # "logits" names the same tensor for classification heads (the training CLI reads it).
        return {"output": out, "logits": out, "modality_weights": torch.softmax(self.gate_logits, 0),
                "primary": MODALITIES[i], "primary_index": i, "pooled": pooled}
