"""The functional API: one- and two-direction cross-attention that can return its weights.

Shape legend:
    B: batch size            H: number of heads
    Hkv: key/value heads (grouped-query attention: H % Hkv == 0)
    Lq: query length         Lk: key/value length (independent of Lq)
    D: query/key head dim    Dv: value head dim (may differ from D)
    Lx, Ly: lengths of the two modalities of a bidirectional call
"""
from __future__ import annotations

import torch

from . import backends
from ._philox import draw_dropout_seed
from ._validation import check_attention
from .reference import AuxOutput, BidirectionalOutput, _per_direction, select_blocks_reference

__all__ = [
    "cross_attention",
    "bidirectional_cross_attention",
    "merge_attention",
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
    attn_bias: torch.Tensor | None = None,
    is_causal: bool = False,
    weight_heads=None,
    return_aux=None,
    backend: str = "auto",
):
    """Queries of one modality attend to keys/values of another.

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, Hkv, Lk, D]`` keys; ``Hkv`` divides ``H`` (grouped-query attention: query
            head ``h`` reads key/value head ``h // (H // Hkv)``, without copying ``k``/``v``).
        v: ``[B, Hkv, Lk, Dv]`` values.
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
        attn_bias: float tensor broadcastable to ``[B, H, Lq, Lk]`` (``[Lq, Lk]``,
            ``[B, 1, Lq, Lk]``, ``[1, H, 1, Lk]``, ...), added to the logits after scale and
            temperature; differentiable (a learned position bias trains through it). ``-inf``
            entries mask. Read with broadcast strides, never expanded in memory.
        is_causal: query ``i`` sees keys ``j <= i + (Lk - Lq)`` (bottom-right aligned, as
            FlashAttention: right for decoding with a cache).
        weight_heads: a sequence of query-head indices: the returned weights (``"full"``
            ``[B, len(heads), Lq, Lk]`` or their ``"mean"``) cover only those heads, computed
            for them alone (e.g. Whisper's alignment heads). Needs ``need_weights``.
        return_aux: a :class:`crossattn.AuxRequest`: statistics of the weights without the
            weight matrix (log-sum-exp, entropy, key mass, top-k); see :class:`AuxOutput`.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; ``CROSSATTN_BACKEND``
            overrides ``"auto"``.

    Returns:
        ``(out [B, H, Lq, Dv], weights or None)``, or ``(out, weights, AuxOutput)`` when
        ``return_aux`` is given. A query row with no valid key (all keys padded, the query
        padded, above the causal diagonal, every key block pruned, or an all ``-inf`` bias)
        gives output 0, weights 0 and gradient 0 (``lse`` ``-inf``, entropy 0).

    Raises:
        TypeError, ValueError: bad input, naming the argument, the expected and the actual
            value.
        RuntimeError: an explicitly requested backend is not available here.
    """
    problem = check_attention(
        q, k, v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask, scale=scale, temperature=temperature,
        dropout_p=dropout_p, need_weights=need_weights, prune=prune, attn_bias=attn_bias,
        is_causal=is_causal, weight_heads=weight_heads, return_aux=return_aux,
    )
    choice = backends.choose([problem], backend)
    if problem.dropout_p > 0.0:
        problem.dropout_seed = draw_dropout_seed()
    out, weights, aux = backends.BACKENDS[choice.name].attention(problem)
    if return_aux is None:
        return out, weights
    return out, weights, aux if aux is not None else AuxOutput()


def _check_bidirectional(
    q_x, k_x, v_x, q_y, k_y, v_y, *, x_padding_mask, y_padding_mask,
    scale, temperature, dropout_p, need_weights, prune, weight_heads=None, return_aux=None,
):
    scales = _per_direction(scale, "scale")
    temps = _per_direction(temperature, "temperature")
    prunes = _per_direction(prune, "prune")
    paired = [isinstance(a, (tuple, list)) for a in (scale, temperature, prune)]
    # One batch for both sides, checked first: the per-direction checks would otherwise judge
    # each padding mask against the other side's batch size.
    if (isinstance(q_x, torch.Tensor) and isinstance(q_y, torch.Tensor) and q_x.dim() == q_y.dim() == 4
            and q_y.shape[0] != q_x.shape[0]):
        raise ValueError(
            f"q_y must have the batch size of q_x (B = {q_x.shape[0]}: the two sides are one "
            f"batch of paired sequences), got q_y of shape {list(q_y.shape)}"
        )
    common = dict(dropout_p=dropout_p, need_weights=need_weights, weight_heads=weight_heads,
                  return_aux=return_aux)
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
    if q_y.shape[1] != q_x.shape[1]:
        raise ValueError(
            f"q_y must have as many heads as q_x (H = {q_x.shape[1]}: both directions share the "
            f"per-head temperature and one launch), got q_y of shape {list(q_y.shape)}"
        )
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
    weight_heads=None,
    return_aux=None,
    backend: str = "auto",
) -> BidirectionalOutput:
    """Both directions of cross-attention between modalities x and y, in one call.

    x queries attend to y keys/values and y queries attend to x keys/values; on the GPU
    both directions run in one kernel launch.

    Args:
        q_x, k_x, v_x: ``[B, H, Lx, D]``, ``[B, Hkv, Lx, D']``, ``[B, Hkv, Lx, Dv']`` (x side).
        q_y, k_y, v_y: ``[B, H, Ly, D']``, ``[B, Hkv', Ly, D]``, ``[B, Hkv', Ly, Dv]`` (y side);
            each side's key/value heads divide ``H`` (grouped-query attention).
        x_padding_mask, y_padding_mask: bool ``[B, Lx]`` / ``[B, Ly]``, True = padding. A
            padded position is ignored as a key and gives zero rows as a query.
        scale, temperature, prune: as in :func:`cross_attention`; each may also be a pair
            ``(x->y, y->x)``.
        dropout_p, need_weights, weight_heads, return_aux, backend: as in
            :func:`cross_attention` (``weight_heads`` applies to both directions).

    Returns:
        ``BidirectionalOutput(out_x [B, H, Lx, Dv], out_y [B, H, Ly, Dv'], weights_xy
        [B, H, Lx, Ly] or [B, Lx, Ly] or None, weights_yx [B, H, Ly, Lx] or [B, Ly, Lx] or None)``;
        with ``return_aux`` its attributes ``aux_xy`` and ``aux_yx`` hold the statistics.
    """
    xy, yx = _check_bidirectional(
        q_x, k_x, v_x, q_y, k_y, v_y, x_padding_mask=x_padding_mask,
        y_padding_mask=y_padding_mask, scale=scale, temperature=temperature,
        dropout_p=dropout_p, need_weights=need_weights, prune=prune, weight_heads=weight_heads,
        return_aux=return_aux,
    )
    choice = backends.choose([xy, yx], backend)
    if xy.dropout_p > 0.0:
        xy.dropout_seed = yx.dropout_seed = draw_dropout_seed()
    out_x, out_y, w_xy, w_yx, a_xy, a_yx = backends.BACKENDS[choice.name].bidirectional(xy, yx)
    if return_aux is not None:
        a_xy = a_xy if a_xy is not None else AuxOutput()
        a_yx = a_yx if a_yx is not None else AuxOutput()
    return BidirectionalOutput(out_x, out_y, w_xy, w_yx, a_xy, a_yx)


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
    is_causal: bool = False,
) -> torch.Tensor:
    """The block mask a pruning config chooses: bool ``[B, H, ceil(Lq/block_q),
    ceil(Lk/block_k)]``, True = the key block is attended by the query block.

    Arguments as in :func:`cross_attention` (``pruning`` is its ``prune``); the selection is
    not differentiable. With ``is_causal`` key blocks wholly above the diagonal are never
    candidates.
    """
    if pruning is None:
        raise TypeError("pruning must be a crossattn.BlockPruning or a bool block mask, got None")
    problem = check_attention(
        q, k, k, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask, scale=scale, temperature=temperature,
        prune=pruning, is_causal=is_causal, names=("q", "k", "k"), prune_name="pruning",
    )
    return select_blocks_reference(
        problem.q, problem.k, problem.pruning, key_valid=problem.key_valid(),
        query_valid=problem.query_valid(), scale=problem.scale,
        temperature=problem.temperature, is_causal=problem.is_causal,
    )


def choose_backend(q, k, v, *, backend: str = "auto", **kwargs) -> backends.BackendChoice:
    """Which backend :func:`cross_attention` would use for these arguments, and why each
    backend tried before it was rejected: ``BackendChoice(name, rejected={name: reason})``."""
    problem = check_attention(q, k, v, **kwargs)
    return backends.choose([problem], backend)



def merge_attention(outs, lses):
    """Merge attention results computed over disjoint chunks of the keys (context-parallel
    and ring attention): ``out = sum_c exp(lse_c - lse) * out_c`` with
    ``lse = logsumexp_c(lse_c)``.

    Args:
        outs: sequence of ``[B, H, Lq, Dv]`` outputs, one per key chunk.
        lses: sequence of ``[B, H, Lq]`` log-sum-exps of the same chunks (``-inf`` where a row
            saw no key in that chunk), e.g. ``AuxOutput.lse`` from ``return_aux=AuxRequest(lse=True)``.

    Returns:
        ``(out [B, H, Lq, Dv] in the dtype of outs[0], lse [B, H, Lq] float32/float64)``:
        what one call over all the keys returns; rows empty in every chunk give 0 and ``-inf``.
        Differentiable with respect to every output and log-sum-exp.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty sequences of the same length, got {len(outs)} "
                         f"and {len(lses)}")
    for i, (o, ls) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or not isinstance(ls, torch.Tensor):
            raise TypeError(f"outs[{i}] and lses[{i}] must be tensors, got {type(o).__name__} and "
                            f"{type(ls).__name__}")
        if o.dim() != 4 or tuple(ls.shape) != tuple(o.shape[:3]) or o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] must be [B, H, Lq, Dv] like outs[0] {list(outs[0].shape)} and "
                             f"lses[{i}] its [B, H, Lq]; got {list(o.shape)} and {list(ls.shape)}")
    ct = torch.promote_types(lses[0].dtype, torch.float32)
    stacked = torch.stack([ls.to(ct) for ls in lses])  # [C, B, H, Lq]
    lse = torch.logsumexp(stacked, dim=0)
    empty = lse == float("-inf")
    # exp(-inf - -inf) would be NaN on rows no chunk saw: those rows weigh nothing.
    w = torch.exp(stacked - lse.masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    out = sum(w_c[..., None] * o.to(ct) for w_c, o in zip(w, outs))
    return out.to(outs[0].dtype), lse
