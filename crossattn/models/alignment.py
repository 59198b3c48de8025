"""Does a text-to-audio attention map follow the words' known timings? (seed 000 claims its
weights align words with the audio frames that speak them.)

Shape legend: T text tokens, A audio frames.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

__all__ = ["frame_centres", "frame_geometry", "token_spans", "word_alignment"]

_UNKNOWN = {"[unk]", "<unk>"}


def frame_centres(frames: int, seconds_per_frame: float, offset: float = 0.0) -> Tensor:
    """Centre time (s) of each of ``frames`` encoder frames: ``offset + k * seconds_per_frame``."""
    return offset + torch.arange(frames, dtype=torch.float64) * seconds_per_frame


def frame_geometry(encoder, sample_rate: int = 16000) -> tuple[float, float] | None:
    """``(seconds_per_frame, first_centre_s)`` of an audio encoder's output frames: frame ``k``
    is centred at ``first_centre_s + k * seconds_per_frame``. Known for :class:`LogMelEncoder`
    (STFT hop times its stride-2 convs; a centred kernel keeps the STFT frame's centre) and for
    Hugging Face encoders with a conv feature extractor (``config.conv_kernel`` /
    ``conv_stride``: Wav2Vec2, HuBERT, WavLM); None otherwise."""
    from .encoders import LogMelEncoder

    if isinstance(encoder, LogMelEncoder):
        return encoder.hop * 2 ** len(encoder.convs) / encoder.sample_rate, encoder.n_fft / 2 / encoder.sample_rate
    config = getattr(encoder, "config", None)
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        return None
    field, jump = 1, 1  # receptive field and stride, in samples, layer by layer
    for k, s in zip(kernels, strides):
        field, jump = field + (k - 1) * jump, jump * s
    return jump / sample_rate, (field - 1) / 2 / sample_rate


def token_spans(tokens: list[str], words: list) -> list:
    """Per token, the ``(start_s, end_s)`` of the spoken word it spells, or None (``[CLS]``,
    punctuation): tokens are matched to ``words`` (``[word, start, end]``, in order) by their
    letters, left to right. An unknown-word token (``[UNK]``) stands for the next word, so the
    words after it still match; it gets no span (which word it was is unknown)."""
    spans, k = [], 0
    for tok in tokens:
        letters = re.sub(r"[^a-z']", "", tok.lower())
        if letters and k < len(words) and letters == re.sub(r"[^a-z']", "", str(words[k][0]).lower()):
            spans.append((float(words[k][1]), float(words[k][2])))
            k += 1
        else:
            k += tok.lower() in _UNKNOWN
            spans.append(None)
    return spans


def word_alignment(weights: Tensor, spans: list, centres: Tensor) -> dict:
    """``weights [T, A]`` (rows over valid frames), ``spans`` per token (None = no word),
    ``centres [A]``. Returns, over the tokens that have a word with at least one frame:
    ``mass`` (mean attention mass on the word's own frames), ``chance`` (mean share of frames
    that are the word's: what uniform attention would put there, and also the chance of a
    random argmax landing there), ``hit`` (how often the row's argmax frame is one of the
    word's) and ``tokens``."""
    w = weights.double()
    if w.dim() != 2 or w.shape[1] != centres.numel() or len(spans) != w.shape[0]:
        raise ValueError(f"weights must be [T, A] = [{len(spans)}, {centres.numel()}], got {list(w.shape)}")
    mass, chance, hit = [], [], []
    for row, span in zip(w, spans):
        if span is None:
            continue
        inside = (centres >= span[0]) & (centres < span[1])
        if not inside.any():
            continue
        mass.append(float(row[inside].sum() / row.sum().clamp(min=1e-30)))
        chance.append(float(inside.double().mean()))
        hit.append(float(inside[int(row.argmax())]))
    n = len(mass)
    mean = (lambda xs: sum(xs) / n) if n else (lambda xs: float("nan"))
    return {"mass": mean(mass), "chance": mean(chance), "hit": mean(hit), "tokens": n}
