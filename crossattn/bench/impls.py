"""The implementations compared, side by side in one process.

Layer workloads run a seed's own module (seed 000's bidirectional layer, seed 001's
one-direction layer) with a pluggable attention core, so only the attention differs between
rows -- except ``torch.nn.MultiheadAttention``, which brings its own projections. The row
``eager`` is the seed's own code for the workload's layer (matmul, masked_fill, softmax,
dropout, matmul). Core workloads call the attention alone.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import crossattn

from .workloads import Inputs, Workload


@dataclass
class Impl:
    name: str
    build: Callable  # (workload, device, dtype) -> fn(inputs, train: bool) -> list of tensors
    writes_weights: str | None = None  # "full" / "mean" when the row returns weights
    why_not: Callable = lambda w, device, dtype: None  # reason this row cannot run, or None


# ------------------------------------------------------------------------------ cores
def eager_core(q, k, v, key_pad, dropout_p, training):
    """Seed 000's math: matmul -> masked_fill -> softmax -> dropout -> matmul."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :], -1e9)
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, dropout_p, training)
    return torch.matmul(weights, v), weights


def matmul_floor_core(q, k, v, key_pad, dropout_p, training):
    """A yardstick, not an attention: the two matmuls of ``eager_core`` alone (no scale, mask,
    softmax or dropout), the scores returned as the "weights", so that the backward runs the same
    four matmuls as any exact attention returning weights. On a CPU no such attention core can be
    faster: the gap between this row and ``eager`` is all an implementation can win there."""
    scores = torch.matmul(q, k.transpose(-2, -1))
    return torch.matmul(scores, v), scores


def sdpa_core(q, k, v, key_pad, dropout_p, training):
    mask = None if key_pad is None else ~key_pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0), None


def sdpa_backend_picked(q, k, v, key_pad) -> str:
    """The first SDPA backend, in torch's priority order, that accepts these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = None if key_pad is None else ~key_pad[:, None, None, :]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                F.scaled_dot_product_attention(q[:1, :1, :2], k[:1, :1], v[:1, :1],
                                               attn_mask=None if mask is None else mask[:1, :, :2])
            return backend.name.lower()
        except RuntimeError:
            continue
    return "none"


def make_flex_core():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def core(q, k, v, key_pad, dropout_p, training):
        block_mask = None
        if key_pad is not None:
            key = (key_pad.data_ptr(), q.shape[2], k.shape[2])
            if key not in cache:
                valid = ~key_pad

                def padding(b, h, q_idx, kv_idx):
                    return valid[b, kv_idx]

                cache[key] = create_block_mask(padding, q.shape[0], None, q.shape[2], k.shape[2],
                                               device=q.device)
            block_mask = cache[key]
        return compiled(q, k, v, block_mask=block_mask), None

    return core


def flash_attn_core(q, k, v, key_pad, dropout_p, training):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          dropout_p=dropout_p if training else 0.0)
    return out.transpose(1, 2), None


STATS_TOP_K = 4


def stats_from_weights(weights):
    """What eager code computes from the weights ``[B, H, T, A]``: each query's entropy, each
    key's received mass, each query's top-k weights (every query valid in these workloads)."""
    entropy = -(weights * torch.log(weights.clamp(min=1e-30))).sum(-1)
    return [entropy, weights.sum(2), weights.topk(STATS_TOP_K, dim=-1).values]


def crossattn_stats_core(backend):
    """The same statistics from ``return_aux``, without the weight matrix."""
    request = crossattn.AuxRequest(entropy=True, key_mass=True, top_k=STATS_TOP_K)

    def core(q, k, v, key_pad, dropout_p, training):
        out, _, aux = crossattn.cross_attention(q, k, v, key_padding_mask=key_pad, return_aux=request,
                                                backend=backend)
        return out, None, [aux.entropy, aux.key_mass, aux.top_k_values]
    return core


def crossattn_packed_core(backend):
    """Each example alone at its real key length (the cost a ragged batch should have)."""
    def core(q, k, v, key_pad, dropout_p, training):
        lengths = (~key_pad).sum(-1).tolist()
        outs = [crossattn.cross_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], backend=backend)[0]
                for b, n in enumerate(lengths)]
        return torch.cat(outs), None
    return core


def crossattn_core(backend, need_weights, prune=None):
    def core(q, k, v, key_pad, dropout_p, training):
        return crossattn.cross_attention(q, k, v, key_padding_mask=key_pad, need_weights=need_weights,
                                         dropout_p=dropout_p if training else 0.0, prune=prune,
                                         backend=backend)
    return core


# ------------------------------------------------------------------------------ layer
class SeedLayer(nn.Module):
    """Seed 000's bidirectional module with a pluggable attention core."""

    def __init__(self, d_model, heads, core, dropout=0.1, fused_pair=None):
        super().__init__()
        self.h = heads
        self.core, self.fused_pair, self.dropout = core, fused_pair, dropout
        names = ("W_Q_text", "W_K_audio", "W_V_audio", "W_Q_audio", "W_K_text", "W_V_text")
        for n in names:
            setattr(self, n, nn.Linear(d_model, d_model))
        self.layer_norm = nn.LayerNorm(d_model)

    def _split(self, x):
        B, L, E = x.shape
        return x.view(B, L, self.h, E // self.h).transpose(1, 2)

    def forward(self, text, audio, text_pad=None, audio_pad=None):
        def merge(x):
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

        q_t, k_a, v_a = self._split(self.W_Q_text(text)), self._split(self.W_K_audio(audio)), self._split(self.W_V_audio(audio))
        q_a, k_t, v_t = self._split(self.W_Q_audio(audio)), self._split(self.W_K_text(text)), self._split(self.W_V_text(text))
        if self.fused_pair is not None:  # crossattn: both directions in one call
            res = self.fused_pair(q_t, k_t, v_t, q_a, k_a, v_a, text_pad, audio_pad, self.dropout, self.training)
            att_audio, att_text, w_ta, w_at = res.out_x, res.out_y, res.weights_xy, res.weights_yx
        else:
            att_audio, w_ta = self.core(q_t, k_a, v_a, audio_pad, self.dropout, self.training)
            att_text, w_at = self.core(q_a, k_t, v_t, text_pad, self.dropout, self.training)
        out = [self.layer_norm(merge(att_audio) + text), self.layer_norm(merge(att_text) + audio)]
        return out + [w for w in (w_ta, w_at) if w is not None]


class SeedLayer1(nn.Module):
    """Seed 001's one-direction ``CrossModalAttention`` (text queries, image keys/values,
    output projection) with a pluggable attention core."""

    def __init__(self, d_model, heads, core, dropout=0.1):
        super().__init__()
        self.h, self.core, self.dropout = heads, core, dropout
        self.text_query, self.image_key, self.image_value, self.output_proj = (
            nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, text, image, text_pad=None, image_pad=None):
        B, T, E = text.shape

        def split(x):
            return x.view(B, x.shape[1], self.h, E // self.h).transpose(1, 2)

        q, k, v = split(self.text_query(text)), split(self.image_key(image)), split(self.image_value(image))
        ctx, w = self.core(q, k, v, image_pad, self.dropout, self.training)
        out = self.output_proj(ctx.transpose(1, 2).reshape(B, T, E))
        return [out] + ([w] if w is not None else [])


def crossattn_pair(backend, need_weights, prune=None):
    def pair(q_t, k_t, v_t, q_a, k_a, v_a, text_pad, audio_pad, dropout_p, training):
        return crossattn.bidirectional_cross_attention(
            q_t, k_t, v_t, q_a, k_a, v_a, x_padding_mask=text_pad, y_padding_mask=audio_pad,
            dropout_p=dropout_p if training else 0.0, need_weights=need_weights, prune=prune,
            backend=backend)
    return pair


class MHAPair(nn.Module):
    """Two ``torch.nn.MultiheadAttention`` (one per direction) + residual + LayerNorm, or one
    (``one_way``: seed 001's direction, whose output projection MHA has built in)."""

    def __init__(self, d_model, heads, need_weights, dropout=0.1, one_way=False):
        super().__init__()
        self.ta = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.at = None if one_way else nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.layer_norm = nn.LayerNorm(d_model)
        self.need_weights = need_weights

    def forward(self, text, audio, text_pad=None, audio_pad=None):
        a, w_ta = self.ta(text, audio, audio, key_padding_mask=audio_pad, need_weights=self.need_weights)
        if self.at is None:
            return [a] + ([w_ta] if w_ta is not None else [])
        t, w_at = self.at(audio, text, text, key_padding_mask=text_pad, need_weights=self.need_weights)
        out = [self.layer_norm(a + text), self.layer_norm(t + audio)]
        return out + [w for w in (w_ta, w_at) if w is not None]


# --------------------------------------------------------------------------- registry
def _runner(w: Workload, device, dtype, core=None, pair=None, module=None):
    if w.kind in ("core", "stats"):
        def run(inputs: Inputs, train: bool):
            key_pad = None if inputs.audio_mask is None else inputs.audio_mask == 0
            out, weights, *stats = core(inputs.text, inputs.audio, inputs.value, key_pad, 0.0, train)
            if w.kind == "stats":  # the statistics are the result; weights only on the way to them
                return [out] + (stats[0] if stats else stats_from_weights(weights))
            return [out] + ([weights] if weights is not None else [])
        run.parameters = []
        return run
    torch.manual_seed(0)
    if module is None:
        module = SeedLayer1(w.E, w.H, core) if w.kind == "layer1" else SeedLayer(w.E, w.H, core, fused_pair=pair)
    layer = module.to(device=device, dtype=dtype)

    def run(inputs: Inputs, train: bool):
        layer.train(train)
        text_pad = None if inputs.text_mask is None else inputs.text_mask == 0
        audio_pad = None if inputs.audio_mask is None else inputs.audio_mask == 0
        return layer(inputs.text, inputs.audio, text_pad, audio_pad)
    run.parameters = list(layer.parameters())  # their .grad is reset between timed runs
    return run


def _needs_cuda(w, device, dtype):
    return None if torch.device(device).type == "cuda" else "needs a CUDA device"


def _layer_only(w, device, dtype):
    return "a layer-only peer" if w.kind in ("core", "stats") else None


def _cpu_only(w, device, dtype):
    return None if torch.device(device).type == "cpu" else "a CPU yardstick (the fused GPU kernels have other floors)"


def _no_stats(w, device, dtype):
    return "returns no weights to take statistics of" if w.kind == "stats" else None


def _either(*checks):
    def why_not(w, device, dtype):
        return next((r for r in (c(w, device, dtype) for c in checks) if r), None)
    return why_not


def registry(quick: bool) -> list[Impl]:
    impls = [
        # The seed's own code for the workload's layer (the report says which seed).
        Impl("eager", lambda w, d, t: _runner(w, d, t, core=eager_core), writes_weights="full"),
        Impl("nn.MultiheadAttention need_weights=True",
             lambda w, d, t: _runner(w, d, t, module=MHAPair(w.E, w.H, True, one_way=w.kind == "layer1")),
             writes_weights="mean", why_not=_layer_only),
        Impl("nn.MultiheadAttention need_weights=False",
             lambda w, d, t: _runner(w, d, t, module=MHAPair(w.E, w.H, False, one_way=w.kind == "layer1")),
             why_not=_layer_only),
        Impl("sdpa", lambda w, d, t: _runner(w, d, t, core=sdpa_core), why_not=_no_stats),
        Impl("yardstick: eager's matmuls only", lambda w, d, t: _runner(w, d, t, core=matmul_floor_core),
             writes_weights="full", why_not=_either(_layer_only, _cpu_only)),
    ]

    def flex_why_not(w, device, dtype):
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            return "this torch has no FlexAttention"
        if quick or torch.device(device).type != "cuda":
            return "FlexAttention runs compiled; left out of CPU and --quick runs"
        return None

    impls.append(Impl("flex_attention", lambda w, d, t: _runner(w, d, t, core=make_flex_core()),
                      why_not=_either(_no_stats, flex_why_not)))

    def flash_why_not(w, device, dtype):
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not installed"
        if w.ragged:
            return "padding needs flash_attn's varlen API (not benchmarked)"
        return _needs_cuda(w, device, dtype) or (None if dtype in (torch.float16, torch.bfloat16) else "fp16/bf16 only")

    impls.append(Impl("flash_attn", lambda w, d, t: _runner(w, d, t, core=flash_attn_core),
                      why_not=_either(_no_stats, flash_why_not)))

    for backend in ("torch", "triton", "cuda"):
        def why_not(w, device, dtype, backend=backend):
            reason = crossattn.available_backends()[backend]
            if reason:
                return reason
            if backend != "torch" and torch.device(device).type != "cuda":
                return "runs on CUDA tensors (the interpreter is for tests, not timing)"
            return None

        def only_stats(w, device, dtype):
            return None if w.kind == "stats" else "only for statistics workloads"

        def only_ragged_core(w, device, dtype):
            return None if w.kind == "core" and w.kv_fractions else "only for ragged-key core workloads"

        for weights in (False, "mean", "full"):
            # Layers call the bidirectional pair (one launch), cores the single direction;
            # statistics workloads take them from the full weights (the other two give none).
            impls.append(Impl(
                f"crossattn[{backend}] weights={weights or 'off'}",
                lambda w, d, t, b=backend, nw=weights: _runner(
                    w, d, t, core=crossattn_core(b, nw), pair=crossattn_pair(b, nw)),
                writes_weights=weights or None,
                why_not=why_not if weights == "full" else _either(_no_stats, why_not)))
        for keep in (0.5, 0.25, 0.1):
            prune = crossattn.BlockPruning(keep=keep)
            impls.append(Impl(
                f"crossattn[{backend}] prune keep={keep}",
                lambda w, d, t, b=backend, p=prune: _runner(
                    w, d, t, core=crossattn_core(b, False, p), pair=crossattn_pair(b, False, p)),
                why_not=_either(_no_stats, why_not)))
        impls.append(Impl(f"crossattn[{backend}] statistics (return_aux)",
                          lambda w, d, t, b=backend: _runner(w, d, t, core=crossattn_stats_core(b)),
                          why_not=_either(only_stats, why_not)))
        impls.append(Impl(f"crossattn[{backend}] same batch unpadded (full length)",
                          lambda w, d, t, b=backend: _runner(
                              w, d, t, core=lambda q, k, v, pad, p, tr: crossattn_core(b, False)(q, k, v, None, p, tr)),
                          why_not=_either(only_ragged_core, why_not)))
        impls.append(Impl(f"crossattn[{backend}] packed (each example at its length)",
                          lambda w, d, t, b=backend: _runner(w, d, t, core=crossattn_packed_core(b)),
                          why_not=_either(only_ragged_core, why_not)))
    return impls
