"""Triton forward kernels: attention output + row statistics, and the weights pass.

One kernel serves both directions of a bidirectional call: program ids along axis 0 below
``nblk0`` work on direction 0 (x queries -> y keys, or the only direction), the rest on
direction 1. Each direction travels as one tuple (``PROBLEM`` below: pointers, strides,
lengths, head dims, scale), selected once per program; both share batch, heads, dtypes and
compile-time flags. One-direction launches pass ``BIDIR=False``, which compiles the selection
away: the direction's scalars then stay kernel parameters (read from the constant bank where
used) instead of values held in registers for the whole program.

Conventions (the reference's, crossattn/reference.py):
* logits are kept in base-2 units inside the kernels: ``s2 = q.k * scale / T * log2(e)``;
* each query row stores its statistics ``M`` (the max of ``s2``) and ``R = log2(sum exp2(s2 - M))``
  separately, so ``P = exp2((s2 - M) - R)`` is exact where ``s2`` is near the max even when the
  logits are huge (a single LSE loses that to rounding); rows that attend to nothing store
  ``M = +inf, R = 0`` (so ``P = 0``); the LSE is ``(M + R) * ln 2``;
* dropout drops element (b, h, i, j) of direction d iff
  ``philox(seed, (j // 4, i, b*H + h, d))[j % 4] < floor(p * 2**32)`` (crossattn/_philox.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# The per-direction tuple every kernel takes (see ``_problem`` in xattn.py). BM is the pruning
# layout walked by the pass (the dense mask for the weights pass, the transposed layout for
# dK/dV); KEND the end of each batch row's valid keys; BIAS is read through its broadcast
# strides; strides are (batch, head, row, column) tuples; K/V head = query head // group.
# ONE is the constant 1: Triton 3.6 fails to merge the two directions' tuples in the if/else
# ("Mismatched type") when a tuple's only specialised constants (ints equal to 1) are nested,
# e.g. a unit stride with GQA and pruning; a top-level constant avoids it (3.9 needs none).
PROBLEM = ("Q", "K", "V", "QV", "KV", "KEND", "T", "BM", "BIAS", "sq", "sk", "sv", "sbias", "Lq", "Lk", "D",
           "DV", "scale", "nqbp", "nkbp", "group", "ONE")


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
def _load(X, st, b, h, offs_r, R, offs_c, C):
    """``X[b, h, offs_r, offs_c]`` ([rows, cols]; zeros outside R x C), strides ``st``."""
    sb, sh, sr, sc = st
    return tl.load(X + b * sb + h * sh + offs_r[:, None] * sr + offs_c[None, :] * sc,
                   mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _load_t(X, st, b, h, offs_r, R, offs_c, C):
    """The transposed tile ``X[b, h, offs_r, offs_c]^T`` ([cols, rows])."""
    sb, sh, sr, sc = st
    return tl.load(X + b * sb + h * sh + offs_r[None, :] * sr + offs_c[:, None] * sc,
                   mask=(offs_r[None, :] < R) & (offs_c[:, None] < C), other=0.0)


@triton.jit
def _dot_streamed(A, sa, ba, ha, offs_a, La, Bt, sb, bb, hb, offs_b, Lb, C, BLOCK_C: tl.constexpr,
                  PREC: tl.constexpr):
    """``A[ba, ha, offs_a, :C] @ B[bb, hb, offs_b, :C]^T`` (fp32), the contraction read from memory
    32 columns at a time. Why: an fp32 FMA dot (and a D = 256 one) holds each thread's whole
    operand rows in registers; with both operands streamed only 32 columns of each are live,
    at the price of re-reading them (from L1/L2) on every tile of the walk."""
    acc = tl.zeros((offs_a.shape[0], offs_b.shape[0]), dtype=tl.float32)
    for c0 in range(0, BLOCK_C, 32):  # a loop, not unrolled: ptxas would hoist every chunk's loads
        offs_c = c0 + tl.arange(0, 32)
        acc += tl.dot(_load(A, sa, ba, ha, offs_a, La, offs_c, C), _load_t(Bt, sb, bb, hb, offs_b, Lb, offs_c, C),
                      input_precision=PREC)
    return acc


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
def _key_end(KEND, b, m0, Lq, Lk, HAS_KV: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """No query row of the tile at ``m0`` attends a key at or past this bound: the batch row's
    last valid key (ragged lengths), the causal diagonal of the tile's last row. Walks stop
    there, so those key tiles cost nothing."""
    hi = m0 * 0 + Lk
    if CAUSAL:
        hi = tl.minimum(hi, tl.minimum(m0 + BLOCK_M, Lq) + (Lk - Lq))
    if HAS_KV:
        hi = tl.minimum(hi, tl.load(KEND + b))
    return tl.maximum(hi, 0)


@triton.jit
def _logits(q, kt, coef2, prob, b, h, offs_m, offs_n, row_ok, col_ok, CAUSAL: tl.constexpr,
            HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """The one place that decides the logits of a tile (base 2): ``q.k * scale / T + bias``,
    -inf where the pair does not attend (query/key padding, causality; pruning is decided per
    tile by the walks). Returns (masked logits, q.k * scale / T, attended)."""
    return _mask_logits(tl.dot(q, kt, input_precision=PREC) * coef2, prob, b, h, offs_m, offs_n, row_ok, col_ok,
                        CAUSAL, HAS_BIAS)


@triton.jit
def _mask_logits(s2, prob, b, h, offs_m, offs_n, row_ok, col_ok, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``_logits`` from ``s2 = q.k * scale / T`` (base 2) computed by the caller."""
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    s = s2
    if HAS_BIAS:
        s = s2 + _load(BIAS, sbias, b, h, offs_m, Lq, offs_n, Lk).to(tl.float32) * 1.4426950408889634
    ok = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    return tl.where(ok, s, float("-inf")), s2, ok


@triton.jit
def _head_coef(T, h, scale, HAS_T: tl.constexpr):
    """scale / temperature[h] (natural units)."""
    coef = scale
    if HAS_T:
        coef = scale / tl.load(T + h).to(tl.float32)
    return coef


@triton.jit
def _row_stats(M, R, bh, offs_m, Lq):
    """The stored (M, R) of query rows ``offs_m`` (rows past Lq: nothing attended)."""
    row = bh.to(tl.int64) * Lq + offs_m
    m2 = tl.load(M + row, mask=offs_m < Lq, other=float("inf"))
    r2 = tl.load(R + row, mask=offs_m < Lq, other=0.0)
    return m2, r2


@triton.jit
def _probs(s, m2, r2):
    """P from masked logits and the row statistics: 0 where s = -inf or the row is empty."""
    return tl.exp2((s - m2[:, None]) - r2[:, None])


@triton.jit
def _layout_row(BM, bh, blk, nrows, ncols):
    """Row ``blk`` of batch*head ``bh`` in a compact layout ``[B*H, nrows, 1 + ncols]``."""
    return BM + (bh.to(tl.int64) * nrows + blk) * (ncols + 1)


@triton.jit
def _num_tiles(lrow, L, block, PRUNE: tl.constexpr, BLOCK: tl.constexpr):
    """Tiles of BLOCK rows a walk visits: those of the kept blocks, or all of ``L``."""
    if PRUNE:
        return tl.load(lrow) * (block // BLOCK)
    else:
        return tl.cdiv(L, BLOCK)


@triton.jit
def _tile_start(lrow, t, block, PRUNE: tl.constexpr, BLOCK: tl.constexpr):
    """First row of the walk's ``t``-th tile (a kept block is ``block // BLOCK`` tiles; the
    caller skips tiles starting past the length)."""
    if PRUNE:
        n_sub = block // BLOCK
        return tl.load(lrow + 1 + t // n_sub) * block + (t % n_sub) * BLOCK
    else:
        return t * BLOCK


# Top-k keys: a logit and its key index packed into one int64 that orders by logit, then by
# lower index (the reference's tie rule), so one max picks a row's best. Masked logits take
# _TK_NONE; an empty slot of the running list takes _TK_NONE + 1 + slot (distinct, below any
# real key: the smallest, -inf, packs to about -9.19e18).
_TK_NONE = tl.constexpr(-9223372036854775807)
_TK_REAL = tl.constexpr(-9200000000000000000)


@triton.jit
def _topk_keys(s, offs_n):
    bits = s.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed int order
    key = (mono.to(tl.int64) << 32) + (4294967295 - offs_n.to(tl.int64))
    return tl.where(s == float("-inf"), _TK_NONE, key)


@triton.jit
def _topk_init(BLOCK_M: tl.constexpr, KP: tl.constexpr):
    return tl.zeros((BLOCK_M, KP), dtype=tl.int64) + (tl.arange(0, KP).to(tl.int64) + (_TK_NONE + 1))[None, :]


@triton.jit
def _topk_merge(lst, key, TOPK: tl.constexpr, KP: tl.constexpr):
    """The running top-k ``lst`` [rows, KP] (slots < TOPK, unsorted) merged with the candidate
    keys ``key`` [rows, n]: each round moves every row's best remaining candidate into its
    worst slot if it beats it; rounds stop when no row has a candidate left that does."""
    live = tl.arange(0, KP)[None, :] < TOPK
    worst = tl.min(tl.where(live, lst, 9223372036854775807), 1)
    rounds = tl.minimum(tl.max(tl.sum((key > worst[:, None]).to(tl.int32), 1), 0), TOPK)
    for _ in range(0, rounds):
        best = tl.max(key, 1)
        lst = tl.where(live & (lst == worst[:, None]) & (best > worst)[:, None], best[:, None], lst)
        key = tl.where(key == best[:, None], _TK_NONE, key)
        worst = tl.min(tl.where(live, lst, 9223372036854775807), 1)
    return lst


@triton.jit
def _topk_store(lst, m2, r2, TV, TI, bh, offs_m, Lq, TOPK: tl.constexpr, KP: tl.constexpr):
    """The top-k of rows ``offs_m`` sorted (descending; ties to the lower index) and decoded:
    values P = exp2(s - M - R) as the weights pass computes them, indices; value 0, index -1
    for the slots no attended key filled."""
    cols = tl.arange(0, KP)[None, :]
    lst = tl.where(cols < TOPK, lst, _TK_NONE)
    ranked = tl.zeros(lst.shape, dtype=tl.int64) + _TK_NONE
    for r in range(0, TOPK):
        best = tl.max(lst, 1)
        ranked = tl.where(cols == r, best[:, None], ranked)
        lst = tl.where(lst == best[:, None], _TK_NONE, lst)
    real = ranked > _TK_REAL
    mono = (ranked >> 32).to(tl.int32)
    s = (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    val = tl.where(real, tl.exp2((s - m2[:, None]) - r2[:, None]), 0.0)
    idx = tl.where(real, 4294967295 - (ranked & 4294967295), -1)
    ptr = (bh.to(tl.int64) * Lq + offs_m[:, None]) * TOPK + cols
    mask = (offs_m[:, None] < Lq) & (cols < TOPK)
    tl.store(TV + ptr, val.to(TV.dtype.element_ty), mask=mask)
    tl.store(TI + ptr, idx, mask=mask)


@triton.jit
def _entropy_update(w_i, l_i, m_i, m_safe, alpha, s, p):
    """The running ``sum p * (s - m)`` of a row (base 2, relative to the running max), rescaled
    like the row sum when the max moves, plus the tile's terms (0 where nothing is attended)."""
    moved = alpha * (w_i + l_i * tl.where(l_i > 0.0, m_i - m_safe, 0.0))
    return moved + tl.sum(p * tl.where(p > 0.0, s - m_safe[:, None], 0.0), 1)



@triton.jit
def _xattn_fwd_kernel(
    dir0, dir1, res0, res1, SEED, drop_threshold, drop_scale, nblk0, ntiles, H, block_q, block_k,
    HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr, DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr, PRUNE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, ENTROPY: tl.constexpr = False, TOPK: tl.constexpr = 0, KP: tl.constexpr = 2,
    BIDIR: tl.constexpr = True,
):
    """Axis 0: query blocks of both directions x batch * head; axis 2: key splits.

    ``res`` is (O, M, R, E, TV, TI) per direction: output, row statistics, and the optional
    statistics (return_aux): ENTROPY writes each row's entropy to E, TOPK > 0 the top-k values
    and indices to TV, TI. With SPLIT (flash-decoding, for few query blocks and
    many keys) the key tiles of the walk are dealt round-robin to the splits, and O/M/R are
    fp32 workspaces ``[splits, B, H, Lq, (Dv)]`` of normalised partial outputs and partial
    statistics (M = -inf when empty), merged by ``_xattn_fwd_combine_kernel``; E then holds
    each split's mean of ``s - M`` under its P (base 2), and TI its unsorted top-k keys
    ``[splits, B, H, Lq, TOPK]``.
    """
    pid, bh = _tile_and_slab(ntiles)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            prob, res, direction, mblk = dir0, res0, 0, pid
        else:
            prob, res, direction, mblk = dir1, res1, 1, pid - nblk0
    else:
        prob, res, direction, mblk = dir0, res0, 0, pid
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    O, M, R, E, TV, TI = res
    hk = h // group

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load(Q, sq, b, h, offs_m, Lq, offs_d, D)
    coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
    row_ok = _row_valid(QV, b, offs_m, Lq, HAS_QV)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if ENTROPY:
        w_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if TOPK > 0:
        top = _topk_init(BLOCK_M, KP)
    lrow = _layout_row(BM, bh, (mblk * BLOCK_M) // block_q, nqbp, nkbp)
    hi = _key_end(KEND, b, mblk * BLOCK_M, Lq, Lk, HAS_KV, CAUSAL, BLOCK_M)
    for t in range(split, _num_tiles(lrow, hi, block_k, PRUNE, BLOCK_N), tl.num_programs(2)):
        start_n = _tile_start(lrow, t, block_k, PRUNE, BLOCK_N)
        if start_n < hi:  # online softmax over keys start_n .. start_n + BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = _load_t(K, sk, b, hk, offs_n, Lk, offs_d, D)
            s, _, _ = _logits(q, kt, coef2, prob, b, h, offs_m, offs_n, row_ok, _col_valid(KV, b, offs_n, Lk, HAS_KV),
                              CAUSAL, HAS_BIAS, PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: no NaN
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            if ENTROPY:  # statistics of the pre-dropout P
                w_i = _entropy_update(w_i, l_i, m_i, m_safe, alpha, s, p)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                keep = _keep_mask(seed, offs_m, offs_n, bh, direction, drop_threshold)
                p = tl.where(keep, p * drop_scale, 0.0)
            v = _load(V, sv, b, hk, offs_n, Lk, offs_dv, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
            if TOPK > 0:  # after P V: fewer registers live
                top = _topk_merge(top, _topk_keys(s, offs_n), TOPK, KP)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    empty_m = float("-inf") if SPLIT else float("inf")  # final: +inf, so that P = 0
    row = split.to(tl.int64) * (tl.num_programs(0) // ntiles) + bh
    tl.store(O + row * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV))
    r_i = tl.log2(tl.where(has_key, l_i, 1.0))
    tl.store(M + row * Lq + offs_m, tl.where(has_key, m_i, empty_m), mask=offs_m < Lq)
    tl.store(R + row * Lq + offs_m, r_i, mask=offs_m < Lq)
    if ENTROPY:  # H = lse - sum P s = ln 2 * (R - sum p (s - M) / l); a split keeps the mean
        e_i = w_i / tl.where(has_key, l_i, 1.0)
        if not SPLIT:
            e_i = tl.where(has_key, (r_i - e_i) * 0.6931471805599453, 0.0)
        tl.store(E + row * Lq + offs_m, e_i, mask=offs_m < Lq)
    if TOPK > 0:
        if SPLIT:
            cols = tl.arange(0, KP)[None, :]
            tl.store(TI + (row * Lq + offs_m[:, None]) * TOPK + cols, top,
                     mask=(offs_m[:, None] < Lq) & (cols < TOPK))
        else:
            _topk_store(top, m_i, r_i, TV, TI, bh, offs_m, Lq, TOPK, KP)


@triton.jit
def _xattn_fwd_combine_kernel(part0, part1, nblk0, ntiles, n_split,
                              BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                              ENTROPY: tl.constexpr = False, TOPK: tl.constexpr = 0, KP: tl.constexpr = 2,
                              BIDIR: tl.constexpr = True):
    """Merges the split-key partial outputs, a softmax over the partial statistics;
    ``part`` is (OP, MP, RP, O, M, R, Lq, DV, EP, E, TKP, TV, TI) per direction: the optional
    statistics' partials EP (mean of s - M per split) and TKP (top-k keys per split) merge into
    the entropy E and the top-k TV, TI."""
    pid, bh = _tile_and_slab(ntiles)
    bh = bh.to(tl.int64)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            part, mblk = part0, pid
        else:
            part, mblk = part1, pid - nblk0
    else:
        part, mblk = part0, pid
    OP, MP, RP, O, M, R, Lq, DV, EP, E, TKP, TV, TI = part
    BH = tl.num_programs(0) // ntiles
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    omask = (offs_m[:, None] < Lq) & (offs_dv[None, :] < DV)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    if ENTROPY:
        w_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if TOPK > 0:
        top = _topk_init(BLOCK_M, KP)
        cols = tl.arange(0, KP)[None, :]
    for s in range(0, n_split):
        row = s * BH + bh
        ms = tl.load(MP + row * Lq + offs_m, mask=offs_m < Lq, other=float("-inf"))
        rs = tl.load(RP + row * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        os = tl.load(OP + row * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=omask, other=0.0)
        m_new = tl.maximum(m_i, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2((ms - m_safe) + rs)  # this split's row sum, relative to the running max
        if ENTROPY:  # sum p (s - m) = w * (mean of s - ms + ms - m), rescaled as in the forward
            es = tl.load(EP + row * Lq + offs_m, mask=offs_m < Lq, other=0.0)
            w_i = (alpha * (w_i + l_i * tl.where(l_i > 0.0, m_i - m_safe, 0.0))
                   + w * tl.where(w > 0.0, es + (ms - m_safe), 0.0))
        if TOPK > 0:
            keys = tl.load(TKP + (row * Lq + offs_m[:, None]) * TOPK + cols,
                           mask=(offs_m[:, None] < Lq) & (cols < TOPK), other=_TK_NONE)
            # Only real keys: a split's empty slots would duplicate the list's (slots must stay
            # distinct, the merge replaces the slot equal to the worst).
            top = _topk_merge(top, tl.where(keys > _TK_REAL, keys, _TK_NONE), TOPK, KP)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * os
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    r_i = tl.log2(tl.where(has_key, l_i, 1.0))
    m_i = tl.where(has_key, m_i, float("inf"))
    tl.store(O + bh * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty), mask=omask)
    tl.store(M + bh * Lq + offs_m, m_i, mask=offs_m < Lq)
    tl.store(R + bh * Lq + offs_m, r_i, mask=offs_m < Lq)
    if ENTROPY:
        e_i = tl.where(has_key, (r_i - w_i / tl.where(has_key, l_i, 1.0)) * 0.6931471805599453, 0.0)
        tl.store(E + bh * Lq + offs_m, e_i, mask=offs_m < Lq)
    if TOPK > 0:
        _topk_store(top, m_i, r_i, TV, TI, bh, offs_m, Lq, TOPK, KP)


@triton.jit
def _weights_tile(prob, M, R, b, h, bh, offs_m, offs_n, H, block_q, block_k,
                  HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr, PRUNE: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """P on one [BLOCK_M, BLOCK_N] tile, 0 where nothing is attended; a pruned block (BM is the
    dense kept mask here), or one past the key end or the causal diagonal, costs no matrix work."""
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    p = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    m0 = tl.min(offs_m, 0)
    n0 = tl.min(offs_n, 0)
    kept = n0 < _key_end(KEND, b, m0, Lq, Lk, HAS_KV, CAUSAL, offs_m.shape[0])
    if PRUNE:  # the whole tile lies in one pruning block (BLOCK_M | block_q, BLOCK_N | block_k)
        qb = m0.to(tl.int64) // block_q
        kb = n0.to(tl.int64) // block_k
        kept = kept & (tl.load(BM + ((b * H + h) * nqbp + qb) * nkbp + kb) != 0)
    if kept:
        offs_d = tl.arange(0, BLOCK_D)
        q = _load(Q, sq, b, h, offs_m, Lq, offs_d, D)
        kt = _load_t(K, sk, b, h // group, offs_n, Lk, offs_d, D)
        m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
        s, _, _ = _logits(q, kt, _head_coef(T, h, scale, HAS_T) * 1.4426950408889634, prob, b, h, offs_m, offs_n,
                          _row_valid(QV, b, offs_m, Lq, HAS_QV), _col_valid(KV, b, offs_n, Lk, HAS_KV),
                          CAUSAL, HAS_BIAS, PREC)
        p = _probs(s, m2, r2)
    return p


@triton.jit
def _xattn_weights_kernel(
    dir0, dir1, res0, res1, ntiles0, ntiles, H, block_q, block_k,
    MEAN: tl.constexpr, HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr,
    PRUNE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BIDIR: tl.constexpr = True,
):
    """Writes the weights from the stored row statistics, one tile per program: no score
    matrix in memory and no softmax pass. ``res`` is (W, M, R, nkb, HEADS, nh): the weights
    cover query heads ``HEADS[0 .. nh)`` (all H without HAS_HEADS), computed for them alone.
    MEAN: axis 1 is the batch and those heads are averaged here; otherwise batch * listed head
    (one grid axis: tiles x slabs)."""
    pid, slab = _tile_and_slab(ntiles)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < ntiles0:
            prob, res, tile = dir0, res0, pid
        else:
            prob, res, tile = dir1, res1, pid - ntiles0
    else:
        prob, res, tile = dir0, res0, pid
    W, M, R, nkb, HEADS, nh = res
    Lq, Lk = prob[13], prob[14]  # (PROBLEM)
    offs_m = (tile // nkb) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % nkb) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if MEAN:
        b = slab.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, nh):
            h = j
            if HAS_HEADS:
                h = tl.load(HEADS + j)
            acc += _weights_tile(prob, M, R, b, h, b * H + h, offs_m, offs_n, H, block_q, block_k,
                                 HAS_QV, HAS_KV, HAS_T, PRUNE, CAUSAL, HAS_BIAS, BLOCK_D, PREC)
        w = acc / nh
        w_base = W + b * Lq * Lk
    else:
        b = (slab // nh).to(tl.int64)
        h = slab % nh
        if HAS_HEADS:
            h = tl.load(HEADS + h)
        h = h.to(tl.int64)
        w = _weights_tile(prob, M, R, b, h, b * H + h, offs_m, offs_n, H, block_q, block_k,
                          HAS_QV, HAS_KV, HAS_T, PRUNE, CAUSAL, HAS_BIAS, BLOCK_D, PREC)
        w_base = W + slab.to(tl.int64) * Lq * Lk
    tl.store(w_base + offs_m[:, None] * Lk + offs_n[None, :], w.to(W.dtype.element_ty), mask=mask)
