"""Weight statistics without the weights (``return_aux``) in the Triton backend: the key-mass
pass and the launch glue of the statistics the forward kernel accumulates.

* ``entropy`` ``[B, H, Lq]``: accumulated in the forward's online softmax (xattn_fwd: a running
  ``sum p * (s - m)`` rescaled like the row sum), no extra pass; ``H = ln 2 * (R - sum p (s - M) / l)``.
* ``top_k`` values/indices ``[B, H, Lq, k]`` (k <= MAX_TOP_K): a running top-k of the logits per
  row in the forward, decoded with the final row statistics, so values are exactly the P the
  weights pass returns; ties go to the lower key index, as in the reference. Not differentiable
  (as in the reference: they are returned detached).
* ``key_mass`` ``[B, H, Lk]``: column sums of P over the valid queries in a key-major pass like
  the dK/dV pass (``_xattn_key_mass_kernel``): each program owns one key tile of one query head
  and walks the query tiles that may attend it, recomputing P from q, k and the row statistics.

Their gradients are fused into the backward (xattn_bwd): dS gains ``-P (log P + H) dH`` and
``P (g_j - sum_j' P g_j')``. Nothing here allocates a ``[B, H, Lq, Lk]`` tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from crossattn.reference import AuxOutput

from .xattn_fwd import (
    _col_valid,
    _head_coef,
    _layout_row,
    _load,
    _load_t,
    _logits,
    _num_tiles,
    _probs,
    _row_stats,
    _row_valid,
    _tile_and_slab,
    _tile_start,
)
from .xattn_select import _grid

MAX_TOP_K = 16


@triton.jit
def _xattn_key_mass_kernel(
    dir0, dir1, res0, res1, nblk0, ntiles, H, block_q, block_k,
    HAS_QV: tl.constexpr, HAS_KV: tl.constexpr, HAS_T: tl.constexpr, PRUNE: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BIDIR: tl.constexpr = True,
):
    """``KM[b, h, j] = sum_i P[b, h, i, j]`` for one key tile of one query head (axis 0: key
    tiles of both directions x batch * head). ``res`` is (KM, M, R); the problem's BM is the
    transposed pruning layout (the query blocks that kept each key block), as in dK/dV."""
    pid, bh = _tile_and_slab(ntiles)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if BIDIR:  # one direction: no select, its scalars stay kernel parameters
        if pid < nblk0:
            prob, res, nblk = dir0, res0, pid
        else:
            prob, res, nblk = dir1, res1, pid - nblk0
    else:
        prob, res, nblk = dir0, res0, pid
    Q, K, V, QV, KV, KEND, T, BM, BIAS, sq, sk, sv, sbias, Lq, Lk, D, DV, scale, nqbp, nkbp, group, _one = prob
    KM, M, R = res
    n0 = nblk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kt = _load_t(K, sk, b, h // group, offs_n, Lk, offs_d, D)
    col_ok = _col_valid(KV, b, offs_n, Lk, HAS_KV)
    coef2 = _head_coef(T, h, scale, HAS_T) * 1.4426950408889634
    # Query rows that may attend this key tile: from the causal diagonal on; none when the tile
    # starts past the batch row's last valid key.
    lo = n0 * 0
    if CAUSAL:
        lo = tl.maximum(n0 - (Lk - Lq), 0)
    q_hi = Lq
    if HAS_KV:
        q_hi = tl.where(n0 < tl.load(KEND + b), Lq, 0)
    km = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lcol = _layout_row(BM, bh, n0 // block_k, nkbp, nqbp)
    t0 = 0 if PRUNE else lo // BLOCK_M
    for t in range(t0, _num_tiles(lcol, q_hi, block_q, PRUNE, BLOCK_M)):
        start_m = _tile_start(lcol, t, block_q, PRUNE, BLOCK_M)
        if (start_m < q_hi) & (start_m + BLOCK_M > lo):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load(Q, sq, b, h, offs_m, Lq, offs_d, D)
            m2, r2 = _row_stats(M, R, bh, offs_m, Lq)
            s, _, _ = _logits(q, kt, coef2, prob, b, h, offs_m, offs_n, _row_valid(QV, b, offs_m, Lq, HAS_QV),
                              col_ok, CAUSAL, HAS_BIAS, PREC)
            km += tl.sum(_probs(s, m2, r2), 0)
    tl.store(KM + bh.to(tl.int64) * Lk + offs_n, km, mask=offs_n < Lk)


def fwd_buffers(q, entropy: bool, top_k: int, n_split: int, dummy):
    """Per direction: the final entropy / top-k outputs (empty when not requested) and the
    forward kernel's (E, TV, TI) destinations (split: per-split workspaces)."""
    B, H = q[0].shape[:2]
    ents, tvs, tis, dests = [], [], [], []
    for qq in q:
        Lq = qq.shape[2]
        ent = qq.new_empty((B, H, Lq) if entropy else (0,), dtype=torch.float32)
        tv = qq.new_empty((B, H, Lq, top_k) if top_k else (0,))
        ti = qq.new_empty((B, H, Lq, top_k) if top_k else (0,), dtype=torch.int64)
        d_e = ent if entropy else dummy(torch.float32)
        d_tv = tv if top_k else dummy(qq.dtype)
        d_ti = ti if top_k else dummy(torch.int64)
        if n_split > 1:
            if entropy:
                d_e = qq.new_empty(n_split, B, H, Lq, dtype=torch.float32)
            if top_k:
                d_ti = qq.new_empty(n_split, B, H, Lq, top_k, dtype=torch.int64)
        ents.append(ent)
        tvs.append(tv)
        tis.append(ti)
        dests.append((d_e, d_tv, d_ti))
    return ents, tvs, tis, dests


def kp(top_k: int) -> int:
    """Width of the running top-k list (a power of two >= 2)."""
    return max(2, triton.next_power_of_2(max(top_k, 1)))


def launch_key_mass(problems, k, stats, s) -> list[torch.Tensor]:
    """``key_mass`` ``[B, H, Lk]`` per direction; ``problems`` are the kernels' problem tuples
    with the transposed pruning layout in the BM slot (xattn._problem)."""
    B, H, cfg = s.B, s.H, s.cfg
    kms = [torch.empty(B, H, kk.shape[2], device=s.device, dtype=torch.float32) for kk in k]
    nkb = [triton.cdiv(kk.shape[2], cfg.block_n) for kk in k]
    ends = (0, len(k) - 1)
    if B * H and sum(nkb):
        _xattn_key_mass_kernel[_grid(sum(nkb), B * H)](
            *[problems[i] for i in ends], *[(kms[i], stats[i][0], stats[i][1]) for i in ends],
            nkb[0], sum(nkb), H, s.block_q, s.block_k,
            **{n: s.flags[n] for n in ("HAS_QV", "HAS_KV", "HAS_T", "PRUNE", "CAUSAL", "HAS_BIAS", "BIDIR")},
            **s.tiles,
        )
    return kms


def bwd_buffers(dent, dkm, q, k, dummy):
    """The gradients of the entropy ``[B, H, Lq]`` and key mass ``[B, H, Lk]`` per direction as
    the backward kernels read them (fp32, contiguous; zeros for a direction without one, a dummy
    when no direction has one), and whether any direction has one."""
    has_dh, has_dkm = (any(g is not None for g in x) for x in (dent, dkm))
    dent = [g.float().contiguous() if g is not None else
            q[i].new_zeros(q[i].shape[:3], dtype=torch.float32) if has_dh else dummy for i, g in enumerate(dent)]
    dkm = [g.float().contiguous() if g is not None else
           q[i].new_zeros(*q[i].shape[:2], k[i].shape[2], dtype=torch.float32) if has_dkm else dummy
           for i, g in enumerate(dkm)]
    return dent, dkm, has_dh, has_dkm


def fold_entropy_grad(ctx, dlse, d_ents, d_kms, ents):
    """The statistics' gradients for the backward op. The entropy's dS = -P (log P + H) dH: its
    row term P H dH joins delta as -dLSE does (dLSE - H dH), the kernels add -log P * dH to dP.
    Autograd hands zeros of the empty placeholders of statistics not requested: dropped."""
    n = len(dlse)
    d_ents = list(d_ents or [None] * n) if ctx.entropy else [None] * n
    d_kms = list(d_kms or [None] * n) if ctx.key_mass else [None] * n
    dlse = [dl if de is None else (-(e * de) if dl is None else dl - e * de) for dl, de, e in zip(dlse, d_ents, ents)]
    return dlse, d_ents, d_kms


def aux_outputs(problems, lses, ents, kms, tvs, tis):
    """Each direction's :class:`AuxOutput` (None without ``return_aux``): the LSE -inf on empty
    rows, top-k values detached (not differentiable, as in the reference)."""
    auxes = []
    for p, lse, ent, km, tv, ti in zip(problems, lses, ents, kms, tvs, tis):
        req = p.aux
        if req is None:
            auxes.append(None)
            continue
        top = req.top_k > 0
        auxes.append(AuxOutput(
            lse=torch.where(lse == float("inf"), float("-inf"), lse) if req.lse else None,
            entropy=ent if req.entropy else None, key_mass=km if req.key_mass else None,
            top_k_values=tv.detach() if top else None, top_k_indices=ti if top else None))
    return auxes
