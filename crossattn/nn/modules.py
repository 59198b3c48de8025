"""Cross-modal attention modules over the functional API (every backend serves them).

Shape legend: ``B`` batch, ``Lq``/``T`` query (text) length, ``Lk``/``A`` context (audio,
image) length, ``E``/``d`` model width, ``H`` heads.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import _check_padding_mask, _check_values
from ..functional import bidirectional_cross_attention, cross_attention

__all__ = ["CrossModalAttention", "BidirectionalCrossAttention"]


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, L, H * D] -> [B, H, L, D] (a view)."""
    B, L, E = x.shape
    return x.view(B, L, heads, E // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, D] -> [B, L, H * D]."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


def _check_divisible(width: int, heads: int, name: str):
    if heads < 1 or width % heads:
        raise ValueError(f"{name} ({width}) must be divisible by num_heads ({heads})")


def _check_features(x, name: str, width: int, width_name: str, like: tuple | None = None) -> None:
    """``x`` must be a batch-first ``[B, L, width]`` tensor; ``like = (other, other_name,
    same_length)`` ties its batch size (and length) and device to another input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor [B, L, {width_name}], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must be 3-D [B, L, {width_name}] (batch first; unsqueeze(0) an unbatched "
            f"input), got {x.dim()}-D shape {list(x.shape)}"
        )
    if x.shape[-1] != width:
        raise ValueError(
            f"{name} must have {width_name} = {width} features [B, L, {width}], got shape {list(x.shape)}"
        )
    if like is not None:
        other, other_name, same_length = like
        n = 2 if same_length else 1
        if x.shape[:n] != other.shape[:n]:
            what = "batch size and length" if same_length else "batch size"
            raise ValueError(
                f"{name} must have the {what} of {other_name} {list(other.shape)}, "
                f"got shape {list(x.shape)}"
            )
        if x.device != other.device:
            raise ValueError(f"{name} must be on the device of {other_name} ({other.device}), got {x.device}")


def _check_dtype(x: Tensor, name: str, weight: Tensor) -> None:
    """``x`` must be floating point and, outside autocast, in the dtype of the module's
    parameters (else ``nn.Linear`` fails with a message naming neither)."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} must have the dtype of the module's parameters ({weight.dtype}), got "
            f"{x.dtype} (convert the input, or the module with .to({x.dtype}))"
        )


def _hf_padding(mask: Tensor | None, name: str, like: Tensor, like_name: str) -> Tensor | None:
    """A Hugging Face attention mask (1 = real token, 0 = padding) ``[B, L]`` of the input
    ``like`` as a bool padding mask (True = padding). Anything but 0 / 1 (an additive 0 / -inf
    mask, say) is refused rather than misread."""
    if mask is None:
        return None
    batch, length = like.shape[:2]
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor [B, L] (1 = real token, 0 = padding), got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape [B, L] = [{batch}, {length}] (the batch and length of "
            f"{like_name}), got {list(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {mask.device}")
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float tensor of 0s and 1s, got {mask.dtype}")
    _check_values(mask, ((mask == 0) | (mask == 1)).all(), lambda: (
        f"{name} must be a Hugging Face attention mask of 0s and 1s (1 = real token, 0 = "
        f"padding), got other values; an additive mask (0 = attend, -inf = padding) is not "
        f"one: pass ({name} == 0).long() instead"))
    return mask == 0


class _Temperature(nn.Module):
    """Per-head learnable temperature, parametrised as exp(log_t) so it stays positive."""

    def __init__(self, shape, device=None, dtype=None):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def forward(self) -> Tensor:
        return self.log_temperature.exp()


class CrossModalAttention(nn.Module):
    """One direction: queries of one modality attend to a context of another (text tokens
    to image patches or audio frames), with q/k/v and output projections.

    Args:
        embed_dim: width ``E`` of the queries and of the output.
        num_heads: ``H``; ``E`` must be divisible by it.
        kdim, vdim: widths of the context for keys and of the values (default ``E`` and
            ``kdim``: the values are the context unless ``value`` is passed).
        dropout: attention dropout, applied in training mode.
        bias: biases in the projections.
        learnable_temperature: a per-head temperature parameter (logits / temperature).
        prune: a :class:`crossattn.BlockPruning` applied to every call.
        backend: as in :func:`crossattn.cross_attention`.

    ``forward(query [B, Lq, E], context [B, Lk, kdim], context_padding_mask=None,
    query_padding_mask=None, need_weights=False, value=None, return_aux=None)`` returns
    ``(out [B, Lq, E], weights or None)``, and ``(out, weights, AuxOutput)`` with
    ``return_aux`` (a :class:`crossattn.AuxRequest`: weight statistics without the weights).
    Padding masks are bool, True = padding (``nn.MultiheadAttention``'s convention);
    ``value`` defaults to ``context``.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None,
                 dropout: float = 0.0, bias: bool = True, learnable_temperature: bool = False,
                 prune=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        _check_divisible(embed_dim, num_heads, "embed_dim")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim or embed_dim
        self.vdim = vdim or self.kdim  # the values default to the context itself
        self.dropout, self.prune, self.backend = dropout, prune, backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.temperature = _Temperature(num_heads, **factory) if learnable_temperature else None

    def forward(self, query: Tensor, context: Tensor, context_padding_mask: Tensor | None = None,
                query_padding_mask: Tensor | None = None, need_weights=False,
                value: Tensor | None = None, return_aux=None):
        _check_features(query, "query", self.embed_dim, "embed_dim")
        _check_features(context, "context", self.kdim, "kdim", like=(query, "query", False))
        _check_dtype(query, "query", self.q_proj.weight)
        _check_dtype(context, "context", self.k_proj.weight)
        if value is None:
            if self.vdim != self.kdim:
                raise ValueError(f"value must be given: vdim ({self.vdim}) differs from kdim ({self.kdim})")
            value = context
        else:
            _check_features(value, "value", self.vdim, "vdim", like=(context, "context", True))
            _check_dtype(value, "value", self.v_proj.weight)
        # Checked here so that errors name the caller's arguments, not the functional API's.
        context_padding_mask = _check_padding_mask(
            context_padding_mask, "context_padding_mask", context.shape[0], context.shape[1],
            "context", context.device)
        query_padding_mask = _check_padding_mask(
            query_padding_mask, "query_padding_mask", query.shape[0], query.shape[1], "query",
            query.device)
        H = self.num_heads
        q = _split_heads(self.q_proj(query), H)
        k = _split_heads(self.k_proj(context), H)
        v = _split_heads(self.v_proj(value), H)
        res = cross_attention(
            q, k, v, key_padding_mask=context_padding_mask, query_padding_mask=query_padding_mask,
            temperature=None if self.temperature is None else self.temperature(),
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
            prune=self.prune, return_aux=return_aux, backend=self.backend,
        )
        return (self.out_proj(_merge_heads(res[0])),) + tuple(res[1:])


class BidirectionalCrossAttention(nn.Module):
    """Text attends to audio and audio attends to text, in one fused call (seed 000).

    Each direction has its own q/k/v projections (queries from its own modality, keys and
    values from the other) and output projection, then a residual connection and LayerNorm:

        text_attended  = LayerNorm(text  + W_o^t attn(text  -> audio))
        audio_attended = LayerNorm(audio + W_o^a attn(audio -> text))

    ``forward(text [B, T, d], audio [B, A, d], text_mask=None, audio_mask=None,
    need_weights=False, return_aux=None)`` returns ``(text_attended [B, T, d], audio_attended
    [B, A, d], weights_ta, weights_at)`` with weights ``[B, H, T, A]`` / ``[B, H, A, T]``
    ("full") or head averages ``[B, T, A]`` / ``[B, A, T]`` ("mean"); with ``return_aux`` (a
    :class:`crossattn.AuxRequest`) two more items, the statistics ``aux_ta``, ``aux_at``
    (:class:`crossattn.AuxOutput`), which need no weight map. Masks are Hugging Face attention
    masks, as the encoders produce them: 1 = real token, 0 = padding. Padded positions never
    influence valid outputs or weights; their own output rows carry no attention.

    ``learnable_temperature`` adds a per-direction, per-head temperature; ``prune`` (a
    :class:`crossattn.BlockPruning`, or a pair for the two directions) prunes key blocks.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.1,
                 learnable_temperature: bool = False, prune=None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        _check_divisible(d_model, num_heads, "d_model")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.num_heads = d_model, num_heads
        self.dropout, self.prune, self.backend = dropout, prune, backend

        def linear():
            return nn.Linear(d_model, d_model, **factory)

        self.text_q, self.text_k, self.text_v = linear(), linear(), linear()
        self.audio_q, self.audio_k, self.audio_v = linear(), linear(), linear()
        self.text_out, self.audio_out = linear(), linear()
        self.text_norm = nn.LayerNorm(d_model, **factory)
        self.audio_norm = nn.LayerNorm(d_model, **factory)
        self.temperature = _Temperature((2, num_heads), **factory) if learnable_temperature else None

    def forward(self, text: Tensor, audio: Tensor, text_mask: Tensor | None = None,
                audio_mask: Tensor | None = None, need_weights=False, return_aux=None):
        _check_features(text, "text", self.d_model, "d_model")
        _check_features(audio, "audio", self.d_model, "d_model", like=(text, "text", False))
        _check_dtype(text, "text", self.text_q.weight)
        _check_dtype(audio, "audio", self.audio_q.weight)
        H = self.num_heads
        text_pad = _hf_padding(text_mask, "text_mask", text, "text")
        audio_pad = _hf_padding(audio_mask, "audio_mask", audio, "audio")
        temperature = None
        if self.temperature is not None:
            t = self.temperature()
            temperature = (t[0], t[1])
        res = bidirectional_cross_attention(
            _split_heads(self.text_q(text), H), _split_heads(self.text_k(text), H),
            _split_heads(self.text_v(text), H),
            _split_heads(self.audio_q(audio), H), _split_heads(self.audio_k(audio), H),
            _split_heads(self.audio_v(audio), H),
            x_padding_mask=text_pad, y_padding_mask=audio_pad, temperature=temperature,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
            prune=self.prune, return_aux=return_aux, backend=self.backend,
        )
        text_attended = self.text_norm(text + self.text_out(_merge_heads(res.out_x)))
        audio_attended = self.audio_norm(audio + self.audio_out(_merge_heads(res.out_y)))
        if return_aux is not None:
            return text_attended, audio_attended, res.weights_xy, res.weights_yx, res.aux_xy, res.aux_yx
        return text_attended, audio_attended, res.weights_xy, res.weights_yx
