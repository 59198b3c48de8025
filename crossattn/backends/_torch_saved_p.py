"""The torch backend's saved-P path: weights "full" (the caller holds ``P`` anyway) or ``P``
small enough to keep, so the backward reuses it instead of recomputing the logits.

float32 on a CPU runs the softmax, the dropout and the softmax backward as the fused kernels
of :mod:`crossattn._cpu_kernels` (one pass each, the ``scale / temperature`` factor and the
dropout scale folded in: no pass over q, dq, out or dO for them); everything else runs torch
ops, with the factors applied on the small side (q, out, dO, dq).
"""
from __future__ import annotations

import math

import torch

from .. import _cpu_kernels
from .._philox import _bh_counters, dropout_keep_mask, dropout_threshold
from ..reference import compute_dtype
from ._torch_common import (
    _batch_ids,
    _coef,
    _drop,
    _dropout_scale,
    _grouped,
    _head_mean,
    _pair_mask,
    _ungrouped,
    chunk_rows,
)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the saved-P path multiplies and normalises. bfloat16 stays in bfloat16, as eager
    does: its matmuls accumulate in float32 (oneDNN) and torch's softmax and softmax backward
    compute in float32 inside, so only the stored logits, P and dP round to bfloat16 -- well
    within the bfloat16 tolerance, at 2-3x the speed of float32 matmuls. float16 keeps
    float32 (its tolerance is 8x tighter, and CPUs rarely multiply it natively)."""
    return dtype if dtype == torch.bfloat16 else compute_dtype(dtype)


class _SavedPAttention(torch.autograd.Function):
    """(q, k, v, temperature) -> (out, weights "full" / "mean" / empty), every head.

    ``P`` is saved for the backward -- with weights "full" it is the returned tensor, which
    the caller holds anyway -- and, with dropout, the dropped-out ``PD = P * keep`` (stored
    like ``P``) that the forward multiplies ``v`` with: nothing is recomputed, the backward
    needs no keep mask (``P * keep * dP = PD * dP``, so the softmax backward
    ``P * (g - rowsum(P * g))`` of ``g = keep * dP + dW`` is ``t - P * rowsum(t)`` with
    ``t = PD * dP + P * dW``) and runs in place on ``dP``, and the saved state (``P``, ``PD``)
    stays below eager autograd's (``P``, the mask and the dropped-out copy). The keep mask
    is drawn as 0/1 of the work dtype and becomes ``PD`` in place: a multiply vectorises,
    where ``masked_fill`` / ``where`` with a bool mask run 3-6x slower on a CPU; no
    [B, H, Lq, Lk] buffer is allocated beyond the logits, ``P`` and ``dP`` (at the seed's size
    each fresh one is a new mapping whose page faults cost as much as the pass). The dropout
    scale ``1/(1-p)`` and the ``scale / temperature`` factor are applied on the small side
    (q, out, dO, dq) -- or, on the fused float32 CPU path, inside the kernels: ``PD = P * keep
    / (1-p)`` and the kernel's gradient of the logits carries the factor.
    float32, float64 and bfloat16 compute ``P`` whole; float16 is computed in float32 by
    row chunks (its ``P`` and ``PD`` stored in float16, as eager would)."""

    @staticmethod
    def forward(ctx, q, k, v, temperature, key_valid, query_valid, block_mask, seed, cfg, train):
        B, H, Lq, _ = q.shape
        Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
        ct, wt = compute_dtype(q.dtype), _work_dtype(q.dtype)
        rows = max(Lq, 1) if wt == q.dtype else chunk_rows(B, H, Lq, Lk, ct, False)
        whole = rows >= Lq > 0 and wt == q.dtype
        coefs = _fused_coefs(q, k, v, temperature, cfg) if whole else None
        if coefs is not None:  # float32 on a CPU: the compiled kernels
            out, weights, dropped, k, v = _fused_forward(q, k, v, key_valid, query_valid, block_mask, seed, cfg,
                                                         coefs, train)
            ctx.save_for_backward(q, k, v, temperature, weights, dropped)
            ctx.cfg, ctx.q_dtype, ctx.coefs = cfg, q.dtype, coefs
            ctx.set_materialize_grads(False)
            return _results(out, weights, cfg)
        coef = _coef(cfg, temperature, ct)
        # logits = qs @ k^T. A float factor multiplies q in its own dtype (computed in float32
        # and rounded once, as the float32 product would be: no conversion passes).
        qs = q * coef if isinstance(coef, float) and q.dtype == wt else (q.to(ct) * coef).to(wt)
        # Training: batch-contiguous once, and saved so -- a head-split projection ([B, L, H, D]
        # viewed as [B, H, L, D]) would be copied by every matmul reading it, twice more in the
        # backward. Inference keeps the views: each matmul's copy is transient (a lower peak).
        kc, vc = k.to(wt), v.to(wt)
        if train:
            kc, vc = kc.contiguous(), vc.contiguous()
        kt = kc.transpose(-1, -2)
        dropout = cfg.dropout_p > 0
        weights = None if whole else q.new_empty(B, H, Lq, Lk)  # P (whole: P itself, no copy)
        dropped = None if whole or not dropout else q.new_empty(B, H, Lq, Lk)  # PD
        f = _dropout_scale(cfg.dropout_p)
        out = None if whole else q.new_empty(B, H, Lq, Dv)
        for r0 in range(0, Lq, rows):
            sl = slice(r0, min(Lq, r0 + rows))
            r = torch.arange(cfg.row0 + sl.start, cfg.row0 + sl.stop, device=q.device)
            s = _ungrouped(_grouped(qs[:, :, sl], Hkv) @ kt, H)
            mask = _pair_mask(B, Lk, key_valid, query_valid, block_mask, cfg, r, q.device)
            if mask is not None:
                s.masked_fill_(~mask, -math.inf)
            # Without dropout the logits die here: P takes their buffer on a CPU (its softmax
            # reads each row whole before writing it; tested), one [B, H, Lq, Lk] fewer at peak.
            in_place = s.device.type == "cpu" and not dropout and not torch.compiler.is_compiling()
            p = torch.softmax(s, dim=-1, out=s if in_place else None)
            if mask is not None:
                p.masked_fill_(~mask.any(-1, keepdim=True), 0.0)  # softmax of an all -inf row is NaN
            if whole:
                weights = p
            else:
                weights[:, :, sl] = p
            pd = p
            if dropout:  # P * keep (in the logits' buffer: no fresh [B, H, rows, Lk] allocation)
                if cfg.dropper is not None:  # the gathered problem's: the caller's bits
                    pd = s.copy_(p).masked_fill_(cfg.dropper(r), 0.0)
                else:
                    pd = dropout_keep_mask(seed, cfg.dropout_p, batch=B, heads=H, rows=r, cols=Lk,
                                           direction=cfg.direction, device=q.device,
                                           batch_ids=_batch_ids(cfg, q.device), dtype=wt, out=s, probs=p)
                if whole:
                    dropped = pd
                else:
                    dropped[:, :, sl] = pd
            del s
            o = _ungrouped(_grouped(pd, Hkv) @ vc, H)
            o = o * f if dropout else o
            if whole:
                out = o.clone() if Hkv != H and not dropout else o  # grouped heads: `o` is a view
            else:
                out[:, :, sl] = o
        if out is None:  # no query rows
            out = q.new_empty(B, H, Lq, Dv)
        same = wt == k.dtype  # keep the copies (else the inputs: no float32 copy of float16 kept)
        ctx.save_for_backward(qs, kc if same else k, vc if same else v, temperature, weights, dropped)
        ctx.cfg, ctx.q_dtype, ctx.coefs = cfg, q.dtype, None
        ctx.set_materialize_grads(False)  # an unused output costs no [B, H, Lq, Lk] of zeros
        return _results(out, weights, cfg)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_weights):
        if ctx.coefs is not None:
            return _fused_backward(ctx, d_out, d_weights)
        qs, k, v, temperature, weights, dropped = ctx.saved_tensors
        cfg = ctx.cfg
        B, H, Lq, _ = qs.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        wt, ct = qs.dtype, compute_dtype(qs.dtype)
        kc, vt = k.to(wt), v.to(wt).transpose(-1, -2)
        f = _dropout_scale(cfg.dropout_p)
        rows = max(Lq, 1) if wt == ctx.q_dtype else chunk_rows(B, H, Lq, Lk, ct, False)
        # One chunk: the gradients are the matmuls' results themselves (as eager's autograd
        # has them); several: float32 accumulators. dq is before the scale / temperature factor.
        single = rows >= Lq
        dq, dk, dv = (None, None, None) if single else (
            torch.empty(qs.shape, dtype=ct, device=qs.device),
            torch.zeros(k.shape, dtype=ct, device=k.device), torch.zeros(v.shape, dtype=ct, device=v.device))
        for r0 in range(0, Lq, rows):
            sl = slice(r0, min(Lq, r0 + rows))
            p = weights[:, :, sl].to(wt)
            t = None  # P * g for g = d loss / d P (both branches: dropped-out and returned)
            if d_out is not None:
                do = d_out[:, :, sl].to(wt).contiguous()  # read by two matmuls: copied once if strided
                pd = p
                if dropped is not None:
                    do = do * f  # the 1/(1-p) of dP and dV, on the small side
                    pd = dropped[:, :, sl].to(wt)
                dv_part = _grouped(pd, Hkv).transpose(-1, -2) @ _grouped(do, Hkv)
                dv = dv_part if single else dv.add_(dv_part)
                t = _ungrouped(_grouped(do, Hkv) @ vt, H).mul_(pd)  # P * keep * dP = PD * dP
                del pd
            if d_weights is not None and cfg.need_weights in ("full", "mean"):
                dw = d_weights[:, :, sl].to(wt) if cfg.need_weights == "full" else d_weights[:, None, sl].to(wt) / H
                t = p * dw if t is None else t.addcmul_(p, dw)
            if t is None:
                t = torch.zeros_like(p)
            # P * (g - rowsum(P * g)); a bfloat16 row sum accumulates in float32 (one rounding of
            # the sum, as eager's dropout backward rounds each dP); a float32 one would make
            # addcmul_ mixed-dtype, 20x slower on a CPU
            ds = t.addcmul_(p, t.sum(-1, keepdim=True), value=-1)
            del t, p
            ds = _grouped(ds, Hkv)
            dq_part = _ungrouped(ds @ kc, H)
            dk_part = ds.transpose(-1, -2) @ _grouped(qs[:, :, sl], Hkv)
            if single:
                dq, dk = dq_part, dk_part
            else:
                dq[:, :, sl] = dq_part
                dk += dk_part
        if dv is None:  # no gradient reached the output (or no query rows)
            dv = torch.zeros_like(v)
        if dq is None:  # no query rows
            dq, dk = torch.zeros_like(qs), torch.zeros_like(k)
        d_temp = None
        if temperature is not None and ctx.needs_input_grad[3]:
            # logits = q.k * scale / T: sum_j dS_ij * S_ij = qs_i . (dS @ k)_i, so
            # dL/dT_h = -(1/T_h) * sum_{b,i} qs_i . dq_raw_i
            dt = -(qs.to(ct) * dq).sum((0, 2, 3)) / temperature.to(ct).reshape(-1).expand(H)
            d_temp = (dt.sum().reshape(temperature.shape) if temperature.numel() == 1 else dt).to(temperature.dtype)
        dq = dq * _coef(cfg, temperature, ct)
        return dq.to(ctx.q_dtype), dk.to(k.dtype), dv.to(v.dtype), d_temp, None, None, None, None, None, None


def _fused_coefs(q, k, v, temperature, cfg) -> torch.Tensor | None:
    """The ``scale / temperature`` factors (float32 ``[1]`` or ``[H]``) for the fused CPU
    kernels where they serve this call (float32 plain CPU tensors, eager), else None."""
    if not (q.dtype == k.dtype == v.dtype == torch.float32 and all(
            type(t) is torch.Tensor and t.device.type == "cpu" for t in (q, k, v)) and _cpu_kernels.can_softmax()
            and (temperature is None or temperature.device.type == "cpu")):  # an nn.Parameter too
        return None
    if temperature is None:
        return torch.tensor([cfg.scale], dtype=torch.float32)
    return (cfg.scale / temperature.detach().to(torch.float32)).reshape(-1).contiguous()


def _results(out, weights, cfg):
    if cfg.need_weights == "full":
        return out, weights
    return out, _head_mean(weights) if cfg.need_weights == "mean" else out.new_empty(0)


def _like(t: torch.Tensor, last: int) -> torch.Tensor:
    """An empty ``[B, H, L, last]`` in ``t``'s memory layout where ``t`` is a head-split
    projection ([B, L, H, D] seen as [B, H, L, D]), so that a caller merging heads back, or a
    projection taking the gradient, reads it without a copy (as SDPA's CPU flash kernel returns
    its output); else contiguous. Not a view (in-place ops on the result stay allowed)."""
    B, H, L, _ = t.shape
    if t.stride(0) > t.stride(2) > t.stride(1) and H > 1 and L > 1:
        return torch.empty_strided((B, H, L, last), (L * H * last, last, H * last, 1), dtype=t.dtype,
                                   device=t.device)
    return t.new_empty(B, H, L, last)


# Below this many multiply-adds per (batch, head) score matrix the fused path multiplies as
# torch.matmul does (strided operands copied once, contiguous results): reading small matrices
# in place, rows a whole projection apart, costs more than the copies (MultiheadAttention at
# L = 4..64 ran 15-20 % slower).
_STRIDED_MIN_MACS = 1 << 18


def _strided(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused path reads q, k, v in place and returns results in their layouts."""
    return q.shape[1] == k.shape[1] and q.shape[2] * k.shape[2] * q.shape[3] >= _STRIDED_MIN_MACS


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` for ``[B, H, ., .]`` operands and ``out`` of any layout, copying nothing:
    one bmm over B * H where all three view as ``[B * H, ., .]``, else one per batch item -- a
    head-split projection ([B, L, H, D] seen as [B, H, L, D]) is a strided batch of H matrices
    that BLAS reads in place, where ``torch.matmul`` would copy it first."""
    B, H = out.shape[:2]
    if torch.compiler.is_compiling():  # traced (compiled autograd): no out= in graphs
        return out.copy_(a @ b)
    if all(B == 1 or H == 1 or t.stride(0) == t.stride(1) * H for t in (a, b, out)):
        torch.bmm(*(t.reshape(B * H, *t.shape[2:]) for t in (a, b)), out=out.view(B * H, *out.shape[2:]))
    else:  # a strided batch: per item (no try/except on view: a caught error kept `out` alive)
        for i in range(B):
            torch.bmm(a[i], b[i], out=out[i])
    return out


def _fused_forward(q, k, v, key_valid, query_valid, block_mask, seed, cfg, coefs, train):
    """The saved-P forward on the compiled kernels: ``(out, P, PD or None, k, v to save)``.
    Same heads and large matrices (``_strided``): no copy of a strided q, k, v (``_mm``),
    ``out`` in q's layout. Otherwise torch.matmul's way, grouped heads stacking the query heads
    of a group by rows (k, v batch-contiguous once when training)."""
    B, H, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    strided = _strided(q, k)
    if not strided and train:
        k, v = k.contiguous(), v.contiguous()
    if strided:
        s = _mm(q, k.transpose(-1, -2), q.new_empty(B, H, Lq, Lk))
    else:
        s = _ungrouped(_grouped(q, Hkv) @ k.transpose(-1, -2), H)
    r = torch.arange(cfg.row0, cfg.row0 + Lq, device=q.device)
    mask = _pair_mask(B, Lk, key_valid, query_valid, block_mask, cfg, r, q.device)
    if mask is not None:
        s.masked_fill_(~mask, -math.inf)
    dropout = cfg.dropout_p > 0
    weights = q.new_empty(B, H, Lq, Lk) if dropout else s  # P over the logits, or PD there and P fresh
    dropped = s if dropout else None
    batch_ids = _batch_ids(cfg, q.device)
    drops = dropout and cfg.dropper is None  # the kernel draws the bits (else the gathered problem's, below)
    if not _cpu_kernels.softmax(s, weights, coefs, heads=H, pd=dropped if drops else None,
                                keep_scale=_dropout_scale(cfg.dropout_p), seed=seed if drops else 0,
                                threshold=dropout_threshold(cfg.dropout_p) if drops else 0, direction=cfg.direction,
                                bh=_bh_counters(B, H, batch_ids, q.device).flatten(), rows=r):
        weights, dropped = _fused_softmax_ops(s, coefs, cfg, seed, r)  # refused (a dispatch mode's)
    elif dropout and not drops:
        dropped = torch.mul(weights, _dropout_scale(cfg.dropout_p), out=s).masked_fill_(cfg.dropper(r), 0.0)
    pd = weights if dropped is None else dropped  # PD carries the dropout scale
    if strided:
        out = _mm(pd, v, _like(q, Dv))
    else:
        out = q.new_empty(B, H, Lq, Dv)
        torch.matmul(_grouped(pd, Hkv), v, out=_grouped(out, Hkv))  # `out` itself, not a view of a result
    return out, weights, dropped, k, v


def _fused_backward(ctx, d_out, d_weights):
    """The backward of the fused forward: ``PD`` (when dropout) holds the dropout scale and the
    kernel's gradient of the logits the ``scale / temperature`` factor, so ``dq = dS k`` and
    ``dk = dS^T q`` need no further pass. Where the forward read q, k, v in place
    (``_strided``): the gradients in their inputs' layouts, nothing copied (``_mm``)."""
    q, k, v, temperature, p, pd = ctx.saved_tensors
    cfg = ctx.cfg
    B, H, Lq, _ = q.shape
    Hkv = k.shape[1]
    strided = _strided(q, k)  # as the forward decided
    dp = dv = None
    if d_out is not None:
        pv = p if pd is None else pd  # what multiplied v
        if strided:
            dv = _mm(pv.transpose(-1, -2), d_out, torch.empty_like(v))
            dp = _mm(d_out, v.transpose(-1, -2), p.new_empty(p.shape))
        else:
            do = _grouped(d_out.contiguous(), Hkv)  # read by two matmuls: copied once if strided
            dv = _grouped(pv, Hkv).transpose(-1, -2) @ do
            dp = _ungrouped(do @ v.transpose(-1, -2), H)
    dw = d_weights if d_weights is not None and cfg.need_weights in ("full", "mean") else None
    if dp is None and dw is None:
        ds = None
    else:
        ds = dp if dp is not None else torch.empty_like(p)
        scale = 1.0 / H if cfg.need_weights == "mean" else 1.0
        if not _cpu_kernels.softmax_backward(ds, p, ctx.coefs, heads=H, dp=dp, pd=pd, dw=dw, dw_scale=scale):
            # refused (a traced backward -- compiled autograd --, a gradient with strided keys)
            ds = _fused_softmax_backward_ops(p, ctx.coefs, dp, pd, dw, scale)
    if ds is None:
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    elif strided:
        dq = _mm(ds, k, torch.empty_like(q))
        dk = _mm(ds.transpose(-1, -2), q, torch.empty_like(k))
    else:
        ds = _grouped(ds, Hkv)
        dq, dk = _ungrouped(ds @ k, H), ds.transpose(-1, -2) @ _grouped(q, Hkv)
    d_temp = None
    if temperature is not None and ctx.needs_input_grad[3]:
        # logits = q.k * c, c = scale / T: dL/dT_h = -(1/T_h) sum_{b,i} q_i . dq_i (dq = c dS k)
        dt = -(q * dq).sum((0, 2, 3)) / temperature.to(torch.float32).reshape(-1).expand(H)
        d_temp = (dt.sum().reshape(temperature.shape) if temperature.numel() == 1 else dt).to(temperature.dtype)
    return dq, dk, torch.zeros_like(v) if dv is None else dv, d_temp, None, None, None, None, None, None


def _fused_softmax_ops(s, coefs, cfg, seed, rows):
    """What the fused softmax kernel computes, in torch ops: ``(P, PD or None)``."""
    B, H, _, Lk = s.shape
    z = torch.where(s == -math.inf, s, s * coefs.reshape(1, -1, 1, 1))
    p = torch.softmax(z, -1).masked_fill((z == -math.inf).all(-1, keepdim=True), 0.0)  # no key: 0
    if cfg.dropout_p <= 0:
        return p, None
    drop = _drop(seed, cfg, B, H, rows, Lk, s.device)  # the caller's Philox bits (or the gathered problem's)
    return p, (p * _dropout_scale(cfg.dropout_p)).masked_fill_(drop, 0.0)


def _fused_softmax_backward_ops(p, coefs, dp, pd, dw, dw_scale):
    """What the fused softmax-backward kernel computes, in torch ops (``dp`` is overwritten)."""
    t = torch.zeros_like(p) if dp is None else dp.mul_(p if pd is None else pd)
    if dw is not None:
        t.addcmul_(p, dw if dw.dim() == 4 else dw[:, None], value=dw_scale)
    return t.addcmul_(p, t.sum(-1, keepdim=True), value=-1).mul_(coefs.reshape(1, -1, 1, 1))
