"""Argument checks for the functional API.

Every check names the argument, what was expected and what came, so that no bad input
reaches a kernel. Checks of tensor *values* (lengths in range, positive temperatures) never
make a call wait for the GPU: on CPU tensors they run eagerly; on CUDA tensors they are
device-side asserts (``torch._assert_async``: the error surfaces at the next sync) unless
``CROSSATTN_CHECK_VALUES=1`` asks for eager checks (a device sync per call); they are skipped
on meta tensors, while tracing with torch.compile, while capturing a CUDA graph, and with
``CROSSATTN_CHECK_VALUES=0``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch._subclasses import fake_tensor as _fake_tensor

from .pruning import BlockPruning
from .reference import AuxRequest, compute_dtype, default_scale, key_valid_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _type_name(x) -> str:
    return type(x).__name__


def values_unreadable(t: torch.Tensor) -> bool:
    """True where ``t`` has no values to read on the host: meta and fake tensors (shape
    inference, ``FakeTensorMode``, export) and tracing under ``torch.compile``."""
    return t.device.type == "meta" or torch.compiler.is_compiling() or _is_fake(t)


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor (a seed, a table of indices) on ``device`` without waiting for the
    GPU: a copy from pageable memory synchronizes the stream, one from pinned memory with
    ``non_blocking`` does not (the caching host allocator keeps the buffer until it is read)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _is_fake(t: torch.Tensor) -> bool:
    return _fake_tensor.is_fake(t)


def _value_check_mode(t: torch.Tensor) -> str | None:
    """"eager" (read the values now), "async" (device-side assert) or None (skip)."""
    setting = os.environ.get("CROSSATTN_CHECK_VALUES", "")
    if setting == "0" or values_unreadable(t):
        return None
    if t.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return None
        return "eager" if setting == "1" else "async"
    return "eager"


def _check_values(t: torch.Tensor, ok: torch.Tensor, message) -> None:
    """Raise ``ValueError(message())`` unless the bool tensor ``ok`` is true -- without a
    device sync (see the module docstring)."""
    mode = _value_check_mode(t)
    if mode == "eager" and not bool(ok):
        raise ValueError(message())
    if mode == "async":
        torch._assert_async(ok, message())


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
    # A view of the caller's bias, 4-D [B|1, H|1, Lq|1, Lk|1] (read it through
    # .expand(B, H, Lq, Lk): stride 0 on broadcast dims; never materialise it).
    attn_bias: torch.Tensor | None = None
    is_causal: bool = False  # query i sees keys j <= i + (Lk - Lq)
    weight_heads: tuple[int, ...] | None = None  # distinct non-negative query heads
    aux: AuxRequest | None = None  # None when no statistic is requested

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(B, H, Lq, Lk, D, Dv)."""
        B, H, Lq, D = self.q.shape
        return B, H, Lq, self.k.shape[2], D, self.v.shape[3]

    @property
    def kv_heads(self) -> int:
        """Key/value heads: query head h reads kv head ``h // (H // kv_heads)``."""
        return self.k.shape[1]

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
        if t.is_nested:
            raise TypeError(
                f"{n} must be a dense (strided) tensor, got a nested tensor: pad it "
                "(t.to_padded_tensor(0.0)) and pass the padding as a mask"
            )
        if t.layout != torch.strided:
            raise TypeError(f"{n} must be a dense (strided) tensor, got layout {t.layout} (use .to_dense())")
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
    Hkv = k.shape[1]
    if (Hkv == 0 and H != 0) or (Hkv and H % Hkv):
        raise ValueError(
            f"{nk} must have a number of heads that divides the {H} query heads of {nq} {_shape(q)} "
            f"(grouped-query attention: H % Hkv == 0), got {Hkv} heads in {nk} of shape {_shape(k)}"
        )
    if v.shape[1] != Hkv:
        raise ValueError(
            f"{nv} must have the {Hkv} heads of {nk} {_shape(k)} (keys and values share their heads; "
            f"grouped-query attention lets both have fewer heads than {nq}), got {nv} of shape {_shape(v)}"
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
        if len(kv_lengths) != batch:
            raise ValueError(f"{name} must have B = {batch} entries, got {len(kv_lengths)}")
        bad = [x for x in kv_lengths if not 0 <= x <= length]
        if bad:  # checked here: values past int64 must not reach torch.tensor
            raise ValueError(
                f"{name} must lie in [0, {length}] (the length of {length_of}), got {bad[0]}"
            )
        kv_lengths = host_to_device(torch.tensor(kv_lengths, dtype=torch.int64), device)
    if not isinstance(kv_lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor [B] or a list of ints, got {_type_name(kv_lengths)}")
    if kv_lengths.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {kv_lengths.dtype}")
    if tuple(kv_lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {_shape(kv_lengths)}")
    if kv_lengths.device != device:
        raise ValueError(f"{name} must be on {device}, got {kv_lengths.device}")
    if batch:
        ok = ((kv_lengths >= 0) & (kv_lengths <= length)).all()
        _check_values(kv_lengths, ok, lambda: (
            f"{name} must lie in [0, {length}] (the length of {length_of}), got values from "
            + (f"{int(kv_lengths.min())} to {int(kv_lengths.max())}" if kv_lengths.device.type == "cpu"
               else "outside that range")))
    return kv_lengths.to(torch.int64)


def check_scale(scale, head_dim: int, name: str = "scale") -> float:
    if scale is None:
        return default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {_type_name(scale)}")
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return float(scale)


def check_temperature(temperature, heads: int, device, name: str = "temperature", *, scale=None,
                      dtype=torch.float32):
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
        if temperature.numel():
            t = temperature.detach()
            ok = ((t > 0) & torch.isfinite(t)).all()
            if scale is not None:  # scale / temperature multiplies every logit
                ok = ok & torch.isfinite(scale / t.to(compute_dtype(dtype))).all()
            _check_values(t, ok, lambda: (
                f"{name} must be positive, finite and not so small that scale / {name} overflows, got "
                + (f"values from {float(t.min())} to {float(t.max())}" if t.device.type == "cpu"
                   else "a value outside that range")
                + " (parametrise a learnable temperature as exp(log_t))"))
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be None, a float or a tensor [H], got {_type_name(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be positive and finite, got {temperature}")
    return float(temperature)


def fold_scale(scale: float, temperature, dtype: torch.dtype, names: tuple[str, str]):
    """``(scale, temperature)`` with a float temperature folded into the scale in float64 on
    the host, so that ``1/temperature`` never overflows on its own; the product must be
    representable in the compute dtype (it multiplies every logit)."""
    limit = torch.finfo(compute_dtype(dtype)).max
    if isinstance(temperature, float):
        coef = scale / temperature
        if not math.isfinite(coef) or abs(coef) > limit:
            raise ValueError(
                f"{names[0]} / {names[1]} = {scale!r} / {temperature!r} overflows "
                f"{compute_dtype(dtype)} (the logits would be inf): use a larger temperature or a "
                "smaller scale"
            )
        return coef, None
    if abs(scale) > limit:
        raise ValueError(f"{names[0]} = {scale!r} overflows {compute_dtype(dtype)} (the logits would be inf)")
    return scale, temperature


def check_pruning(prune, q, lq: int, lk: int, name: str = "prune") -> BlockPruning | None:
    if prune is None:
        return None
    if isinstance(prune, torch.Tensor):
        if prune.dtype != torch.bool:
            raise TypeError(
                f"{name} as a tensor must be a bool block mask (True = keep), got {prune.dtype}"
            )
        if prune.dim() != 4:  # else BlockPruning's own message would not name the argument
            nqb, nkb = -(-lq // 64), -(-lk // 64)  # BlockPruning()'s default blocks
            raise ValueError(
                f"{name} as a tensor must be a 4-D bool block mask [B|1, H|1, ceil(Lq/64), "
                f"ceil(Lk/64)] = [{q.shape[0]}|1, {q.shape[1]}|1, {nqb}, {nkb}], got {_shape(prune)} "
                "(wrap the mask in crossattn.BlockPruning(block_q=..., block_k=..., block_mask=...) "
                "for other block sizes)"
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


def check_attn_bias(bias, q, lk: int, name: str = "attn_bias"):
    """A view of ``bias`` as ``[B|1, H|1, Lq|1, Lk|1]`` (never expanded in memory)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a float tensor broadcastable to [B, H, Lq, Lk] or None, "
                        f"got {_type_name(bias)}")
    if bias.dtype == torch.bool:
        raise TypeError(
            f"{name} must be a float tensor (added to the logits), got torch.bool; for a bool mask "
            "(True = attend) pass torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float('-inf'))"
        )
    if not bias.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {bias.dtype}")
    if bias.is_nested or bias.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor")
    if bias.device != q.device:
        raise ValueError(f"{name} must be on {q.device}, got {bias.device}")
    B, H, Lq, _ = q.shape
    full = (B, H, Lq, lk)
    if bias.dim() > 4 or any(s not in (1, f) for s, f in zip(bias.shape[::-1], full[::-1])):
        raise ValueError(
            f"{name} must broadcast to [B, H, Lq, Lk] = {list(full)} (each dim of size 1 or full, "
            f"e.g. [Lq, Lk], [B, 1, Lq, Lk], [1, H, 1, Lk]), got {_shape(bias)}"
        )
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def check_weight_heads(weight_heads, heads: int, need_weights, name: str = "weight_heads"):
    if weight_heads is None:
        return None
    if isinstance(weight_heads, torch.Tensor):
        if weight_heads.dtype.is_floating_point or weight_heads.dtype == torch.bool or weight_heads.dim() != 1:
            raise TypeError(f"{name} as a tensor must be a 1-D integer tensor, got {weight_heads.dtype} "
                            f"of shape {_shape(weight_heads)}")
        weight_heads = weight_heads.tolist()  # host data: a list of head indices
    if isinstance(weight_heads, int) and not isinstance(weight_heads, bool):
        weight_heads = [weight_heads]
    if not isinstance(weight_heads, (list, tuple, range)) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in weight_heads
    ):
        raise TypeError(f"{name} must be a sequence of head indices (ints), got {weight_heads!r}")
    if need_weights is None:
        raise ValueError(f"{name} selects heads of the returned weights: pass need_weights='full' or 'mean' too")
    if len(weight_heads) == 0:
        raise ValueError(f"{name} must name at least one head, got an empty sequence")
    norm = []
    for h in weight_heads:
        if not -heads <= h < heads:
            raise ValueError(f"{name} must hold head indices in [0, {heads}) (or negative from the end), got {h}")
        norm.append(h % heads)
    if len(set(norm)) != len(norm):
        raise ValueError(f"{name} must not repeat a head, got {list(weight_heads)}")
    return tuple(norm)


def check_aux(return_aux, name: str = "return_aux"):
    if return_aux is None:
        return None
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(f"{name} must be None or a crossattn.AuxRequest(lse=..., entropy=..., key_mass=..., "
                        f"top_k=...), got {_type_name(return_aux)}")
    return return_aux


def check_attention(
    q, k, v, *,
    key_padding_mask=None, kv_lengths=None, query_padding_mask=None,
    scale=None, temperature=None, dropout_p=0.0, need_weights=False, prune=None,
    attn_bias=None, is_causal=False, weight_heads=None, return_aux=None,
    names=("q", "k", "v"),
    mask_names=("key_padding_mask", "kv_lengths", "query_padding_mask"),
    suffix: str = "",
    direction: int = 0,
    prune_name: str | None = None,
) -> AttentionProblem:
    """Validate one direction and return the normalised problem.

    ``names``/``mask_names`` are the caller's argument names, used in error messages;
    ``suffix`` is appended to the names of scale, temperature and prune (``prune_name``, when
    given, is the caller's name for ``prune``).
    """
    _check_qkv(q, k, v, names)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    kpm_name, len_name, qpm_name = mask_names
    if key_padding_mask is not None and kv_lengths is not None:
        raise ValueError(
            f"pass either {kpm_name} or {len_name}, not both (they both describe key padding)"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {_type_name(is_causal)}")
    key_padding_mask = _check_padding_mask(key_padding_mask, kpm_name, B, Lk, names[1], q.device)
    kv_lengths = _check_lengths(kv_lengths, len_name, B, Lk, names[1], q.device)
    query_padding_mask = _check_padding_mask(query_padding_mask, qpm_name, B, Lq, names[0], q.device)
    scale_name, temp_name = "scale" + suffix, "temperature" + suffix
    scale = check_scale(scale, D, scale_name)
    temperature = check_temperature(temperature, H, q.device, temp_name, scale=scale, dtype=q.dtype)
    scale, temperature = fold_scale(scale, temperature, q.dtype, (scale_name, temp_name))
    need_weights = check_need_weights(need_weights)
    if need_weights == "mean" and H == 0:
        raise ValueError(f"need_weights='mean' averages the query heads, but {names[0]} has none "
                         f"(shape {list(q.shape)}); ask for 'full' (an empty [B, 0, Lq, Lk]) or False")
    aux = check_aux(return_aux)
    return AttentionProblem(
        q=q, k=k, v=v,
        key_padding_mask=key_padding_mask,
        kv_lengths=kv_lengths,
        query_padding_mask=query_padding_mask,
        scale=scale,
        temperature=temperature,
        dropout_p=check_dropout(dropout_p),
        need_weights=need_weights,
        pruning=check_pruning(prune, q, Lq, Lk, prune_name or "prune" + suffix),
        direction=direction,
        attn_bias=check_attn_bias(attn_bias, q, Lk),
        is_causal=is_causal,
        weight_heads=check_weight_heads(weight_heads, H, need_weights),
        aux=aux if aux is not None and aux.any else None,
    )
