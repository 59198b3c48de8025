"""Triton backward kernels (FlashAttention-2 style recompute from the stored row statistics).

With P the weights, dP_eff = (dO V^T) * keep / (1 - p) and dW the gradient reaching the
returned weights (full, or mean / H per head):

    dS    = P * (dP_eff + dW - delta),   delta = rowsum(dO * O) + rowsum(P * dW)
    dV    = (P * keep / (1 - p))^T dO
    dQ    = dS K * scale / T,   dK = dS^T Q * scale / T
    dT_h  = -sum(dS * S) / T_h          (S: the logits, temperature included)

With ``return_aux``, the gradient G reaching P through the statistics joins dW: the entropy's
``-log P * dH`` (HAS_DH; its row term ``H dH`` enters delta with dLSE, ``delta -= dLSE - H dH``,
from the launcher) and the key mass's ``dKM_j`` (HAS_DKM; its row term ``sum_j P dKM_j`` is
summed into delta by the delta kernel). Like the forward, one
kernel serves both directions (program ids below ``nblk0`` are direction 0). All three kernels take the same arguments: per direction the problem tuple
(xattn_fwd.PROBLEM) and the gradient tuple ``GRAD`` below. ``_xattn_bwd_delta_kernel``
computes delta, ``_xattn_bwd_dkdv_kernel`` walks the query blocks of one key block,
``_xattn_bwd_dq_kernel`` walks the key blocks of one query block and also writes
per-program partial sums for the temperature gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .xattn_fwd import (
    _col_valid,
    _dot_streamed,
    _head_coef,
    _keep_mask,
    _key_end,
    _layout_row,
    _load,
    _load_t,
    _logits,
    _mask_logits,
    _num_tiles,
    _probs,
    _row_stats,
    _row_valid,
    _tile_and_slab,
    _tile_start,
)

# Outputs of the forward, incoming gradients, and what the backward writes (all contiguous but
# DBIAS, an fp32 buffer of the bias's own shape read through broadcast strides ``sdbias``); LT is
# the transposed pruning layout the dK/dV walk follows; HPOS[h] is query head h's index in the
# weights' head axis (-1: not returned) and nh that axis' length (weight_heads); DH and DKM the
# gradients of the entropy [B*H, Lq] and key mass [B*H, Lk] (fp32). ONE: see xattn_fwd.PROBLEM.
GRAD = ("O", "DO", "M", "R", "DELTA", "DW", "DQ", "DK", "DVG", "DT", "LT", "DBIAS", "sdbias", "HPOS", "nh", "DH",
        "DKM", "ONE")


@triton.jit
def _dw_tile(grad, b, h, offs_m, offs_n, Lq, Lk, MEAN: tl.constexpr, HAS_HEADS: tl.constexpr):
    """The gradient reaching P[b, h] through the returned weights (0 for a head not returned)."""
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT, DBIAS, sdbias, HPOS, nh, DH, DKM, _one = grad
    rows = Lq
    pos = h
    if HAS_HEADS:
        pos = tl.load(HPOS + h)
        rows = tl.where(pos >= 0, Lq, 0)  # a head not returned reads nothing
        pos = tl.maximum(pos, 0)
    mask = (offs_m[:, None] < rows) & (offs_n[None, :] < Lk)
    if MEAN:
        base = DW + b.to(tl.int64) * Lq * Lk
        dw = tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0)
        return dw.to(tl.float32) / nh
    base = DW + (b.to(tl.int64) * nh + pos) * Lq * Lk
    return tl.load(base + offs_m[:, None] * Lk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _slab_vec(X, bh, offs, L):
    """``X[bh, offs]`` of a contiguous fp32 ``[B*H, L]`` (DH: per query row, DKM: per key)."""
    return tl.load(X + bh.to(tl.int64) * L + offs, mask=offs < L, other=0.0)


@triton.jit
def _entropy_grad(s, m2, r2, dh):
    """The entropy's gradient reaching P (see the module docstring): -log P * dH, 0 where
    nothing is attended."""
    log_p = ((s - m2[:, None]) - r2[:, None]) * 0.6931471805599453
    return -tl.where(s == float("-inf"), 0.0, log_p) * dh[:, None]


@triton.jit
def _bias_grad(DBIAS, st, b, h, offs_m, offs_n, Lq, Lk, ds, BIAS_M: tl.constexpr, BIAS_N: tl.constexpr):
    """dBias += dS, reduced first over the axes the bias broadcasts along (BIAS_M / BIAS_N: it
    varies along queries / keys), so that the atomics do not collide within a tile."""
    sb, sh, sm, sn = st
    base = DBIAS + b * sb + h * sh
    if BIAS_M and BIAS_N:
        tl.atomic_add(base + offs_m[:, None] * sm + offs_n[None, :] * sn, ds,
                      mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))
    elif BIAS_M:
        tl.atomic_add(base + offs_m * sm, tl.sum(ds, 1), mask=offs_m < Lq)
    elif BIAS_N:
        tl.atomic_add(base + offs_n * sn, tl.sum(ds, 0), mask=offs_n < Lk)
    else:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))


@triton.jit
def _query_rows(prob, grad, b, h, bh, offs_m, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the backward needs of query rows ``offs_m``: q, M, R, delta, dO."""
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT, DBIAS, sdbias, HPOS, nh, DH, DKM, _one = grad
    q = _load(Q, sq, b, h, offs_m, Lq, tl.arange(0, BLOCK_D), D)
    m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    do = _load(DO, (0, Lq * DV, DV, 1), 0, bh.to(tl.int64), offs_m, Lq, tl.arange(0, BLOCK_DV), DV)
    return q, m2, r2, delta, do


@triton.jit
def _xattn_bwd_delta_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, B, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_M: tl.constexpr, BIAS_N: tl.constexpr,
    HAS_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr, HAS_DH: tl.constexpr = False, HAS_DKM: tl.constexpr = False,
    BIDIR: tl.constexpr = True,
):
    """delta = rowsum(dO * O) + rowsum(P * (dW + dKM)) - dLSE (DELTA holds -dLSE on entry)."""
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            prob, grad, mblk = dir0, g0, pid
        else:
            prob, grad, mblk = dir1, g1, pid - nblk0
    else:
        prob, grad, mblk = dir0, g0, pid
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT, DBIAS, sdbias, HPOS, nh, DH, DKM, _one = grad
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (0, Lq * DV, DV, 1)  # O and dO: contiguous [B*H, Lq, Dv]
    o = _load(O, rows, 0, bh.to(tl.int64), offs_m, Lq, offs_dv, DV).to(tl.float32)
    do = _load(DO, rows, 0, bh.to(tl.int64), offs_m, Lq, offs_dv, DV).to(tl.float32)
    dptr = DELTA + bh.to(tl.int64) * Lq + offs_m
    delta = tl.sum(o * do, 1) + tl.load(dptr, mask=offs_m < Lq, other=0.0)
    if HAS_DW or HAS_DKM:
        q = _load(Q, sq, b, h, offs_m, Lq, tl.arange(0, BLOCK_D), D)
        coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
        m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
        row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
        lrow = _layout_row(BM, bh, (mblk * BLOCK_M) // block_q, nqbp, nkbp)
        hi = _key_end(KEND, b, mblk * BLOCK_M, Lq, Lk, HAS_KV, CAUSAL, BLOCK_M)
        for t in range(0, _num_tiles(lrow, hi, block_k, PRUNE, BLOCK_N)):
            start_n = _tile_start(lrow, t, block_k, PRUNE, BLOCK_N)
            if start_n < hi:  # rowsum(P * (dW + dKM)) over one key tile
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kt = _load_t(K, sk, b, h // group, offs_n, Lk, tl.arange(0, BLOCK_D), D)
                s, _, _ = _logits(q, kt, coef2, prob, b, h, offs_m, offs_n, row_ok,
                                  _col_valid(KV, b, offs_n, Lk, HAS_KV), CAUSAL, HAS_BIAS, PREC)
                g = tl.zeros(s.shape, dtype=tl.float32)
                if HAS_DKM:
                    g += _slab_vec(DKM, bh, offs_n, Lk)[None, :]
                if HAS_DW:
                    g += _dw_tile(grad, b, h, offs_m, offs_n, Lq, Lk, MEAN, HAS_HEADS)
                delta += tl.sum(_probs(s, m2, r2) * g, 1)
    tl.store(dptr, delta, mask=offs_m < Lq)


@triton.jit
def _xattn_bwd_dkdv_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, B, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_M: tl.constexpr, BIAS_N: tl.constexpr,
    HAS_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr, HAS_DH: tl.constexpr = False, HAS_DKM: tl.constexpr = False,
    STREAM: tl.constexpr = False, BIDIR: tl.constexpr = True,
):
    """One key tile of kv head g: dK, dV summed over the group's query heads in-kernel. Slabs
    are batch * kv heads (of the direction with the most; the other's extra slabs idle)."""
    pid, slab = _tile_and_slab(ntiles)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            prob, grad, direction, nblk = dir0, g0, 0, pid
        else:
            prob, grad, direction, nblk = dir1, g1, 1, pid - nblk0
    else:
        prob, grad, direction, nblk = dir0, g0, 0, pid
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT, DBIAS, sdbias, HPOS, nh, DH, DKM, _one = grad
    hkv = H // group
    b = (slab // hkv).to(tl.int64)
    g = (slab % hkv).to(tl.int64)
    active = b < B
    n0 = nblk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    lk = tl.where(active, Lk, 0)  # idle slabs load and store nothing
    if not STREAM:  # K and V tiles held for the whole walk (else streamed: _dot_streamed)
        kt = _load_t(K, sk, b, g, offs_n, lk, offs_d, D)
        vt = _load_t(V, sv, b, g, offs_n, lk, offs_dv, DV)
    col_ok = _col_valid(KV, b, offs_n, lk, HAS_KV)  # lk: an idle slab reads no mask row
    # Query rows that may attend this key tile: from the causal diagonal on; none past the
    # batch row's last valid key.
    lo = n0 * 0
    if CAUSAL:
        lo = tl.maximum(n0 - (Lk - Lq), 0)
    q_hi = tl.where(active, Lq, 0)
    if HAS_KV:
        q_hi = tl.where(n0 < tl.load(KEND + b, mask=active, other=0), q_hi, 0)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for j in range(0, group):
        h = g * group + j
        bh = b * H + h
        coef = _head_coef(T, h, scale, HAS_T)
        # With pruning, only the query blocks that kept this key block: the transposed layout.
        lcol = _layout_row(LT, tl.where(active, bh, 0), n0 // block_k, nkbp, nqbp)  # idle: a real row
        if HAS_DKM:  # this head's key-mass gradient of the tile, for every query tile
            gkm = _slab_vec(DKM, bh, offs_n, lk)
        t0 = 0 if PRUNE else lo // BLOCK_M
        for t in range(t0, _num_tiles(lcol, q_hi, block_q, PRUNE, BLOCK_M)):
            start_m = _tile_start(lcol, t, block_q, PRUNE, BLOCK_M)
            if (start_m < q_hi) & (start_m + BLOCK_M > lo):  # queries start_m .. + BLOCK_M
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q, m2, r2, delta, do = _query_rows(prob, grad, b, h, bh, offs_m, BLOCK_D, BLOCK_DV)
                row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
                if STREAM:  # q.k and dO.v with both operands streamed (see _dot_streamed)
                    qk = _dot_streamed(Q, sq, b, h, offs_m, Lq, K, sk, b, g, offs_n, lk, D, BLOCK_D, PREC)
                else:
                    qk = tl.dot(q, kt, input_precision=PREC)
                s, _, _ = _mask_logits(qk * (coef * 1.4426950408889634), prob, b, h, offs_m, offs_n, row_ok, col_ok,
                                       CAUSAL, HAS_BIAS)
                p = _probs(s, m2, r2)
                if STREAM:
                    dp = _dot_streamed(DO, (0, Lq * DV, DV, 1), 0, bh.to(tl.int64), offs_m, Lq, V, sv, b, g, offs_n,
                                       lk, DV, BLOCK_DV, PREC)
                else:
                    dp = tl.dot(do, vt, input_precision=PREC)
                pd = p
                if DROPOUT:
                    keep = _keep_mask(seed, offs_m, offs_n, bh.to(tl.int32), direction, drop_threshold)
                    pd = tl.where(keep, p * drop_scale, 0.0)
                    dp = tl.where(keep, dp * drop_scale, 0.0)
                if HAS_DW:
                    dp += _dw_tile(grad, b, h, offs_m, offs_n, Lq, Lk, MEAN, HAS_HEADS)
                if HAS_DH:
                    dp += _entropy_grad(s, m2, r2, _slab_vec(DH, bh, offs_m, Lq))
                if HAS_DKM:
                    dp += gkm[None, :]
                ds = p * (dp - delta[:, None]) * coef  # per query head: temperatures differ
                dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    out_n = (b * hkv + g) * Lk + offs_n
    nmask = offs_n[:, None] < lk
    tl.store(DK + out_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nmask & (offs_d[None, :] < D))
    tl.store(DVG + out_n[:, None] * DV + offs_dv[None, :], dv.to(DVG.dtype.element_ty),
             mask=nmask & (offs_dv[None, :] < DV))


@triton.jit
def _xattn_bwd_dq_kernel(
    dir0, dir1, g0, g1, SEED, drop_threshold, drop_scale, nblk0, ntiles, B, H, block_q, block_k,
    HAS_DW: tl.constexpr, MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr,
    HAS_T: tl.constexpr, DROPOUT: tl.constexpr, PRUNE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BIAS_M: tl.constexpr, BIAS_N: tl.constexpr,
    HAS_HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr, HAS_DH: tl.constexpr = False, HAS_DKM: tl.constexpr = False,
    STREAM: tl.constexpr = False, BIDIR: tl.constexpr = True,
):
    """One query tile: dQ, the temperature's partial sum and the bias gradient."""
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            prob, grad, direction, mblk = dir0, g0, 0, pid
        else:
            prob, grad, direction, mblk = dir1, g1, 1, pid - nblk0
    else:
        prob, grad, direction, mblk = dir0, g0, 0, pid
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    O, DO, M, R, DELTA, DW, DQ, DK, DVG, DT, LT, DBIAS, sdbias, HPOS, nh, DH, DKM, _one = grad
    hk = h // group
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
    if HAS_DH:  # the rows' entropy gradient, for every key tile
        dh = _slab_vec(DH, bh, offs_m, Lq)
    lrow = _layout_row(BM, bh, (mblk * BLOCK_M) // block_q, nqbp, nkbp)
    hi = _key_end(KEND, b, mblk * BLOCK_M, Lq, Lk, HAS_KV, CAUSAL, BLOCK_M)
    for t in range(0, _num_tiles(lrow, hi, block_k, PRUNE, BLOCK_N)):
        start_n = _tile_start(lrow, t, block_k, PRUNE, BLOCK_N)
        if start_n < hi:  # dQ (and temperature, bias) contributions of keys start_n .. + BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_t(K, sk, b, hk, offs_n, Lk, offs_d, D)
            if STREAM:  # q.k and dO.v with their operands streamed (see _dot_streamed); kt for dQ only
                qk = _dot_streamed(Q, sq, b, h, offs_m, Lq, K, sk, b, hk, offs_n, Lk, D, BLOCK_D, PREC)
            else:
                qk = tl.dot(q, kt, input_precision=PREC)
            s, s2, ok = _mask_logits(qk * coef2, prob, b, h, offs_m, offs_n, row_ok,
                                     _col_valid(KV, b, offs_n, Lk, HAS_KV), CAUSAL, HAS_BIAS)
            p = _probs(s, m2, r2)
            if STREAM:
                dp = _dot_streamed(DO, (0, Lq * DV, DV, 1), 0, bh.to(tl.int64), offs_m, Lq, V, sv, b, hk, offs_n, Lk,
                                   DV, BLOCK_DV, PREC)
            else:
                dp = tl.dot(do, _load_t(V, sv, b, hk, offs_n, Lk, offs_dv, DV), input_precision=PREC)
            if DROPOUT:
                keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            if HAS_DW:
                dp += _dw_tile(grad, b, h, offs_m, offs_n, Lq, Lk, MEAN, HAS_HEADS)
            if HAS_DH:
                dp += _entropy_grad(s, m2, r2, dh)
            if HAS_DKM:
                dp += _slab_vec(DKM, bh, offs_n, Lk)[None, :]
            ds = p * (dp - delta[:, None])
            if HAS_T:
                dt += tl.sum(tl.where(ok, ds * s2, 0.0), 1)
            if BIAS_GRAD:
                _bias_grad(DBIAS, sdbias, b, h, offs_m, offs_n, Lq, Lk, ds, BIAS_M, BIAS_N)
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq = dq * coef
    row = bh.to(tl.int64) * Lq
    tl.store(DQ + row * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    if HAS_T:
        # dT_h = -sum(dS * S) / T_h with S = s2 * ln 2; one partial per program ([B*H, blocks]).
        part = -tl.sum(dt, 0) * 0.6931471805599453 / tl.load(T + h).to(tl.float32)
        tl.store(DT + bh * tl.cdiv(Lq, BLOCK_M) + mblk, part)
