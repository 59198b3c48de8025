"""The one call convention of the feature-level models (HCTDMG, FusionBaseline):
``model(text, audio, vision, *, text_padding_mask=None, audio_padding_mask=None,
vision_padding_mask=None)`` with features ``[B, L_m, dim_m]`` and bool masks (True = padding)."""
from __future__ import annotations

import torch
from torch import Tensor

MODALITIES = ("text", "audio", "vision")


def check_modalities(dims, features: dict, masks: dict) -> tuple[dict, dict]:
    """Validates ``features`` / ``masks`` (dicts by modality name, in MODALITIES order) against
    the widths ``dims`` the model was built for; returns them restricted to the used modalities.
    A model built for two modalities takes ``vision=None``."""
    used = MODALITIES[: len(dims)]
    batch = None
    for m in MODALITIES:
        x, pad = features[m], masks[m]
        if m not in used:
            if x is not None or pad is not None:
                raise ValueError(f"{m}: this model was built for {len(dims)} modalities {list(used)}; "
                                 f"pass {m}=None (and no {m}_padding_mask)")
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{m} must be a float tensor [B, L, {dims[used.index(m)]}], got {type(x).__name__}")
        width = dims[used.index(m)]
        if x.dim() != 3 or x.shape[2] != width or not x.is_floating_point():
            raise ValueError(f"{m} must be a float tensor [B, L_{m}, {width}], got {x.dtype} {list(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{m} must have at least one step, got shape {list(x.shape)}")
        batch = x.shape[0] if batch is None else batch
        if x.shape[0] != batch:
            raise ValueError(f"{m} has batch size {x.shape[0]}, but {used[0]} has {batch}")
        if pad is not None:
            if not isinstance(pad, Tensor) or pad.dtype != torch.bool:
                raise TypeError(f"{m}_padding_mask must be a bool tensor [B, L_{m}] (True = padding), got "
                                f"{getattr(pad, 'dtype', type(pad).__name__)}")
            if tuple(pad.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{m}_padding_mask must have shape {list(x.shape[:2])} (as {m}), got "
                                 f"{list(pad.shape)}")
    return {m: features[m] for m in used}, {m: masks[m] for m in used}
