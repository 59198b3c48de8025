"""Triton block selection for pruning, and the compact kept-block layout the kernels walk.

Semantics are ``crossattn.reference.select_blocks_reference``'s (DESIGN.md, Pruning):

1. ``_xattn_pool_kernel``: per (batch, head, block) the mean of the *valid* rows of a block of
   queries or keys, and how many rows were valid (a block without any is never kept);
2. ``_xattn_select_kernel``: per (batch, head, query block) the block scores
   ``Sb = mean_q . mean_k * scale / T``, each key block's rank (ties to the lower index) and,
   for ``mass``, the softmax mass of the blocks ranked before it; a block is kept when its
   rank is below the kept count (``top_k``/``keep``: a host table indexed by the number of
   valid key blocks, so ``ceil(keep * n)`` is computed in float64 exactly as the reference
   does) or the mass before it is below ``reference.mass_threshold(mass)`` (or its rank
   below ``min_blocks``);
3. ``_xattn_blocks_compact_kernel``: any dense kept mask (a fixed ``block_mask``, or the
   transposed mask the dK/dV pass needs) to the compact layout.

Compact layout (FlexAttention's BlockMask idea): int32 ``[B, H, rows, 1 + cols]``; entry 0 of
a row is the number of kept blocks, entries ``1 .. count`` their indices in ascending order
(the rest is unspecified). Rows are query blocks (forward, delta, dQ) or, transposed, key
blocks listing the query blocks that kept them (dK/dV).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from crossattn._validation import host_to_device
from crossattn.reference import causal_block_reach, default_scale, mass_threshold

from .xattn_fwd import _tile_and_slab


@triton.jit
def _xattn_pool_kernel(
    X, VALID, MEAN, COUNT, length, nb, H, D, sxb, sxh, sxl, sxd, block,
    HAS_VALID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs: blocks x batch * head. MEAN is fp32 ``[B*H, nb, D]``, COUNT fp32
    ``[B*H, nb]`` (valid rows of the block)."""
    blk, bh = _tile_and_slab(nb)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, block, BLOCK_R):  # BLOCK_R divides block (powers of two)
        offs_r = blk * block + r0 + tl.arange(0, BLOCK_R)
        inb = offs_r < length
        w = inb.to(tl.float32)
        if HAS_VALID:
            w = tl.where(tl.load(VALID + b * length + offs_r, mask=inb, other=0) != 0, w, 0.0)
        # Padded rows are not read (they may hold NaN or inf: NaN * 0 would be NaN).
        x = tl.load(X + b * sxb + h * sxh + offs_r[:, None] * sxl + offs_d[None, :] * sxd,
                    mask=(w > 0.0)[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * w[:, None], 0)
        cnt += w
    n = tl.sum(cnt, 0)
    row = bh.to(tl.int64) * nb + blk
    tl.store(MEAN + row * D + offs_d, acc / tl.maximum(n, 1.0), mask=offs_d < D)
    tl.store(COUNT + row, n)


@triton.jit
def _xattn_select_kernel(
    PQ, PQN, PK, PKN, T, SCORES, NKEEP, MASK, LAYOUT, QLAST, KFIRST,
    nqb, nkb, H, D, scale, mass, min_blocks, group, Lq, Lk, block_q, block_k,
    MASS: tl.constexpr, HAS_T: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs: query blocks x batch * head. Writes the dense uint8 row of MASK
    ``[B*H, nqb, nkb]`` and the compact row of LAYOUT ``[B*H, nqb, 1 + nkb]``; SCORES is an
    fp32 scratch row per program."""
    qb, bh = _tile_and_slab(nqb)
    h = bh % H
    row = bh.to(tl.int64) * nqb + qb
    offs_d = tl.arange(0, BLOCK_D)
    qm = tl.load(PQ + row * D + offs_d, mask=offs_d < D, other=0.0)
    q_ok = tl.load(PQN + row) > 0.0
    coef = scale
    if HAS_T:
        coef = scale / tl.load(T + h).to(tl.float32)
    kbase = ((bh // H) * (H // group) + h // group).to(tl.int64) * nkb  # the kv head's key blocks
    srow = SCORES + row * nkb
    # Causal: a key block is a candidate when its first valid key is at most the block's last
    # valid query + (Lk - Lq) (QLAST [B, nqb], KFIRST [B, nkb]: reference.causal_block_reach).
    k_last = Lk
    if CAUSAL:
        k_last = tl.load(QLAST + (bh // H).to(tl.int64) * nqb + qb) + (Lk - Lq) + 1
    kfirst = KFIRST + (bh // H).to(tl.int64) * nkb

    # Pass 1: block scores (-inf for key blocks without a valid key), their max and count.
    n_valid = 0
    mx = float("-inf")
    for j0 in range(0, nkb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        km = tl.load(PK + (kbase + offs_j)[:, None] * D + offs_d[None, :],
                     mask=(offs_j[:, None] < nkb) & (offs_d[None, :] < D), other=0.0)
        k_ok = tl.load(PKN + kbase + offs_j, mask=offs_j < nkb, other=0.0) > 0.0
        if CAUSAL:
            k_ok = k_ok & (tl.load(kfirst + offs_j, mask=offs_j < nkb, other=Lk) < k_last)
        s = tl.where(k_ok, tl.sum(km * qm[None, :], 1) * coef, float("-inf"))
        tl.store(srow + offs_j, s, mask=offs_j < nkb)
        n_valid += tl.sum(k_ok.to(tl.int32), 0)
        mx = tl.maximum(mx, tl.max(s, 0))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = 1.0
    if MASS:
        total = 0.0
        for j0 in range(0, nkb, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            total += tl.sum(tl.exp(tl.load(srow + offs_j, mask=offs_j < nkb, other=float("-inf")) - mx), 0)
        total = tl.where(total > 0.0, total, 1.0)
    n_keep = tl.load(NKEEP + n_valid)

    # Pass 2: rank of each block among the row (and the mass ranked before it), kept flags,
    # compact indices by a running prefix count.
    lrow = LAYOUT + row * (nkb + 1)
    pos = 0
    for j0 in range(0, nkb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        sj = tl.load(srow + offs_j, mask=offs_j < nkb, other=float("-inf"))
        rank = tl.zeros((BLOCK_J,), dtype=tl.int32)
        before = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for i0 in range(0, nkb, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            si = tl.load(srow + offs_i, mask=offs_i < nkb, other=float("-inf"))
            better = (si[None, :] > sj[:, None]) | ((si[None, :] == sj[:, None]) & (offs_i[None, :] < offs_j[:, None]))
            better = better & (offs_i[None, :] < nkb)
            rank += tl.sum(better.to(tl.int32), 1)
            if MASS:
                before += tl.sum(tl.where(better, tl.exp(si[None, :] - mx) / total, 0.0), 1)
        if MASS:
            kept = ((before < mass) | (rank < min_blocks)) & (rank < n_valid)
        else:
            kept = rank < n_keep
        k_ok = tl.load(PKN + kbase + offs_j, mask=offs_j < nkb, other=0.0) > 0.0
        if CAUSAL:
            k_ok = k_ok & (tl.load(kfirst + offs_j, mask=offs_j < nkb, other=Lk) < k_last)
        kept = tl.where(q_ok, kept & k_ok & (offs_j < nkb), False)
        tl.store(MASK + row * nkb + offs_j, kept.to(tl.uint8), mask=offs_j < nkb)
        slot = pos + tl.cumsum(kept.to(tl.int32), 0)
        tl.store(lrow + slot, offs_j, mask=kept)
        pos += tl.sum(kept.to(tl.int32), 0)
    tl.store(lrow, pos)


@triton.jit
def _xattn_blocks_compact_kernel(
    MASK, LAYOUT, nrows, ncols, H, smb, smh, smr, smc, BLOCK_C: tl.constexpr,
):
    """Programs: rows x batch * head. Dense kept mask (any strides: broadcast or
    transposed views) to the compact layout ``[B*H, nrows, 1 + ncols]``."""
    r, bh = _tile_and_slab(nrows)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base = MASK + b * smb + h * smh + r.to(tl.int64) * smr
    lrow = LAYOUT + (bh.to(tl.int64) * nrows + r) * (ncols + 1)
    pos = 0
    for c0 in range(0, ncols, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        kept = tl.load(base + offs * smc, mask=offs < ncols, other=0) != 0
        slot = pos + tl.cumsum(kept.to(tl.int32), 0)
        tl.store(lrow + slot, offs, mask=kept)
        pos += tl.sum(kept.to(tl.int32), 0)
    tl.store(lrow, pos)


# --------------------------------------------------------------------------- launchers
class BlockLayout(NamedTuple):
    """Kept key blocks: ``mask`` bool ``[B, H, nqb, nkb]`` (what ``select_blocks`` returns) and
    ``layout`` int32 ``[B, H, nqb, 1 + nkb]`` (count, then the kept indices ascending)."""

    mask: torch.Tensor
    layout: torch.Tensor


def _grid(tiles: int, slabs: int, *rest: int) -> tuple:
    """The 1-D launch grid of ``tiles x slabs`` programs (see ``_tile_and_slab``)."""
    programs = tiles * slabs
    if programs >= 2**31:
        raise ValueError(f"{tiles} tiles x {slabs} batch*heads = {programs} programs: more than one launch "
                         "takes (2**31 - 1); split the batch")
    return (programs, 1, *rest)


def _block_r(block: int, block_d: int) -> int:
    """Rows per step of the pool kernel: a [rows, BLOCK_D] tile of at most 4096 elements (32 fp32
    registers a thread at 4 warps); 64 x 128 spilled on sm_90 (float32, unaligned rows)."""
    return min(block, max(16, 4096 // block_d))


def block_means(x, valid, block):
    """fp32 ``([B*H, nb, D] means of the valid rows, [B*H, nb] valid-row counts)``."""
    B, H, L, D = x.shape
    nb = triton.cdiv(L, block)
    mean = torch.empty(B * H, nb, D, device=x.device, dtype=torch.float32)
    count = torch.empty(B * H, nb, device=x.device, dtype=torch.float32)
    if nb and B * H:
        valid_u8 = valid.to(torch.uint8).contiguous() if valid is not None else mean
        block_d = max(16, triton.next_power_of_2(D))
        _xattn_pool_kernel[_grid(nb, B * H)](
            x, valid_u8, mean, count, L, nb, H, D, *x.stride(), block,
            HAS_VALID=valid is not None, BLOCK_R=_block_r(block, block_d), BLOCK_D=block_d,
        )
    return mean, count


def _keep_table(pruning, nkb: int, device) -> torch.Tensor:
    """Kept count by number of valid key blocks (``top_k`` / ``keep`` rules), computed on the
    host in float64 with the reference's guard so ``ceil(0.28 * 25)`` is 7."""
    table = []
    for n in range(nkb + 1):
        if pruning.top_k is not None:
            want = pruning.top_k
        elif pruning.keep is not None:
            want = math.ceil(pruning.keep * n - 1e-9)
        else:
            want = n
        table.append(min(max(want, pruning.min_blocks), n))
    return host_to_device(torch.tensor(table, dtype=torch.int32), device)


def compact(mask: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Compact layout ``[B, H, R, 1 + C]`` of a dense mask broadcastable to ``[B, H, R, C]``
    (any strides, e.g. a transposed view)."""
    R, C = mask.shape[-2:]
    mask = mask.expand(B, H, R, C)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    layout = torch.empty(B, H, R, C + 1, device=mask.device, dtype=torch.int32)
    if R and B * H:
        _xattn_blocks_compact_kernel[_grid(R, B * H)](
            mask, layout, R, C, H, *mask.stride(), BLOCK_C=min(256, max(16, triton.next_power_of_2(C))),
        )
    return layout


def select_blocks_triton(q, k, pruning, *, key_valid=None, query_valid=None, scale=None,
                         temperature=None, is_causal=False) -> BlockLayout:
    """The reference's block selection on the device: ``BlockLayout(mask, layout)``.

    ``q`` ``[B, H, Lq, D]``, ``k`` ``[B, Hkv, Lk, D]`` (query head h uses kv head
    ``h // (H // Hkv)``); ``key_valid`` / ``query_valid`` bool
    ``[B, Lk]`` / ``[B, Lq]``; ``temperature`` a float or an ``[H]`` tensor. A fixed
    ``pruning.block_mask`` is converted, not selected."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    nqb, nkb = pruning.num_blocks(Lq, Lk)
    device = q.device
    if pruning.block_mask is not None:
        mask = pruning.block_mask.to(device).expand(B, H, nqb, nkb)
        return BlockLayout(mask, compact(mask, B, H))
    scale = default_scale(D) if scale is None else float(scale)
    mean_q, n_q = block_means(q.detach(), query_valid, pruning.block_q)
    mean_k, n_k = block_means(k.detach(), key_valid, pruning.block_k)
    has_t = temperature is not None
    if has_t:
        t = temperature.detach() if isinstance(temperature, torch.Tensor) else torch.tensor(float(temperature))
        temp = t.to(device=device, dtype=torch.float32).reshape(-1).expand(H).contiguous()
    else:
        temp = mean_q
    mask = torch.empty(B, H, nqb, nkb, device=device, dtype=torch.uint8)
    layout = torch.empty(B, H, nqb, nkb + 1, device=device, dtype=torch.int32)
    scores = torch.empty(B * H * nqb, max(nkb, 1), device=device, dtype=torch.float32)
    q_last = k_first = mean_q  # read only under is_causal
    if is_causal:
        q_last, k_first = (t.to(torch.int32).contiguous() for t in causal_block_reach(
            query_valid, key_valid, B, Lq, Lk, pruning, device))
    if nqb and B * H:
        _xattn_select_kernel[_grid(nqb, B * H)](
            mean_q, n_q, mean_k, n_k, temp, scores, _keep_table(pruning, nkb, device), mask, layout,
            q_last, k_first,
            nqb, nkb, H, D, scale, mass_threshold(float(pruning.mass or 0.0)), pruning.min_blocks,
            H // k.shape[1], Lq, Lk,
            pruning.block_q, pruning.block_k, MASS=pruning.mass is not None, HAS_T=has_t, CAUSAL=is_causal,
            BLOCK_J=64, BLOCK_I=32, BLOCK_D=max(16, triton.next_power_of_2(D)),
            num_warps=4, maxnreg=255,  # ptxas left alone capped itself at 64 and spilled on sm_80
        )
    return BlockLayout(mask.view(torch.bool), layout)
