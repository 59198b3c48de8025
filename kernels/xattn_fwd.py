"""Triton forward kernels: attention output + log-sum-exp, and the weights pass.

One kernel serves both directions of a bidirectional call: program ids along axis 0 below
``nblk0`` work on direction 0 (x queries -> y keys, or the only direction), the rest on
direction 1. Each direction has its own pointers, strides, lengths and scale; both share
batch, heads, head dims, dtypes and compile-time flags.

Conventions (the reference's, crossattn/reference.py):
* logits are kept in base-2 units inside the kernels: ``s2 = q.k * scale / T * log2(e)``;
* the stored LSE is natural-log; rows that attend to nothing store +inf;
* dropout drops element (b, h, i, j) of direction d iff
  ``philox(seed, (j // 4, i, b*H + h, d))[j % 4] < floor(p * 2**32)`` (crossattn/_philox.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _tile_and_slab(ntiles):
    """(tile, slab) of this program in a 1-D grid of ``ntiles * slabs`` programs. A slab is a
    batch * head (or a batch); one grid axis because CUDA caps axes 1 and 2 at 65 535."""
    pid = tl.program_id(0)
    return pid % ntiles, pid // ntiles


@triton.jit
def _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold):
    """Bool [BLOCK_M, BLOCK_N]: True where dropout keeps the weight (key j takes word j % 4
    of the Philox call for counter (j // 4, i, b*H + h, direction))."""
    zero = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.int32)
    c0 = offs_n[None, :] // 4 + zero
    c1 = offs_m[:, None] + zero
    c2 = zero + bh
    c3 = zero + direction
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    lane = offs_n[None, :] % 4 + zero
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return word.to(tl.int64) >= drop_threshold


@triton.jit
def _row_valid(QV, b, offs_m, Lq, HAS_QV: tl.constexpr):
    valid = offs_m < Lq
    if HAS_QV:
        valid = valid & (tl.load(QV + b * Lq + offs_m, mask=offs_m < Lq, other=0) != 0)
    return valid


@triton.jit
def _col_valid(KV, b, offs_n, Lk, HAS_KV: tl.constexpr):
    valid = offs_n < Lk
    if HAS_KV:
        valid = valid & (tl.load(KV + b * Lk + offs_n, mask=offs_n < Lk, other=0) != 0)
    return valid


@triton.jit
def _head_coef(T, h, scale, HAS_T: tl.constexpr):
    """scale / temperature[h] (natural units)."""
    coef = scale
    if HAS_T:
        coef = scale / tl.load(T + h).to(tl.float32)
    return coef


@triton.jit
def _fwd_tile(q, m_i, l_i, acc, start_n, K, V, KV, b, h, bh, offs_m, row_ok, Lk, D, DV,
              skb, skh, skn, skd, svb, svh, svn, svd, coef2, seed, drop_threshold, drop_scale,
              direction, HAS_KV: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over keys ``start_n .. start_n + BLOCK_N``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = tl.load(
        K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
        mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0,
    )
    s = tl.dot(q, kt, input_precision=PREC) * coef2
    ok = row_ok[:, None] & _col_valid(KV, b, offs_n, Lk, HAS_KV)[None, :]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
    v = tl.load(
        V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
        mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV), other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _xattn_fwd_kernel(
    # direction 0
    Q0, K0, V0, O0, L0, QV0, KV0, T0, BM0, Lq0, Lk0, scale0, split_len0, nqbp0, nkbp0,
    sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d, sv0b, sv0h, sv0n, sv0d,
    # direction 1 (unused when nblk0 covers the grid)
    Q1, K1, V1, O1, L1, QV1, KV1, T1, BM1, Lq1, Lk1, scale1, split_len1, nqbp1, nkbp1,
    sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d, sv1b, sv1h, sv1n, sv1d,
    SEED, drop_threshold, drop_scale, nblk0, ntiles, H, D, DV, block_q, block_k,
    HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr, DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr, PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Axis 0: query blocks of both directions x batch * head; axis 2: key splits.

    With SPLIT (flash-decoding, for few query blocks and many keys) each program covers
    ``split_len`` keys (with PRUNE: every n-th kept block) and O/L are fp32 workspaces ``[splits, B, H, Lq, (Dv)]`` holding
    normalised partial outputs and partial LSEs (-inf when empty), merged by
    ``_xattn_fwd_combine_kernel``.
    """
    pid, bh = _tile_and_slab(ntiles)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if pid < nblk0:
        direction = 0
        mblk = pid
        Q, K, V, O, L, QV, KV, T, Lq, Lk, scale = Q0, K0, V0, O0, L0, QV0, KV0, T0, Lq0, Lk0, scale0
        split_len, BM, nqbp, nkbp = split_len0, BM0, nqbp0, nkbp0
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d
        svb, svh, svn, svd = sv0b, sv0h, sv0n, sv0d
    else:
        direction = 1
        mblk = pid - nblk0
        Q, K, V, O, L, QV, KV, T, Lq, Lk, scale = Q1, K1, V1, O1, L1, QV1, KV1, T1, Lq1, Lk1, scale1
        split_len, BM, nqbp, nkbp = split_len1, BM1, nqbp1, nkbp1
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d
        svb, svh, svn, svd = sv1b, sv1h, sv1n, sv1d

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0,
    )
    coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
    row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if PRUNE:
        # Only the kept key blocks of this query tile's pruning row ([B, H, nqbp, 1 + nkbp]:
        # count, indices), dealt round-robin to the key splits so they share the work evenly
        # whatever the count (BLOCK_M | block_q; a key block is n_sub tiles of BLOCK_N).
        lrow = BM + ((b * H + h) * nqbp + (mblk * BLOCK_M) // block_q) * (nkbp + 1)
        n_sub = block_k // BLOCK_N
        for e in range(split, tl.load(lrow), tl.num_programs(2)):
            kb_start = tl.load(lrow + 1 + e) * block_k
            for sub in range(0, n_sub):
                start_n = kb_start + sub * BLOCK_N
                if start_n < Lk:
                    m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, K, V, KV, b, h, bh, offs_m,
                                              row_ok, Lk, D, DV, skb, skh, skn, skd, svb, svh, svn, svd,
                                              coef2, seed, drop_threshold, drop_scale, direction,
                                              HAS_KV, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV, PREC)
    else:
        n_lo = split * split_len  # split_len is a multiple of BLOCK_N
        n_hi = tl.minimum(Lk, n_lo + split_len)
        for start_n in range(n_lo, n_hi, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, start_n, K, V, KV, b, h, bh, offs_m, row_ok,
                                      Lk, D, DV, skb, skh, skn, skd, svb, svh, svn, svd, coef2,
                                      seed, drop_threshold, drop_scale, direction,
                                      HAS_KV, DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV, PREC)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    empty_lse = float("-inf") if SPLIT else float("inf")  # final: +inf (reference convention)
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   empty_lse)
    row = split.to(tl.int64) * (tl.num_programs(0) // ntiles) + bh
    tl.store(O + row * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))
    tl.store(L + row * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _xattn_fwd_combine_kernel(
    OP0, LP0, O0, L0, Lq0, OP1, LP1, O1, L1, Lq1, nblk0, ntiles, n_split, DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merges the split-key partial outputs: a softmax over the partial LSEs."""
    pid, bh = _tile_and_slab(ntiles)
    bh = bh.to(tl.int64)
    if pid < nblk0:
        mblk = pid
        OP, LP, O, L, Lq = OP0, LP0, O0, L0, Lq0
    else:
        mblk = pid - nblk0
        OP, LP, O, L, Lq = OP1, LP1, O1, L1, Lq1
    BH = tl.num_programs(0) // ntiles
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    omask = (offs_m[:, None] < Lq) & (offs_dv[None, :] < DV)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for s in range(0, n_split):
        row = s * BH + bh
        ls = tl.load(LP + row * Lq + offs_m, mask=offs_m < Lq, other=float("-inf"))
        os = tl.load(OP + row * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=omask, other=0.0)
        m_new = tl.maximum(m_i, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(ls - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * os
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    m_safe = tl.where(has_key, m_i, 0.0)
    lse = tl.where(has_key, m_safe + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(O + bh * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty), mask=omask)
    tl.store(L + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _weights_tile(Q, K, L, QV, KV, T, BM, b, h, bh, offs_m, offs_n, offs_d, Lq, Lk, scale, D,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, nqbp, nkbp, block_q, block_k, H,
                  HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr,
                  PRUNE: tl.constexpr, PREC: tl.constexpr):
    """P = exp(S - LSE) on one [BLOCK_M, BLOCK_N] tile, 0 where nothing is attended (and,
    without any matrix work, on a pruned block)."""
    p = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    kept = True
    if PRUNE:  # the whole tile lies in one pruning block (BLOCK_M | block_q, BLOCK_N | block_k)
        qb = tl.min(offs_m, 0).to(tl.int64) // block_q
        kb = tl.min(offs_n, 0).to(tl.int64) // block_k
        kept = tl.load(BM + ((b * H + h) * nqbp + qb) * nkbp + kb) != 0
    if kept:
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0,
        )
        kt = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
            mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0,
        )
        coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
        lse2 = tl.load(L + bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634
        ok = (_row_valid(QV, b, offs_m, Lq, HAS_QV)[:, None]
              & _col_valid(KV, b, offs_n, Lk, HAS_KV)[None, :])
        p = tl.where(ok, tl.exp2(tl.dot(q, kt, input_precision=PREC) * coef2 - lse2[:, None]), 0.0)
    return p


@triton.jit
def _xattn_weights_kernel(
    Q0, K0, L0, W0, QV0, KV0, T0, BM0, Lq0, Lk0, scale0, nkb0, nqbp0, nkbp0,
    sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d,
    Q1, K1, L1, W1, QV1, KV1, T1, BM1, Lq1, Lk1, scale1, nkb1, nqbp1, nkbp1,
    sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d,
    ntiles0, ntiles, H, D, block_q, block_k,
    MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr,
    PRUNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    """Writes the weights from the stored LSE, one tile per program: no score matrix in
    memory and no softmax pass. MEAN: axis 1 is the batch and the heads are averaged here;
    otherwise batch * head (one grid axis: tiles x slabs)."""
    pid, slab = _tile_and_slab(ntiles)
    if pid < ntiles0:
        tile = pid
        Q, K, L, W, QV, KV, T, Lq, Lk, scale, nkb = Q0, K0, L0, W0, QV0, KV0, T0, Lq0, Lk0, scale0, nkb0
        BM, nqbp, nkbp = BM0, nqbp0, nkbp0
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq0b, sq0h, sq0m, sq0d, sk0b, sk0h, sk0n, sk0d
    else:
        tile = pid - ntiles0
        Q, K, L, W, QV, KV, T, Lq, Lk, scale, nkb = Q1, K1, L1, W1, QV1, KV1, T1, Lq1, Lk1, scale1, nkb1
        BM, nqbp, nkbp = BM1, nqbp1, nkbp1
        sqb, sqh, sqm, sqd, skb, skh, skn, skd = sq1b, sq1h, sq1m, sq1d, sk1b, sk1h, sk1n, sk1d
    offs_m = (tile // nkb) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % nkb) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MEAN:
        b = slab.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for h in range(0, H):
            acc += _weights_tile(Q, K, L, QV, KV, T, BM, b, h, b * H + h, offs_m, offs_n, offs_d,
                                 Lq, Lk, scale, D, sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                                 nqbp, nkbp, block_q, block_k, H, HAS_QV, HAS_KV, HAS_T, PRUNE, PREC)
        w = acc / H
        w_base = W + b.to(tl.int64) * Lq * Lk
    else:
        bh = slab
        w = _weights_tile(Q, K, L, QV, KV, T, BM, (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh,
                          offs_m, offs_n, offs_d, Lq, Lk, scale, D, sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                          nqbp, nkbp, block_q, block_k, H, HAS_QV, HAS_KV, HAS_T, PRUNE, PREC)
        w_base = W + bh.to(tl.int64) * Lq * Lk
    tl.store(w_base + offs_m[:, None] * Lk + offs_n[None, :], w.to(W.dtype.element_ty), mask=mask)
