"""The functional API: one- and two-direction cross-attention that can return its weights.

Shape legend:
    B: batch size            H: number of heads
    Lq: query length         Lk: key/value length (independent of Lq)
    D: query/key head dim    Dv: value head dim (may differ from D)
    Lx, Ly: lengths of the two modalities of a bidirectional call
"""
from __future__ import annotations

import torch

from . import backends
from ._philox import draw_dropout_seed
from ._validation import check_attention
from .reference import BidirectionalOutput, _per_direction, select_blocks_reference

__all__ = [
    "cross_attention",
    "bidirectional_cross_attention",
    "select_blocks",
    "choose_backend",
]


def cross_attention(
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
    need_weights=False,
    prune=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queries of one modality attend to keys/values of another.

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, H, Lk, D]`` keys.
        v: ``[B, H, Lk, Dv]`` values.
        key_padding_mask: bool ``[B, Lk]``, True = padding (the nn.MultiheadAttention
            convention; for a Hugging Face mask pass ``attention_mask == 0``).
        kv_lengths: int ``[B]`` (tensor or list): keys at positions ``>= length`` are padding.
            An alternative to ``key_padding_mask``; give at most one.
        query_padding_mask: bool ``[B, Lq]``, True = padding: those output and weight rows are 0.
        scale: multiplier of ``q . k``; default ``1/sqrt(D)``.
        temperature: None, a positive float, or a tensor ``[H]`` (or ``[]``, ``[1]``), e.g. a
            learnable parameter: logits are ``q . k * scale / temperature``. Differentiable.
        dropout_p: dropout probability on the weights before they multiply ``v``. Applied
            whenever > 0 (pass 0 in evaluation). Reproducible under ``torch.manual_seed``.
        need_weights: False, ``"full"`` for ``[B, H, Lq, Lk]`` or ``"mean"`` for the head
            average ``[B, Lq, Lk]``. Weights are the softmax probabilities before dropout,
            in the dtype of ``q``, and gradients flow through them.
        prune: None, a :class:`crossattn.BlockPruning`, or a bool block mask
            ``[B|1, H|1, ceil(Lq/64), ceil(Lk/64)]`` (True = keep).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; ``CROSSATTN_BACKEND``
            overrides ``"auto"``.

    Returns:
        ``(out [B, H, Lq, Dv], weights or None)``. A query row with no valid key (all keys
        padded, the query padded, or every key block pruned) gives output 0, weights 0 and
        gradient 0.

    Raises:
        TypeError, ValueError: bad input, naming the argument, the expected and the actual
            value.
        RuntimeError: an explicitly requested backend is not available here.
    """
    problem = check_attention(
        q, k, v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask, scale=scale, temperature=temperature,
        dropout_p=dropout_p, need_weights=need_weights, prune=prune,
    )
    choice = backends.choose([problem], backend)
    if problem.dropout_p > 0.0:
        problem.dropout_seed = draw_dropout_seed()
    return backends.BACKENDS[choice.name].attention(problem)


def _check_bidirectional(
    q_x, k_x, v_x, q_y, k_y, v_y, *, x_padding_mask, y_padding_mask,
    scale, temperature, dropout_p, need_weights, prune,
):
    scales = _per_direction(scale, "scale")
    temps = _per_direction(temperature, "temperature")
    prunes = _per_direction(prune, "prune")
    paired = [isinstance(a, (tuple, list)) for a in (scale, temperature, prune)]
    common = dict(dropout_p=dropout_p, need_weights=need_weights)
    xy = check_attention(
        q_x, k_y, v_y, key_padding_mask=y_padding_mask, query_padding_mask=x_padding_mask,
        scale=scales[0], temperature=temps[0], prune=prunes[0], **common,
        names=("q_x", "k_y", "v_y"),
        mask_names=("y_padding_mask", "kv_lengths", "x_padding_mask"),
        suffix=" (x->y)" if any(paired) else "", direction=0,
    )
    yx = check_attention(
        q_y, k_x, v_x, key_padding_mask=x_padding_mask, query_padding_mask=y_padding_mask,
        scale=scales[1], temperature=temps[1], prune=prunes[1], **common,
        names=("q_y", "k_x", "v_x"),
        mask_names=("x_padding_mask", "kv_lengths", "y_padding_mask"),
        suffix=" (y->x)" if any(paired) else "", direction=1,
    )
    # Each direction checked its own q against the other side's k/v; tie the sides together.
    if q_x.device != q_y.device:
        raise ValueError(f"q_y must be on the device of q_x ({q_x.device}), got {q_y.device}")
    if q_y.dtype != q_x.dtype:
        raise TypeError(f"q_y must have the dtype of q_x ({q_x.dtype}), got {q_y.dtype}")
    if k_x.shape[2] != q_x.shape[2]:
        raise ValueError(
            f"k_x must have as many positions as q_x (Lx = {q_x.shape[2]}), "
            f"got k_x of shape {list(k_x.shape)}"
        )
    if k_y.shape[2] != q_y.shape[2]:
        raise ValueError(
            f"k_y must have as many positions as q_y (Ly = {q_y.shape[2]}), "
            f"got k_y of shape {list(k_y.shape)}"
        )
    return xy, yx


def bidirectional_cross_attention(
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    q_y: torch.Tensor,
    k_y: torch.Tensor,
    v_y: torch.Tensor,
    *,
    x_padding_mask: torch.Tensor | None = None,
    y_padding_mask: torch.Tensor | None = None,
    scale=None,
    temperature=None,
    dropout_p: float = 0.0,
    need_weights=False,
    prune=None,
    backend: str = "auto",
) -> BidirectionalOutput:
    """Both directions of cross-attention between modalities x and y, in one call.

    x queries attend to y keys/values and y queries attend to x keys/values; on the GPU
    both directions run in one kernel launch.

    Args:
        q_x, k_x, v_x: ``[B, H, Lx, D]``, ``[B, H, Lx, D']``, ``[B, H, Lx, Dv']`` (x side).
        q_y, k_y, v_y: ``[B, H, Ly, D']``, ``[B, H, Ly, D]``, ``[B, H, Ly, Dv]`` (y side).
        x_padding_mask, y_padding_mask: bool ``[B, Lx]`` / ``[B, Ly]``, True = padding. A
            padded position is ignored as a key and gives zero rows as a query.
        scale, temperature, prune: as in :func:`cross_attention`; each may also be a pair
            ``(x->y, y->x)``.
        dropout_p, need_weights, backend: as in :func:`cross_attention`.

    Returns:
        ``BidirectionalOutput(out_x [B, H, Lx, Dv], out_y [B, H, Ly, Dv'], weights_xy
        [B, H, Lx, Ly] or [B, Lx, Ly] or None, weights_yx [B, H, Ly, Lx] or [B, Ly, Lx] or None)``.
    """
    xy, yx = _check_bidirectional(
        q_x, k_x, v_x, q_y, k_y, v_y, x_padding_mask=x_padding_mask,
        y_padding_mask=y_padding_mask, scale=scale, temperature=temperature,
        dropout_p=dropout_p, need_weights=need_weights, prune=prune,
    )
    choice = backends.choose([xy, yx], backend)
    if xy.dropout_p > 0.0:
        xy.dropout_seed = yx.dropout_seed = draw_dropout_seed()
    out_x, out_y, w_xy, w_yx = backends.BACKENDS[choice.name].bidirectional(xy, yx)
    return BidirectionalOutput(out_x, out_y, w_xy, w_yx)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    pruning,
    *,
    key_padding_mask: torch.Tensor | None = None,
    kv_lengths=None,
    query_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    temperature=None,
) -> torch.Tensor:
    """The block mask a pruning config chooses: bool ``[B, H, ceil(Lq/block_q),
    ceil(Lk/block_k)]``, True = the key block is attended by the query block.

    Arguments as in :func:`cross_attention` (``pruning`` is its ``prune``); the selection is
    not differentiable.
    """
    if pruning is None:
        raise TypeError("pruning must be a crossattn.BlockPruning or a bool block mask, got None")
    problem = check_attention(
        q, k, k, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask, scale=scale, temperature=temperature,
        prune=pruning, names=("q", "k", "k"),
    )
    return select_blocks_reference(
        problem.q, problem.k, problem.pruning, key_valid=problem.key_valid(),
        query_valid=problem.query_valid(), scale=problem.scale,
        temperature=problem.temperature,
    )


def choose_backend(q, k, v, *, backend: str = "auto", **kwargs) -> backends.BackendChoice:
    """Which backend :func:`cross_attention` would use for these arguments, and why each
    backend tried before it was rejected: ``BackendChoice(name, rejected={name: reason})``."""
    problem = check_attention(q, k, v, **kwargs)
    return backends.choose([problem], backend)

