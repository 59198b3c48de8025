"""The executable contract: cross-attention in plain PyTorch.

Every backend computes what this module computes. It is written for clarity, not speed:
it materialises the full score matrix and relies on ordinary autograd, so it works for any
float dtype (float64 included) and ``torch.autograd.gradcheck`` runs through every output.
Half-precision inputs are computed in float32 and cast back.

Shape legend: ``B`` batch, ``H`` heads, ``Lq`` queries, ``Lk`` keys, ``D`` query/key head
dim, ``Dv`` value head dim.

Semantics:

* logits ``S = q @ k^T * scale / temperature`` (``scale`` defaults to ``1/sqrt(D)``;
  ``temperature`` is a float or a tensor ``[]``, ``[1]`` or ``[H]``);
* query ``i`` attends to key ``j`` iff key ``j`` is valid (``key_padding_mask`` /
  ``kv_lengths``), query ``i`` is valid (``query_padding_mask``) and the key block of ``j`` is
  kept for the query block of ``i`` (pruning);
* weights ``P`` are the softmax of ``S`` over the attended keys (0 elsewhere); a row that
  attends to nothing has weights 0 and output 0, and gradient 0 -- never NaN;
* dropout (``dropout_p > 0``) multiplies ``P`` by ``keep / (1 - p)`` before ``P @ v``, with the
  counter-based mask of :mod:`crossattn._philox`; returned weights are pre-dropout;
* ``need_weights="full"`` returns ``P`` ``[B, H, Lq, Lk]``, ``"mean"`` its head average
  ``[B, Lq, Lk]``, both in the dtype of ``q``;
* the per-row log-sum-exp of the attended logits is what kernels store; rows that attend
  to nothing store ``+inf`` so that ``exp(S - lse)`` is 0 there.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._philox import dropout_keep_mask, draw_dropout_seed
from .pruning import BlockPruning

__all__ = [
    "BidirectionalOutput",
    "attention_reference",
    "bidirectional_reference",
    "select_blocks_reference",
    "element_mask",
    "key_valid_mask",
]


class BidirectionalOutput(NamedTuple):
    """Result of a bidirectional call: ``out_x`` (x queries attend to y) and ``out_y``."""

    out_x: torch.Tensor
    out_y: torch.Tensor
    weights_xy: torch.Tensor | None
    weights_yx: torch.Tensor | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs are computed in float32; float32 and float64 in themselves."""
    return torch.promote_types(dtype, torch.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def key_valid_mask(key_padding_mask, kv_lengths, batch: int, lk: int, device) -> torch.Tensor | None:
    """Bool ``[B, Lk]``, True = the key can be attended, or None when every key is valid."""
    if key_padding_mask is not None:
        return ~key_padding_mask.to(device=device, dtype=torch.bool)
    if kv_lengths is not None:
        lengths = torch.as_tensor(kv_lengths, device=device).reshape(batch, 1)
        return torch.arange(lk, device=device).view(1, lk) < lengths
    return None


def temperature_factor(temperature, heads: int):
    """``1/temperature`` as a float or a ``[1, H|1, 1, 1]`` tensor (None when absent)."""
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature.reshape(1, -1, 1, 1)
    return 1.0 / float(temperature)


def as_pruning(prune) -> BlockPruning | None:
    if prune is None or isinstance(prune, BlockPruning):
        return prune
    return BlockPruning(block_mask=prune)


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    pruning: BlockPruning,
    *,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    scale: float | None = None,
    temperature=None,
) -> torch.Tensor:
    """Bool ``[B, H, ceil(Lq/block_q), ceil(Lk/block_k)]``: True = the key block is kept."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    nqb, nkb = pruning.num_blocks(Lq, Lk)
    if pruning.block_mask is not None:
        return pruning.block_mask.to(q.device).expand(B, H, nqb, nkb)
    ct = compute_dtype(q.dtype)
    scale = default_scale(D) if scale is None else scale
    q, k = q.detach().to(ct), k.detach().to(ct)

    def block_means(x, valid, length, block, nblocks):
        w = torch.ones(B, length, dtype=ct, device=x.device) if valid is None else valid.to(ct)
        pad = nblocks * block - length
        xs = torch.nn.functional.pad(x * w[:, None, :, None], (0, 0, 0, pad))
        sums = xs.reshape(B, H, nblocks, block, x.shape[-1]).sum(3)
        counts = torch.nn.functional.pad(w, (0, pad)).reshape(B, nblocks, block).sum(-1)
        return sums / counts.clamp(min=1)[:, None, :, None], counts > 0

    mean_q, qb_valid = block_means(q, query_valid, Lq, pruning.block_q, nqb)
    mean_k, kb_valid = block_means(k, key_valid, Lk, pruning.block_k, nkb)
    sb = mean_q @ mean_k.transpose(-1, -2) * scale
    inv_t = temperature_factor(temperature, H)
    if inv_t is not None:
        sb = sb * (inv_t.to(ct) if isinstance(inv_t, torch.Tensor) else inv_t)
    sb = sb.masked_fill(~kb_valid[:, None, None, :], -math.inf)
    n_valid = kb_valid.sum(-1).view(B, 1, 1)  # valid key blocks per batch

    sorted_sb, order = torch.sort(sb, dim=-1, descending=True, stable=True)
    if pruning.top_k is not None:
        n_keep = torch.full_like(n_valid, pruning.top_k)
    elif pruning.keep is not None:
        # The epsilon keeps ceil() exact where keep * n is an integer in decimal (0.3 * 10).
        n_keep = torch.ceil(pruning.keep * n_valid.double() - 1e-9).long()
    else:
        probs = torch.softmax(sorted_sb, dim=-1).nan_to_num(0.0)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better blocks
        n_keep = (before < pruning.mass).sum(-1)
    n_keep = torch.minimum(n_keep.clamp(min=pruning.min_blocks), n_valid)
    rank_kept = torch.arange(nkb, device=q.device).view(1, 1, 1, nkb) < n_keep.unsqueeze(-1)
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, rank_kept.expand_as(order))
    return keep & kb_valid[:, None, None, :] & qb_valid[:, None, :, None]


def element_mask(
    batch: int,
    lq: int,
    lk: int,
    *,
    key_valid: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    block_mask: torch.Tensor | None = None,
    block_q: int = 0,
    block_k: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Bool mask ``[B|1, H|1, R, Lk]`` of the (query, key) pairs that attend, for query rows
    ``rows`` (all ``lq`` rows when None); None when every pair attends."""
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if query_valid is not None:
        qv = query_valid if rows is None else query_valid[:, rows]
        qv = qv[:, None, :, None]
        mask = qv if mask is None else mask & qv
    if block_mask is not None:
        device = block_mask.device
        r = torch.arange(lq, device=device) if rows is None else rows.to(device)
        qi = (r // block_q)[:, None]
        kj = (torch.arange(lk, device=device) // block_k)[None, :]
        bm = block_mask[:, :, qi, kj]
        mask = bm if mask is None else mask & bm
    return mask


def logits(q, k, scale, inv_t):
    """``q @ k^T * scale / temperature``. Backends that recompute the logits in backward use
    this too, so that ``exp(s - lse)`` sees bit-identical ``s``."""
    s = q @ k.transpose(-1, -2) * scale
    return s if inv_t is None else s * inv_t


def _attend(q, k, v, mask, scale, inv_t, keep, dropout_p):
    """Core math on compute-dtype tensors. Returns (out, weights, lse)."""
    s = logits(q, k, scale, inv_t)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
        empty = ~mask.any(-1, keepdim=True)
        # Fully masked rows: softmax over zeros, then zeroed; no -inf - -inf anywhere.
        s = s.masked_fill(empty, 0.0)
        p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
        lse = torch.logsumexp(s, dim=-1).masked_fill(empty.squeeze(-1), math.inf)
    else:
        p = torch.softmax(s, dim=-1)
        lse = torch.logsumexp(s, dim=-1)
        if s.shape[-1] == 0:
            lse = torch.full_like(lse, math.inf)
    pd = p
    if keep is not None:
        pd = p * keep.to(p.dtype) * (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))
    return pd @ v, p, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    kv_lengths=None,
    query_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    temperature=None,
    dropout_p: float = 0.0,
    dropout_seed: int | torch.Tensor | None = None,
    need_weights=False,
    prune=None,
    direction: int = 0,
    return_lse: bool = False,
):
    """Reference cross-attention. Arguments as :func:`crossattn.cross_attention`, plus:

    Args:
        dropout_seed: Philox seed of the dropout mask, an int or 0-d int64 tensor (drawn with
            :func:`crossattn._philox.draw_dropout_seed` when None and ``dropout_p > 0``).
        direction: the dropout stream: 0 for one-direction and x->y, 1 for y->x.
        return_lse: also return the per-row log-sum-exp ``[B, H, Lq]`` (float32/float64).

    Returns:
        ``(out [B, H, Lq, Dv], weights or None)``, plus ``lse`` when ``return_lse``.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    ct = compute_dtype(q.dtype)
    scale = default_scale(D) if scale is None else float(scale)
    key_valid = key_valid_mask(key_padding_mask, kv_lengths, B, Lk, q.device)
    query_valid = None if query_padding_mask is None else ~query_padding_mask.to(q.device)
    pruning = as_pruning(prune)
    block_mask = None
    if pruning is not None:
        block_mask = select_blocks_reference(
            q, k, pruning, key_valid=key_valid, query_valid=query_valid,
            scale=scale, temperature=temperature,
        )
    mask = element_mask(
        B, Lq, Lk, key_valid=key_valid, query_valid=query_valid, block_mask=block_mask,
        block_q=pruning.block_q if pruning else 0, block_k=pruning.block_k if pruning else 0,
    )
    keep = None
    if dropout_p > 0.0:
        seed = draw_dropout_seed() if dropout_seed is None else dropout_seed
        keep = dropout_keep_mask(
            seed, dropout_p, batch=B, heads=H, rows=torch.arange(Lq), cols=Lk,
            direction=direction, device=q.device,
        )
    inv_t = temperature_factor(temperature, H)
    if isinstance(inv_t, torch.Tensor):
        inv_t = inv_t.to(ct)
    out, p, lse = _attend(q.to(ct), k.to(ct), v.to(ct), mask, scale, inv_t, keep, dropout_p)
    weights = None
    if need_weights == "full":
        weights = p.to(q.dtype)
    elif need_weights == "mean":
        weights = p.mean(1).to(q.dtype)
    result = (out.to(q.dtype), weights)
    return result + (lse,) if return_lse else result


def _per_direction(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} as a pair must have 2 entries (x->y, y->x), got {len(value)}")
        return tuple(value)
    return value, value


def bidirectional_reference(
    q_x, k_x, v_x, q_y, k_y, v_y, *,
    x_padding_mask=None, y_padding_mask=None,
    scale=None, temperature=None, dropout_p=0.0, dropout_seed=None,
    need_weights=False, prune=None,
) -> BidirectionalOutput:
    """Reference for :func:`crossattn.bidirectional_cross_attention`.

    ``out_x``: x queries attend to y keys/values; ``out_y``: y queries attend to x.
    ``scale``, ``temperature`` and ``prune`` may be pairs ``(x->y, y->x)``. Both directions
    share one dropout seed and use Philox streams 0 (x->y) and 1 (y->x).
    """
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    scales = _per_direction(scale, "scale")
    temps = _per_direction(temperature, "temperature")
    prunes = _per_direction(prune, "prune")
    out_x, w_xy = attention_reference(
        q_x, k_y, v_y, key_padding_mask=y_padding_mask, query_padding_mask=x_padding_mask,
        scale=scales[0], temperature=temps[0], dropout_p=dropout_p, dropout_seed=dropout_seed,
        need_weights=need_weights, prune=prunes[0], direction=0,
    )
    out_y, w_yx = attention_reference(
        q_y, k_x, v_x, key_padding_mask=x_padding_mask, query_padding_mask=y_padding_mask,
        scale=scales[1], temperature=temps[1], dropout_p=dropout_p, dropout_seed=dropout_seed,
        need_weights=need_weights, prune=prunes[1], direction=1,
    )
    return BidirectionalOutput(out_x, out_y, w_xy, w_yx)
