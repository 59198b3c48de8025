"""The ``torch`` backend: memory-bounded attention in plain PyTorch, for every device.

Queries are processed in chunks so that at most one chunk of the score matrix exists at a
time; the backward recomputes each chunk from the saved log-sum-exp (FlashAttention-2
style), so memory stays bounded in training too -- Lk = 100 000 audio frames fit. The logits
are computed by the reference's own function, so forward and backward see identical bits.

The chunk size follows ``CROSSATTN_TORCH_CHUNK_MB`` (default 128): the budget for the
per-chunk temporaries of the forward and backward.
"""
from __future__ import annotations

import math
import os

import torch

from .._philox import dropout_keep_mask
from .._validation import AttentionProblem
from ..reference import (
    compute_dtype,
    element_mask,
    logits,
    select_blocks_reference,
    temperature_factor,
)
from .base import Backend

_DEFAULT_CHUNK_MB = 128
# Per score element: ~6 compute-dtype temporaries in backward (s, s*t, p, dp, ds, masks)
# plus the int64 Philox state (5 words) while a dropout mask is drawn.
_TEMPS = 6
_PHILOX_BYTES = 5 * 8


def chunk_rows(batch: int, heads: int, lq: int, lk: int, dtype: torch.dtype, dropout: bool) -> int:
    """Query rows per chunk so that one chunk's temporaries fit the budget."""
    budget = float(os.environ.get("CROSSATTN_TORCH_CHUNK_MB", _DEFAULT_CHUNK_MB)) * 2**20
    per_row = max(1, batch * heads * lk) * (
        _TEMPS * torch.finfo(dtype).bits // 8 + (_PHILOX_BYTES if dropout else 0)
    )
    return max(1, min(max(lq, 1), int(budget // per_row)))


class _ChunkedAttention(torch.autograd.Function):
    """(q, k, v, temperature) -> (out, weights); weights is empty unless requested."""

    @staticmethod
    def forward(
        ctx, q, k, v, temperature, key_valid, query_valid, block_mask,
        scale, temp_float, block_q, block_k, dropout_p, seed, direction, need_weights,
    ):
        B, H, Lq, _ = q.shape
        Lk, Dv = k.shape[2], v.shape[3]
        ct = compute_dtype(q.dtype)
        inv_t = _inv_temperature(temperature, temp_float, H, ct)
        kc, vc = k.to(ct), v.to(ct)
        out = q.new_empty(B, H, Lq, Dv)
        lse = torch.empty(B, H, Lq, dtype=ct, device=q.device)
        weights = _new_weights(q, need_weights, Lk)
        rows = chunk_rows(B, H, Lq, Lk, ct, dropout_p > 0)
        # The log-sum-exp is only needed by the backward.
        need_lse = any(ctx.needs_input_grad[:4])
        for r0 in range(0, Lq, rows):
            r = torch.arange(r0, min(Lq, r0 + rows), device=q.device)
            sl = slice(r0, r0 + len(r))
            mask = element_mask(
                B, Lq, Lk, key_valid=key_valid, query_valid=query_valid,
                block_mask=block_mask, block_q=block_q, block_k=block_k, rows=r,
            )
            s = logits(q[:, :, sl].to(ct), kc, scale, inv_t)
            empty = None
            if mask is not None:
                s.masked_fill_(~mask, -math.inf)
                empty = ~mask.any(-1, keepdim=True)
            if need_lse:
                l = torch.logsumexp(s, dim=-1)
                # Rows that attend to nothing store +inf: exp(s - lse) is then 0 in backward.
                lse[:, :, sl] = l if empty is None else l.masked_fill(empty.squeeze(-1), math.inf)
            p = torch.softmax(s, dim=-1)
            del s
            if empty is not None:
                p.masked_fill_(empty, 0.0)  # softmax of an all -inf row is NaN
            pd = p
            keep = _keep(seed, dropout_p, B, H, r, Lk, direction, q.device)
            if keep is not None:
                pd = p * keep * (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))
            out[:, :, sl] = pd @ vc
            if need_weights == "full":
                weights[:, :, sl] = p
            elif need_weights == "mean":
                weights[:, sl] = p.mean(1)
        ctx.save_for_backward(q, k, v, temperature, key_valid, query_valid, block_mask, lse, seed)
        ctx.config = (scale, temp_float, block_q, block_k, dropout_p, direction, need_weights)
        ctx.mark_non_differentiable(lse)
        return out, weights, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_weights, _d_lse):
        q, k, v, temperature, key_valid, query_valid, block_mask, lse, seed = ctx.saved_tensors
        scale, temp_float, block_q, block_k, dropout_p, direction, need_weights = ctx.config
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        ct = compute_dtype(q.dtype)
        inv_t = _inv_temperature(temperature, temp_float, H, ct)
        kc, vc = k.to(ct), v.to(ct)
        dq = torch.zeros_like(q, dtype=ct)
        dk = torch.zeros_like(k, dtype=ct)
        dv = torch.zeros_like(v, dtype=ct)
        dt = None if temperature is None else torch.zeros(H, dtype=ct, device=q.device)
        want_dw = need_weights is not None and d_weights is not None
        # d logits / d (q.k): per head when the temperature is a tensor.
        coef = scale * inv_t if inv_t is not None else scale
        rows = chunk_rows(B, H, Lq, Lk, ct, dropout_p > 0)
        for r0 in range(0, Lq, rows):
            r = torch.arange(r0, min(Lq, r0 + rows), device=q.device)
            sl = slice(r0, r0 + len(r))
            qc = q[:, :, sl].to(ct)
            s = logits(qc, kc, scale, inv_t)
            p = torch.exp(s - lse[:, :, sl, None])  # rows with no key: lse=+inf -> 0
            mask = element_mask(
                B, Lq, Lk, key_valid=key_valid, query_valid=query_valid,
                block_mask=block_mask, block_q=block_q, block_k=block_k, rows=r,
            )
            if mask is not None:
                p = p.masked_fill(~mask, 0.0)
            do = d_out[:, :, sl].to(ct)
            dp = do @ vc.transpose(-1, -2)
            keep = _keep(seed, dropout_p, B, H, r, Lk, direction, q.device)
            pd = p
            if keep is not None:
                factor = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
                keep_scaled = keep.to(ct) * factor
                dp = dp * keep_scaled
                pd = p * keep_scaled
            if want_dw:
                dw = d_weights[:, :, sl] if need_weights == "full" else d_weights[:, None, sl] / H
                dp = dp + dw.to(ct)
            ds = p * (dp - (p * dp).sum(-1, keepdim=True))  # d loss / d logits
            dv += pd.transpose(-1, -2) @ do
            if dt is not None:
                # logits = q.k * scale / T  =>  d logits / dT = -logits / T
                dt -= (ds * s).sum((0, 2, 3)) * inv_t.reshape(-1).expand(H)
            ds = ds * coef
            dq[:, :, sl] = ds @ kc
            dk += ds.transpose(-1, -2) @ qc
        d_temp = None
        if temperature is not None and ctx.needs_input_grad[3]:
            d_temp = dt.sum().reshape(temperature.shape) if temperature.numel() == 1 else dt
            d_temp = d_temp.to(temperature.dtype)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_temp,
            None, None, None, None, None, None, None, None, None, None, None,
        )


def _inv_temperature(temperature, temp_float, heads, ct):
    if temperature is not None:
        return temperature_factor(temperature.to(ct), heads)
    return temperature_factor(temp_float, heads)


def _new_weights(q, need_weights, lk):
    B, H, Lq, _ = q.shape
    if need_weights == "full":
        return q.new_empty(B, H, Lq, lk)
    if need_weights == "mean":
        return q.new_empty(B, Lq, lk)
    return q.new_empty(0)


def _keep(seed, dropout_p, batch, heads, rows, lk, direction, device):
    if dropout_p <= 0.0:
        return None
    return dropout_keep_mask(
        seed, dropout_p, batch=batch, heads=heads, rows=rows, cols=lk,
        direction=direction, device=device,
    )


class TorchBackend(Backend):
    name = "torch"

    def unavailable(self) -> str | None:
        return None

    def unsupported(self, problem: AttentionProblem) -> str | None:
        return None

    def attention(self, problem: AttentionProblem):
        p = problem
        key_valid, query_valid = p.key_valid(), p.query_valid()
        block_mask, block_q, block_k = None, 0, 0
        if p.pruning is not None:
            block_mask = select_blocks_reference(
                p.q, p.k, p.pruning, key_valid=key_valid, query_valid=query_valid,
                scale=p.scale, temperature=p.temperature,
            )
            block_q, block_k = p.pruning.block_q, p.pruning.block_k
        temp = p.temperature if isinstance(p.temperature, torch.Tensor) else None
        temp_float = None if isinstance(p.temperature, torch.Tensor) else p.temperature
        out, weights, _ = _ChunkedAttention.apply(
            p.q, p.k, p.v, temp, key_valid, query_valid, block_mask,
            p.scale, temp_float, block_q, block_k, p.dropout_p, p.dropout_seed, p.direction,
            p.need_weights,
        )
        return out, (weights if p.need_weights else None)

