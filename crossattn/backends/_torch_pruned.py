"""The torch backend's pruned attention over the kept key blocks only (contract: pruned key
blocks cost no matrix work).

On CPU tensors the block mask is on the host, so a pruned call becomes a dense problem of
the kept blocks: query block ``qb`` of head ``h`` is a head ``h * nqb + qb`` of its own whose
keys are the ``m`` key blocks it kept (``m`` = the most any query block kept; fewer are
padded with masked slots), gathered in ascending order so that top-k ties still go to the
lower key position. Padding, causality and the slots' validity travel as an additive
``-inf`` bias (per head and row: no ``[B, Lk]`` mask can say them), the caller's bias is
gathered into it, and the gathered keys and values of masked slots are zeroed (padding may
hold anything). ``_ChunkedAttention`` runs it; outputs scatter back to the caller's
coordinates (weights, key mass and top-k positions by the gathered key positions). The
matrix work is ``B * H * Lq * m * block_k`` instead of ``B * H * Lq * Lk``.

Dropout keeps the dense path: its Philox bits are drawn at the caller's (row, key)
coordinates, which the gathered problem does not have.
"""
from __future__ import annotations

import math

import torch

from .._validation import values_unreadable
from ..reference import compute_dtype
from ._torch_common import _head_mean


def worthwhile(p, block_mask) -> int | None:
    """``m`` (kept key blocks per query block, at most) where gathering saves matrix work on
    this problem, else None: the dense path runs it."""
    B, H, Lq, Lk, _, _ = p.dims
    if (p.q.device.type != "cpu" or p.dropout_p > 0.0 or min(B, H, Lq, Lk) == 0
            or any(values_unreadable(t) for t in (p.q, p.k, block_mask))):
        return None
    m = max(1, int(block_mask.sum(-1).max()))  # a host read: CPU tensors only
    return m if m * p.pruning.block_k < Lk else None


def run(p, cfg, block_mask, m, key_valid, query_valid, temp, core):
    """``core(q, k, v, temperature, bias, cfg)`` on the gathered problem (``_ChunkedAttention``);
    returns ``(out, weights, lse, entropy, key_mass, top-k values, top-k indices)`` of ``p``."""
    B, H, Lq, Lk, D, Dv = p.dims
    Hkv, bq, bk = p.kv_heads, p.pruning.block_q, p.pruning.block_k
    nqb, nkb = block_mask.shape[2], block_mask.shape[3]
    M, Lqp = m * bk, nqb * bq
    dev, ct = p.q.device, compute_dtype(p.q.dtype)

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

    # Keys and values of each (head, query block), without expanding grouped heads first.
    flat = ((torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(H, device=dev) // (H // Hkv))[..., None, None]
            * Lk + pos_c).reshape(-1)
    zero = ~key_ok.view(B, H * nqb, M, 1)
    kg = p.k.reshape(B * Hkv * Lk, D).index_select(0, flat).view(B, H * nqb, M, D).masked_fill(zero, 0.0)
    vg = p.v.reshape(B * Hkv * Lk, Dv).index_select(0, flat).view(B, H * nqb, M, Dv).masked_fill(zero, 0.0)
    qg = torch.nn.functional.pad(p.q, (0, 0, 0, Lqp - Lq)).reshape(B, H * nqb, bq, D)

    # Which (row, slot) pairs attend: the slot's key is valid, the row is a valid query, and
    # the key is on or below the causal diagonal; as an additive bias, with the caller's.
    rows = torch.arange(Lqp, device=dev).view(nqb, bq, 1)
    row_ok = rows < Lq
    if query_valid is not None:
        row_ok = row_ok & torch.nn.functional.pad(query_valid, (0, Lqp - Lq)).view(B, 1, nqb, bq, 1)
    ok = key_ok[:, :, :, None, :] & row_ok
    if p.is_causal:
        ok = ok & (pos[:, :, :, None, :] <= rows + (Lk - Lq))
    bias = torch.zeros(ok.shape, dtype=ct, device=dev).masked_fill_(~ok, -math.inf)
    if p.attn_bias is not None:
        bias = bias + _gather_bias(p.attn_bias, pos_c, B, H, Lq, nqb, bq).to(ct)

    heads = tuple(range(H)) if p.weight_heads is None else tuple(p.weight_heads)
    sub_heads = tuple(h * nqb + i for h in heads for i in range(nqb))
    sub_cfg = cfg._replace(
        block_q=0, block_k=0, is_causal=False, causal_shift=0, row0=0, batch_ids=None,
        need_weights="full" if p.need_weights else None,
        weight_heads=None if sub_heads == tuple(range(H * nqb)) else sub_heads,
    )
    if temp is not None and temp.numel() > 1:
        temp = temp.reshape(-1).repeat_interleave(nqb)  # per head -> per (head, query block)
    out, w, lse, ent, mass, top_v, top_i = core(qg, kg, vg, temp, bias.view(B, H * nqb, bq, M), sub_cfg)

    out = out.reshape(B, H, Lqp, Dv)[:, :, :Lq].contiguous()
    weights = out.new_empty(0)
    if p.need_weights:
        nh = len(heads)
        idx = pos_c[:, list(heads)][:, :, :, None, :].expand(B, nh, nqb, bq, M)
        full = torch.zeros(B, nh, nqb, bq, Lk, dtype=w.dtype, device=dev).scatter_add(
            -1, idx, w.view(B, nh, nqb, bq, M))  # masked slots add 0 (they share key Lk - 1)
        full = full.view(B, nh, Lqp, Lk)[:, :, :Lq]
        weights = full.contiguous() if p.need_weights == "full" else _head_mean(full)
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


def _gather_bias(bias, pos_c, B, H, Lq, nqb, bq):
    """The caller's bias (a view ``[B|1, H|1, Lq|1, Lk|1]``) at each (head, query block, row,
    slot): ``[B, H, nqb, bq, M]``, differentiable (its gradient sums back to the bias' shape)."""
    b = bias
    if b.shape[2] != 1:
        b = torch.nn.functional.pad(b, (0, 0, 0, nqb * bq - Lq))
        b = b.view(b.shape[0], b.shape[1], nqb, bq, b.shape[3])
    else:
        b = b.view(b.shape[0], b.shape[1], 1, 1, b.shape[3])
    M = pos_c.shape[-1]
    if b.shape[-1] == 1:
        return b.expand(B, H, nqb, bq, M)
    b = b.expand(B, H, nqb, bq, b.shape[-1])
    return b.gather(-1, pos_c[:, :, :, None, :].expand(B, H, nqb, bq, M))
