"""Hugging Face ``transformers`` attention implementation backed by crossattn.

    import crossattn.integrations.transformers as ca_hf
    name = ca_hf.register()            # "crossattn"
    model = AutoModel.from_pretrained(path, attn_implementation=name)
    out = model(**inputs, output_attentions=True)   # weights from the fused kernel

``register`` installs an attention function and its mask function (transformers builds
masks per implementation). The mask function is transformers' ``sdpa_mask`` (bool, True =
attend), and it notes on each mask it builds the structure behind it -- padding alone, or
causal plus padding -- so the kernels get a key padding mask and ``is_causal`` instead of
reading a dense ``[B, 1, Lq, Lk]`` mask. Any other mask (sliding windows, packed sequences,
a custom 4-D mask) goes to the kernels as an additive ``attn_bias``, as eager adds it;
grouped-query heads go as they are, and T5's ``position_bias`` is an ``attn_bias`` too
(differentiable: ``relative_attention_bias`` trains). Results match
``attn_implementation="eager"``, including rows that see no key at all: eager gives them
uniform weights and the mean of the values, and so does this integration (the kernels give
zeros there; only those rows are patched, with eager's gradients: its softmax backward at the
uniform row reaches the queries, keys and position bias too).

An argument this function does not understand is never ignored: the call goes to the
model's own eager attention function, and the reason is logged once.

Whisper: ``generate(return_token_timestamps=True)`` makes transformers switch the model to
eager attention, so those timestamps never come from crossattn's kernels; use
``crossattn.integrations.whisper.generate`` / ``token_timestamps`` for the same timestamps from
the alignment heads' weights alone.
"""
from __future__ import annotations

import logging
import sys
from typing import NamedTuple

import torch

from .._validation import values_unreadable
from ..functional import cross_attention

DEFAULT_NAME = "crossattn"  # no "sdpa"/"flash" in it: transformers treats those specially
logger = logging.getLogger(__name__)

# Keyword arguments that change nothing in the attention math here: bookkeeping, or what the
# mask already encodes (sliding windows, packed sequences).
_HARMLESS = frozenset({
    "output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "use_cache", "return_dict", "cache_position", "position_ids", "cu_seq_lens_q",
    "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "sliding_window", "layer_idx",
    "past_key_values", "cache", "target_dtype",
})
_logged: set[str] = set()


class MaskStructure(NamedTuple):
    """What a mask built by :func:`crossattn_mask` is made of: ``key_padding`` bool ``[B, Lk]``
    (True = padding) or None, and, for a causal mask, the offset ``c`` with key ``j`` visible
    to query ``i`` iff ``j <= i + c`` (None for a bidirectional mask)."""

    key_padding: torch.Tensor | None
    causal_offset: int | None


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention and mask functions under ``name`` and return it."""
    if "sdpa" in name or "flash" in name:
        raise ValueError(f"name must not contain 'sdpa' or 'flash' (transformers special-cases them), got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, crossattn_attention_forward)
    AttentionMaskInterface.register(name, crossattn_mask)
    return name


def crossattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """transformers' ``sdpa_mask``, with its structure attached as ``mask.crossattn_structure``
    when it is padding alone or causal plus padding."""
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = causal_mask_function if mask_function is None else mask_function
    mask = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)
    causal = mask_function is causal_mask_function
    if mask is None or not (causal or mask_function is bidirectional_mask_function):
        return mask
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return mask  # a static cache's tensor offset: reading it would sync
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        padding = ~padding[:, kv_offset:kv_offset + kv_length].bool()
    mask.crossattn_structure = MaskStructure(padding, q_offset - kv_offset if causal else None)
    return mask


def _weights_requested(kwargs) -> bool:
    """Whether the caller wants the weights: ``output_attentions`` reaches the attention
    function in some models only; the others record the weights with output hooks, active
    while transformers' output collector asks for some attentions."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older transformers passes output_attentions down
        return False
    collecting = _active_collector.get()
    return bool(collecting) and any("attentions" in key for key in collecting)


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("crossattn: the model's eager attention serves this call: %s", reason)


def _model_eager(module):
    """The eager attention function of the model ``module`` belongs to, or None."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    return None


def _eager_mask(attention_mask, query, key, causal):
    """The additive mask an eager function takes (as transformers' ``eager_mask`` builds it)."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal and q_len > 1:
        # sdpa_mask skipped the mask for SDPA's is_causal, which is top-left aligned.
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    return attention_mask


def _empty_rows(structure: MaskStructure, q_len: int, k_len: int, device) -> torch.Tensor | None:
    """Bool ``[B|1, 1, Lq]``: the query rows that see no key, or None when there are none
    (computed from the structure: ``[B, Lk]`` work, not ``[B, Lq, Lk]``)."""
    pad, offset = structure
    if offset is None:
        return None if pad is None else pad.all(-1)[:, None, None]
    reach = torch.arange(q_len, device=device) + offset  # last visible key of each row
    if pad is None:
        return None if offset >= 0 else (reach < 0)[None, None]
    seen = (~pad).cumsum(-1) > 0  # [B, Lk]: some valid key at or before j
    sees = seen[:, reach.clamp(0, k_len - 1)] & (reach >= 0)
    return ~sees[:, None]


def crossattn_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                position_bias: torch.Tensor | None = None, **kwargs):
    """transformers attention function: ``query [B, H, Lq, D]``, ``key``/``value``
    ``[B, Hkv, Lk, D]`` -> ``(out [B, Lq, H, Dv], weights [B, H, Lq, Lk] or None)``."""
    want_weights = _weights_requested(kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS and v is not None)
    reason = None
    if unknown:
        reason = f"argument(s) {', '.join(map(repr, unknown))} not understood by crossattn"
    elif attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        reason = f"an attention mask of type {type(attention_mask).__name__}"
    if reason is not None:
        eager = _model_eager(module)
        if eager is None:
            raise NotImplementedError(
                f"crossattn cannot serve this call ({reason}) and {type(module).__name__} has no "
                "eager_attention_forward to fall back to: use attn_implementation='eager'")
        _log_once(reason)
        if position_bias is not None:
            kwargs["position_bias"] = position_bias
        return eager(module, query, key, value, _eager_mask(attention_mask, query, key, causal),
                     scaling=scaling, dropout=dropout, **kwargs)

    q_len, k_len = query.shape[2], key.shape[2]
    key_padding, kernel_causal, bias, empty = None, False, position_bias, None
    structure = getattr(attention_mask, "crossattn_structure", None)
    if attention_mask is None:
        if causal and q_len > 1:
            if k_len > q_len:
                # As the SDPA integration: an empty static cache's prefill, top-left aligned
                # causality = the first q_len keys, bottom-right.
                key, value = key[:, :, :q_len], value[:, :, :q_len]
                bias = None if bias is None else bias[..., :q_len]
                k_len = q_len
            kernel_causal = True
    elif structure is not None and attention_mask.shape[-2:] == (q_len, k_len) and (
            structure.causal_offset in (None, k_len - q_len)):
        key_padding, kernel_causal = structure.key_padding, structure.causal_offset is not None
        empty = _empty_rows(structure, q_len, k_len, query.device)
    else:
        # Any other mask goes as an additive bias: a float mask as eager adds it, a bool one
        # as 0 / -inf (rows it masks entirely are patched below, whatever the dtype).
        mask_bias = attention_mask
        if attention_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask_bias = torch.where(attention_mask, zero, -torch.inf)
            empty = ~attention_mask.any(-1)
        bias = mask_bias if bias is None else bias + mask_bias

    out, weights = cross_attention(
        query, key, value, key_padding_mask=key_padding, attn_bias=bias, is_causal=kernel_causal,
        scale=None if scaling is None else float(scaling), dropout_p=float(dropout),
        need_weights="full" if want_weights else False,
    )
    if empty is not None:
        out, weights = _as_eager_where_empty(out, weights, empty, query, key, value, scaling, position_bias)
    return out.transpose(1, 2).contiguous(), weights


def _as_eager_where_empty(out, weights, empty, query, key, value, scaling, position_bias):
    """Rows that see no key, as eager computes them (the kernels give zeros there).

    Eager adds the dtype's minimum to every logit of such a row: the softmax is uniform, ``u =
    1 / Lk``, so the output is the mean of the values -- but its backward is the softmax's at
    ``u``, so the logits, and through them the queries, keys and a position bias, still get
    gradients. Written as value + (z - z.detach()) with z linear in the logits, that Jacobian
    costs O((Lq + Lk) D Dv) per head, no [Lq, Lk] logits (those only for returned weights)."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    g = H // Hkv
    if Lk == 0:  # eager: an empty softmax, output 0 (the kernels' zeros), weights [.., 0]
        return out, weights
    if empty.device.type == "cpu" and not values_unreadable(empty) and not bool(empty.any()):
        return out, weights  # no such row, and on a CPU knowing it costs no device sync
    # Half precision sums over the keys in float32 (a float16 sum of Lk products overflows).
    ct = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    mean_v = value.to(ct).mean(2, keepdim=True)  # [B, Hkv, 1, Dv]
    patched = mean_v.repeat_interleave(g, dim=1)
    trains = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, position_bias))
    scale = D ** -0.5 if scaling is None else float(scaling)
    bias_grad = position_bias is not None and position_bias.requires_grad
    if trains:
        # d out_i / d s_ij = u (v_j - mean v): z_i = sum_j u s_ij (v_j - mean v), values detached
        # (the values' own gradient, u each, comes through mean_v).
        vc = ((value.to(ct) - mean_v) / Lk).detach()
        a = vc.transpose(-1, -2) @ key.to(ct)  # [B, Hkv, Dv, D]: (1/Lk) sum_j (v_j - mean v) k_j^T
        z = (query.to(ct).reshape(B, Hkv, g * Lq, D) @ a.transpose(-1, -2) * scale).reshape(B, H, Lq, -1)
        if bias_grad:
            z = z + position_bias.to(ct) @ vc.repeat_interleave(g, dim=1)
        patched = patched + (z - z.detach())
    out = torch.where(empty[..., None], patched.to(out.dtype), out)
    if weights is not None:
        uniform = torch.full((), 1.0 / Lk, dtype=weights.dtype, device=weights.device)
        if trains:  # d P_ij / d s_il = u (delta_jl - u) at the uniform row
            s = (query.to(ct).reshape(B, Hkv, g * Lq, D) @ key.to(ct).transpose(-1, -2) * scale).reshape(B, H, Lq, Lk)
            if bias_grad:
                s = s + position_bias.to(ct)
            y = (s - s.mean(-1, keepdim=True)) / Lk
            uniform = uniform + (y - y.detach()).to(weights.dtype)
        weights = torch.where(empty[..., None], uniform, weights)
    return out, weights
