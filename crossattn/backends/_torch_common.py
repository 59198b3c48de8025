"""Helpers shared by the torch backend's two autograd Functions (``torch_backend`` and
``_torch_saved_p``): chunk sizing, the per-direction config, grouped heads, masks, dropout."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .._philox import dropout_keep_mask
from ..reference import element_mask

_DEFAULT_CHUNK_MB = 128
# Per score element: ~7 compute-dtype temporaries in backward (s, s+bias, p, dp, ds, masks)
# plus the int64 Philox state (5 words) while a dropout mask is drawn.
_TEMPS = 7
_PHILOX_BYTES = 5 * 8


def chunk_budget() -> float:
    """Bytes for one chunk's temporaries (``CROSSATTN_TORCH_CHUNK_MB``, read at each call)."""
    return float(os.environ.get("CROSSATTN_TORCH_CHUNK_MB", _DEFAULT_CHUNK_MB)) * 2**20


def chunk_rows(batch: int, heads: int, lq: int, lk: int, dtype: torch.dtype, dropout: bool) -> int:
    """Query rows per chunk so that one chunk's temporaries fit the budget."""
    budget = chunk_budget()
    per_row = max(1, batch * heads * lk) * (
        _TEMPS * torch.finfo(dtype).bits // 8 + (_PHILOX_BYTES if dropout else 0)
    )
    return max(1, min(max(lq, 1), int(budget // per_row)))


class _Config(NamedTuple):
    """The non-tensor arguments of one direction."""

    scale: float
    block_q: int
    block_k: int
    dropout_p: float
    direction: int
    need_weights: str | None
    weight_heads: tuple[int, ...] | None
    is_causal: bool
    aux: object  # AuxRequest | None
    # Where a part of the problem sits in the whole (``_torch_skip`` runs ragged batches by
    # parts): its first query row, its batch rows (None: all, in order) and the causal
    # diagonal ``j <= i + causal_shift`` of the whole (Lk - Lq), so that masks and dropout
    # see the caller's coordinates.
    row0: int = 0
    batch_ids: tuple[int, ...] | None = None
    causal_shift: int = 0
    # ``_torch_pruned``'s gathered problem: rows -> its dropout mask (True = dropped), the
    # caller's Philox bits at the gathered coordinates.
    dropper: object = None


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, R, X]`` -> ``[B, Hkv, G * R, X]`` (query heads of a group stacked by rows)."""
    B, H, R, X = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads if kv_heads else 1) * R, X)  # H = Hkv = 0: no heads


def _ungrouped(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``_grouped``; ``x`` itself with one query head per key head (not a view: an
    autograd Function's output that is a view may not be modified in place)."""
    B, Hkv, GR, X = x.shape
    if Hkv == heads:
        return x
    return x.view(B, heads, GR * Hkv // heads if heads else GR, X)


def _pair_mask(batch, lk, key_valid, query_valid, block_mask, cfg, rows, device):
    """Bool ``[B|1, H|1, R, Lk]``: the (query, key) pairs that attend for query rows ``rows``
    (the whole problem's indices), or None when all do."""
    mask = element_mask(
        batch, 0, lk, key_valid=key_valid, query_valid=query_valid, block_mask=block_mask,
        block_q=cfg.block_q, block_k=cfg.block_k, rows=rows, device=device,
    )
    if cfg.is_causal:
        seen = (torch.arange(lk, device=device)[None, :] <= rows[:, None] + cfg.causal_shift)[None, None]
        mask = seen if mask is None else mask & seen
    return mask


def _batch_ids(cfg, device):
    return None if cfg.batch_ids is None else torch.tensor(cfg.batch_ids, dtype=torch.int64, device=device)


def _drop(seed, cfg, batch, heads, rows, lk, device):
    """Bool ``[B, H, rows, Lk]``, True where dropout drops (None without dropout)."""
    if cfg.dropout_p <= 0.0:
        return None
    if cfg.dropper is not None:
        return cfg.dropper(rows)
    return dropout_keep_mask(seed, cfg.dropout_p, batch=batch, heads=heads, rows=rows, cols=lk,
                             direction=cfg.direction, device=device, dropped=True,
                             batch_ids=_batch_ids(cfg, device))


def _dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def _coef(cfg, temperature, ct):
    """``scale / temperature``: a float, or ``[1, H, 1, 1]`` for a tensor temperature."""
    return cfg.scale if temperature is None else cfg.scale / temperature.to(ct).reshape(1, -1, 1, 1)


def _head_mean(w: torch.Tensor) -> torch.Tensor:
    """Mean over the heads (dim 1) of ``[B, H, L, S]``. Half precision accumulates in float32
    head by head: torch's mean would first convert all of ``w`` to float32 (a ``[B, H, L, S]``
    float32 temporary, twice the weights' own size, at the forward's peak)."""
    if w.dtype not in (torch.float16, torch.bfloat16) or w.shape[1] == 0:
        return w.mean(1)
    acc = w[:, 0].float()
    for h in range(1, w.shape[1]):
        acc += w[:, h]
    return acc.div_(w.shape[1]).to(w.dtype)
