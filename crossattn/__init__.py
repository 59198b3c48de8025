"""crossattn: fused cross-modal attention for PyTorch that can return its weights.

Text tokens attending to audio frames or image patches (and the reverse, in one call),
with padding masks, learnable temperature, dropout, block pruning, and attention weights
(full or head-averaged) that carry gradients.

Start with ``crossattn.cross_attention`` and ``crossattn.bidirectional_cross_attention``
(functional, SDPA layout ``[B, H, L, D]``) or the modules in ``crossattn.nn`` (``[B, L, E]``).
``crossattn.available_backends()`` maps each backend name to ``None`` when it can run in this
process, else to the reason it cannot (no CUDA device, extension not built, Triton missing);
``crossattn.choose_backend(q, k, v, ...)`` says which backend a call would use. The README's
Configuration section lists the ``CROSSATTN_*`` environment variables.
"""
from .backends import BackendChoice, available_backends
from .functional import (
    bidirectional_cross_attention,
    choose_backend,
    cross_attention,
    merge_attention,
    select_blocks,
)
from .pruning import BlockPruning
from .reference import AuxOutput, AuxRequest, BidirectionalOutput
from . import alignment, nn  # noqa: E402  (after the functional API they are built on)
from .nn import convert_multihead_attention

__version__ = "0.1.0"

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BackendChoice",
    "BidirectionalOutput",
    "BlockPruning",
    "available_backends",
    "bidirectional_cross_attention",
    "choose_backend",
    "convert_multihead_attention",
    "cross_attention",
    "merge_attention",
    "nn",
    "select_blocks",
    "alignment",
    "__version__",
]
