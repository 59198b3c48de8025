"""``torch.nn.MultiheadAttention`` served by crossattn, weights included."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import cross_attention

__all__ = ["MultiheadAttention", "convert_multihead_attention"]


class MultiheadAttention(nn.MultiheadAttention):
    """A drop-in subclass of :class:`torch.nn.MultiheadAttention`: same constructor,
    parameters, state dict and ``forward`` signature, computed by crossattn's fused kernels
    -- ``need_weights=True`` included, which torch serves with its slow unfused path.

    Served: ``need_weights`` True/False, ``average_attn_weights`` both ways, a bool or float
    (0 / -inf) ``key_padding_mask``, ``batch_first`` both ways, ``kdim``/``vdim``,
    ``bias=False``, unbatched inputs, dropout in training. Anything else (a general
    ``attn_mask``, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``) falls back to torch's own
    implementation. Two differences, on purpose: a query whose keys are all padded gets
    zeros (output and weights) where torch returns NaN; in training, the returned weights are
    the pre-dropout probabilities (torch returns them after dropout).

    Extra keyword ``backend`` ("auto", "torch", "triton", "cuda") selects the crossattn
    backend; ``fallback_reason(...)`` says why a call would go to torch.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def fallback_reason(self, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                        is_causal: bool = False) -> str | None:
        """Why ``forward`` would use torch's implementation for these arguments, or None."""
        if attn_mask is not None:
            return "attn_mask is not supported by the kernels"
        if is_causal:
            return "is_causal is not supported by the kernels"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv is not supported by the kernels"
        if self.add_zero_attn:
            return "add_zero_attn is not supported by the kernels"
        if query.dim() not in (2, 3):
            return f"query must be 2-D or 3-D, got {query.dim()}-D"
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            if not key_padding_mask.is_floating_point():
                return f"key_padding_mask of dtype {key_padding_mask.dtype}"
            # A float mask is additive: only 0 / -inf (a padding mask) maps to the kernels.
            if not torch.compiler.is_compiling() and not bool(
                ((key_padding_mask == 0) | (key_padding_mask == float("-inf"))).all()
            ):
                return "a float key_padding_mask with values other than 0 and -inf"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.fallback_reason(query, key, value, key_padding_mask, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # Sequence-first [L, B, E] from here, as in F.multi_head_attention_forward.
        Lq, B, E = query.shape
        H = self.num_heads
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(x, w, b):
            return F.linear(x, w, b).view(x.shape[0], B, H, E // H).permute(1, 2, 0, 3)

        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask == float("-inf")
        mode = ("mean" if average_attn_weights else "full") if need_weights else False
        out, weights = cross_attention(
            heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv),
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=mode, backend=getattr(self, "backend", "auto"),
        )
        out = F.linear(out.permute(2, 0, 1, 3).reshape(Lq, B, E), self.out_proj.weight,
                       self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def convert_multihead_attention(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` (nested ones too, e.g. in
    ``nn.TransformerEncoderLayer``) for :class:`MultiheadAttention`, in place.

    The modules keep their parameters (the same tensors, so optimizers stay valid), buffers,
    hooks, training mode and device: only their class changes. Returns ``model``.

    Note: ``nn.TransformerEncoderLayer`` in eval mode without gradients may take torch's
    native fused path and not call its attention module at all; results are the same.
    """
    for module in model.modules():  # includes model itself
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if not isinstance(module, MultiheadAttention):
            module.__class__ = MultiheadAttention
        module.backend = backend
    return model
