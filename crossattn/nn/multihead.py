"""``torch.nn.MultiheadAttention`` served by crossattn, weights included."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import cross_attention

__all__ = ["MultiheadAttention", "convert_multihead_attention"]


def _check_mask_type(mask, name, other_type, other_name, check_other=True):
    """torch's ``F._canonical_mask`` checks (error and deprecation warning, same words),
    without its bool -> float copy of the mask: it runs on an empty slice of ``mask``."""
    if mask is not None:
        F._canonical_mask(mask=mask.flatten()[:0], mask_name=name, other_type=other_type,
                          other_name=other_name, target_type=torch.float32, check_other=check_other)


class MultiheadAttention(nn.MultiheadAttention):
    """A drop-in subclass of :class:`torch.nn.MultiheadAttention`: same constructor,
    parameters, state dict, ``forward`` signature and errors (torch's shape checks, in torch's
    order, with torch's exception types and messages), computed by crossattn's fused kernels
    -- ``need_weights=True`` included, which torch serves with its slow unfused path.

    Served by the kernels: ``need_weights`` and ``average_attn_weights`` both ways, bool or
    float ``key_padding_mask`` and ``attn_mask`` (2-D ``[L, S]`` and 3-D ``[N * H, L, S]``),
    ``is_causal``, ``batch_first`` both ways, ``kdim``/``vdim``, ``bias=False``, unbatched
    inputs, dropout in training. torch's own implementation serves ``add_bias_kv``,
    ``add_zero_attn``, NestedTensor inputs and a float mask whose dtype is not the query's.
    Two differences, on purpose: a query whose keys are all masked gets zeros (output and
    weights) where torch returns NaN; in training, the returned weights are the pre-dropout
    probabilities (torch returns them after dropout).

    ``is_causal=True`` is, as in torch, a hint that ``attn_mask`` is the causal mask: for a
    square mask the kernels apply causality themselves (skipping the blocks above the
    diagonal) instead of reading the mask.

    Extra keyword ``backend`` ("auto", "torch", "triton", "cuda") selects the crossattn
    backend; ``fallback_reason(...)`` says why a call would go to torch.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def __prepare_scriptable__(self):
        """``torch.jit.script`` cannot compile crossattn's Python dispatch; say so plainly (torch
        would replace this module by whatever is returned here, in the caller's model too)."""
        raise RuntimeError(
            "crossattn.nn.MultiheadAttention cannot be scripted with torch.jit.script (deprecated by "
            "torch): use torch.compile or torch.export, which trace the kernels, or script the model "
            "before crossattn.convert_multihead_attention")

    def fallback_reason(self, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                        is_causal: bool = False) -> str | None:
        """Why ``forward`` would use torch's implementation for these arguments, or None.
        (Arguments torch rejects are no reason: ``forward`` raises torch's error for them.)"""
        if not all(isinstance(t, Tensor) for t in (query, key, value)) or not all(
                m is None or isinstance(m, Tensor) for m in (key_padding_mask, attn_mask)):
            return "arguments that are not tensors (torch raises its own errors)"
        if any(t.is_nested for t in (query, key, value)):
            return "NestedTensor inputs (torch's native fast path serves them)"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv is not supported by the kernels"
        if self.add_zero_attn:
            return "add_zero_attn is not supported by the kernels"
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.is_floating_point() and mask.dtype != query.dtype:
                return f"a float {name} of dtype {mask.dtype} with a {query.dtype} query"
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.fallback_reason(query, key, value, key_padding_mask, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        # From here on: torch's checks in the order of nn.MultiheadAttention.forward and
        # F.multi_head_attention_forward, then the kernels instead of its attention.
        _check_mask_type(key_padding_mask, "key_padding_mask", F._none_or_dtype(attn_mask), "attn_mask")
        _check_mask_type(attn_mask, "attn_mask", None, "", check_other=False)
        batch_first = self.batch_first and query.dim() == 3
        if batch_first:  # as torch does it, keeping `query is key` (the packed projection)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. "
                "You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch hands the hint to SDPA and never reads (or checks) the mask
        if embed_dim != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if not self._qkv_same_embed_dim:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                       self.v_proj_weight, b_q, b_k, b_v)
        else:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        H = self.num_heads
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, "
                                       f"but should be {(tgt_len, src_len)}.")
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * H, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, "
                                       f"but should be {(bsz * H, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        def heads(x):  # [L, B, E] -> [B, H, L, E / H], a view; torch's view first (its error)
            x = x.view(x.shape[0], bsz * H, embed_dim // H)
            return x.view(x.shape[0], bsz, H, embed_dim // H).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        if key_padding_mask is not None:  # F._check_key_padding_mask, minus its graph break
            if key_padding_mask.shape[0] != bsz:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != src_len:
                raise AssertionError(
                    f"Expected key_padded_mask.shape[1] to be {src_len}, but got {key_padding_mask.shape[1]}")
        bias, padding, causal = self._masks(attn_mask, key_padding_mask, is_causal, query,
                                            bsz, tgt_len, src_len)
        mode = ("mean" if average_attn_weights else "full") if need_weights else False
        out, weights = cross_attention(
            q, k, v, key_padding_mask=padding, attn_bias=bias, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=mode, backend=getattr(self, "backend", "auto"),
        )
        out = F.linear(out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim),
                       self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, embed_dim)
        if not is_batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif batch_first:
            out = out.transpose(1, 0)
        return out, weights

    @staticmethod
    def _masks(attn_mask, key_padding_mask, is_causal, query, bsz, tgt_len, src_len):
        """torch's masks as the kernels take them: ``(attn_bias, key_padding_mask, is_causal)``.

        A bool key padding mask stays bool (padded key blocks are skipped); float masks are
        additive, as in torch, and go in the bias, broadcast rather than expanded."""
        causal = bool(is_causal) and tgt_len == src_len
        bias = None
        if is_causal and not causal and attn_mask is None:
            # torch dropped the mask for SDPA's is_causal, which is top-left aligned; the
            # kernels' is_causal is bottom-right: the same only for a square mask.
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None and not causal:
            if attn_mask.dtype == torch.bool:  # True = masked, as torch
                bias = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask, -math.inf)
            else:
                bias = attn_mask
            if bias.dim() == 3:
                bias = bias.reshape(bsz, -1, tgt_len, src_len)  # a view unless it cannot be
        padding = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                padding = key_padding_mask
            else:
                kpm = key_padding_mask.view(bsz, 1, 1, src_len)
                bias = kpm if bias is None else bias + kpm
        return bias, padding, causal


def convert_multihead_attention(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` inside ``model`` (nested ones too, e.g. in
    ``nn.TransformerEncoderLayer``) for :class:`MultiheadAttention`, in place.

    The modules keep their parameters (the same tensors, so optimizers stay valid), buffers,
    hooks, training mode and device: only their class changes. Returns ``model``. Subclasses
    of ``torch.nn.MultiheadAttention`` other than crossattn's are left as they are: their own
    ``forward`` is theirs to keep. ``backend`` (default ``"auto"``) is set on the swapped
    modules; crossattn modules already in ``model`` keep theirs unless ``backend`` is given.

    Note: ``nn.TransformerEncoderLayer`` in eval mode without gradients may take torch's
    native fused path and not call its attention module at all (and gives NaN for a sequence
    that is all padding); ``crossattn.models.encoders.TransformerEncoderLayer`` never does.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
    for module in model.modules():  # includes model itself
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = backend or "auto"
        elif isinstance(module, MultiheadAttention) and backend is not None:
            module.backend = backend
    return model
