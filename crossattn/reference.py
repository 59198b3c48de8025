"""The executable contract: cross-attention in plain PyTorch.

Every backend computes what this module computes. It is written for clarity, not speed:
it materialises the full score matrix and relies on ordinary autograd, so it works for any
float dtype (float64 included) and ``torch.autograd.gradcheck`` runs through every output.
Half-precision inputs are computed in float32 and cast back.

Shape legend: ``B`` batch, ``H`` heads, ``Lq`` queries, ``Lk`` keys, ``D`` query/key head
dim, ``Dv`` value head dim.

Semantics:

* ``k``/``v`` may have ``Hkv`` heads with ``H % Hkv == 0``: query head ``h`` reads key/value
  head ``h // (H // Hkv)`` (grouped-query attention);
* logits ``S = q @ k^T * scale / temperature + attn_bias`` (``scale`` defaults to
  ``1/sqrt(D)``; ``temperature`` is a float or a tensor ``[]``, ``[1]`` or ``[H]``; the bias
  broadcasts to ``[B, H, Lq, Lk]``);
* query ``i`` attends to key ``j`` iff key ``j`` is valid (``key_padding_mask`` /
  ``kv_lengths``), query ``i`` is valid (``query_padding_mask``), ``j <= i + (Lk - Lq)`` when
  ``is_causal`` (bottom-right aligned, as FlashAttention), the key block of ``j`` is kept for
  the query block of ``i`` (pruning) and ``S_ij > -inf`` (a ``-inf`` bias masks);
* weights ``P`` are the softmax of ``S`` over the attended keys (0 elsewhere); a row that
  attends to nothing has weights 0 and output 0, and gradient 0 -- never NaN;
* dropout (``dropout_p > 0``) multiplies ``P`` by ``keep / (1 - p)`` before ``P @ v``, with the
  counter-based mask of :mod:`crossattn._philox`; returned weights are pre-dropout;
* ``need_weights="full"`` returns ``P`` ``[B, H, Lq, Lk]``, ``"mean"`` its head average
  ``[B, Lq, Lk]``, both in the dtype of ``q``; ``weight_heads`` restricts both to those heads;
* ``return_aux`` statistics of ``P`` (pre-dropout): ``lse`` (``-inf`` on empty rows),
  ``entropy`` (0 on empty rows), ``key_mass`` (column sums over the queries) and the ``top_k``
  largest weights of each row with their key positions (value 0, index -1 past the row's
  valid keys; ties to the lower index);
* the per-row log-sum-exp of the attended logits is what kernels store; rows that attend
  to nothing store ``+inf`` so that ``exp(S - lse)`` is 0 there.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._philox import dropout_keep_mask, draw_dropout_seed
from .pruning import BlockPruning

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BidirectionalOutput",
    "attention_reference",
    "bidirectional_reference",
    "mass_threshold",
    "causal_block_reach",
    "select_blocks_reference",
    "element_mask",
    "key_valid_mask",
]


@dataclass(frozen=True)
class AuxRequest:
    """Which statistics of the attention weights to return (``return_aux=``), computed without
    materialising the weights on the fused backends.

    Args:
        lse: the log-sum-exp of each row's logits ``[B, H, Lq]`` (``-inf`` for an empty row).
        entropy: ``-sum_j P_ij log P_ij`` per row ``[B, H, Lq]`` (0 for an empty row).
        key_mass: ``sum_i P_ij`` over the valid queries ``[B, H, Lk]``: the attention each key
            receives.
        top_k: the ``top_k`` largest weights of each row and their key positions
            ``[B, H, Lq, top_k]`` (0 = none).
    """

    lse: bool = False
    entropy: bool = False
    key_mass: bool = False
    top_k: int = 0

    def __post_init__(self):
        def kind(x):  # numpy.bool, not a bare "bool" that reads like the expected type
            t = type(x)
            return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"

        for name in ("lse", "entropy", "key_mass"):
            value = getattr(self, name)
            if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
                object.__setattr__(self, name, bool(value))  # a NumPy bool is a bool
            elif not isinstance(value, bool):
                raise TypeError(f"AuxRequest: {name} must be a bool, got {kind(value)}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise TypeError(f"AuxRequest: top_k must be an int, got {kind(self.top_k)}")
        object.__setattr__(self, "top_k", int(self.top_k))  # numpy.int64 and the like
        if self.top_k < 0:
            raise ValueError(f"AuxRequest: top_k must be >= 0, got {self.top_k}")

    @property
    def any(self) -> bool:
        return self.lse or self.entropy or self.key_mass or self.top_k > 0


class AuxOutput(NamedTuple):
    """Statistics of the (pre-dropout) attention weights; each None unless requested.

    ``lse``, ``entropy`` ``[B, H, Lq]`` and ``key_mass`` ``[B, H, Lk]`` are float32 (float64
    for float64 inputs) and differentiable; ``top_k_values`` ``[B, H, Lq, k]`` has the dtype of
    ``q``, ``top_k_indices`` is int64 (-1 where a row has fewer than ``k`` valid keys).
    """

    lse: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    key_mass: torch.Tensor | None = None
    top_k_values: torch.Tensor | None = None
    top_k_indices: torch.Tensor | None = None


class _BidirectionalFields(NamedTuple):
    out_x: torch.Tensor
    out_y: torch.Tensor
    weights_xy: torch.Tensor | None
    weights_yx: torch.Tensor | None


class BidirectionalOutput(_BidirectionalFields):
    """Result of a bidirectional call: ``out_x`` (x queries attend to y) and ``out_y``, and
    their weights; a 4-tuple. With ``return_aux`` the statistics are the attributes ``aux_xy``
    and ``aux_yx`` (:class:`AuxOutput`; None otherwise)."""

    def __new__(cls, out_x, out_y, weights_xy=None, weights_yx=None, aux_xy=None, aux_yx=None):
        self = super().__new__(cls, out_x, out_y, weights_xy, weights_yx)
        self.aux_xy, self.aux_yx = aux_xy, aux_yx
        return self

    aux_xy = None  # defaults for instances made by _make / _replace
    aux_yx = None


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


def mass_threshold(mass: float) -> float:
    """``BlockPruning(mass=m)`` keeps a key block while the mass ranked before it is below this.
    A mass within 1e-6 of ``m`` has reached it (eight equal blocks of ten sum to
    0.7999999999999999, which must not keep a ninth for m = 0.8; float32 kernels round more);
    ``m = 1`` is reached only by every block, however small the tail."""
    return mass - 1e-6 if mass < 1.0 else math.inf


def as_pruning(prune) -> BlockPruning | None:
    if prune is None or isinstance(prune, BlockPruning):
        return prune
    return BlockPruning(block_mask=prune)


def causal_visible(lq: int, lk: int, device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[R, Lk]``: key ``j`` is visible to query ``i`` iff ``j <= i + (Lk - Lq)``."""
    r = torch.arange(lq, device=device) if rows is None else rows.to(device)
    return torch.arange(lk, device=device)[None, :] <= (r[:, None] + (lk - lq))


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` -> ``[B, H, L, D]``: query head ``h`` reads kv head ``h // (H // Hkv)``
    (the reference may copy; the backends index instead)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def causal_block_reach(query_valid, key_valid, batch: int, lq: int, lk: int, pruning, device):
    """``(last_q [B, nqb], first_k [B, nkb])`` int64: the last valid query row of each query
    block (-1 if none) and the first valid key of each key block (``Lk`` if none), for the
    causal candidacy of key blocks (device ops only: no host sync)."""
    nqb, nkb = pruning.num_blocks(lq, lk)

    def reach(valid, length, block, nblocks, fill, reduce):
        pos = torch.arange(length, device=device).expand(batch, length)
        if valid is not None:
            pos = torch.where(valid.to(device), pos, fill)
        pos = torch.nn.functional.pad(pos, (0, nblocks * block - length), value=fill)
        return reduce(pos.reshape(batch, nblocks, block), -1).values

    return (reach(query_valid, lq, pruning.block_q, nqb, -1, torch.max),
            reach(key_valid, lk, pruning.block_k, nkb, lk, torch.min))


def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    pruning: BlockPruning,
    *,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    scale: float | None = None,
    temperature=None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Bool ``[B, H, ceil(Lq/block_q), ceil(Lk/block_k)]``: True = the key block is kept.

    With ``is_causal`` a key block that no valid query of the query block may see (each of its
    valid keys above the diagonal of each valid query) is neither a candidate nor counted among
    the valid key blocks."""
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
        # where, not a product: padding may hold NaN or inf, and NaN * 0 is NaN
        xs = torch.nn.functional.pad(torch.where(w[:, None, :, None] > 0, x, 0.0), (0, 0, 0, pad))
        sums = xs.reshape(B, x.shape[1], nblocks, block, x.shape[-1]).sum(3)
        counts = torch.nn.functional.pad(w, (0, pad)).reshape(B, nblocks, block).sum(-1)
        return sums / counts.clamp(min=1)[:, None, :, None], counts > 0

    mean_q, qb_valid = block_means(q, query_valid, Lq, pruning.block_q, nqb)
    mean_k, kb_valid = block_means(k, key_valid, Lk, pruning.block_k, nkb)
    sb = mean_q @ repeat_kv(mean_k, H).transpose(-1, -2) * scale
    inv_t = temperature_factor(temperature, H)
    if inv_t is not None:
        sb = sb * (inv_t.to(ct) if isinstance(inv_t, torch.Tensor) else inv_t)
    candidate = kb_valid[:, None, None, :]  # [B, 1, 1|nqb, nkb]
    if is_causal:
        # A key block is a candidate when some valid query of the query block sees some valid
        # key of it: its first valid key <= the block's last valid query + (Lk - Lq).
        last_q, first_k = causal_block_reach(query_valid, key_valid, B, Lq, Lk, pruning, q.device)
        candidate = candidate & (first_k[:, None, None, :] <= last_q[:, None, :, None] + (Lk - Lq))
    sb = sb.masked_fill(~candidate, -math.inf)
    n_valid = candidate.sum(-1)  # candidate key blocks per (batch, query block)

    sorted_sb, order = torch.sort(sb, dim=-1, descending=True, stable=True)
    if pruning.top_k is not None:
        n_keep = torch.full_like(n_valid, pruning.top_k)
    elif pruning.keep is not None:
        # The epsilon keeps ceil() exact where keep * n is an integer in decimal (0.3 * 10).
        n_keep = torch.ceil(pruning.keep * n_valid.double() - 1e-9).long()
    else:
        wide = torch.float32 if sorted_sb.device.type == "mps" else torch.float64  # MPS has no float64
        probs = torch.softmax(sorted_sb.to(wide), dim=-1).nan_to_num(0.0)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the better blocks
        n_keep = (before < mass_threshold(pruning.mass)).sum(-1)
    n_keep = torch.minimum(n_keep.clamp(min=pruning.min_blocks), n_valid)
    rank_kept = torch.arange(nkb, device=q.device).view(1, 1, 1, nkb) < n_keep.unsqueeze(-1)
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, rank_kept.expand_as(order))
    return keep & candidate & qb_valid[:, None, :, None]


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
    is_causal: bool = False,
    device=None,
) -> torch.Tensor | None:
    """Bool mask ``[B|1, H|1, R, Lk]`` of the (query, key) pairs that attend, for query rows
    ``rows`` (all ``lq`` rows when None); None when every pair attends. (A ``-inf`` bias
    masks too; the callers handle it through the logits.)"""
    mask = None
    if is_causal:
        mask = causal_visible(lq, lk, device, rows)[None, None]
    if key_valid is not None:
        kv = key_valid[:, None, None, :]
        mask = kv if mask is None else mask & kv
    if query_valid is not None:
        qv = query_valid if rows is None else query_valid[:, rows]
        qv = qv[:, None, :, None]
        mask = qv if mask is None else mask & qv
    if block_mask is not None and block_q == block_k == 1 and block_mask.shape[3] == lk:
        bm = block_mask if rows is None else block_mask[:, :, rows.to(block_mask.device)]  # per element
        mask = bm if mask is None else mask & bm
    elif block_mask is not None:
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


def _attend(q, k, v, mask, scale, inv_t, keep, dropout_p, bias=None):
    """Core math on compute-dtype tensors. Returns (out, weights, lse, logits) with ``lse``
    +inf and logits 0 on rows that attend to nothing."""
    s = logits(q, k, scale, inv_t)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    # Rows with no attended key (masks, or a -inf bias): softmax over zeros, then zeroed; no
    # -inf - -inf anywhere, and no gradient reaches them.
    empty = (s == -math.inf).all(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty.squeeze(-1), math.inf)
    pd = p
    if keep is not None:
        pd = p * keep.to(p.dtype) * (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))
    return pd @ v, p, lse, s


def statistics_reference(p: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, request: AuxRequest,
                         out_dtype: torch.dtype) -> AuxOutput:
    """:class:`AuxOutput` from the weights ``p``, the masked logits ``s`` (``-inf`` where not
    attended, 0 on empty rows) and the row log-sum-exp (+inf on empty rows)."""
    empty = torch.isinf(lse) & (lse > 0)
    attended = s > -math.inf
    out = {}
    if request.lse:
        out["lse"] = lse.masked_fill(empty, -math.inf)
    if request.entropy:
        # H = lse - sum_j P_ij S_ij, written around the row max so that large logits cancel
        # exactly (lse - m is small).
        m = s.masked_fill(~attended, -math.inf).amax(-1, keepdim=True).masked_fill(empty[..., None], 0.0)
        shifted = (s - m).masked_fill(~attended, 0.0)
        ent = (lse - m.squeeze(-1)).masked_fill(empty, 0.0) - (p * shifted).sum(-1)
        out["entropy"] = ent.masked_fill(empty, 0.0)
    if request.key_mass:
        out["key_mass"] = p.sum(-2)
    if request.top_k:
        k = request.top_k
        B, H, Lq, Lk = p.shape
        ranked = p.detach().masked_fill(~attended | empty[..., None], -1.0)
        if Lk < k:
            ranked = torch.nn.functional.pad(ranked, (0, k - Lk), value=-1.0)
        values, idx = torch.sort(ranked, dim=-1, descending=True, stable=True)
        values, idx = values[..., :k], idx[..., :k]
        none = values < 0
        out["top_k_values"] = values.masked_fill(none, 0.0).to(out_dtype)
        out["top_k_indices"] = idx.masked_fill(none, -1)
    return AuxOutput(**out)


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
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    weight_heads=None,
    return_aux: AuxRequest | None = None,
    direction: int = 0,
    return_lse: bool = False,
):
    """Reference cross-attention. Arguments as :func:`crossattn.cross_attention`, plus:

    Args:
        dropout_seed: Philox seed of the dropout mask, an int or 0-d int64 tensor (drawn with
            :func:`crossattn._philox.draw_dropout_seed` when None and ``dropout_p > 0``).
        direction: the dropout stream: 0 for one-direction and x->y, 1 for y->x.
        return_lse: also return the per-row log-sum-exp ``[B, H, Lq]`` (float32/float64) in the
            kernels' convention (+inf on empty rows).

    Returns:
        ``(out [B, H, Lq, Dv], weights or None)``, then ``AuxOutput`` when ``return_aux`` is
        given, then ``lse`` when ``return_lse``.
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
            scale=scale, temperature=temperature, is_causal=is_causal,
        )
    mask = element_mask(
        B, Lq, Lk, key_valid=key_valid, query_valid=query_valid, block_mask=block_mask,
        block_q=pruning.block_q if pruning else 0, block_k=pruning.block_k if pruning else 0,
        is_causal=is_causal, device=q.device,
    )
    keep = None
    if dropout_p > 0.0:
        seed = draw_dropout_seed() if dropout_seed is None else dropout_seed
        keep = dropout_keep_mask(
            seed, dropout_p, batch=B, heads=H, rows=torch.arange(Lq), cols=Lk,
            direction=direction, device=q.device, compiled=False,  # the oracle keeps to torch ops
        )
    inv_t = temperature_factor(temperature, H)
    if isinstance(inv_t, torch.Tensor):
        inv_t = inv_t.to(ct)
    bias = None if attn_bias is None else attn_bias.to(ct)
    out, p, lse, s = _attend(q.to(ct), repeat_kv(k, H).to(ct), repeat_kv(v, H).to(ct), mask, scale,
                             inv_t, keep, dropout_p, bias)
    pw = p if weight_heads is None else p[:, list(weight_heads)]
    weights = None
    if need_weights == "full":
        weights = pw.to(q.dtype)
    elif need_weights == "mean":
        weights = pw.mean(1).to(q.dtype)
    result = (out.to(q.dtype), weights)
    if return_aux is not None:
        result += (statistics_reference(p, s, lse, return_aux, q.dtype),)
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
    need_weights=False, prune=None, weight_heads=None, return_aux=None,
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
    common = dict(dropout_p=dropout_p, dropout_seed=dropout_seed, need_weights=need_weights,
                  weight_heads=weight_heads, return_aux=return_aux)
    xy = attention_reference(
        q_x, k_y, v_y, key_padding_mask=y_padding_mask, query_padding_mask=x_padding_mask,
        scale=scales[0], temperature=temps[0], prune=prunes[0], direction=0, **common,
    )
    yx = attention_reference(
        q_y, k_x, v_x, key_padding_mask=x_padding_mask, query_padding_mask=y_padding_mask,
        scale=scales[1], temperature=temps[1], prune=prunes[1], direction=1, **common,
    )
    aux = (xy[2], yx[2]) if return_aux is not None else (None, None)
    return BidirectionalOutput(xy[0], yx[0], xy[1], yx[1], *aux)
