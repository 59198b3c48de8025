"""Whisper token timestamps whose attention weights come from crossattn.

``model.generate(..., return_token_timestamps=True)`` makes transformers switch the model to
eager attention and record every head of every layer at every step, then align with a
pure-Python DTW. Here the tokens generate as usual (on any attention implementation, e.g.
``"crossattn"``), then one teacher-forced decoder pass runs on the crossattn kernels and
materialises only the ``generation_config.alignment_heads`` weights (``weight_heads=``), or
only their top-k statistics (``return_aux=AuxRequest(top_k=k)``: no ``[T, F]`` matrix at
all), and :mod:`crossattn.alignment` turns them into timestamps.

The result is transformers' ``token_timestamps`` for short-form (one 30 s window) audio:
the same normalisation (each head standardised over the tokens per frame, frames cropped to
``num_frames // 2`` of the feature mask first), median filter of
``config.median_filter_width``, head mean, DTW on the negation; each token's time is its
first frame on the path times ``time_precision``; the prompt (``decoder_input_ids``) tokens
get 0 and the last token, which no step attends from, repeats the one before.

Shape legend: ``B`` batch, ``M`` mel frames of the features (``2 * max_source_positions``),
``F = M // 2`` encoder frames, ``L`` sequence length (prompt + generated tokens), ``E``
model width, ``h`` alignment heads, ``k`` top-k.

Usage::

    import crossattn.integrations.whisper as ca_whisper
    model.generation_config.alignment_heads = [[3, 1], [4, 2]]       # (layer, head) pairs
    out = ca_whisper.generate(model, input_features, attention_mask=feature_mask)
    out["sequences"], out["token_timestamps"]                       # [B, L] each, seconds

    # or for the decoder's whole input (prompt of 4 tokens + generated ones), e.g.
    # model.generate(..., return_dict_in_generate=True).sequences:
    ts = ca_whisper.token_timestamps(model, input_features, sequences, num_input_ids=4)  # [B, L]

The teacher-forced pass switches ``model.config._attn_implementation`` for its duration
(as transformers' own timestamp path does, but restored after): do not run the same model
concurrently from another thread meanwhile.
"""
from __future__ import annotations

import contextvars
from collections import defaultdict

import torch

from .. import alignment
from ..functional import cross_attention
from ..reference import AuxRequest
from . import transformers as ca_hf

__all__ = ["ALIGNMENT_NAME", "generate", "token_timestamps"]

ALIGNMENT_NAME = "crossattn_whisper_alignment"  # the attention implementation of the pass
_MAX_TOP_K = 16
# The pass in progress: {cross-attention module: its alignment heads}, and what they gave.
_capture: contextvars.ContextVar = contextvars.ContextVar("crossattn_whisper_capture", default=None)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ALIGNMENT_NAME, _alignment_attention)
    AttentionMaskInterface.register(ALIGNMENT_NAME, ca_hf.crossattn_mask)


def _alignment_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, **kwargs):
    """The pass's attention function: alignment layers' cross-attention gives its heads'
    weights (or top-k); every other attention is the crossattn integration's, weightless."""
    capture = _capture.get()
    heads = None if capture is None else capture["heads"].get(module)
    if heads is None:
        kwargs.pop("output_attentions", None)
        return ca_hf.crossattn_attention_forward(module, query, key, value, attention_mask,
                                                 dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask is not None:  # Whisper's cross-attention has none; never drop one
        raise NotImplementedError("crossattn whisper timestamps: a cross-attention mask is not supported")
    scale = None if scaling is None else float(scaling)
    if capture["top_k"]:
        out, _, aux = cross_attention(query, key, value, scale=scale, dropout_p=float(dropout),
                                      return_aux=AuxRequest(top_k=capture["top_k"]),
                                      backend=capture["backend"])
        capture["found"][module] = (aux.top_k_values[:, heads], aux.top_k_indices[:, heads])
    else:
        out, weights = cross_attention(query, key, value, scale=scale, dropout_p=float(dropout),
                                       need_weights="full", weight_heads=heads, backend=capture["backend"])
        capture["found"][module] = weights  # [B, len(heads), T, F]
    return out.transpose(1, 2).contiguous(), None


def _check_heads(alignment_heads, config):
    try:
        pairs = [tuple(int(x) for x in p) for p in alignment_heads]
    except (TypeError, ValueError):
        pairs = None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("alignment_heads must be a non-empty sequence of (layer, head) pairs, got "
                         f"{alignment_heads!r}")
    for layer, head in pairs:
        if not (0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads):
            raise ValueError(f"alignment_heads: ({layer}, {head}) is outside the model's "
                             f"{config.decoder_layers} decoder layers x {config.decoder_attention_heads} heads")
    return pairs


def _num_frames(attention_mask, batch: int, mel_frames: int) -> list[int] | None:
    """Encoder frames of each item: half the real mel frames of the feature mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, mel_frames):
        got = getattr(attention_mask, "shape", type(attention_mask).__name__)
        raise ValueError(f"attention_mask must be a tensor [B, M] = [{batch}, {mel_frames}] (the feature "
                         f"mask, 1 = real frame), got {got}")
    return [int(n) // 2 for n in attention_mask.sum(-1).tolist()]


@torch.no_grad()
def token_timestamps(model, input_features: torch.Tensor, sequences: torch.Tensor, *, num_input_ids: int,
                     attention_mask: torch.Tensor | None = None, alignment_heads=None,
                     time_precision: float = 0.02, median_filter_width: int | None = None,
                     top_k: int | None = None, backend: str = "auto",
                     encoder_outputs: torch.Tensor | None = None) -> torch.Tensor:
    """Token timestamps ``[B, L]`` float32 (seconds) of ``sequences`` from the crossattn
    weights of the alignment heads, as transformers' ``return_token_timestamps=True`` gives.

    Args:
        model: a ``WhisperForConditionalGeneration`` or ``WhisperModel``.
        input_features: ``[B, num_mel_bins, M]`` log-mel features (one window: ``M = 2 *
            config.max_source_positions``).
        sequences: int ``[B, L]``: the decoder's input, prompt (``num_input_ids`` tokens) and
            generated tokens (``generate(..., return_dict_in_generate=True).sequences``).
        num_input_ids: the prompt length (decoder start, language, task... tokens): those get
            time 0 and stay out of the alignment.
        attention_mask: the feature mask ``[B, M]`` (1 = real audio) the processor returns;
            each item is aligned to its own ``sum // 2`` encoder frames. None: all frames.
        alignment_heads: ``[(layer, head), ...]``; default ``model.generation_config.alignment_heads``.
        time_precision: seconds per encoder frame.
        median_filter_width: default ``model.config.median_filter_width``.
        top_k: None to align from the heads' weights (``[B, h, T, F]``); an int in 1..16 to align
            from their top-k statistics alone (no weight matrix: an approximation of the above).
        backend: the crossattn backend of the alignment heads' attention.
        encoder_outputs: the encoder's ``last_hidden_state`` ``[B, F, E]`` for ``input_features``
            when already computed (the encoder is not run again).
    """
    if not hasattr(model, "get_encoder") or not hasattr(getattr(model, "config", None), "decoder_layers"):
        raise TypeError(f"model must be a Hugging Face Whisper model, got {type(model).__name__}")
    config = model.config
    if alignment_heads is None:
        alignment_heads = getattr(model.generation_config, "alignment_heads", None)
        if alignment_heads is None:
            raise ValueError("alignment_heads: none given and model.generation_config.alignment_heads is not set")
    pairs = _check_heads(alignment_heads, config)
    if not isinstance(input_features, torch.Tensor) or input_features.dim() != 3:
        raise ValueError("input_features must be a tensor [B, num_mel_bins, M], got "
                         f"{getattr(input_features, 'shape', type(input_features).__name__)}")
    if (not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype.is_floating_point
            or sequences.shape[0] != input_features.shape[0]):
        raise ValueError(f"sequences must be an integer tensor [B, L] with B = {input_features.shape[0]} "
                         f"(input_features' batch), got {getattr(sequences, 'shape', type(sequences).__name__)}"
                         f"{'' if not isinstance(sequences, torch.Tensor) else ' ' + str(sequences.dtype)}")
    B, L = sequences.shape
    if isinstance(num_input_ids, bool) or not isinstance(num_input_ids, int) or not 1 <= num_input_ids <= L:
        raise ValueError(f"num_input_ids must be an int in [1, L = {L}], got {num_input_ids!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= _MAX_TOP_K):
        raise ValueError(f"top_k must be None or an int in [1, {_MAX_TOP_K}], got {top_k!r}")
    num_frames = _num_frames(attention_mask, B, input_features.shape[-1])
    frames_out = input_features.shape[-1] // 2
    if encoder_outputs is not None and (not isinstance(encoder_outputs, torch.Tensor)
                                        or encoder_outputs.shape != (B, frames_out, config.d_model)):
        raise ValueError(f"encoder_outputs must be a tensor [B, F, E] = [{B}, {frames_out}, {config.d_model}], "
                         f"got {getattr(encoder_outputs, 'shape', type(encoder_outputs).__name__)}")
    width = config.median_filter_width if median_filter_width is None else median_filter_width

    timestamps = torch.zeros(B, L, dtype=torch.float32, device=sequences.device)
    if L - 1 <= num_input_ids:
        return timestamps  # no generated token was attended from: all 0, as transformers

    # One pass over every token but the last (no step attends from it), on the kernels.
    layers = model.get_decoder().layers
    heads = defaultdict(list)
    for layer, head in pairs:
        heads[layers[layer].encoder_attn].append(head)
    capture = {"heads": {m: sorted(set(h)) for m, h in heads.items()}, "found": {},
               "top_k": top_k or 0, "backend": backend}
    _register()
    previous = config._attn_implementation
    token = _capture.set(capture)
    try:
        config._attn_implementation = ALIGNMENT_NAME
        encoded = encoder_outputs
        if encoded is None:
            encoded = model.get_encoder()(input_features).last_hidden_state
        model.get_decoder()(input_ids=sequences[:, :-1], encoder_hidden_states=encoded, use_cache=False)
    finally:
        config._attn_implementation = previous
        _capture.reset(token)

    def pick(layer, head, found):  # the (layer, head) slice of what that layer returned
        return found[:, capture["heads"][layers[layer].encoder_attn].index(head)]

    F = encoded.shape[1]
    for b in range(B):
        frames = F if num_frames is None else min(num_frames[b], F)
        if top_k:
            vals = torch.stack([pick(li, h, capture["found"][layers[li].encoder_attn][0])[b] for li, h in pairs])
            idx = torch.stack([pick(li, h, capture["found"][layers[li].encoder_attn][1])[b] for li, h in pairs])
            # Keys past the item's frames do not exist for it: drop them before aligning.
            keep = idx < frames
            path = alignment.align_top_k(vals[:, num_input_ids:] * keep[:, num_input_ids:],
                                         idx[:, num_input_ids:].masked_fill(~keep[:, num_input_ids:], -1),
                                         frames, median_width=width)
        else:
            w = torch.stack([pick(li, h, capture["found"][layers[li].encoder_attn])[b] for li, h in pairs])
            path = alignment.align(w[:, num_input_ids:], num_frames=frames, median_width=width)
        starts = (path.starts.double() * time_precision).float().to(sequences.device)
        timestamps[b, num_input_ids:L - 1] = starts
        timestamps[b, L - 1] = starts[-1]
    return timestamps


class _PromptLength:
    """A logits processor that records the decoder's input length at its first step: the
    prompt length (``num_input_ids``), whatever language/task/prompt tokens generate chose."""

    def __init__(self):
        self.length = None

    def __call__(self, input_ids, scores):
        if self.length is None:
            self.length = input_ids.shape[-1]
        return scores


def generate(model, input_features: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             top_k: int | None = None, time_precision: float = 0.02, backend: str = "auto",
             **generate_kwargs) -> dict:
    """``model.generate`` then :func:`token_timestamps`, without switching the model to eager
    attention: ``{"sequences": [B, N], "token_timestamps": [B, N]}`` as transformers'
    ``generate(..., return_token_timestamps=True)`` returns them for short-form audio (the
    generated tokens without the prompt and the final end-of-text token, right-padded with
    the pad token; times padded with each row's last). ``generate_kwargs`` go to
    ``model.generate``; timestamp tokens, segments and long-form audio are not supported."""
    for name in ("return_token_timestamps", "return_timestamps", "return_segments", "return_dict_in_generate"):
        if generate_kwargs.get(name):
            raise ValueError(f"{name}: not supported by crossattn's generate (it returns sequences and "
                             "token_timestamps), got True")
    if not isinstance(input_features, torch.Tensor) or input_features.dim() != 3:
        raise ValueError("input_features must be a tensor [B, num_mel_bins, M], got "
                         f"{getattr(input_features, 'shape', type(input_features).__name__)}")
    window = 2 * model.config.max_source_positions
    if input_features.shape[-1] != window:
        raise ValueError(f"input_features must have M = {window} mel frames (one window; long-form audio "
                         f"is not supported here), got {input_features.shape[-1]}")
    from transformers import LogitsProcessorList

    recorder = _PromptLength()
    processors = list(generate_kwargs.pop("logits_processor", None) or []) + [recorder]
    with torch.no_grad():  # one encoder pass serves generation and the alignment pass
        encoded = model.get_encoder()(input_features)
    out = model.generate(input_features, attention_mask=attention_mask, return_dict_in_generate=True,
                         encoder_outputs=encoded, logits_processor=LogitsProcessorList(processors),
                         **generate_kwargs)
    full = out["sequences"]  # [B, P + N]: the decoder's inputs, prompt included
    prompt = recorder.length if recorder.length is not None else full.shape[-1]
    times = token_timestamps(model, input_features, full, num_input_ids=prompt, attention_mask=attention_mask,
                             time_precision=time_precision, top_k=top_k, backend=backend,
                             encoder_outputs=encoded.last_hidden_state)
    return _as_transformers_returns(full[:, prompt:], times[:, prompt:], model.generation_config)


def _as_transformers_returns(sequences, times, generation_config) -> dict:
    """Trim each row as transformers' short-form ``generate`` does (trailing pad tokens, then
    the end-of-text token) and pad the rows back to one length."""
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    rows = []
    for seq, t in zip(sequences, times):
        if len(seq) and seq[-1] == pad:
            n = int((seq == pad).sum()) - (1 if pad == eos else 0)
            seq = seq[:-n] if n else seq
        if len(seq) and seq[-1] == eos:
            seq = seq[:-1]
        rows.append((seq, t[: len(seq)]))
    n = max(len(seq) for seq, _ in rows)
    seqs = torch.stack([torch.nn.functional.pad(seq, (0, n - len(seq)), value=pad) for seq, _ in rows])
    ts = torch.stack([torch.nn.functional.pad(t, (0, n - len(t)), value=float(t[-1]) if len(t) else 0.0)
                      for _, t in rows])
    return {"sequences": seqs, "token_timestamps": ts}
