"""The Triton backend's interface: launchers, torch custom ops and autograd.

Two ops carry one or two directions each (lists of length 1 or 2), so that a bidirectional
call is one launch per pass:

* ``crossattn::xattn_fwd`` -> (out, stats, weights, entropy, key_mass, top-k values, top-k
  indices) per direction: the forward kernel, then the weights kernel when weights are
  requested and the key-mass pass when it is (the statistics: xattn_stats, empty when not
  requested); ``stats`` is float32 ``[2, B, H, Lq]``, each
  row's max logit M and R = log2 of its sum relative to M, in base-2 units (xattn_fwd), which
  the weights and backward passes recompute P from exactly (``lse_from_stats`` gives the LSE);
* ``crossattn::xattn_bwd`` -> (dq, dk, dv, dtemperature, dbias) per direction: delta, dK/dV
  and dQ kernels.

They are ``torch.library.custom_op`` with fake implementations and ``register_autograd``
(not ``triton_op``, which breaks opcheck and compile under the Triton interpreter), so
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` see through them.
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Optional

import torch
import triton
from torch import Tensor

from crossattn._philox import dropout_threshold
from crossattn._validation import host_to_device

from . import xattn_configs as configs
from .xattn_bwd import _xattn_bwd_delta_kernel, _xattn_bwd_dkdv_kernel, _xattn_bwd_dq_kernel
from .xattn_configs import Config, default_config, interpreting
from .xattn_fwd import LN2, LOG2E, _xattn_fwd_combine_kernel, _xattn_fwd_kernel, _xattn_weights_kernel
from .xattn_select import _grid, compact, select_blocks_triton
from .xattn_stats import MAX_TOP_K, aux_outputs, bwd_buffers, fold_entropy_grad, fwd_buffers, kp, launch_key_mass

WEIGHTS_MODES = {None: 0, "full": 1, "mean": 2}
MAX_HEAD_DIM = 256


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """float32 inputs are multiplied in full precision unless torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), as torch.matmul does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _streamed(s, kernel: str, stats_grad: bool) -> bool:
    """Whether a backward kernel ("dq", "dkdv") streams its q.k and dO.v operands from memory
    (xattn_fwd._dot_streamed) instead of holding them: where holding them spilled in the compile
    survey (tests/_kernel_compile.py). fp32 without TF32 (FMA dots): dQ always, dK/dV past D = 64
    (at 64 its streamed form spilled instead); every head dim past 128; tensor-core dK/dV (fp16/bf16,
    TF32) with the statistics' gradients (held: 12 B on sm_80)."""
    bd = max(s.tiles["BLOCK_D"], s.block_dv)
    fma = s.tiles["PREC"] == "ieee" and s.dtype == torch.float32
    return (fma and (bd > 64 or kernel == "dq")) or bd > 128 or (kernel == "dkdv" and stats_grad and not fma)


# --------------------------------------------------------------------------- launchers
def _dummy(device, dtype):
    return torch.empty(1, device=device, dtype=dtype)


def _prepare(q, k, q_valid, k_valid, temperature):
    """Kernel-ready validity masks (uint8), per-batch key ends (int32: one past the last valid
    key, computed on the device) and per-head temperatures, and which of them are present."""
    has_qv, has_kv, has_t = (any(t is not None for t in x) for x in (q_valid, k_valid, temperature))
    device = q[0].device
    H = q[0].shape[1]
    dummy_u8, dummy_i32 = _dummy(device, torch.uint8), _dummy(device, torch.int32)

    def masks(given, tensors, present):
        if not present:
            return [dummy_u8 for _ in tensors]
        return [m.to(torch.uint8).contiguous() if m is not None
                else torch.ones(t.shape[0], t.shape[2], device=device, dtype=torch.uint8)
                for m, t in zip(given, tensors)]

    q_valid, k_valid = masks(q_valid, q, has_qv), masks(k_valid, k, has_kv)
    kend = [dummy_i32] * len(k)
    if has_kv:
        kend = [(m * torch.arange(1, m.shape[1] + 1, device=device, dtype=torch.int32)).amax(1).to(torch.int32)
                if m.shape[1] else torch.zeros(m.shape[0], device=device, dtype=torch.int32) for m in k_valid]
    if has_t:
        temperature = [t.detach().to(torch.float32).expand(H).contiguous() if t is not None
                       else torch.ones(H, device=device, dtype=torch.float32) for t in temperature]
    else:
        temperature = [_dummy(device, torch.float32) for _ in q]
    return q_valid, k_valid, kend, temperature, (has_qv, has_kv, has_t)


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
    cfg = cfg.capped(block_m=block_q, block_n=block_k)
    return masks, layouts, sizes, cfg, True, block_q, block_k


def _dropout_args(seed, dropout_p, device):
    if dropout_p > 0.0:
        scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
        return seed.to(device=device, dtype=torch.int64), dropout_threshold(dropout_p), scale, True
    return _dummy(device, torch.int64), 0, 1.0, False


def _bias_args(bias, q, k):
    """(bias or a dummy, its broadcast strides over [B, H, Lq, Lk]: 0 where it broadcasts)."""
    out = []
    for b, qq, kk in zip(bias, q, k):
        if b is None:
            out.append((_dummy(qq.device, torch.float32), (0, 0, 0, 0)))
        else:
            out.append((b, tuple(b.expand(*qq.shape[:3], kk.shape[2]).stride())))
    return out


def _heads_args(weight_heads, H, device):
    """(HEADS int32 [nh], HPOS int32 [H]: index in HEADS or -1, nh) for ``weight_heads``."""
    if not weight_heads:
        dummy = _dummy(device, torch.int32)
        return dummy, dummy, H
    heads = torch.tensor(list(weight_heads), dtype=torch.int32)
    pos = torch.full((H,), -1, dtype=torch.int32)
    pos[heads.long()] = torch.arange(len(weight_heads), dtype=torch.int32)
    return host_to_device(heads, device), host_to_device(pos, device), len(weight_heads)


def _setup(kind, q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
           block_q, block_k, attn_bias, is_causal, weight_heads, top_k=0, cfg: Config | None = None
           ) -> SimpleNamespace:
    """What every pass derives from the op arguments: dims, launch config, kernel-ready masks,
    temperatures, dropout, pruning, bias and head-subset arguments. Head dims may differ between
    the directions of a bidirectional call: tiles fit the widest."""
    B, H = q[0].shape[:2]
    D, DV = max(t.shape[3] for t in q), max(t.shape[3] for t in v)
    dense, layouts, bm_sizes, cfg, prune, block_q, block_k = _prune_args(
        block_mask, block_layout, q, k, cfg or default_config(D, DV, q[0].dtype, kind, top_k), block_q, block_k)
    qv, kv, kend, temp, flags = _prepare(q, k, q_valid, k_valid, temperature)
    seed, thr, drop_scale, dropout = _dropout_args(seed, dropout_p, q[0].device)
    return SimpleNamespace(
        B=B, H=H, device=q[0].device, dtype=q[0].dtype, cfg=cfg, prune=prune, dense=dense,
        layouts=layouts, bm_sizes=bm_sizes, block_q=block_q, block_k=block_k, qv=qv, kv=kv, kend=kend,
        temp=temp, bias=_bias_args(attn_bias, q, k), heads=_heads_args(weight_heads, H, q[0].device),
        has_heads=bool(weight_heads),
        flags=dict(HAS_QV=flags[0], HAS_KV=flags[1], HAS_T=flags[2], PRUNE=prune, CAUSAL=bool(is_causal),
                   HAS_BIAS=any(b is not None for b in attn_bias), BIDIR=len(q) == 2),
        drop=(seed, thr, drop_scale), dropout=dropout,
        tiles=dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_dim(D), PREC=_precision(q[0].dtype),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg),
        block_dv=_block_dim(DV),
    )


def _problem(s, i, q, k, v, scale, bm):
    """Direction ``i`` as the kernels' tuple (xattn_fwd.PROBLEM)."""
    return (q[i], k[i], v[i], s.qv[i], s.kv[i], s.kend[i], s.temp[i], bm[i], s.bias[i][0], tuple(q[i].stride()),
            tuple(k[i].stride()), tuple(v[i].stride()), s.bias[i][1], q[i].shape[2], k[i].shape[2], q[i].shape[3],
            v[i].shape[3], float(scale[i]), *s.bm_sizes[i], max(q[i].shape[1] // max(k[i].shape[1], 1), 1), 1)


def _ends(n):
    """The directions a kernel takes: (0, 1), or (0, 0) for one direction."""
    return (0, n - 1)


def lse_from_stats(stats: Tensor) -> Tensor:
    """The natural-log LSE ``[B, H, Lq]`` of row statistics (+inf on rows with no key)."""
    return (stats[0] + stats[1]) * LN2


def stats_from_lse(lse: Tensor) -> Tensor:
    """Row statistics ``[2, B, H, Lq]`` (M, R; see xattn_fwd) from a natural-log LSE, for callers
    whose forward stores the LSE only (the CUDA backend): exact up to the LSE's rounding."""
    return torch.stack([lse.float() * LOG2E, torch.zeros_like(lse, dtype=torch.float32)])


def _t_layouts(s):
    """Key-major walks (dK/dV, key mass) visit the query blocks that kept their key block:
    the transposed layout."""
    return [compact(m.transpose(-1, -2), s.B, s.H) for m in s.dense] if s.prune else s.layouts


def _tuned(kind, launch, args, q, k, v, top_k, options):
    """The pass's config from the autotuner (xattn_configs; ``CROSSATTN_AUTOTUNE=1``), or None
    for the surveyed default. ``options`` (the call's switches) join dtype, head dims, length
    buckets and device in the cache key."""
    device = q[0].device
    if not configs.enabled(device):
        return None
    D, DV, dtype = max(t.shape[3] for t in q), max(t.shape[3] for t in v), q[0].dtype
    cands = configs.candidates(kind, D, DV, dtype, top_k, configs.DeviceLimits.of(device))

    def key():
        return configs.make_key(kind, device, dtype, D, DV, max(t.shape[2] for t in q), max(t.shape[2] for t in k),
                                (len(q), max(t.shape[1] // max(kk.shape[1], 1) for t, kk in zip(q, k)), *options))
    return configs.pick(key, cands, lambda cfg: launch(*args, cfg=cfg))


def _launch_fwd(q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
                block_mask, block_layout, block_q, block_k, attn_bias, is_causal, weight_heads,
                entropy=False, key_mass=False, top_k=0, cfg=None):
    s = _setup("fwd", q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
               block_q, block_k, attn_bias, is_causal, weight_heads, top_k, cfg)
    B, H, cfg, device = s.B, s.H, s.cfg, s.device
    outs = [torch.empty(B, H, qq.shape[2], vv.shape[3], device=device, dtype=s.dtype) for qq, vv in zip(q, v)]
    stats = [torch.empty(2, B, H, qq.shape[2], device=device, dtype=torch.float32) for qq in q]
    nblk = [triton.cdiv(qq.shape[2], cfg.block_m) for qq in q]
    grid = (sum(nblk), B * H)
    n_split = _num_splits(grid[0] * grid[1], max(kk.shape[2] for kk in k), cfg.block_n, device)
    if n_split > 1:  # partial results in fp32 workspaces, merged below
        dest_o = [torch.empty(n_split, *o.shape, device=device, dtype=torch.float32) for o in outs]
        dest_s = [torch.empty(2, n_split, *st.shape[1:], device=device, dtype=torch.float32) for st in stats]
    else:
        dest_o, dest_s = outs, stats
    ents, tvs, tis, dest_a = fwd_buffers(q, entropy, top_k, n_split, lambda dt: _dummy(device, dt))
    aux_c = dict(ENTROPY=entropy, TOPK=top_k, KP=kp(top_k))
    ends = _ends(len(q))
    if grid[0] and grid[1]:
        _xattn_fwd_kernel[_grid(*grid, n_split)](
            *[_problem(s, i, q, k, v, scale, s.layouts) for i in ends],
            *[(dest_o[i], dest_s[i][0], dest_s[i][1], *dest_a[i]) for i in ends],
            *s.drop, nblk[0], grid[0], H, s.block_q, s.block_k,
            DROPOUT=s.dropout, SPLIT=n_split > 1, BLOCK_DV=s.block_dv, **s.flags, **s.tiles, **aux_c,
        )
        if n_split > 1:
            _xattn_fwd_combine_kernel[_grid(*grid)](
                *[(dest_o[i], dest_s[i][0], dest_s[i][1], outs[i], stats[i][0], stats[i][1], q[i].shape[2],
                   v[i].shape[3], dest_a[i][0], ents[i], dest_a[i][2], tvs[i], tis[i]) for i in ends],
                nblk[0], grid[0], n_split, BLOCK_M=cfg.block_m, BLOCK_DV=s.block_dv, num_warps=cfg.num_warps,
                maxnreg=cfg.maxnreg, BIDIR=s.flags["BIDIR"], **aux_c,
            )
    ws = [qq.new_empty(0) for qq in q]
    if weights:
        ws = _launch_weights(q, k, v, stats, s, scale, weights)
    kms = [qq.new_empty(0, dtype=torch.float32) for qq in q]
    if key_mass:
        kms = launch_key_mass([_problem(s, i, q, k, v, scale, _t_layouts(s)) for i in range(len(q))], k, stats, s)
    return outs, stats, ws, ents, kms, tvs, tis


def _launch_weights(q, k, v, stats, s, scale, weights):
    B, cfg = s.B, s.cfg
    heads, _, nh = s.heads
    mean = weights == WEIGHTS_MODES["mean"]
    ws, ntiles, nkb = [], [], []
    for qq, kk in zip(q, k):
        Lq, Lk = qq.shape[2], kk.shape[2]
        ws.append(torch.empty((B, Lq, Lk) if mean else (B, nh, Lq, Lk), device=qq.device, dtype=qq.dtype))
        nkb.append(triton.cdiv(Lk, cfg.block_n))
        ntiles.append(triton.cdiv(Lq, cfg.block_m) * nkb[-1])
    ends = _ends(len(q))
    grid = (sum(ntiles), B if mean else B * nh)
    if grid[0] and grid[1]:
        _xattn_weights_kernel[_grid(*grid)](
            *[_problem(s, i, q, k, v, scale, s.dense) for i in ends],
            *[(ws[i], stats[i][0], stats[i][1], max(nkb[i], 1), heads, nh) for i in ends],
            ntiles[0], grid[0], s.H, s.block_q, s.block_k, MEAN=mean, HAS_HEADS=s.has_heads,
            **s.flags, **s.tiles,
        )
    return ws


def _launch_bwd(dout, dweights, q, k, v, out, stats, q_valid, k_valid, temperature, scale, seed, dropout_p,
                weights, block_mask, block_layout, block_q, block_k, attn_bias, bias_grad, is_causal,
                weight_heads, dlse, dent, dkm, cfg=None):
    s = _setup("bwd", q, k, v, q_valid, k_valid, temperature, seed, dropout_p, block_mask, block_layout,
               block_q, block_k, attn_bias, is_causal, weight_heads, cfg=cfg)
    B, H, cfg, device, dtype = s.B, s.H, s.cfg, s.device, s.dtype
    t_layouts = _t_layouts(s)
    mean = weights == WEIGHTS_MODES["mean"]
    has_dw = weights != 0 and all(d is not None for d in dweights)
    dout = [d.to(dtype).contiguous() for d in dout]
    dw = [d.contiguous() if has_dw else _dummy(device, dtype) for d in dweights]
    stats = [st.contiguous() for st in stats]
    # delta starts as -dLSE (the LSE's own gradient, return_aux) and the kernel adds the rest.
    delta = [(-g.float()).contiguous() if g is not None else torch.zeros(st.shape[1:], device=device)
             for g, st in zip(dlse, stats)]
    dent, dkm, has_dh, has_dkm = bwd_buffers(dent, dkm, q, k, _dummy(device, torch.float32))
    dq = [torch.empty(qq.shape, device=device, dtype=dtype) for qq in q]
    dk = [torch.empty(kk.shape, device=device, dtype=dtype) for kk in k]
    dv = [torch.empty(vv.shape, device=device, dtype=dtype) for vv in v]
    dbias = [torch.zeros(b.shape, device=device, dtype=torch.float32) if b is not None and bias_grad
             else _dummy(device, torch.float32) for b in attn_bias]
    nqb = [triton.cdiv(qq.shape[2], cfg.block_m) for qq in q]
    nkb = [triton.cdiv(kk.shape[2], cfg.block_n) for kk in k]
    # Per-program partial sums of the temperature gradient ([B, H, query blocks]).
    dt_part = [torch.zeros(B, H, max(m, 1), device=device, dtype=torch.float32) for m in nqb]
    _, hpos, nh = s.heads
    ends = _ends(len(q))
    sdb = [tuple(d.expand(B, H, qq.shape[2], kk.shape[2]).stride()) if d.dim() == 4 else (0, 0, 0, 0)
           for d, qq, kk in zip(dbias, q, k)]
    args = (*[_problem(s, i, q, k, v, scale, s.layouts) for i in ends],
            *[(out[i], dout[i], stats[i][0], stats[i][1], delta[i], dw[i], dq[i], dk[i], dv[i], dt_part[i],
               t_layouts[i], dbias[i], sdb[i], hpos, nh, dent[i], dkm[i], 1) for i in ends],
            *s.drop)
    bias = next((b for b in attn_bias if b is not None), None)
    consts = dict(HAS_DW=has_dw, MEAN=mean, DROPOUT=s.dropout, BLOCK_DV=s.block_dv, HAS_HEADS=bool(weight_heads),
                  BIAS_GRAD=bias is not None and bias_grad, BIAS_M=bias is not None and bias.shape[2] != 1,
                  BIAS_N=bias is not None and bias.shape[3] != 1, HAS_DH=has_dh, HAS_DKM=has_dkm, **s.flags,
                  **s.tiles)
    stats_grad = has_dh or has_dkm
    if B * H and sum(nqb):
        _xattn_bwd_delta_kernel[_grid(sum(nqb), B * H)](*args, nqb[0], sum(nqb), B, H, s.block_q, s.block_k,
                                                        **consts)
    kv_slabs = B * max(kk.shape[1] for kk in k)
    if kv_slabs and sum(nkb):
        _xattn_bwd_dkdv_kernel[_grid(sum(nkb), kv_slabs)](*args, nkb[0], sum(nkb), B, H, s.block_q, s.block_k,
                                                          STREAM=_streamed(s, "dkdv", stats_grad), **consts)
    else:
        for t in dk + dv:
            t.zero_()
    if B * H and sum(nqb):
        _xattn_bwd_dq_kernel[_grid(sum(nqb), B * H)](*args, nqb[0], sum(nqb), B, H, s.block_q, s.block_k,
                                                     STREAM=_streamed(s, "dq", stats_grad), **consts)
    dtemp = [p.sum((0, 2)) if s.flags["HAS_T"] else p.new_empty(0) for p in dt_part]
    dbias = [d if b is not None and bias_grad else d.new_empty(0) for d, b in zip(dbias, attn_bias)]
    return dq, dk, dv, dtemp, dbias


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("crossattn::xattn_fwd", mutates_args=())
def xattn_fwd(
    q: list[Tensor], k: list[Tensor], v: list[Tensor],
    q_valid: list[Optional[Tensor]], k_valid: list[Optional[Tensor]],
    temperature: list[Optional[Tensor]], scale: list[float],
    seed: Optional[Tensor], dropout_p: float, weights: int,
    block_mask: list[Optional[Tensor]], block_layout: list[Optional[Tensor]], block_q: int, block_k: int,
    attn_bias: list[Optional[Tensor]], is_causal: bool, weight_heads: list[int],
    entropy: bool, key_mass: bool, top_k: int,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(out, stats, weights, entropy, key_mass, top_k values, top_k indices) per direction,
    the statistics empty when not requested."""
    args = (q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights, block_mask, block_layout,
            block_q, block_k, attn_bias, is_causal, weight_heads, entropy, key_mass, top_k)
    switches = (weights, dropout_p > 0, any(m is not None for m in block_mask), block_q, block_k,
                any(b is not None for b in attn_bias), is_causal, bool(weight_heads), entropy, key_mass, top_k,
                any(m is not None for m in q_valid), any(m is not None for m in k_valid))
    return _launch_fwd(*args, cfg=_tuned("fwd", _launch_fwd, args, q, k, v, top_k, switches))


@xattn_fwd.register_fake
def _(q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
      block_mask, block_layout, block_q, block_k, attn_bias, is_causal, weight_heads, entropy, key_mass, top_k):
    res = [[] for _ in range(7)]
    for qq, kk, vv in zip(q, k, v):
        B, H, Lq, _ = qq.shape
        Lk = kk.shape[2]
        nh = len(weight_heads) or H
        f32, i64 = torch.float32, torch.int64
        for r, t in zip(res, (
                qq.new_empty(B, H, Lq, vv.shape[3]), qq.new_empty(2, B, H, Lq, dtype=f32),
                qq.new_empty((B, Lq, Lk) if weights == 2 else (B, nh, Lq, Lk) if weights else (0,)),
                qq.new_empty((B, H, Lq) if entropy else (0,), dtype=f32),
                qq.new_empty((B, H, Lk) if key_mass else (0,), dtype=f32),
                qq.new_empty((B, H, Lq, top_k) if top_k else (0,)),
                qq.new_empty((B, H, Lq, top_k) if top_k else (0,), dtype=i64))):
            r.append(t)
    return tuple(res)


@torch.library.custom_op("crossattn::xattn_bwd", mutates_args=())
def xattn_bwd(
    dout: list[Tensor], dweights: list[Optional[Tensor]],
    q: list[Tensor], k: list[Tensor], v: list[Tensor], out: list[Tensor], stats: list[Tensor],
    q_valid: list[Optional[Tensor]], k_valid: list[Optional[Tensor]],
    temperature: list[Optional[Tensor]], scale: list[float],
    seed: Optional[Tensor], dropout_p: float, weights: int,
    block_mask: list[Optional[Tensor]], block_layout: list[Optional[Tensor]], block_q: int, block_k: int,
    attn_bias: list[Optional[Tensor]], bias_grad: bool, is_causal: bool, weight_heads: list[int],
    dlse: list[Optional[Tensor]], dentropy: list[Optional[Tensor]], dkey_mass: list[Optional[Tensor]],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``dlse`` carries the entropy's row term too (dLSE - H dH, see _backward)."""
    args = (dout, dweights, q, k, v, out, stats, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
            block_mask, block_layout, block_q, block_k, attn_bias, bias_grad, is_causal, weight_heads, dlse,
            dentropy, dkey_mass)
    switches = (weights, any(d is not None for d in dweights), dropout_p > 0, any(m is not None for m in block_mask),
                block_q, block_k, any(b is not None for b in attn_bias), bias_grad, is_causal, bool(weight_heads),
                *(any(g is not None for g in gs) for gs in (dlse, dentropy, dkey_mass)),
                any(m is not None for m in q_valid), any(m is not None for m in k_valid))
    return _launch_bwd(*args, cfg=_tuned("bwd", _launch_bwd, args, q, k, v, 0, switches))


@xattn_bwd.register_fake
def _(dout, dweights, q, k, v, out, stats, q_valid, k_valid, temperature, scale, seed, dropout_p, weights,
      block_mask, block_layout, block_q, block_k, attn_bias, bias_grad, is_causal, weight_heads, dlse, dentropy,
      dkey_mass):
    has_t = any(t is not None for t in temperature)
    return (
        [torch.empty_like(t) for t in q], [torch.empty_like(t) for t in k],
        [torch.empty_like(t) for t in v],
        [q[0].new_empty(q[0].shape[1], dtype=torch.float32) if has_t else q[0].new_empty(0, dtype=torch.float32)
         for _ in q],
        [b.new_empty(b.shape, dtype=torch.float32) if b is not None and bias_grad
         else q[0].new_empty(0, dtype=torch.float32) for b in attn_bias],
    )


# Saved for backward, per list: the op's optional tensor inputs (None entries skipped).
_OPTIONAL = ("q_valid", "k_valid", "temperature", "block_mask", "block_layout", "attn_bias")


def _setup_context(ctx, inputs, output):
    (q, k, v, q_valid, k_valid, temperature, scale, seed, dropout_p, weights, block_mask, block_layout,
     block_q, block_k, attn_bias, is_causal, weight_heads, entropy, key_mass, top_k) = inputs
    outs, stats, _, ents = output[:4]
    opt = dict(q_valid=q_valid, k_valid=k_valid, temperature=temperature, block_mask=block_mask,
               block_layout=block_layout, attn_bias=attn_bias)
    ctx.n = len(q)
    ctx.present = {name: [t is not None for t in opt[name]] for name in _OPTIONAL}
    ctx.temp_meta = [(t.shape, t.dtype) if t is not None else None for t in temperature]
    ctx.bias_dtype = [b.dtype if b is not None else None for b in attn_bias]
    ctx.bias_grad = any(b is not None and b.requires_grad for b in attn_bias)
    ctx.scale, ctx.dropout_p, ctx.weights = list(scale), dropout_p, weights
    ctx.has_seed = seed is not None
    ctx.static = (block_q, block_k, is_causal, list(weight_heads))
    ctx.entropy, ctx.key_mass = entropy, key_mass
    saved = [*q, *k, *v, *outs, *stats] + ([seed] if seed is not None else []) + (list(ents) if entropy else [])
    for name in _OPTIONAL:
        saved += [t for t in opt[name] if t is not None]
    ctx.save_for_backward(*saved)


def _unflatten(ctx):
    saved = list(ctx.saved_tensors)
    n = ctx.n

    def take(count):
        nonlocal saved
        head, saved = saved[:count], saved[count:]
        return head

    q, k, v, out, stats = take(n), take(n), take(n), take(n), take(n)
    seed = take(1)[0] if ctx.has_seed else None
    ents = take(n) if ctx.entropy else [None] * n
    opt = {name: [take(1)[0] if has else None for has in ctx.present[name]] for name in _OPTIONAL}
    return q, k, v, out, stats, seed, ents, opt


def _backward(ctx, d_outs, d_stats, d_ws, d_ents, d_kms, _d_top_values, _d_top_indices):
    q, k, v, out, stats, seed, ents, opt = _unflatten(ctx)
    block_q, block_k, is_causal, weight_heads = ctx.static
    d_outs = [d if d is not None else torch.zeros_like(o) for d, o in zip(d_outs, out)]
    d_ws = list(d_ws) if ctx.weights else [None] * ctx.n
    if ctx.weights and any(d is not None for d in d_ws):
        # A loss on one direction's weights only: the other direction's weights get zeros.
        mean = ctx.weights == WEIGHTS_MODES["mean"]
        nh = len(weight_heads) or q[0].shape[1]
        d_ws = [d if d is not None else
                qq.new_zeros((qq.shape[0],) + (() if mean else (nh,)) + (qq.shape[2], kk.shape[2]))
                for d, qq, kk in zip(d_ws, q, k)]
    # The statistics reach the caller only as the LSE (M + R) * ln 2 (return_aux): both rows of
    # their gradient are dLSE * ln 2.
    dlse = [None if d is None else d[1] * LOG2E for d in (d_stats or [None] * ctx.n)]
    dlse, d_ents, d_kms = fold_entropy_grad(ctx, dlse, d_ents, d_kms, ents)
    bias_grad = ctx.bias_grad
    dq, dk, dv, dtemp, dbias = xattn_bwd(
        d_outs, d_ws, q, k, v, out, stats, opt["q_valid"], opt["k_valid"], opt["temperature"], ctx.scale, seed,
        ctx.dropout_p, ctx.weights, opt["block_mask"], opt["block_layout"], block_q, block_k, opt["attn_bias"],
        bias_grad, is_causal, weight_heads, dlse, d_ents, d_kms)
    d_temp = []
    for g, meta in zip(dtemp, ctx.temp_meta):
        if meta is None:
            d_temp.append(None)
        else:
            shape, dtype = meta
            d_temp.append((g.sum() if shape.numel() == 1 else g).reshape(shape).to(dtype))
    d_bias = [g.to(dt) if dt is not None and bias_grad else None for g, dt in zip(dbias, ctx.bias_dtype)]

    # torch.library expands an input list only when it holds tensors alone; a list with a
    # None in it is one leaf, whose gradient is a single None.
    def like(name, grads):
        return grads if all(ctx.present[name]) else None

    none = [None] * ctx.n
    return (dq, dk, dv, like("q_valid", none), like("k_valid", none), like("temperature", d_temp), None, None,
            None, None, like("block_mask", none), like("block_layout", none), None, None,
            like("attn_bias", d_bias), None, None if weight_heads else [], None, None, None)


xattn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backend API
# Options of crossattn.backends.base.OPTIONAL_FEATURES these kernels serve (any other is rejected).
FEATURES = ("gqa", "attn_bias", "is_causal", "weight_heads", "aux_lse", "aux_entropy", "aux_key_mass", "aux_top_k")


def unsupported(problem) -> str | None:
    B, H, Lq, Lk, D, Dv = problem.dims
    if D > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}"
    if problem.aux is not None and problem.aux.top_k > MAX_TOP_K:
        return f"return_aux top_k up to {MAX_TOP_K} is supported, got top_k={problem.aux.top_k}"
    if interpreting() and problem.q.dtype == torch.bfloat16:
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
    aux = first.aux  # both directions of a call share one request
    return (
        [p.q for p in problems], [p.k for p in problems], [p.v for p in problems],
        [p.query_valid() for p in problems], [p.key_valid() for p in problems], temps,
        [p.scale for p in problems],
        host_to_device(first.dropout_seed, first.q.device) if first.dropout_p > 0 else None,
        first.dropout_p, WEIGHTS_MODES[first.need_weights],
        *_pruning_args(problems),
        [p.attn_bias for p in problems], bool(first.is_causal), list(first.weight_heads or ()),
        bool(aux and aux.entropy), bool(aux and aux.key_mass), aux.top_k if aux else 0,
    )


def _pruning_args(problems):
    """Kept blocks per direction, selected on the device by the Triton selection kernel
    (dense mask and compact layout), and the block sizes the kernels share: a direction whose
    blocks are larger is served at the smaller size, its kept mask refined (the same keys)."""
    configs = [p.pruning for p in problems]
    if all(c is None for c in configs):
        return [None] * len(problems), [None] * len(problems), 0, 0
    block_q = min(c.block_q for c in configs if c is not None)
    block_k = min(c.block_k for c in configs if c is not None)
    masks, layouts = [], []
    for p in problems:
        if p.pruning is None:
            masks.append(None)
            layouts.append(None)
            continue
        sel = select_blocks_triton(p.q, p.k, p.pruning, key_valid=p.key_valid(), query_valid=p.query_valid(),
                                   scale=p.scale, temperature=p.temperature, is_causal=p.is_causal)
        mask, layout = sel.mask, sel.layout
        fq, fk = p.pruning.block_q // block_q, p.pruning.block_k // block_k
        if fq > 1 or fk > 1:  # powers of two: the smaller size divides the larger
            B, H, Lq, Lk, _, _ = p.dims
            mask = (mask.repeat_interleave(fq, 2)[:, :, :triton.cdiv(Lq, block_q)]
                    .repeat_interleave(fk, 3)[..., :triton.cdiv(Lk, block_k)])
            layout = compact(mask, B, H)
        masks.append(mask)
        layouts.append(layout)
    return masks, layouts, block_q, block_k


def run(problems):
    """One or two directions in one launch per pass: ``(outs, weights, auxes)`` lists."""
    outs, stats, ws, *stat_outs = xattn_fwd(*_op_args(problems))
    weights = [w if problems[0].need_weights else None for w in ws]
    return outs, weights, aux_outputs(problems, [lse_from_stats(st) for st in stats], *stat_outs)
