"""Triton backward kernels (FlashAttention-2 style recompute from the stored LSE).

With P the weights, dP_eff = (dO V^T) * keep / (1 - p) and dW the gradient reaching the
returned weights (full, or mean / H per head):

    dS    = P * (dP_eff + dW - delta),   delta = rowsum(dO * O) + rowsum(P * dW)
    dV    = (P * keep / (1 - p))^T dO
    dQ    = dS K * scale / T,   dK = dS^T Q * scale / T
    dT_h  = -sum(dS * S) / T_h          (S: the logits, temperature included)

Like the forward, one kernel serves both directions (program ids below ``nblk0`` are
direction 0). ``_xattn_bwd_delta_kernel`` computes delta, ``_xattn_bwd_dkdv_kernel`` walks the
query blocks of one key block, ``_xattn_bwd_dq_kernel`` walks the key blocks of one query
block and also writes per-program partial sums for the temperature gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .xattn_fwd import _col_valid, _head_coef, _keep_mask, _row_valid, _tile_and_slab


@triton.jit
def _dw_tile(DW, b, h, bh, offs_m, offs_n, Lq, Lk, H, MEAN: tl.constexpr):
    mask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MEAN:
        base = DW + b.to(tl.int64) * Lq * Lk
        dw = tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0)
        return dw.to(tl.float32) / H
    base = DW + bh.to(tl.int64) * Lq * Lk
    return tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _p_tile(q, K, b, h, offs_n, offs_d, Lk, D, skb, skh, skn, skd, coef2, lse2, ok,
            PREC: tl.constexpr):
    """(P, S in base-2 units, K^T) on one tile, P = 0 where nothing is attended."""
    kt = tl.load(
        K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0,
    )
    s2 = tl.dot(q, kt, input_precision=PREC) * coef2
    p = tl.where(ok, tl.exp2(s2 - lse2[:, None]), 0.0)
    return p, s2, kt


@triton.jit
def _delta_dw_tile(q, K, KV, DW, b, h, bh, start_n, offs_m, row_ok, Lq, Lk, D, H,
                   skb, skh, skn, skd, coef2, lse2, HAS_KV: tl.constexpr, MEAN: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """rowsum(P * dW) over one key tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & _col_valid(KV, b, offs_n, Lk, HAS_KV)[None, :]
    p, _, _ = _p_tile(q, K, b, h, offs_n, offs_d, Lk, D, skb, skh, skn, skd, coef2, lse2, ok, PREC)
    return tl.sum(p * _dw_tile(DW, b, h, bh, offs_m, offs_n, Lq, Lk, H, MEAN), 1)


@triton.jit
def _xattn_bwd_delta_kernel(
    O0, DO0, L0, DW0, Q0, K0, QV0, KV0, T0, DELTA0, BM0, Lq0, Lk0, scale0, nqbp0, nkbp0,
    sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d,
    O1, DO1, L1, DW1, Q1, K1, QV1, KV1, T1, DELTA1, BM1, Lq1, Lk1, scale1, nqbp1, nkbp1,
    sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d,
    nblk0, ntiles, H, D, DV, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        mblk = pid
        O, DO, L, DW, Q, K, QV, KV, T, DELTA, Lq, Lk, scale = O0, DO0, L0, DW0, Q0, K0, QV0, KV0, T0, DELTA0, Lq0, Lk0, scale0
        BM, nqbp, nkbp = BM0, nqbp0, nkbp0
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d
    else:
        mblk = pid - nblk0
        O, DO, L, DW, Q, K, QV, KV, T, DELTA, Lq, Lk, scale = O1, DO1, L1, DW1, Q1, K1, QV1, KV1, T1, DELTA1, Lq1, Lk1, scale1
        BM, nqbp, nkbp = BM1, nqbp1, nkbp1
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    om = (offs_m[:, None] < Lq) & (offs_dv[None, :] < DV)
    row = bh.to(tl.int64) * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    o = tl.load(O + row, mask=om, other=0.0).to(tl.float32)
    do = tl.load(DO + row, mask=om, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DW:
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0,
        )
        coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
        lse2 = tl.load(L + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634
        row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
        if PRUNE:  # kept key blocks only (BLOCK_M | block_q, BLOCK_N | block_k)
            lrow = BM + ((b * H + h) * nqbp + (mblk * BLOCK_M) // block_q) * (nkbp + 1)
            n_sub = block_k // BLOCK_N
            for t in range(0, tl.load(lrow) * n_sub):
                start_n = tl.load(lrow + 1 + t // n_sub) * block_k + (t % n_sub) * BLOCK_N
                if start_n < Lk:
                    delta += _delta_dw_tile(q, K, KV, DW, b, h, bh, start_n, offs_m, row_ok, Lq, Lk, D, H,
                                            skb, skh, skn, skd, coef2, lse2, HAS_KV, MEAN, BLOCK_N,
                                            BLOCK_D, PREC)
        else:
            for start_n in range(0, Lk, BLOCK_N):
                delta += _delta_dw_tile(q, K, KV, DW, b, h, bh, start_n, offs_m, row_ok, Lq, Lk, D, H,
                                        skb, skh, skn, skd, coef2, lse2, HAS_KV, MEAN, BLOCK_N,
                                        BLOCK_D, PREC)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _query_rows(Q, L, DELTA, DO, b, h, bh, offs_m, Lq, D, DV, sqb, sqh, sqm, sqd,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward needs of query rows ``offs_m``: q, LSE (base 2), delta, dO."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0,
    )
    row = bh.to(tl.int64) * Lq
    lse2 = tl.load(L + row + offs_m, mask=offs_m < Lq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=offs_m < Lq, other=0.0)
    do = tl.load(DO + row * DV + offs_m[:, None] * DV + offs_dv[None, :],
                 mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV), other=0.0)
    return q, lse2, delta, do


@triton.jit
def _dkdv_tile(dk, dv, kt, vt, start_m, offs_n, col_ok, Q, DO, L, DELTA, DW, QV, b, h, bh,
               Lq, Lk, D, DV, H, sqb, sqh, sqm, sqd, coef2, seed, drop_threshold, drop_scale,
               direction, HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """dK, dV contributions of queries ``start_m .. start_m + BLOCK_M``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, lse2, delta, do = _query_rows(Q, L, DELTA, DO, b, h, bh, offs_m, Lq, D, DV, sqb, sqh, sqm, sqd,
                                     BLOCK_D, BLOCK_DV)
    ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)[:, None] & col_ok[None, :]
    p = tl.where(ok, tl.exp2(tl.dot(q, kt, input_precision=PREC) * coef2 - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision=PREC)
    pd = p
    if DROPOUT:
        keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    if HAS_DW:
        dp += _dw_tile(DW, b, h, bh, offs_m, offs_n, Lq, Lk, H, MEAN)
    ds = p * (dp - delta[:, None])
    dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _xattn_bwd_dkdv_kernel(
    Q0, K0, V0, DO0, L0, DELTA0, DW0, DK0, DVP0, QV0, KV0, T0, BM0, Lq0, Lk0, scale0, nqbp0, nkbp0,
    sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d, sv0b, sv0h, sv0n, sv0d,
    Q1, K1, V1, DO1, L1, DELTA1, DW1, DK1, DVP1, QV1, KV1, T1, BM1, Lq1, Lk1, scale1, nqbp1, nkbp1,
    sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d, sv1b, sv1h, sv1n, sv1d,
    SEED, drop_threshold, drop_scale, nblk0, ntiles, H, D, DV, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        direction = 0
        nblk = pid
        Q, K, V, DO, L, DELTA, DW, DK, DVP, QV, KV, T, Lq, Lk, scale = Q0, K0, V0, DO0, L0, DELTA0, DW0, DK0, DVP0, QV0, KV0, T0, Lq0, Lk0, scale0
        BM, nqbp, nkbp = BM0, nqbp0, nkbp0
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d
        svb, svh, svn, svd = sv0b, sv0h, sv0n, sv0d
    else:
        direction = 1
        nblk = pid - nblk0
        Q, K, V, DO, L, DELTA, DW, DK, DVP, QV, KV, T, Lq, Lk, scale = Q1, K1, V1, DO1, L1, DELTA1, DW1, DK1, DVP1, QV1, KV1, T1, Lq1, Lk1, scale1
        BM, nqbp, nkbp = BM1, nqbp1, nkbp1
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d
        svb, svh, svn, svd = sv1b, sv1h, sv1n, sv1d
    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(
        K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0,
    )
    vt = tl.load(
        V + b * svb + h * svh + offs_n[None, :] * svn + offs_dv[:, None] * svd,
        mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV), other=0.0,
    )
    coef = _head_coef(T, h, scale, HAS_T)
    coef2 = coef * 1.4426950408889634
    col_ok = _col_valid(KV, b, offs_n, Lk, HAS_KV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    if PRUNE:
        # Only the query blocks that kept this key block: the transposed layout
        # ([B, H, nkbp, 1 + nqbp]; BLOCK_N | block_k, BLOCK_M | block_q).
        lrow = BM + ((b * H + h) * nkbp + (nblk * BLOCK_N) // block_k) * (nqbp + 1)
        m_sub = block_q // BLOCK_M
        for t in range(0, tl.load(lrow) * m_sub):
            start_m = tl.load(lrow + 1 + t // m_sub) * block_q + (t % m_sub) * BLOCK_M
            if start_m < Lq:
                dk, dv = _dkdv_tile(dk, dv, kt, vt, start_m, offs_n, col_ok, Q, DO, L, DELTA, DW, QV,
                                    b, h, bh, Lq, Lk, D, DV, H, sqb, sqh, sqm, sqd, coef2,
                                    seed, drop_threshold, drop_scale, direction,
                                    HAS_DW, MEAN, HAS_QV, DROPOUT, BLOCK_M, BLOCK_D, BLOCK_DV, PREC)
    else:
        for start_m in range(0, Lq, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, kt, vt, start_m, offs_n, col_ok, Q, DO, L, DELTA, DW, QV,
                                b, h, bh, Lq, Lk, D, DV, H, sqb, sqh, sqm, sqd, coef2,
                                seed, drop_threshold, drop_scale, direction,
                                HAS_DW, MEAN, HAS_QV, DROPOUT, BLOCK_M, BLOCK_D, BLOCK_DV, PREC)
    dk = dk * coef
    out_n = bh.to(tl.int64) * Lk + offs_n
    tl.store(DK + out_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D))
    tl.store(DVP + out_n[:, None] * DV + offs_dv[None, :], dv.to(DVP.dtype.element_ty),
             mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(dq, dt, q, do, delta, lse2, row_ok, start_n, offs_m, K, V, KV, DW, b, h, bh,
             Lq, Lk, D, DV, H, skb, skh, skn, skd, svb, svh, svn, svd, coef2, seed,
             drop_threshold, drop_scale, direction, HAS_DW: tl.constexpr, MEAN: tl.constexpr,
             HAS_KV: tl.constexpr, HAS_T: tl.constexpr, DROPOUT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             PREC: tl.constexpr):
    """dQ (and temperature) contributions of keys ``start_n .. start_n + BLOCK_N``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = row_ok[:, None] & _col_valid(KV, b, offs_n, Lk, HAS_KV)[None, :]
    p, s2, kt = _p_tile(q, K, b, h, offs_n, offs_d, Lk, D, skb, skh, skn, skd, coef2, lse2, ok, PREC)
    vt = tl.load(
        V + b * svb + h * svh + offs_n[None, :] * svn + offs_dv[:, None] * svd,
        mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV), other=0.0,
    )
    dp = tl.dot(do, vt, input_precision=PREC)
    if DROPOUT:
        keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    if HAS_DW:
        dp += _dw_tile(DW, b, h, bh, offs_m, offs_n, Lq, Lk, H, MEAN)
    ds = p * (dp - delta[:, None])
    if HAS_T:
        dt += tl.sum(tl.where(ok, ds * s2, 0.0), 1)
    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    return dq, dt


@triton.jit
def _xattn_bwd_dq_kernel(
    Q0, K0, V0, DO0, L0, DELTA0, DW0, DQ0, DT0, QV0, KV0, T0, BM0, Lq0, Lk0, scale0, nqbp0, nkbp0,
    sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d, sv0b, sv0h, sv0n, sv0d,
    Q1, K1, V1, DO1, L1, DELTA1, DW1, DQ1, DT1, QV1, KV1, T1, BM1, Lq1, Lk1, scale1, nqbp1, nkbp1,
    sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d, sv1b, sv1h, sv1n, sv1d,
    SEED, drop_threshold, drop_scale, nblk0, ntiles, H, D, DV, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        direction = 0
        mblk = pid
        nblk_dir = nblk0
        Q, K, V, DO, L, DELTA, DW, DQ, DT, QV, KV, T, Lq, Lk, scale = Q0, K0, V0, DO0, L0, DELTA0, DW0, DQ0, DT0, QV0, KV0, T0, Lq0, Lk0, scale0
        BM, nqbp, nkbp = BM0, nqbp0, nkbp0
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d
        svb, svh, svn, svd = sv0b, sv0h, sv0n, sv0d
    else:
        direction = 1
        mblk = pid - nblk0
        nblk_dir = ntiles - nblk0
        Q, K, V, DO, L, DELTA, DW, DQ, DT, QV, KV, T, Lq, Lk, scale = Q1, K1, V1, DO1, L1, DELTA1, DW1, DQ1, DT1, QV1, KV1, T1, Lq1, Lk1, scale1
        BM, nqbp, nkbp = BM1, nqbp1, nkbp1
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d
        svb, svh, svn, svd = sv1b, sv1h, sv1n, sv1d
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = bh.to(tl.int64) * Lq
    q, lse2, delta, do = _query_rows(Q, L, DELTA, DO, b, h, bh, offs_m, Lq, D, DV, sqb, sqh, sqm, sqd,
                                     BLOCK_D, BLOCK_DV)
    coef = _head_coef(T, h, scale, HAS_T)
    coef2 = coef * 1.4426950408889634
    row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PRUNE:  # kept key blocks only (BLOCK_M | block_q, BLOCK_N | block_k)
        lrow = BM + ((b * H + h) * nqbp + (mblk * BLOCK_M) // block_q) * (nkbp + 1)
        n_sub = block_k // BLOCK_N
        for t in range(0, tl.load(lrow) * n_sub):
            start_n = tl.load(lrow + 1 + t // n_sub) * block_k + (t % n_sub) * BLOCK_N
            if start_n < Lk:
                dq, dt = _dq_tile(dq, dt, q, do, delta, lse2, row_ok, start_n, offs_m, K, V, KV, DW,
                                  b, h, bh, Lq, Lk, D, DV, H, skb, skh, skn, skd, svb, svh, svn, svd,
                                  coef2, seed, drop_threshold, drop_scale, direction,
                                  HAS_DW, MEAN, HAS_KV, HAS_T, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV, PREC)
    else:
        for start_n in range(0, Lk, BLOCK_N):
            dq, dt = _dq_tile(dq, dt, q, do, delta, lse2, row_ok, start_n, offs_m, K, V, KV, DW,
                              b, h, bh, Lq, Lk, D, DV, H, skb, skh, skn, skd, svb, svh, svn, svd,
                              coef2, seed, drop_threshold, drop_scale, direction,
                              HAS_DW, MEAN, HAS_KV, HAS_T, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV, PREC)
    dq = dq * coef
    tl.store(DQ + row * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    if HAS_T:
        # dT_h = -sum(dS * S) / T_h with S = s2 * ln 2; one partial per program.
        part = -tl.sum(dt, 0) * 0.6931471805599453 / tl.load(T + h).to(tl.float32)
        tl.store(DT + bh * nblk_dir + mblk, part)
