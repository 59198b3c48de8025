"""The torch backend's pruned attention over the kept key blocks only (contract: pruned key
blocks cost no matrix work).

On CPU tensors the block mask is on the host, so a pruned call becomes a dense problem of
the kept blocks: query block ``qb`` of head ``h`` is a head ``h * nqb + qb`` of its own whose
keys are the ``m`` key blocks it kept (``m`` = the most any query block kept; fewer are
padded with masked slots), gathered in ascending order so that top-k ties still go to the
lower key position. Padding, causality and the slots' validity are per head and row (no
``[B, Lk]`` mask can say them): the core takes them as an element mask (the saved-P Function,
where the whole problem could take it: no statistics, bias or head subset) or as ``-inf``
filled into a bias that holds the caller's bias gathered (``_ChunkedAttention``); the
gathered keys and values of masked slots and padded query rows are zeroed (padding may hold
NaN). Outputs scatter back to the caller's
coordinates (weights, key mass and top-k positions by the gathered key positions). The
matrix work is ``B * H * Lq * m * block_k`` instead of ``B * H * Lq * Lk``; the path is taken
only where that is less than the dense path's (whose ragged parts run at their lengths: one
long sequence in a batch of short ones sets ``m`` for all). Beyond the gathered scores, the
masks and bias (``[B, H, Lq, m * block_k]``) are built whole, not by chunks.

Dropout draws the caller's Philox bits: the mask of a few rows of every query block over all
keys at a time (within a chunk budget; the compiled CPU kernel, ~1 ns a key; no matrix work),
gathered at the kept positions.
"""
from __future__ import annotations

import math

import torch

from .._philox import dropout_keep_mask
from .._validation import values_unreadable
from ..reference import compute_dtype
from ._torch_common import _PHILOX_BYTES, chunk_budget

# The gathered problem's bias, masks and copies of the kept keys and values are built for the
# whole call (not by chunks): at most this many chunk budgets, else the dense path.
_BUDGETS = 4


def worthwhile(p, block_mask, dense_work: int) -> int | None:
    """``m`` (kept key blocks per query block, at most) where the gathered problem has fewer
    (query, key) pairs than ``dense_work``, the dense path's (ragged parts counted at their
    lengths), and its whole-call temporaries (bias and mask per pair, the gathered keys and
    values) fit ``_BUDGETS`` chunk budgets; else None: the dense path runs it."""
    B, H, Lq, Lk, D, Dv = p.dims
    if (p.q.device.type != "cpu" or min(B, H, Lq, Lk) == 0
            or any(values_unreadable(t) for t in (p.q, p.k, block_mask))):
        return None
    m = max(1, int(block_mask.sum(-1).max()))  # a host read: CPU tensors only
    nqb, M = block_mask.shape[2], m * p.pruning.block_k
    pairs = B * nqb * p.pruning.block_q * M  # per head, as dense_work
    ct_bytes = torch.finfo(compute_dtype(p.q.dtype)).bits // 8
    temporaries = H * (pairs * (ct_bytes + 2) + B * nqb * M * (D + Dv) * p.q.element_size())
    budget = chunk_budget()
    if pairs >= dense_work or temporaries > _BUDGETS * budget:
        return None
    return m


def run(p, cfg, block_mask, m, key_valid, query_valid, temp, core):
    """``core(q, k, v, temperature, bias, ok, cfg)`` on the gathered problem (``bias``: the
    caller's at each (head, query block, row, slot), broadcastable to ``[B, H, nqb, bq, M]``,
    or None; ``ok`` bool ``[B, H * nqb, bq, M]``, the pairs that attend); returns ``(out,
    weights, lse, entropy, key_mass, top-k values, top-k indices)`` of ``p``."""
    B, H, Lq, Lk, D, Dv = p.dims
    Hkv, bq, bk = p.kv_heads, p.pruning.block_q, p.pruning.block_k
    nqb, nkb = block_mask.shape[2], block_mask.shape[3]
    M, Lqp = m * bk, nqb * bq
    dev = p.q.device

    # Kept blocks first, in ascending order (a stable sort of "not kept"); slots past a row's
    # count point at the dummy block nkb. pos: each slot's key position (Lk: none).
    bm = block_mask.expand(B, H, nqb, nkb)
    order = torch.sort((~bm).to(torch.uint8), dim=-1, stable=True).indices[..., :m]
    kept = torch.arange(m, device=dev) < bm.sum(-1, keepdim=True)
    blocks = torch.where(kept, order, nkb)
    pos = (blocks[..., None] * bk + torch.arange(bk, device=dev)).reshape(B, H, nqb, M).clamp_(max=Lk)
    key_ok = pos < Lk
    pos_c = pos.clamp(max=Lk - 1)  # an index to read; masked slots read key Lk - 1 and weigh 0
    if key_valid is not None:
        key_ok &= key_valid.gather(1, pos_c.reshape(B, -1)).view(B, H, nqb, M)

    # Keys and values of each (head, query block), without expanding grouped heads first;
    # masked slots zeroed (they read key Lk - 1, or padding that may hold NaN: 0 * NaN is NaN
    # in P @ v and dS @ k), in place -- index_select's result is fresh and its backward does
    # not read it.
    kv_head = torch.arange(H, device=dev) // (H // Hkv)
    bad = (~key_ok).reshape(-1).nonzero().squeeze(1)  # a host read: CPU tensors only
    kg, vg = (_gather_rows(t, kv_head, pos_c).index_fill_(0, bad, 0.0).view(B, H * nqb, M, t.shape[-1])
              for t in (p.k, p.v))
    q = p.q if query_valid is None else p.q.masked_fill(~query_valid[:, None, :, None], 0.0)
    qg = torch.nn.functional.pad(q, (0, 0, 0, Lqp - Lq)).reshape(B, H * nqb, bq, D)

    # Which (row, slot) pairs attend: the slot's key is valid, the row is a valid query, and
    # the key is on or below the causal diagonal (the core makes them an element mask, or
    # -inf filled into the bias). Padded query rows are zeroed above (they may hold NaN).
    rows = torch.arange(Lqp, device=dev).view(nqb, bq, 1)
    row_ok = rows < Lq
    if query_valid is not None:
        row_ok = row_ok & torch.nn.functional.pad(query_valid, (0, Lqp - Lq)).view(B, 1, nqb, bq, 1)
    ok = key_ok[:, :, :, None, :] & row_ok
    if p.is_causal:
        ok = ok & (pos[:, :, :, None, :] <= rows + (Lk - Lq))
    bias = None if p.attn_bias is None else _gather_bias(p.attn_bias, pos_c, Lq, nqb, bq)

    heads = tuple(range(H)) if p.weight_heads is None else tuple(p.weight_heads)
    budget = chunk_budget()
    sub_heads = tuple(h * nqb + i for h in heads for i in range(nqb))
    def dropper(rows):  # rows of the gathered problem -> [B, H * nqb, len(rows), M], True = dropped
        # The caller's bits over every key of those rows, gathered at the kept ones: drawn by
        # pieces of rows within a chunk budget (a whole [B, H, Lq, Lk] mask would be the
        # unpruned problem's size).
        rows = rows.to(dev)
        out = torch.empty(B, H * nqb, len(rows), M, dtype=torch.bool, device=dev)
        step = max(1, int(budget // (B * H * nqb * Lk * (1 + _PHILOX_BYTES))))
        for r0 in range(0, len(rows), step):
            rr = rows[r0:r0 + step]
            at = (torch.arange(nqb, device=dev)[:, None] * bq + rr[None, :]).reshape(-1)
            dense = dropout_keep_mask(p.dropout_seed, p.dropout_p, batch=B, heads=H, rows=at, cols=Lk,
                                      direction=p.direction, device=dev, dropped=True)
            R = len(rr)
            out[:, :, r0:r0 + R] = dense.view(B, H, nqb, R, Lk).gather(
                -1, pos_c[:, :, :, None, :].expand(B, H, nqb, R, M)).view(B, H * nqb, R, M)
        return out

    sub_cfg = cfg._replace(
        block_q=0, block_k=0, is_causal=False, causal_shift=0, row0=0, batch_ids=None,
        dropper=dropper if p.dropout_p > 0.0 else None,
        need_weights="full" if p.need_weights else None,
        weight_heads=None if sub_heads == tuple(range(H * nqb)) else sub_heads,
    )
    if temp is not None and temp.numel() > 1:
        temp = temp.reshape(-1).repeat_interleave(nqb)  # per head -> per (head, query block)
    out, w, lse, ent, mass, top_v, top_i = core(qg, kg, vg, temp, bias, ok.view(B, H * nqb, bq, M), sub_cfg)

    out = out.reshape(B, H, Lqp, Dv)[:, :, :Lq].contiguous()
    weights = out.new_empty(0)
    if p.need_weights:
        nh = len(heads)
        idx = pos_c[:, list(heads)][:, :, :, None, :]
        w = w.view(B, nh, nqb, bq, M)
        if p.need_weights == "full":
            weights = _scatter_rows(torch.zeros(B, nh, Lq, Lk, dtype=w.dtype, device=dev), w, idx)
        else:  # head by head into one [B, Lq, Lk] (half precision accumulates in float32)
            acc = torch.zeros(B, 1, Lq, Lk, dtype=torch.promote_types(w.dtype, torch.float32), device=dev)
            for h in range(nh):
                acc = _scatter_rows(acc, w[:, h:h + 1].to(acc.dtype) / nh, idx[:, h:h + 1])
            weights = acc.squeeze(1).to(w.dtype)
    if lse.numel():
        lse = lse.view(B, H, Lqp)[:, :, :Lq].contiguous()
    if ent.numel():
        ent = ent.view(B, H, Lqp)[:, :, :Lq].contiguous()
    if mass.numel():
        mass = torch.zeros(B, H, Lk, dtype=mass.dtype, device=dev).scatter_add(
            -1, pos_c.reshape(B, H, nqb * M), mass.view(B, H, nqb * M))
    if top_v.numel():
        k = top_v.shape[-1]
        top_v = top_v.view(B, H, Lqp, k)[:, :, :Lq].contiguous()
        ti = top_i.view(B, H, nqb, bq * k)
        at = pos_c.gather(-1, ti.clamp(min=0))
        top_i = torch.where(ti >= 0, at, -1).view(B, H, Lqp, k)[:, :, :Lq].contiguous()
    return out, weights, lse, ent, mass, top_v, top_i


def _gather_rows(t: torch.Tensor, heads: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows ``t[b, heads[h], pos[b, h, ...]]`` of ``t [B, Hkv, Lk, X]`` as ``[N, X]``, by one
    index_select over a 2-D view of ``t`` where its layout has one (contiguous, or a head-split
    projection ``[B, Lk, Hkv, X]`` seen as ``[B, Hkv, Lk, X]``), else over a copy."""
    B, Hkv, Lk, X = t.shape
    b = torch.arange(B, device=t.device).view(-1, *([1] * (pos.dim() - 1)))
    h = heads.view(1, -1, *([1] * (pos.dim() - 2)))
    if t.transpose(1, 2).is_contiguous():  # [B, Lk, Hkv, X] in memory
        return t.transpose(1, 2).reshape(B * Lk * Hkv, X).index_select(0, ((b * Lk + pos) * Hkv + h).reshape(-1))
    return t.reshape(B * Hkv * Lk, X).index_select(0, ((b * Hkv + h) * Lk + pos).reshape(-1))


def filled_bias(bias, ok, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The chunked core's bias ``[B, H * nqb, bq, M]``: the caller's gathered ``bias`` (or 0)
    with ``-inf`` filled in where ``ok`` is False -- filled, not added: padding may hold NaN,
    and NaN - inf is NaN."""
    if bias is None:
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, -math.inf)
    B, HN, bq, M = ok.shape
    shape = (B, heads, HN // heads, bq, M)
    return bias.to(dtype).expand(shape).masked_fill(~ok.view(shape), -math.inf).view(ok.shape)


def _scatter_rows(target, src, idx):
    """``target [B, X, Lq, Lk]`` plus ``src [B, X, nqb, bq, M]`` at key positions ``idx
    [B, X, nqb, 1, M]``, written in place through views of whole query blocks and of the last,
    partial one (no padded-rows copy). Masked slots add 0 (they share key Lk - 1)."""
    Lq, (nqb, bq) = target.shape[2], src.shape[2:4]
    full = min(nqb, Lq // bq)
    if full:
        target[:, :, :full * bq].unflatten(2, (full, bq)).scatter_add_(
            -1, idx[:, :, :full].expand(-1, -1, -1, bq, -1), src[:, :, :full])
    rest = Lq - full * bq
    if rest:
        target[:, :, full * bq:].scatter_add_(-1, idx[:, :, full].expand(-1, -1, rest, -1), src[:, :, full, :rest])
    return target


def _gather_bias(bias, pos_c, Lq, nqb, bq):
    """The caller's bias (a view ``[B|1, H|1, Lq|1, Lk|1]``) at each (head, query block, row,
    slot), broadcastable to ``[B, H, nqb, bq, M]``: advanced indexing, whose gradient
    accumulates into the bias' own shape (a gather from the expanded bias would allocate a
    dense ``[B, H, Lq, Lk]`` gradient)."""
    b1, h1, q1, k1 = bias.shape
    dev = bias.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    bi = torch.arange(b1, device=dev).view(-1, 1, 1, 1, 1) if b1 > 1 else zero
    hi = torch.arange(h1, device=dev).view(1, -1, 1, 1, 1) if h1 > 1 else zero
    ri = torch.arange(nqb * bq, device=dev).clamp_(max=Lq - 1).view(1, 1, nqb, bq, 1) if q1 > 1 else zero
    ki = pos_c[:, :, :, None, :] if k1 > 1 else zero
    return bias[bi, hi, ri, ki]  # 0-d for a [1, 1, 1, 1] bias: it broadcasts all the same
