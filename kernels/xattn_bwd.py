"""Triton backward kernels (FlashAttention-2 style recompute from the stored row statistics).

With P the weights, dP_eff = (dO V^T) * keep / (1 - p) and dW the gradient reaching the
returned weights (full, or mean / H per head):

    dS    = P * (dP_eff + dW - delta),   delta = rowsum(dO * O) + rowsum(P * dW)
    dV    = (P * keep / (1 - p))^T dO
    dQ    = dS K * scale / T,   dK = dS^T Q * scale / T
    dT_h  = -sum(dS * S) / T_h          (S: the logits, temperature included)

Like the forward, one kernel serves both directions (program ids below ``nblk0`` are
direction 0). All three kernels take the same arguments: per direction the problem tuple
(xattn_fwd.PROBLEM) and the gradient tuple ``GRAD`` below. ``_xattn_bwd_delta_kernel``
computes delta, ``_xattn_bwd_dkdv_kernel`` walks the query blocks of one key block,
``_xattn_bwd_dq_kernel`` walks the key blocks of one query block and also writes
per-program partial sums for the temperature gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .xattn_fwd import (_attended, _col_valid, _head_coef, _keep_mask, _layout_row, _load, _load_t,
                        _num_tiles, _probs, _row_stats, _row_valid, _tile_and_slab, _tile_start)

# Outputs of the forward, incoming gradients, and what the backward writes (all contiguous);
# LT is the transposed pruning layout the dK/dV walk follows.
GRAD = ("O", "DO", "M", "R", "DELTA", "DW", "DQ", "DK", "DVG", "DT", "LT")


@triton.jit
def _dw_tile(DW, b, bh, offs_m, offs_n, Lq, Lk, H, MEAN: tl.constexpr):
    mask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MEAN:
        base = DW + b.to(tl.int64) * Lq * Lk
        dw = tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0)
        return dw.to(tl.float32) / H
    base = DW + bh.to(tl.int64) * Lq * Lk
    return tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _query_rows(prob, grad, b, h, bh, offs_m, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward needs of query rows ``offs_m``: q, M, R, delta, dO."""
    Q, K, V, QV, KV, T, BM, sq, sk, sv, Lq, Lk, D, DV, scale, nqbp, nkbp = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT = grad
    q = _load(Q, sq, b, h, offs_m, Lq, tl.arange(0, BLOCK_D), D)
    m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    do = _load(DO, (0, Lq * DV, DV, 1), 0, bh.to(tl.int64), offs_m, Lq, tl.arange(0, BLOCK_DV), DV)
    return q, m2, r2, delta, do


@triton.jit
def _xattn_bwd_delta_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        prob, grad, direction, mblk = dir0, g0, 0, pid
    else:
        prob, grad, direction, mblk = dir1, g1, 1, pid - nblk0
    Q, K, V, QV, KV, T, BM, sq, sk, sv, Lq, Lk, D, DV, scale, nqbp, nkbp = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT = grad
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (0, Lq * DV, DV, 1)  # O and dO: contiguous [B*H, Lq, Dv]
    o = _load(O, rows, 0, bh.to(tl.int64), offs_m, Lq, offs_dv, DV).to(tl.float32)
    do = _load(DO, rows, 0, bh.to(tl.int64), offs_m, Lq, offs_dv, DV).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DW:
        q = _load(Q, sq, b, h, offs_m, Lq, tl.arange(0, BLOCK_D), D)
        coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
        m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
        row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
        lrow = _layout_row(BM, bh, (mblk * BLOCK_M) // block_q, nqbp, nkbp)
        for t in range(0, _num_tiles(lrow, Lk, block_k, PRUNE, BLOCK_N)):
            start_n = _tile_start(lrow, t, block_k, PRUNE, BLOCK_N)
            if start_n < Lk:  # rowsum(P * dW) over one key tile
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kt = _load_t(K, sk, b, h, offs_n, Lk, tl.arange(0, BLOCK_D), D)
                ok = _attended(row_ok, _col_valid(KV, b, offs_n, Lk, HAS_KV))
                p, _ = _probs(q, kt, coef2, m2, r2, ok, PREC)
                delta += tl.sum(p * _dw_tile(DW, b, bh, offs_m, offs_n, Lq, Lk, H, MEAN), 1)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _xattn_bwd_dkdv_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        prob, grad, direction, nblk = dir0, g0, 0, pid
    else:
        prob, grad, direction, nblk = dir1, g1, 1, pid - nblk0
    Q, K, V, QV, KV, T, BM, sq, sk, sv, Lq, Lk, D, DV, scale, nqbp, nkbp = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT = grad
    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = _load_t(K, sk, b, h, offs_n, Lk, offs_d, D)
    vt = _load_t(V, sv, b, h, offs_n, Lk, offs_dv, DV)
    coef = _head_coef(T, h, scale, HAS_T)
    coef2 = coef * 1.4426950408889634
    col_ok = _col_valid(KV, b, offs_n, Lk, HAS_KV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # With pruning, only the query blocks that kept this key block: the transposed layout.
    lcol = _layout_row(LT, bh, (nblk * BLOCK_N) // block_k, nkbp, nqbp)
    for t in range(0, _num_tiles(lcol, Lq, block_q, PRUNE, BLOCK_M)):
        start_m = _tile_start(lcol, t, block_q, PRUNE, BLOCK_M)
        if start_m < Lq:  # dK, dV contributions of queries start_m .. start_m + BLOCK_M
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q, m2, r2, delta, do = _query_rows(prob, grad, b, h, bh, offs_m, BLOCK_D, BLOCK_DV)
            ok = _attended(_row_valid(QV, b, offs_m, Lq, HAS_QV), col_ok)
            p, _ = _probs(q, kt, coef2, m2, r2, ok, PREC)
            dp = tl.dot(do, vt, input_precision=PREC)
            pd = p
            if DROPOUT:
                keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            if HAS_DW:
                dp += _dw_tile(DW, b, bh, offs_m, offs_n, Lq, Lk, H, MEAN)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * coef
    out_n = bh.to(tl.int64) * Lk + offs_n
    tl.store(DK + out_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D))
    tl.store(DVG + out_n[:, None] * DV + offs_dv[None, :], dv.to(DVG.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV))


@triton.jit
def _xattn_bwd_dq_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        prob, grad, direction, mblk = dir0, g0, 0, pid
    else:
        prob, grad, direction, mblk = dir1, g1, 1, pid - nblk0
    Q, K, V, QV, KV, T, BM, sq, sk, sv, Lq, Lk, D, DV, scale, nqbp, nkbp = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT = grad
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q, m2, r2, delta, do = _query_rows(prob, grad, b, h, bh, offs_m, BLOCK_D, BLOCK_DV)
    coef = _head_coef(T, h, scale, HAS_T)
    coef2 = coef * 1.4426950408889634
    row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lrow = _layout_row(BM, bh, (mblk * BLOCK_M) // block_q, nqbp, nkbp)
    for t in range(0, _num_tiles(lrow, Lk, block_k, PRUNE, BLOCK_N)):
        start_n = _tile_start(lrow, t, block_k, PRUNE, BLOCK_N)
        if start_n < Lk:  # dQ (and temperature) contributions of keys start_n .. + BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_t(K, sk, b, h, offs_n, Lk, offs_d, D)
            ok = _attended(row_ok, _col_valid(KV, b, offs_n, Lk, HAS_KV))
            p, s2 = _probs(q, kt, coef2, m2, r2, ok, PREC)
            dp = tl.dot(do, _load_t(V, sv, b, h, offs_n, Lk, offs_dv, DV), input_precision=PREC)
            if DROPOUT:
                keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            if HAS_DW:
                dp += _dw_tile(DW, b, bh, offs_m, offs_n, Lq, Lk, H, MEAN)
            ds = p * (dp - delta[:, None])
            if HAS_T:
                dt += tl.sum(tl.where(ok, ds * s2, 0.0), 1)
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq = dq * coef
    row = bh.to(tl.int64) * Lq
    tl.store(DQ + row * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    if HAS_T:
        # dT_h = -sum(dS * S) / T_h with S = s2 * ln 2; one partial per program ([B*H, blocks]).
        part = -tl.sum(dt, 0) * 0.6931471805599453 / tl.load(T + h).to(tl.float32)
        tl.store(DT + bh * tl.cdiv(Lq, BLOCK_M) + mblk, part)
