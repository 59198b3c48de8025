"""Hugging Face ``transformers`` attention implementation backed by crossattn.

    import crossattn.integrations.transformers as ca_hf
    name = ca_hf.register()            # "crossattn"
    model = AutoModel.from_pretrained(path, attn_implementation=name)
    out = model(**inputs, output_attentions=True)   # weights from the fused kernel

``register`` installs an attention function and its mask function (transformers builds
masks per implementation; without one the padding would be lost). The mask function is
transformers' ``sdpa_mask`` (bool, True = attend). A mask that is padding alone (every query
row alike) becomes the kernels' key padding mask; anything else -- causal self-attention,
sliding windows, custom patterns -- runs an eager fallback here, so results always match
``attn_implementation="eager"``.
"""
from __future__ import annotations

import torch

from ..functional import cross_attention

DEFAULT_NAME = "crossattn"  # no "sdpa"/"flash" in it: transformers treats those specially


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention and mask functions under ``name`` and return it."""
    if "sdpa" in name or "flash" in name:
        raise ValueError(f"name must not contain 'sdpa' or 'flash' (transformers special-cases them), got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, crossattn_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def key_padding_from_mask(attention_mask, q_len: int, k_len: int, is_causal: bool):
    """``(key_padding_mask or None, None)`` when the kernels can serve the mask, else
    ``(None, reason)``."""
    if is_causal and q_len > 1:
        return None, "causal attention"
    if attention_mask is None:
        return None, None
    if attention_mask.dtype != torch.bool:
        return None, f"a {attention_mask.dtype} attention mask"
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != k_len:
        return None, f"an attention mask of shape {list(attention_mask.shape)}"
    first = attention_mask[:, :1, :1, :]
    if not bool((attention_mask == first).all()):
        return None, "a mask that differs between queries (not padding alone)"
    return ~first[:, 0, 0, :], None


def _eager(module, query, key, value, attention_mask, scaling, dropout, is_causal, want_weights):
    """Plain attention for masks the kernels do not take (the textbook formula)."""
    s = torch.matmul(query, key.transpose(-1, -2)) * scaling
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask, torch.finfo(s.dtype).min)
        else:
            s = s + attention_mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
    p_drop = torch.nn.functional.dropout(p, p=dropout, training=module.training)
    out = torch.matmul(p_drop, value)
    return out.transpose(1, 2).contiguous(), (p if want_weights else None)


def crossattn_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs):
    """transformers attention function: ``query [B, H, Lq, D]``, ``key``/``value``
    ``[B, Hkv, Lk, D]`` -> ``(out [B, Lq, H, D], weights [B, H, Lq, Lk] or None)``."""
    want_weights = bool(kwargs.get("output_attentions", False))
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: the kernels take equal head counts
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    key_padding, reason = key_padding_from_mask(attention_mask, query.shape[2], key.shape[2], causal)
    if reason is not None:
        return _eager(module, query, key, value, attention_mask, scaling, dropout, causal, want_weights)
    out, weights = cross_attention(
        query, key, value, key_padding_mask=key_padding, scale=float(scaling),
        dropout_p=float(dropout), need_weights="full" if want_weights else False,
    )
    return out.transpose(1, 2).contiguous(), weights
