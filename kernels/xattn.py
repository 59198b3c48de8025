"""The Triton backend's interface: launchers, torch custom ops and autograd.

Two ops carry one or two directions each (lists of length 1 or 2), so that a bidirectional
call is one launch per pass:

* ``crossattn::xattn_fwd`` -> (out, lse, weights) per direction: the forward kernel, then
  the weights kernel when weights are requested;
* ``crossattn::xattn_bwd`` -> (dq, dk, dv, dtemperature) per direction: delta, dK/dV and
  dQ kernels.

They are ``torch.library.custom_op`` with fake implementations and ``register_autograd``
(not ``triton_op``, which breaks opcheck and compile under the Triton interpreter), so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` see through them.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from crossattn._philox import dropout_threshold

from .xattn_bwd import _xattn_bwd_delta_kernel, _xattn_bwd_dkdv_kernel, _xattn_bwd_dq_kernel
from .xattn_fwd import _xattn_fwd_combine_kernel, _xattn_fwd_kernel, _xattn_weights_kernel
from .xattn_select import _grid, compact, select_blocks_triton

WEIGHTS_MODES = {None: 0, "full": 1, "mean": 2}
MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (block_m, block_n, num_warps, num_stages) by pass, element size and head-dim class, chosen
# from the compile survey (tests/_kernel_compile.py; table in benchmarks/README.md): ptxas's
# report for every launch a pass makes (forward, split-K combine, weights; backward delta,
# dK/dV, dQ), every option on and off. A pass uses one tile for all its kernels: the largest
# with which its worst kernel (backward: dQ with a loss on the weights, which keeps both
# directions' argument sets live) compiles without spills (Triton 3.9: sm_86 and sm_90, every
# dtype, D <= 128; Triton 3.6: sm_86 at D = 128 and sm_86/sm_90 at D = 64). The backward's
# 64 x 64 spilled 2.3 KB per thread, 32 x 32 still 60 B. fp32 multiplies in full precision
# (FMA "ieee" dots, no tensor cores) with its operands in registers: only 16-row tiles fit.
# Every entry fits 99 KB of shared memory per block (RTX 3060/4080 class).
_CONFIGS = {
    ("fwd", 2): {64: (64, 32, 8, 2), 128: (64, 32, 4, 2), 256: (64, 32, 8, 2)},
    ("fwd", 4): {64: (16, 16, 4, 1), 128: (16, 32, 8, 1), 256: (16, 16, 8, 1)},
    ("bwd", 2): {64: (16, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 1)},
    ("bwd", 4): {64: (16, 16, 8, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
}


def _config(d: int, dv: int, dtype: torch.dtype, kind: str) -> _Config:
    """The launch config of a pass ("fwd": forward, combine, weights; "bwd": backward). One
    config per class, no autotuning (the interpreter breaks on several configs)."""
    if _interpreting():
        return _Config(32, 32, 1, 1)
    widest = max(d, dv)
    table = _CONFIGS[(kind, dtype.itemsize if dtype.itemsize == 4 else 2)]
    cls = next(c for c in sorted(table) if widest <= c)
    return _Config(*table[cls])


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full precision unless torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), as torch.matmul does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------- launchers
def _dummy(device, dtype):
    return torch.empty(1, device=device, dtype=dtype)


def _flags(q_valid, k_valid, temperature):
    return (
        any(t is not None for t in q_valid),
        any(t is not None for t in k_valid),
        any(t is not None for t in temperature),
    )


def _prepare(q, k, q_valid, k_valid, temperature):
    has_qv, has_kv, has_t = _flags(q_valid, k_valid, temperature)
    device = q[0].device
    H = q[0].shape[1]
    dummy_u8 = _dummy(device, torch.uint8)

    def masks(given, tensors, present):
        if not present:
            return [dummy_u8 for _ in tensors]
        return [m.to(torch.uint8).contiguous() if m is not None
                else torch.ones(t.shape[0], t.shape[2], device=device, dtype=torch.uint8)
                for m, t in zip(given, tensors)]

    q_valid, k_valid = masks(q_valid, q, has_qv), masks(k_valid, k, has_kv)
    if has_t:
        temperature = [t.detach().to(torch.float32).expand(H).contiguous() if t is not None
                       else torch.ones(H, device=device, dtype=torch.float32) for t in temperature]
    else:
        temperature = [_dummy(device, torch.float32) for _ in q]
    return q_valid, k_valid, temperature, (has_qv, has_kv, has_t)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(programs: int, max_lk: int, block_n: int, device: torch.device) -> int:
    """Key splits for the forward (flash-decoding): when the query blocks alone cannot fill
    the GPU (20 text tokens against 30 000 audio frames), each also splits its keys.
    ``CROSSATTN_TRITON_SPLITS`` forces a count (tests use it under the interpreter)."""
    forced = os.environ.get("CROSSATTN_TRITON_SPLITS")
    if forced:
        return max(1, int(forced))
    if device.type != "cuda" or programs == 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    # About two waves of programs, each split keeping at least 4 key blocks of work.
    return max(1, min(triton.cdiv(2 * sms, programs), max_lk // (4 * block_n), 64))


def _prune_args(block_mask, block_layout, q, k, cfg, block_q, block_k):
    """Per direction: the dense kept-block mask as uint8 ``[B, H, nqb, nkb]`` (the weights
    pass tests one bit per tile) and the compact layout ``[B, H, nqb, 1 + nkb]`` (the other
    passes walk the kept blocks only), all blocks for a direction without pruning when the
    other has it; their sizes; and the launch config with tiles dividing the blocks."""
    prune = any(m is not None for m in block_mask)
    B, H = q[0].shape[:2]
    if not prune:
        dummy = _dummy(q[0].device, torch.uint8)
        return [dummy] * len(q), [dummy] * len(q), [(1, 1)] * len(q), cfg, False, 1, 1
    masks, layouts, sizes = [], [], []
    for m, lay, qq, kk in zip(block_mask, block_layout, q, k):
        nqb, nkb = triton.cdiv(qq.shape[2], block_q), triton.cdiv(kk.shape[2], block_k)
        if m is None:
            m = torch.ones(1, 1, nqb, nkb, device=qq.device, dtype=torch.uint8)
        m = m.expand(B, H, nqb, nkb)
        m = (m.view(torch.uint8) if m.dtype == torch.bool else m.to(torch.uint8)).contiguous()
        masks.append(m)
        layouts.append(lay if lay is not None else compact(m, B, H))
        sizes.append((nqb, nkb))
    cfg = _Config(min(cfg.block_m, block_q), min(cfg.block_n, block_k), cfg.num_warps, cfg.num_stages)
    return masks, layouts, sizes, cfg, True, block_q, block_k


def _dropout_args(seed, dropout_p, device):
    if dropout_p > 0.0:
        scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        return seed.to(device=device, dtype=torch.int64), dropout_threshold(dropout_p), scale, True
    return _dummy(device, torch.int64), 0, 1.0, False


def _setup(kind, q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
           block_q, block_k):
    """What both passes derive from the op arguments: dims, launch config, kernel-ready masks,
    temperatures, dropout and pruning arguments."""
    B, H, _, D = q[0].shape
    DV = v[0].shape[3]
    prune_args = _prune_args(block_mask, block_layout, q, k, _config(D, DV, q[0].dtype, kind),
                             block_q, block_k)
    return (B, H, D, DV, q[0].device, q[0].dtype, *prune_args,
            *_prepare(q, k, q_valid, k_valid, temperature),
            *_dropout_args(seed, dropout_p, q[0].device))


def _launch_fwd(q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
                block_mask, block_layout, block_q, block_k):
    (B, H, D, DV, device, dtype, bms, layouts, bm_sizes, cfg, prune, block_q, block_k,
     qv, kv, temp, (has_qv, has_kv, has_t), seed_t, thr, drop_scale, dropout) = _setup(
        "fwd", q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
        block_q, block_k)
    outs = [torch.empty(B, H, qq.shape[2], DV, device=device, dtype=dtype) for qq in q]
    lses = [torch.empty(B, H, qq.shape[2], device=device, dtype=torch.float32) for qq in q]
    nblk = [triton.cdiv(qq.shape[2], cfg.block_m) for qq in q]
    grid = (sum(nblk), B * H)
    # Pruned rows deal their kept blocks round-robin to the splits, so the split count is
    # chosen for the full key length; unpruned splits take contiguous key ranges.
    n_split = _num_splits(grid[0] * grid[1], max(kk.shape[2] for kk in k), cfg.block_n, device)
    split_len = [triton.cdiv(triton.cdiv(kk.shape[2], n_split), cfg.block_n) * cfg.block_n or cfg.block_n
                 for kk in k]
    if n_split > 1:  # partial results in fp32 workspaces, merged below
        dest_o = [torch.empty(n_split, B, H, qq.shape[2], DV, device=device, dtype=torch.float32) for qq in q]
        dest_l = [torch.empty(n_split, B, H, qq.shape[2], device=device, dtype=torch.float32) for qq in q]
    else:
        dest_o, dest_l = outs, lses

    def direction(i):
        return (q[i], k[i], v[i], dest_o[i], dest_l[i], qv[i], kv[i], temp[i], layouts[i],
                q[i].shape[2], k[i].shape[2], float(scale[i]), split_len[i], *bm_sizes[i],
                *q[i].stride(), *k[i].stride(), *v[i].stride())

    if grid[0] and grid[1]:
        _xattn_fwd_kernel[_grid(*grid, n_split)](
            *direction(0), *direction(len(q) - 1),
            seed_t, thr, drop_scale, nblk[0], grid[0], H, D, DV, block_q, block_k,
            HAS_QV=has_qv, HAS_KV=has_kv, HAS_T=has_t, DROPOUT=dropout, SPLIT=n_split > 1, PRUNE=prune,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_dim(D), BLOCK_DV=_block_dim(DV),
            PREC=_precision(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if n_split > 1:
            last = len(q) - 1
            _xattn_fwd_combine_kernel[_grid(*grid)](
                dest_o[0], dest_l[0], outs[0], lses[0], q[0].shape[2],
                dest_o[last], dest_l[last], outs[last], lses[last], q[last].shape[2],
                nblk[0], grid[0], n_split, DV, BLOCK_M=cfg.block_m, BLOCK_DV=_block_dim(DV),
                num_warps=cfg.num_warps,
            )
    ws = [q[i].new_empty(0) for i in range(len(q))]
    if weights:
        ws = _launch_weights(q, k, lses, qv, kv, temp, scale, weights, (has_qv, has_kv, has_t), cfg,
                             (bms, bm_sizes, prune, block_q, block_k))
    return outs, lses, ws


def _launch_weights(q, k, lses, qv, kv, temp, scale, weights, flags, cfg, pruning):
    bms, bm_sizes, prune, block_q, block_k = pruning
    B, H, _, D = q[0].shape
    mean = weights == WEIGHTS_MODES["mean"]
    ws = []
    ntiles, nkb = [], []
    for qq, kk in zip(q, k):
        Lq, Lk = qq.shape[2], kk.shape[2]
        shape = (B, Lq, Lk) if mean else (B, H, Lq, Lk)
        ws.append(torch.empty(shape, device=qq.device, dtype=qq.dtype))
        nkb.append(triton.cdiv(Lk, cfg.block_n))
        ntiles.append(triton.cdiv(Lq, cfg.block_m) * nkb[-1])

    def direction(i):
        return (q[i], k[i], lses[i], ws[i], qv[i], kv[i], temp[i], bms[i],
                q[i].shape[2], k[i].shape[2], float(scale[i]), max(nkb[i], 1), *bm_sizes[i],
                *q[i].stride(), *k[i].stride())

    grid = (sum(ntiles), B if mean else B * H)
    if grid[0] and grid[1]:
        _xattn_weights_kernel[_grid(*grid)](
            *direction(0), *direction(len(q) - 1), ntiles[0], grid[0], H, D, block_q, block_k,
            MEAN=mean, HAS_QV=flags[0], HAS_KV=flags[1], HAS_T=flags[2], PRUNE=prune,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_dim(D),
            PREC=_precision(q[0].dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return ws


def _launch_bwd(dout, dweights, q, k, v, out, lse, q_valid, k_valid, temperature, scale,
                seed, dropout_p, weights, block_mask, block_layout, block_q, block_k):
    (B, H, D, DV, device, dtype, bms, layouts, bm_sizes, cfg, prune, block_q, block_k,
     qv, kv, temp, (has_qv, has_kv, has_t), seed_t, thr, drop_scale, dropout) = _setup(
        "bwd", q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
        block_q, block_k)
    # dK/dV programs walk the query blocks that kept their key block: the transposed layout.
    t_layouts = [compact(m.transpose(-1, -2), B, H) for m in bms] if prune else layouts
    n = len(q)
    mean = weights == WEIGHTS_MODES["mean"]
    has_dw = weights != 0 and all(d is not None for d in dweights)
    dout = [d.to(dtype).contiguous() for d in dout]
    dw = [d.contiguous() if has_dw else _dummy(device, dtype) for d in dweights]
    delta = [torch.empty_like(l) for l in lse]
    dq = [torch.empty(qq.shape, device=device, dtype=dtype) for qq in q]
    dk = [torch.empty(kk.shape, device=device, dtype=dtype) for kk in k]
    dv = [torch.empty(vv.shape, device=device, dtype=dtype) for vv in v]
    nqb = [triton.cdiv(qq.shape[2], cfg.block_m) for qq in q]
    nkb = [triton.cdiv(kk.shape[2], cfg.block_n) for kk in k]
    dt_part = [torch.zeros(B * H * max(m, 1), device=device, dtype=torch.float32) for m in nqb]
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_dim(D),
                  BLOCK_DV=_block_dim(DV), PREC=_precision(dtype),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    flags = dict(HAS_QV=has_qv, HAS_KV=has_kv, HAS_T=has_t, PRUNE=prune)
    Ls = [(qq.shape[2], kk.shape[2]) for qq, kk in zip(q, k)]

    if B * H and sum(nqb):
        _xattn_bwd_delta_kernel[_grid(sum(nqb), B * H)](
            *[a for i in (0, n - 1) for a in (
                out[i], dout[i], lse[i], dw[i], q[i], k[i], qv[i], kv[i], temp[i], delta[i], layouts[i],
                *Ls[i], float(scale[i]), *bm_sizes[i], *q[i].stride(), *k[i].stride())],
            nqb[0], sum(nqb), H, D, DV, block_q, block_k, HAS_DW=has_dw, MEAN=mean, **flags, **common,
        )

    def grads_args(i, first, second, lay):
        return (q[i], k[i], v[i], dout[i], lse[i], delta[i], dw[i], first[i], second[i],
                qv[i], kv[i], temp[i], lay[i], *Ls[i], float(scale[i]), *bm_sizes[i],
                *q[i].stride(), *k[i].stride(), *v[i].stride())

    drop = (seed_t, thr, drop_scale)
    if B * H and sum(nkb):
        _xattn_bwd_dkdv_kernel[_grid(sum(nkb), B * H)](
            *grads_args(0, dk, dv, t_layouts), *grads_args(n - 1, dk, dv, t_layouts), *drop, nkb[0], sum(nkb),
            H, D, DV,
            block_q, block_k,
            HAS_DW=has_dw, MEAN=mean, DROPOUT=dropout, **flags, **common,
        )
    else:
        for t in dk + dv:
            t.zero_()
    if B * H and sum(nqb):
        _xattn_bwd_dq_kernel[_grid(sum(nqb), B * H)](
            *grads_args(0, dq, dt_part, layouts), *grads_args(n - 1, dq, dt_part, layouts), *drop, nqb[0],
            sum(nqb), H, D, DV,
            block_q, block_k,
            HAS_DW=has_dw, MEAN=mean, DROPOUT=dropout, **flags, **common,
        )
    dtemp = [p.view(B, H, -1).sum((0, 2)) if has_t else p.new_empty(0) for p in dt_part]
    return dq, dk, dv, dtemp


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("crossattn::xattn_fwd", mutates_args=())
def xattn_fwd(
    q: list[Tensor], k: list[Tensor], v: list[Tensor],
    q_valid: list[Optional[Tensor]], k_valid: list[Optional[Tensor]],
    temperature: list[Optional[Tensor]], scale: list[float],
    seed: Optional[Tensor], dropout_p: float, weights: int,
    block_mask: list[Optional[Tensor]], block_layout: list[Optional[Tensor]], block_q: int, block_k: int,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    return _launch_fwd(q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
                       block_mask, block_layout, block_q, block_k)


@xattn_fwd.register_fake
def _(q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
      block_mask, block_layout, block_q, block_k):
    outs, lses, ws = [], [], []
    for qq, kk, vv in zip(q, k, v):
        B, H, Lq, _ = qq.shape
        Lk = kk.shape[2]
        outs.append(qq.new_empty(B, H, Lq, vv.shape[3]))
        lses.append(qq.new_empty(B, H, Lq, dtype=torch.float32))
        ws.append(qq.new_empty((B, Lq, Lk) if weights == 2 else (B, H, Lq, Lk) if weights else (0,)))
    return outs, lses, ws


@torch.library.custom_op("crossattn::xattn_bwd", mutates_args=())
def xattn_bwd(
    dout: list[Tensor], dweights: list[Optional[Tensor]],
    q: list[Tensor], k: list[Tensor], v: list[Tensor], out: list[Tensor], lse: list[Tensor],
    q_valid: list[Optional[Tensor]], k_valid: list[Optional[Tensor]],
    temperature: list[Optional[Tensor]], scale: list[float],
    seed: Optional[Tensor], dropout_p: float, weights: int,
    block_mask: list[Optional[Tensor]], block_layout: list[Optional[Tensor]], block_q: int, block_k: int,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    return _launch_bwd(dout, dweights, q, k, v, out, lse, q_valid, k_valid, temperature,
                       scale, seed, dropout_p, weights, block_mask, block_layout, block_q, block_k)


@xattn_bwd.register_fake
def _(dout, dweights, q, k, v, out, lse, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
      block_mask, block_layout, block_q, block_k):
    has_t = any(t is not None for t in temperature)
    return (
        [torch.empty_like(t) for t in q], [torch.empty_like(t) for t in k],
        [torch.empty_like(t) for t in v],
        [q[0].new_empty(q[0].shape[1], dtype=torch.float32) if has_t else q[0].new_empty(0, dtype=torch.float32)
         for _ in q],
    )


def _setup_context(ctx, inputs, output):
    (q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights, block_mask, block_layout,
     block_q, block_k) = inputs
    outs, lses, _ = output
    n = len(q)
    ctx.n = n
    ctx.has_temp = [t is not None for t in temperature]
    ctx.temp_meta = [(t.shape, t.dtype) if t is not None else None for t in temperature]
    ctx.opt_mask = ([t is not None for t in q_valid], [t is not None for t in k_valid])
    ctx.scale, ctx.dropout_p, ctx.weights = list(scale), dropout_p, weights
    ctx.has_seed = seed is not None
    ctx.has_bm = [m is not None for m in block_mask]
    ctx.has_layout = [m is not None for m in block_layout]
    ctx.block_sizes = (block_q, block_k)
    saved = [*q, *k, *v, *outs, *lses]
    saved += [t for t in q_valid if t is not None] + [t for t in k_valid if t is not None]
    saved += [t for t in temperature if t is not None]
    saved += [seed] if seed is not None else []
    saved += [m for m in block_mask if m is not None]
    saved += [m for m in block_layout if m is not None]
    ctx.save_for_backward(*saved)


def _unflatten(ctx):
    saved = list(ctx.saved_tensors)
    n = ctx.n

    def take(count):
        nonlocal saved
        head, saved = saved[:count], saved[count:]
        return head

    q, k, v, out, lse = take(n), take(n), take(n), take(n), take(n)
    q_valid = [take(1)[0] if has else None for has in ctx.opt_mask[0]]
    k_valid = [take(1)[0] if has else None for has in ctx.opt_mask[1]]
    temperature = [take(1)[0] if has else None for has in ctx.has_temp]
    seed = take(1)[0] if ctx.has_seed else None
    block_mask = [take(1)[0] if has else None for has in ctx.has_bm]
    block_layout = [take(1)[0] if has else None for has in ctx.has_layout]
    return q, k, v, out, lse, q_valid, k_valid, temperature, seed, block_mask, block_layout


def _backward(ctx, d_outs, d_lses, d_ws):
    q, k, v, out, lse, q_valid, k_valid, temperature, seed, block_mask, block_layout = _unflatten(ctx)
    d_outs = [d if d is not None else torch.zeros_like(o) for d, o in zip(d_outs, out)]
    d_ws = list(d_ws) if ctx.weights else [None] * ctx.n
    if ctx.weights and any(d is not None for d in d_ws):
        # A loss on one direction's weights only: the other direction's weights get zeros.
        mean = ctx.weights == WEIGHTS_MODES["mean"]
        d_ws = [d if d is not None else
                qq.new_zeros((qq.shape[0],) + (() if mean else (qq.shape[1],)) + (qq.shape[2], kk.shape[2]))
                for d, qq, kk in zip(d_ws, q, k)]
    dq, dk, dv, dtemp = xattn_bwd(d_outs, d_ws, q, k, v, out, lse, q_valid, k_valid,
                                  temperature, ctx.scale, seed, ctx.dropout_p, ctx.weights,
                                  block_mask, block_layout, *ctx.block_sizes)
    d_temp = []
    for g, meta in zip(dtemp, ctx.temp_meta):
        if meta is None:
            d_temp.append(None)
        else:
            shape, dtype = meta
            d_temp.append((g.sum() if shape.numel() == 1 else g).reshape(shape).to(dtype))
    # torch.library expands an input list only when it holds tensors alone; a list with a
    # None in it is one leaf, whose gradient is a single None.
    def like(present, grads):
        return grads if all(present) else None

    none = [None] * ctx.n
    return (dq, dk, dv, like(ctx.opt_mask[0], none), like(ctx.opt_mask[1], none),
            like(ctx.has_temp, d_temp), None, None, None, None, like(ctx.has_bm, none),
            like(ctx.has_layout, none), None, None)


xattn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backend API
def unsupported(problem) -> str | None:
    B, H, Lq, Lk, D, Dv = problem.dims
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}"
    if _interpreting() and problem.q.dtype == torch.bfloat16:
        return "bfloat16 tl.dot gives wrong results in the Triton interpreter (fine on a GPU)"
    return None


def _op_args(problems):
    temps = [p.temperature for p in problems]
    if any(t is not None for t in temps):
        # All tensors, so that the op's autograd hands back a gradient per direction.
        temps = [t if isinstance(t, torch.Tensor)
                 else torch.full((1,), 1.0 if t is None else float(t), device=p.q.device,
                                 dtype=torch.float32)
                 for t, p in zip(temps, problems)]
    first = problems[0]
    return (
        [p.q for p in problems], [p.k for p in problems], [p.v for p in problems],
        [p.query_valid() for p in problems], [p.key_valid() for p in problems], temps,
        [p.scale for p in problems],
        first.dropout_seed.to(first.q.device) if first.dropout_p > 0 else None,
        first.dropout_p, WEIGHTS_MODES[first.need_weights],
        *_pruning_args(problems),
    )


def _pruning_args(problems):
    """Kept blocks per direction, selected on the device by the Triton selection kernel
    (dense mask and compact layout), and the shared block sizes."""
    configs = [p.pruning for p in problems]
    if all(c is None for c in configs):
        return [None] * len(problems), [None] * len(problems), 0, 0
    sizes = {(c.block_q, c.block_k) for c in configs if c is not None}
    if len(sizes) > 1:
        raise ValueError(f"the Triton kernels need one block size for both directions, got {sorted(sizes)}")
    (block_q, block_k), = sizes
    masks, layouts = [], []
    for p in problems:
        if p.pruning is None:
            masks.append(None)
            layouts.append(None)
            continue
        sel = select_blocks_triton(p.q, p.k, p.pruning, key_valid=p.key_valid(), query_valid=p.query_valid(),
                                   scale=p.scale, temperature=p.temperature)
        masks.append(sel.mask)
        layouts.append(sel.layout)
    return masks, layouts, block_q, block_k


def run(problems):
    """One or two directions in one launch per pass: ``(outs, weights)`` lists."""
    outs, _, ws = xattn_fwd(*_op_args(problems))
    weights = [w if problems[0].need_weights else None for w in ws]
    return outs, weights

