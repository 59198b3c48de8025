"""The torch backend's ragged and causal skipping (contract: key blocks past a row's last valid
key or above the causal diagonal cost no matrix work).

On CPU tensors the lengths are on the host, so a call is split into *parts* that each run the
ordinary attention on a dense sub-problem: the batch rows that share a (last valid query,
last valid key) pair run together, over their query and key prefixes only, and under
``is_causal`` each group runs by query chunks, each against the keys up to its diagonal.
Keys past the prefix are masked anyway (trailing padding, or invisible to every row of the
chunk), so each part computes exactly what the whole would for its rows; the rest of the
outputs is what a row or key with nothing to attend gets (output and weights 0, ``lse``
``-inf``, top-k index -1). Padding with holes in the middle stays masked inside its part:
only the trailing padding is cut.

Parts take their inputs through one ``_Take`` per tensor and put their outputs back through
one ``_Place`` per output, so the backward scatters each gradient once per tensor rather
than once per part. CUDA tensors never come here: their lengths would cost a host sync.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._validation import values_unreadable

# Causal query chunks: at least this many rows, at most _CAUSAL_CHUNKS of them per group
# (the work above the diagonal left inside the chunks is ~1/(2 * chunks) of the whole).
_CAUSAL_ROWS = 64
_CAUSAL_CHUNKS = 16


class Part(NamedTuple):
    """Batch rows (a slice, or a tuple of indices), query rows and a key prefix of one part."""

    batch: slice | tuple[int, ...]
    rows: slice
    keys: int


def _ends(valid: torch.Tensor | None, n: int, batch: int) -> list[int]:
    """Per batch row, one past its last True (0: none); ``n`` when ``valid`` is None."""
    if valid is None:
        return [n] * batch
    pos = torch.arange(1, n + 1, dtype=torch.int64, device=valid.device)
    return torch.where(valid, pos, 0).amax(-1).tolist()


def causal_chunk(lq: int) -> int:
    return max(_CAUSAL_ROWS, -(-lq // _CAUSAL_CHUNKS))


def plan(p, key_valid, query_valid) -> list[Part] | None:
    """The parts of ``p``, or None when nothing can be skipped or the lengths are not on the
    host (CUDA and meta tensors, tracing)."""
    B, _, Lq, Lk, _, _ = p.dims
    if (p.q.device.type != "cpu" or min(B, Lq, Lk) == 0
            or any(values_unreadable(t) for t in (p.q, key_valid, query_valid) if t is not None)):
        return None
    groups: dict[tuple[int, int], list[int]] = {}
    for b, ends in enumerate(zip(_ends(query_valid, Lq, B), _ends(key_valid, Lk, B))):
        groups.setdefault(ends, []).append(b)
    shift = Lk - Lq  # query i sees keys j <= i + shift
    parts = []
    for (q_end, k_end), ids in groups.items():
        batch = slice(ids[0], ids[-1] + 1) if ids[-1] - ids[0] + 1 == len(ids) else tuple(ids)
        if not p.is_causal:
            if q_end and k_end:
                parts.append(Part(batch, slice(0, q_end), k_end))
            continue
        step = causal_chunk(Lq)
        for r0 in range(max(0, -shift), q_end, step):  # rows above see no key
            r1 = min(q_end, r0 + step)
            keys = min(k_end, r1 + shift)
            if keys > 0:
                parts.append(Part(batch, slice(r0, r1), keys))
    if parts == [Part(slice(0, B), slice(0, Lq), Lk)]:
        return None
    # Nothing attends anywhere: one 1 x 1 part, whose single pair is masked as in the whole,
    # keeps the outputs connected to the inputs (their gradients are 0, not missing).
    return parts or [Part(slice(0, 1), slice(0, 1), 1)]


def batch_ids(part: Part, batch: int) -> tuple[int, ...] | None:
    """The part's batch indices for the dropout stream (None: all rows, in order)."""
    if isinstance(part.batch, tuple):
        return part.batch
    return None if part.batch == slice(0, batch) else tuple(range(part.batch.start, part.batch.stop))


def _index(batch, device):
    return batch if isinstance(batch, slice) else torch.tensor(batch, dtype=torch.int64, device=device)


def _key(batch):
    return (batch.start, batch.stop) if isinstance(batch, slice) else batch  # slices hash from 3.12 only


class _Take(torch.autograd.Function):
    """``x`` -> one region per part: ``x[batch][rest]`` (``rest`` slices the other dims).
    Each batch selection is gathered once; the backward sums the parts' gradients (parts
    may share keys) into one tensor."""

    @staticmethod
    def forward(ctx, x, regions):
        ctx.set_materialize_grads(False)
        ctx.regions, ctx.shape, ctx.dtype = regions, x.shape, x.dtype
        taken = {}
        outs = []
        for batch, rest in regions:
            if _key(batch) not in taken:
                taken[_key(batch)] = x[_index(batch, x.device)]
            outs.append(taken[_key(batch)][(slice(None),) + rest])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        g = None
        per_batch = {}
        for (batch, rest), gp in zip(ctx.regions, grads):
            if gp is None:
                continue
            if g is None:
                g = gp.new_zeros(ctx.shape)
            if isinstance(batch, slice):
                g[batch][(slice(None),) + rest] += gp
            else:
                if batch not in per_batch:
                    per_batch[batch] = gp.new_zeros((len(batch),) + tuple(ctx.shape[1:]))
                per_batch[batch][(slice(None),) + rest] += gp
        for batch, gb in per_batch.items():
            g.index_put_((_index(batch, g.device),), gb, accumulate=True)
        return g, None


class _Place(torch.autograd.Function):
    """Parts' outputs -> one tensor of ``shape`` filled with ``fill`` elsewhere; with
    ``accumulate`` the parts add up (a key's mass over the query chunks)."""

    @staticmethod
    def forward(ctx, shape, fill, regions, accumulate, *parts):
        ctx.set_materialize_grads(False)
        ctx.regions = regions
        return place(shape, fill, regions, accumulate, parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        if g is None:
            return (None,) * (4 + len(ctx.regions))
        return (None, None, None, None, *(g[_index(b, g.device)][(slice(None),) + rest] for b, rest in ctx.regions))


def place(shape, fill, regions, accumulate, parts) -> torch.Tensor:
    full = parts[0].new_full(shape, fill)
    gathered = {}  # batch index tuple -> its rows (advanced indexing copies): written back once
    for (batch, rest), x in zip(regions, parts):
        if isinstance(batch, slice):
            rows = full[batch]
        else:
            rows = gathered.setdefault(batch, full[_index(batch, full.device)])
        view = rows[(slice(None),) + rest]
        view.add_(x) if accumulate else view.copy_(x)
    for batch, rows in gathered.items():
        full.index_copy_(0, _index(batch, full.device), rows)
    return full


def _bias_region(bias, part):
    """The part's region of a ``[B|1, H|1, Lq|1, Lk|1]`` bias (broadcast dims stay whole)."""
    b = part.batch if bias.shape[0] != 1 else slice(None)
    rows = part.rows if bias.shape[2] != 1 else slice(None)
    keys = slice(0, part.keys) if bias.shape[3] != 1 else slice(None)
    return b, (slice(None), rows, keys)


def run(p, parts, core, key_valid, query_valid, block_mask, cfg):
    """Run ``core(q, k, v, bias, key_valid, query_valid, block_mask, cfg)`` -- the torch
    backend's dense attention, returning (out, weights, lse, entropy, key_mass, top-k values,
    top-k indices), an output not computed being None or empty -- on every part, and
    assemble the whole problem's outputs."""
    B, H, Lq, Lk, _, Dv = p.dims
    qs = _Take.apply(p.q, [(pt.batch, (slice(None), pt.rows)) for pt in parts])
    kr = [(pt.batch, (slice(None), slice(0, pt.keys))) for pt in parts]
    ks, vs = _Take.apply(p.k, kr), _Take.apply(p.v, kr)
    biases = [None] * len(parts)
    if p.attn_bias is not None:
        biases = _Take.apply(p.attn_bias, [_bias_region(p.attn_bias, pt) for pt in parts])
    results = []
    for i, pt in enumerate(parts):
        idx = _index(pt.batch, p.q.device)
        kv = None if key_valid is None else key_valid[idx][:, :pt.keys]
        qv = None if query_valid is None else query_valid[idx]
        # With its trailing padding cut a part is mostly dense: no mask then (SDPA keeps its
        # unmasked kernel, the other paths skip the masking passes).
        kv = None if kv is None or bool(kv.all()) else kv
        qv = None if qv is None or bool(qv[:, pt.rows].all()) else qv
        bm = block_mask if block_mask is None or block_mask.shape[0] == 1 else block_mask[idx]
        sub_cfg = cfg._replace(row0=pt.rows.start, batch_ids=batch_ids(pt, B))
        results.append(core(qs[i], ks[i], vs[i], biases[i], kv, qv, bm, sub_cfg))
    outs = list(zip(*results))

    def put(j, shape, fill, rest, accumulate=False):
        xs = outs[j]
        if xs[0] is None or xs[0].numel() == 0:  # not requested
            return None
        regions = [(pt.batch, rest(pt)) for pt in parts]
        if xs[0].requires_grad or any(x.requires_grad for x in xs):
            return _Place.apply(shape, fill, regions, accumulate, *xs)
        return place(shape, fill, regions, accumulate, xs)

    rows = lambda pt: (slice(None), pt.rows)  # noqa: E731
    nh = H if cfg.weight_heads is None else len(cfg.weight_heads)
    wshape = (B, nh, Lq, Lk) if cfg.need_weights == "full" else (B, Lq, Lk)
    wrest = (lambda pt: (slice(None), pt.rows, slice(0, pt.keys))) if cfg.need_weights == "full" else (
        lambda pt: (pt.rows, slice(0, pt.keys)))
    kk = cfg.aux.top_k if cfg.aux else 0
    return (
        put(0, (B, H, Lq, Dv), 0.0, rows),
        put(1, wshape, 0.0, wrest) if cfg.need_weights else None,
        put(2, (B, H, Lq), -math.inf, rows),
        put(3, (B, H, Lq), 0.0, rows),
        put(4, (B, H, Lk), 0.0, lambda pt: (slice(None), slice(0, pt.keys)), accumulate=True),
        put(5, (B, H, Lq, kk), 0.0, rows),
        put(6, (B, H, Lq, kk), -1, rows),
    )
