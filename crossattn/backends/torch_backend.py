"""The ``torch`` backend: memory-bounded attention in plain PyTorch, for every device.

Queries are processed in chunks so that at most one chunk of the score matrix exists at a
time; the backward recomputes each chunk from the saved row max and row sum (FlashAttention-2
style), so memory stays bounded in training too -- Lk = 100 000 audio frames fit. The logits
are computed by the same code in forward and backward, so both see identical bits.

Grouped-query heads are served without copying ``k``/``v``: the query heads of a group are
stacked along the rows (``[B, Hkv, G * rows, D]``) and multiply their shared key head.

The chunk size follows ``CROSSATTN_TORCH_CHUNK_MB`` (default 128): the budget for the
per-chunk temporaries of the forward and backward.

Two faster paths serve the common cases, with the same semantics (issue 20: the torch
backend must be at least as fast as the code users would otherwise write):

* no weights, no statistics, no dropout, bias, causality or pruning, below float64: PyTorch's
  own ``scaled_dot_product_attention`` (a fused kernel with its own backward), with rows that
  attend to nothing patched to 0 afterwards;
* weights ``"full"`` of every head, or ``P`` small enough to keep (no statistics, no bias):
  ``_torch_saved_p`` saves ``P`` (the caller holds it anyway) and the dropped-out ``PD`` and
  reuses them in the backward instead of recomputing the logits; float32 on a CPU runs the
  softmax + dropout and the softmax backward as one-pass compiled kernels
  (:mod:`crossattn._cpu_kernels`).

On CPU tensors every path skips the keys past each row's last valid key, the query rows
past its last valid query and the keys above the causal diagonal: ``_torch_skip`` runs the
call by parts at their real lengths (issue 16); a pruned call runs over the kept key blocks
only (``_torch_pruned``) where that is less work and its temporaries fit a few chunk budgets.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .._validation import AttentionProblem
from ..reference import AuxOutput, compute_dtype, select_blocks_reference
from . import _torch_pruned, _torch_skip
from ._torch_common import (
    _Config,
    _drop,
    _dropout_scale,
    _grouped,
    _head_mean,
    _pair_mask,
    _ungrouped,
    chunk_budget,
    chunk_rows,
)
from ._torch_saved_p import _SavedPAttention
from .base import Backend

# Without returned weights, P is saved for the backward while it takes at most this many
# chunk budgets (512 MiB by default); beyond that the backward recomputes it by chunks.
_SAVED_P_CHUNKS = 4


class _Chunk:
    """What forward and backward both recompute for query rows ``sl``."""

    def __init__(self, q, k, temperature, bias, key_valid, query_valid, block_mask, cfg, sl, ct):
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        self.rows = torch.arange(cfg.row0 + sl.start, cfg.row0 + sl.stop, device=q.device)
        self.qc = q[:, :, sl].to(ct)
        coef = cfg.scale if temperature is None else cfg.scale / temperature.to(ct).reshape(1, -1, 1, 1)
        self.coef = coef
        s_qk = _ungrouped(_grouped(self.qc, k.shape[1]) @ k.to(ct).transpose(-1, -2), H)
        self.s_qk = s_qk * coef  # q.k * scale / temperature (the temperature gradient needs it)
        s = self.s_qk if bias is None else self.s_qk + (bias if bias.shape[2] == 1 else bias[:, :, sl]).to(ct)
        mask = _pair_mask(B, Lk, key_valid, query_valid, block_mask, cfg, self.rows, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        self.s = s  # -inf where not attended


class _ChunkedAttention(torch.autograd.Function):
    """(q, k, v, temperature, bias) -> (out, weights, lse, entropy, key_mass, top-k values,
    top-k indices); an output not requested is an empty tensor."""

    @staticmethod
    def forward(ctx, q, k, v, temperature, bias, key_valid, query_valid, block_mask, seed, cfg):
        B, H, Lq, _ = q.shape
        Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
        ct = compute_dtype(q.dtype)
        aux = cfg.aux
        vc = v.to(ct)
        out = q.new_empty(B, H, Lq, Dv)
        m_all = torch.empty(B, H, Lq, 1, dtype=ct, device=q.device)  # row max (+inf: empty row)
        lnl_all = torch.empty(B, H, Lq, 1, dtype=ct, device=q.device)  # log of the row sum
        weights = _new_weights(q, cfg, Lk)
        ent = torch.zeros(B, H, Lq, dtype=ct, device=q.device) if aux and aux.entropy else q.new_empty(0)
        mass = torch.zeros(B, H, Lk, dtype=ct, device=q.device) if aux and aux.key_mass else q.new_empty(0)
        kk = aux.top_k if aux else 0
        top_v = q.new_zeros(B, H, Lq, kk) if kk else q.new_empty(0)
        top_i = torch.full((B, H, Lq, kk), -1, dtype=torch.int64, device=q.device) if kk else q.new_empty(0)
        rows = chunk_rows(B, H, Lq, Lk, ct, cfg.dropout_p > 0)
        for r0 in range(0, Lq, rows):
            sl = slice(r0, min(Lq, r0 + rows))
            c = _Chunk(q, k, temperature, bias, key_valid, query_valid, block_mask, cfg, sl, ct)
            s = c.s
            m = s.amax(-1, keepdim=True) if Lk else s.new_full(s.shape[:3] + (1,), -math.inf)
            empty = m == -math.inf  # no attended key (masks, causality, pruning, -inf bias)
            p = torch.exp(s - m.masked_fill(empty, 0.0))
            l = p.sum(-1, keepdim=True)
            p /= l.masked_fill(empty, 1.0)
            # Kept apart (not as lse = m + log l) so that P = exp((s - m) - log l) stays exact
            # where s is near a huge m (identical keys at logit 1e4: lse rounds, s - m does not).
            m_all[:, :, sl] = m.masked_fill(empty, math.inf)
            lnl_all[:, :, sl] = torch.log(l).masked_fill(empty, 0.0)
            if ent.numel():
                attended = s > -math.inf
                shifted = torch.where(attended, s - m.masked_fill(empty, 0.0), 0.0)
                e = torch.log(l.masked_fill(empty, 1.0)).squeeze(-1) - (p * shifted).sum(-1)
                ent[:, :, sl] = e.masked_fill(empty.squeeze(-1), 0.0)
            if mass.numel():
                mass += p.sum(2)
            if kk:
                top_v[:, :, sl], top_i[:, :, sl] = _top_k(p, s, kk, q.dtype)
            drop = _drop(seed, cfg, B, H, c.rows, Lk, q.device)
            pd = p if drop is None else p.masked_fill(drop, 0.0)
            o = _ungrouped(_grouped(pd, Hkv) @ vc, H)
            out[:, :, sl] = o if drop is None else o * _dropout_scale(cfg.dropout_p)  # on the small side
            pw = p if cfg.weight_heads is None else p[:, list(cfg.weight_heads)]
            if cfg.need_weights == "full":
                weights[:, :, sl] = pw
            elif cfg.need_weights == "mean":
                weights[:, sl] = _head_mean(pw)
        lse = q.new_empty(0)
        if aux and aux.lse:
            lse = torch.where(m_all == math.inf, -math.inf, m_all + lnl_all).squeeze(-1)
        ctx.save_for_backward(q, k, v, temperature, bias, key_valid, query_valid, block_mask, m_all, lnl_all,
                              seed)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(top_v, top_i)
        return out, weights, lse, ent, mass, top_v, top_i

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_weights, d_lse, d_ent, d_mass, _dv, _di):
        q, k, v, temperature, bias, key_valid, query_valid, block_mask, m_all, lnl_all, seed = ctx.saved_tensors
        cfg = ctx.cfg
        B, H, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        ct = compute_dtype(q.dtype)
        kc, vc = k.to(ct), v.to(ct)
        dq = torch.zeros_like(q, dtype=ct)
        dk = torch.zeros_like(k, dtype=ct)
        dv = torch.zeros_like(v, dtype=ct)
        dt = None if temperature is None else torch.zeros(H, dtype=ct, device=q.device)
        want_dbias = bias is not None and ctx.needs_input_grad[4]
        dbias = torch.zeros(bias.shape, dtype=ct, device=q.device) if want_dbias else None
        heads = list(range(H)) if cfg.weight_heads is None else list(cfg.weight_heads)
        want_dw = cfg.need_weights is not None and d_weights is not None and d_weights.numel() > 0
        use = [g is not None and g.numel() > 0 for g in (d_lse, d_ent, d_mass)]
        rows = chunk_rows(B, H, Lq, Lk, ct, cfg.dropout_p > 0)
        for r0 in range(0, Lq, rows):
            sl = slice(r0, min(Lq, r0 + rows))
            c = _Chunk(q, k, temperature, bias, key_valid, query_valid, block_mask, cfg, sl, ct)
            logp = c.s - m_all[:, :, sl] - lnl_all[:, :, sl]  # -inf where not attended / empty row
            p = torch.exp(logp)
            do = d_out[:, :, sl].to(ct)
            drop = _drop(seed, cfg, B, H, c.rows, Lk, q.device)
            if drop is not None:
                do = do * _dropout_scale(cfg.dropout_p)  # the 1/(1-p) of dP and dV, on the small side
            dp = _ungrouped(_grouped(do, Hkv) @ vc.transpose(-1, -2), H)
            pd = p
            if drop is not None:
                dp.masked_fill_(drop, 0.0)
                pd = p.masked_fill(drop, 0.0)
            if want_dw:
                dw = d_weights[:, :, sl] if cfg.need_weights == "full" else d_weights[:, None, sl] / len(heads)
                dp[:, heads] += dw.to(ct)
            if use[2]:  # key_mass_j = sum_i P_ij
                dp = dp + d_mass[:, :, None, :].to(ct)
            if use[1]:  # d entropy / d P_ij = -(log P_ij + 1); the 1 cancels in the softmax
                dp = dp - d_ent[:, :, sl, None].to(ct) * torch.where(p > 0, logp, 0.0)
            ds = torch._softmax_backward_data(dp, p, -1, ct)  # P * (dP - rowsum(P * dP))
            if use[0]:  # d lse / d logits = P
                ds = ds + p * d_lse[:, :, sl, None].to(ct)
            dv += _grouped(pd, Hkv).transpose(-1, -2) @ _grouped(do, Hkv)
            if dt is not None:
                # logits = q.k * scale / T  =>  d logits / dT = -logits / T
                dt -= (ds * c.s_qk).sum((0, 2, 3)) * (1.0 / temperature.to(ct)).reshape(-1).expand(H)
            if dbias is not None:
                red = tuple(d for d in (0, 1, 3) if bias.shape[d] == 1)
                g = ds.sum(red, keepdim=True) if red else ds
                if bias.shape[2] == 1:
                    dbias += g.sum(2, keepdim=True)
                else:
                    dbias[:, :, sl] += g
            ds = _grouped(ds * c.coef, Hkv)
            dq[:, :, sl] = _ungrouped(ds @ kc, H)
            dk += ds.transpose(-1, -2) @ _grouped(c.qc, Hkv)
        d_temp = None
        if temperature is not None and ctx.needs_input_grad[3]:
            d_temp = dt.sum().reshape(temperature.shape) if temperature.numel() == 1 else dt
            d_temp = d_temp.to(temperature.dtype)
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_temp,
            None if dbias is None else dbias.to(bias.dtype), None, None, None, None, None,
        )


def _pruned_core(p: AttentionProblem, block_mask: torch.Tensor, m: int):
    """The core of ``_torch_pruned``'s gathered problem: the saved-P Function where the whole
    problem could take it (no statistics, bias or head subset) and the gathered ``P`` fits its
    budget -- the pairs that attend as an element mask (a block mask of 1 x 1 blocks) --, else
    the chunked Function with the masks as ``-inf`` in a bias."""
    B, H, _, _, _, _ = p.dims
    saves_p = _saves_p(p, B * H * block_mask.shape[2] * p.pruning.block_q * m * p.pruning.block_k)

    def core(q, k, v, temperature, bias, ok, cfg):
        if saves_p:
            train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, temperature))
            out, weights = _SavedPAttention.apply(q, k, v, temperature, None, None, ok, p.dropout_seed,
                                                  cfg._replace(block_q=1, block_k=1), train)
            none = q.new_empty(0)
            return out, weights, none, none, none, none, none
        bias = _torch_pruned.filled_bias(bias, ok, H, compute_dtype(q.dtype))
        return _ChunkedAttention.apply(q, k, v, temperature, bias, None, None, None, p.dropout_seed, cfg)
    return core


def _top_k(p, s, k, dtype):
    """The ``k`` largest weights of each row and their key positions, ties to the lower index;
    value 0 and index -1 past the row's attended keys."""
    ranked = p.masked_fill(s == -math.inf, -1.0)
    if ranked.shape[-1] < k:
        ranked = torch.nn.functional.pad(ranked, (0, k - ranked.shape[-1]), value=-1.0)
    # Not a full sort of each row (it cost 6x the attention at Lk = 1000): torch.topk gives the
    # k-th largest value but breaks ties arbitrarily, so keep everything above it and the
    # lowest-index entries equal to it, then order those k by value, ties by index.
    kth = ranked.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = ranked > kth
    tie = ranked == kth
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    keep = above | (tie & (tie.cumsum(-1, dtype=torch.int32) <= need))
    L = ranked.shape[-1]
    later_lower = torch.arange(L, 0, -1, dtype=torch.int32, device=p.device)  # larger for lower index
    idx = torch.where(keep, later_lower, 0).topk(k, dim=-1).indices.sort(-1).values  # the k kept, by index
    values, order = ranked.gather(-1, idx).sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, order)
    none = values < 0
    return values.masked_fill(none, 0.0).to(dtype), idx.masked_fill(none, -1)


def _new_weights(q, cfg, lk):
    B, H, Lq, _ = q.shape
    nh = H if cfg.weight_heads is None else len(cfg.weight_heads)
    if cfg.need_weights == "full":
        return q.new_empty(B, nh, Lq, lk)
    if cfg.need_weights == "mean":
        return q.new_empty(B, Lq, lk)
    return q.new_empty(0)


def _saves_p(p: AttentionProblem, scores: int | None = None) -> bool:
    """The saved-P path: weights "full" (``P`` is returned anyway), or ``P`` and (with dropout)
    the dropped-out ``PD`` fit in ``_SAVED_P_CHUNKS`` chunk budgets (long keys keep the recomputing
    path). ``scores``: the size of ``P`` (default ``B * H * Lq * Lk``; a pruned call's gathered one)."""
    if p.aux is not None or p.attn_bias is not None or p.weight_heads is not None:
        return False
    if p.need_weights == "full":
        return True
    if scores is None:
        B, H, Lq, Lk, _, _ = p.dims
        scores = B * H * Lq * Lk
    per_score = p.q.element_size() * (2 if p.dropout_p > 0 else 1)  # P and the dropped-out PD
    return scores * per_score <= _SAVED_P_CHUNKS * chunk_budget()


# SDPA's enable_gqa came with torch 2.5; older torch serves grouped heads on the chunked path.
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): elsewhere oneDNN
    emulates bfloat16 matrix products at a fraction of float32's rate."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _sdpa_serves(p: AttentionProblem) -> bool:
    """Where SDPA computes exactly what the contract asks (float64 keeps the exact path) and
    is the faster choice. On a CPU its half-precision flash kernel (float32 inside) runs at
    ~0.6-0.7x the saved-P path's matmuls where those are fast: float16 (multiplied in float32
    there; 34 vs 21 ms at B=2 H=8 256x1000 D=96, one thread) and bfloat16 on a CPU that
    multiplies it natively (18.5 vs 13.6 ms, AVX512-BF16) take the saved-P path wherever ``P``
    fits it. Without native bfloat16 (AVX2) its emulated products ran the seed layer's forward
    at 0.39x SDPA, so bfloat16 keeps SDPA there."""
    B, H, Lq, Lk, _, _ = p.dims
    if (p.q.device.type == "cpu" and (p.q.dtype == torch.float16 or (
            p.q.dtype == torch.bfloat16 and _cpu_multiplies_bf16())) and _saves_p(p)):
        return False
    return (p.need_weights is None and p.aux is None and p.dropout_p == 0.0 and p.pruning is None
            and p.attn_bias is None and not p.is_causal and p.q.dtype != torch.float64
            and min(B, H, Lq, Lk) > 0 and (p.kv_heads == H or _SDPA_GQA))


def _sdpa_core(p: AttentionProblem):
    """SDPA on one part of ``p`` (``_torch_skip``'s core): a problem of the part's tensors."""
    def core(q, k, v, bias, kv, qv, bm, cfg):
        part = dataclasses.replace(p, q=q, k=k, v=v, kv_lengths=None, key_padding_mask=None if kv is None else ~kv,
                                   query_padding_mask=None if qv is None else ~qv[:, cfg.row0:cfg.row0 + q.shape[2]])
        return _sdpa_attention(part), None, None, None, None, None, None
    return core


def _sdpa_attention(p: AttentionProblem) -> torch.Tensor:
    B, H, Lq, Lk, _, _ = p.dims
    q, scale = p.q, p.scale
    if isinstance(p.temperature, torch.Tensor):  # per-head factor on q; autograd reaches T
        q = q * (p.scale / p.temperature.to(compute_dtype(q.dtype))).reshape(1, -1, 1, 1).to(q.dtype)
        scale = 1.0
    elif p.temperature is not None:
        scale = p.scale / p.temperature
    key_valid, query_valid = p.key_valid(), p.query_valid()
    mask = row_ok = None
    if key_valid is not None:
        # A batch with no valid key attends to all of them here (no NaN, no NaN gradient);
        # its rows are zeroed below, so their output and gradients are exactly 0.
        has_key = key_valid.any(-1)
        mask = (key_valid | ~has_key[:, None])[:, None, None, :]
        row_ok = has_key[:, None, None, None]
    if query_valid is not None:
        qv = query_valid[:, None, :, None]
        row_ok = qv if row_ok is None else row_ok & qv
    gqa = {"enable_gqa": True} if p.kv_heads != H else {}
    out = torch.nn.functional.scaled_dot_product_attention(q, p.k, p.v, attn_mask=mask, scale=scale, **gqa)
    return out if row_ok is None else out.masked_fill(~row_ok, 0.0)


class TorchBackend(Backend):
    name = "torch"

    def unavailable(self) -> str | None:
        return None

    def unsupported(self, problem: AttentionProblem) -> str | None:
        return None

    def attention(self, problem: AttentionProblem):
        p = problem
        key_valid, query_valid = p.key_valid(), p.query_valid()
        parts = _torch_skip.plan(p, key_valid, query_valid)  # None: run the whole at once
        if _sdpa_serves(p):
            if parts is None:
                return _sdpa_attention(p), None, None
            out = _torch_skip.run(p, parts, _sdpa_core(p), key_valid, query_valid, None, _Config(
                p.scale, 0, 0, 0.0, p.direction, None, None, False, None))[0]
            return out, None, None
        block_mask, block_q, block_k = None, 0, 0
        if p.pruning is not None:
            block_mask = select_blocks_reference(
                p.q, p.k, p.pruning, key_valid=key_valid, query_valid=query_valid,
                scale=p.scale, temperature=p.temperature, is_causal=p.is_causal,
            )
            block_q, block_k = p.pruning.block_q, p.pruning.block_k
        temp = p.temperature if isinstance(p.temperature, torch.Tensor) else None
        scale = p.scale if temp is not None or p.temperature is None else p.scale / p.temperature
        B, H, Lq, Lk, _, _ = p.dims
        cfg = _Config(scale, block_q, block_k, p.dropout_p, p.direction, p.need_weights, p.weight_heads,
                      p.is_causal, p.aux, causal_shift=Lk - Lq)
        saves_p = _saves_p(p)  # decided on the whole problem: parts share its memory budget

        def core(q, k, v, bias, kv, qv, bm, c):
            if saves_p:
                train = torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (q, k, v, temp))
                out, weights = _SavedPAttention.apply(q, k, v, temp, kv, qv, bm, p.dropout_seed, c, train)
                return out, weights, None, None, None, None, None
            return _ChunkedAttention.apply(q, k, v, temp, bias, kv, qv, bm, p.dropout_seed, c)

        m = None
        if block_mask is not None:
            dense_work = B * Lq * Lk if parts is None else sum(
                len(range(B)[pt.batch] if isinstance(pt.batch, slice) else pt.batch)
                * (pt.rows.stop - pt.rows.start) * pt.keys for pt in parts)
            m = _torch_pruned.worthwhile(p, block_mask, dense_work)
        if m is not None:  # the kept key blocks only
            res = _torch_pruned.run(p, cfg, block_mask, m, key_valid, query_valid, temp, _pruned_core(p, block_mask, m))
        elif parts is None:
            res = core(p.q, p.k, p.v, p.attn_bias, key_valid, query_valid, block_mask, cfg)
        else:
            res = _torch_skip.run(p, parts, core, key_valid, query_valid, block_mask, cfg)
        out, weights, lse, ent, mass, top_v, top_i = res
        aux = None
        if p.aux is not None:
            aux = AuxOutput(
                lse if p.aux.lse else None, ent if p.aux.entropy else None,
                mass if p.aux.key_mass else None,
                top_v if p.aux.top_k else None, top_i if p.aux.top_k else None,
            )
        return out, (weights if p.need_weights else None), aux
