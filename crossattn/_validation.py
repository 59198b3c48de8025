"""Argument checks for the functional API.

Every check names the argument, what was expected and what came, so that no bad input
reaches a kernel. Value checks that need to read tensor data (lengths in range, positive
temperatures) are skipped while tracing with torch.compile or capturing a CUDA graph, and
when ``CROSSATTN_CHECK_VALUES=0`` (they cost a device sync on the GPU).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .pruning import BlockPruning
from .reference import default_scale, key_valid_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _type_name(x) -> str:
    return type(x).__name__


def _value_checks_enabled(t: torch.Tensor) -> bool:
    if os.environ.get("CROSSATTN_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


@dataclass
class AttentionProblem:
    """One direction of attention, validated and normalised for the backends.

    ``q`` ``[B, H, Lq, D]`` attends to ``k`` ``[B, H, Lk, D]`` / ``v`` ``[B, H, Lk, Dv]``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None  # bool [B, Lk], True = padding
    kv_lengths: torch.Tensor | None  # int64 [B] on q's device
    query_padding_mask: torch.Tensor | None  # bool [B, Lq], True = padding
    scale: float
    temperature: float | torch.Tensor | None  # tensor [] / [1] / [H]
    dropout_p: float
    need_weights: str | None  # None | "full" | "mean"
    pruning: BlockPruning | None
    direction: int = 0  # dropout stream: 0 = one direction / x->y, 1 = y->x
    dropout_seed: torch.Tensor | None = None  # 0-d int64 (CPU), drawn at dispatch

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(B, H, Lq, Lk, D, Dv)."""
        B, H, Lq, D = self.q.shape
        return B, H, Lq, self.k.shape[2], D, self.v.shape[3]

    def key_valid(self) -> torch.Tensor | None:
        B, _, _, Lk, _, _ = self.dims
        return key_valid_mask(self.key_padding_mask, self.kv_lengths, B, Lk, self.q.device)

    def query_valid(self) -> torch.Tensor | None:
        return None if self.query_padding_mask is None else ~self.query_padding_mask


def check_need_weights(need_weights) -> str | None:
    if need_weights is False or need_weights is None:
        return None
    if need_weights is True:
        raise ValueError(
            "need_weights=True is ambiguous: pass need_weights='full' for per-head weights "
            "[B, H, Lq, Lk] or need_weights='mean' for the head average [B, Lq, Lk]"
        )
    if isinstance(need_weights, str) and need_weights in ("full", "mean"):
        return need_weights
    raise ValueError(f"need_weights must be False, 'full' or 'mean', got {need_weights!r}")


def check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float in [0, 1], got {_type_name(dropout_p)}")
    if not (0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _check_qkv(q, k, v, names):
    nq, nk, nv = names
    for t, n in zip((q, k, v), names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {_type_name(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{n} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                f"got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"{n} must be 4-D [B, H, L, D] (the scaled_dot_product_attention layout), "
                f"got {t.dim()}-D shape {_shape(t)}"
            )
    for t, n in ((k, nk), (v, nv)):
        if t.dtype != q.dtype:
            raise TypeError(f"{n} must have the dtype of {nq} ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{n} must be on the device of {nq} ({q.device}), got {t.device}")
    B, H, _, D = q.shape
    for t, n in ((k, nk), (v, nv)):
        if t.shape[0] != B:
            raise ValueError(
                f"{n} must have batch size {B} like {nq} {_shape(q)}, got {n} of shape {_shape(t)}"
            )
        if t.shape[1] != H:
            raise ValueError(
                f"{n} must have {H} heads like {nq} {_shape(q)}, got {n} of shape {_shape(t)} "
                "(grouped-query attention is not supported: repeat the heads)"
            )
    if k.shape[3] != D:
        raise ValueError(
            f"{nk} must have head dim {D} like {nq} {_shape(q)}, got {nk} of shape {_shape(k)}"
        )
    if v.shape[2] != k.shape[2]:
        raise ValueError(
            f"{nv} must have as many keys as {nk} ({k.shape[2]}), got {nv} of shape {_shape(v)}"
        )
    if D == 0 or v.shape[3] == 0:
        raise ValueError(
            f"head dims must be >= 1, got {nq} {_shape(q)} and {nv} {_shape(v)}"
        )


def _check_padding_mask(mask, name, batch, length, length_of, device):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor [B, L] or None, got {_type_name(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = padding, as in nn.MultiheadAttention), "
            f"got {mask.dtype}; for a Hugging Face attention mask (1 = real token) pass "
            "attention_mask == 0"
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{name} must have shape [B, L] = [{batch}, {length}] (L = length of {length_of}), "
            f"got {_shape(mask)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")
    return mask


def _check_lengths(kv_lengths, name, batch, length, length_of, device):
    if kv_lengths is None:
        return None
    if isinstance(kv_lengths, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in kv_lengths):
            raise TypeError(f"{name} as a list must hold ints, got {kv_lengths!r}")
        kv_lengths = torch.tensor(kv_lengths, dtype=torch.int64, device=device)
    if not isinstance(kv_lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor [B] or a list of ints, got {_type_name(kv_lengths)}")
    if kv_lengths.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {kv_lengths.dtype}")
    if tuple(kv_lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {_shape(kv_lengths)}")
    if kv_lengths.device != device:
        raise ValueError(f"{name} must be on {device}, got {kv_lengths.device}")
    if _value_checks_enabled(kv_lengths):
        lo, hi = int(kv_lengths.min()) if batch else 0, int(kv_lengths.max()) if batch else 0
        if lo < 0 or hi > length:
            raise ValueError(
                f"{name} must lie in [0, {length}] (the length of {length_of}), "
                f"got values from {lo} to {hi}"
            )
    return kv_lengths.to(torch.int64)


def check_scale(scale, head_dim: int, name: str = "scale") -> float:
    if scale is None:
        return default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {_type_name(scale)}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return float(scale)


def check_temperature(temperature, heads: int, device, name: str = "temperature"):
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {temperature.dtype}")
        if tuple(temperature.shape) not in ((), (1,), (heads,)):
            raise ValueError(
                f"{name} must be a tensor of shape [], [1] or [H] = [{heads}], "
                f"got {_shape(temperature)}"
            )
        if temperature.device != device:
            raise ValueError(f"{name} must be on {device}, got {temperature.device}")
        if _value_checks_enabled(temperature) and temperature.numel():
            smallest = float(temperature.detach().min())
            if not smallest > 0.0 or not math.isfinite(float(temperature.detach().max())):
                raise ValueError(
                    f"{name} must be positive and finite, got values down to {smallest} "
                    "(parametrise a learnable temperature as exp(log_t))"
                )
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be None, a float or a tensor [H], got {_type_name(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be positive and finite, got {temperature}")
    return float(temperature)


def check_pruning(prune, q, lq: int, lk: int, name: str = "prune") -> BlockPruning | None:
    if prune is None:
        return None
    if isinstance(prune, torch.Tensor):
        if prune.dtype != torch.bool:
            raise TypeError(
                f"{name} as a tensor must be a bool block mask (True = keep), got {prune.dtype}"
            )
        prune = BlockPruning(block_mask=prune)
    if not isinstance(prune, BlockPruning):
        raise TypeError(
            f"{name} must be None, a crossattn.BlockPruning or a bool block mask, "
            f"got {_type_name(prune)}"
        )
    if prune.block_mask is not None:
        B, H = q.shape[:2]
        nqb, nkb = prune.num_blocks(lq, lk)
        m = prune.block_mask
        ok = (
            m.shape[0] in (1, B) and m.shape[1] in (1, H)
            and m.shape[2] == nqb and m.shape[3] == nkb
        )
        if not ok:
            raise ValueError(
                f"{name}: block_mask must have shape [B|1, H|1, ceil(Lq/block_q), ceil(Lk/block_k)]"
                f" = [{B}|1, {H}|1, {nqb}, {nkb}] for Lq={lq}, Lk={lk}, "
                f"block_q={prune.block_q}, block_k={prune.block_k}; got {_shape(m)} "
                "(wrap the mask in crossattn.BlockPruning(block_q=..., block_k=..., block_mask=...) "
                "for other block sizes)"
            )
        if m.device != q.device:
            raise ValueError(f"{name}: block_mask must be on {q.device}, got {m.device}")
    return prune


def check_attention(
    q, k, v, *,
    key_padding_mask=None, kv_lengths=None, query_padding_mask=None,
    scale=None, temperature=None, dropout_p=0.0, need_weights=False, prune=None,
    names=("q", "k", "v"),
    mask_names=("key_padding_mask", "kv_lengths", "query_padding_mask"),
    suffix: str = "",
    direction: int = 0,
) -> AttentionProblem:
    """Validate one direction and return the normalised problem.

    ``names``/``mask_names`` are the caller's argument names, used in error messages;
    ``suffix`` is appended to the names of scale, temperature and prune.
    """
    _check_qkv(q, k, v, names)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kpm_name, len_name, qpm_name = mask_names
    if key_padding_mask is not None and kv_lengths is not None:
        raise ValueError(
            f"pass either {kpm_name} or {len_name}, not both (they both describe key padding)"
        )
    key_padding_mask = _check_padding_mask(key_padding_mask, kpm_name, B, Lk, names[1], q.device)
    kv_lengths = _check_lengths(kv_lengths, len_name, B, Lk, names[1], q.device)
    query_padding_mask = _check_padding_mask(query_padding_mask, qpm_name, B, Lq, names[0], q.device)
    return AttentionProblem(
        q=q, k=k, v=v,
        key_padding_mask=key_padding_mask,
        kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask,
        scale=check_scale(scale, D, "scale" + suffix),
        temperature=check_temperature(temperature, H, q.device, "temperature" + suffix),
        dropout_p=check_dropout(dropout_p),
        need_weights=check_need_weights(need_weights),
        pruning=check_pruning(prune, q, Lq, Lk, "prune" + suffix),
        direction=direction,
    )
