"""crossattn: fused cross-modal attention for PyTorch that can return its weights.

Text tokens attending to audio frames or image patches (and the reverse, in one call),
with padding masks, learnable temperature, dropout, block pruning, and attention weights
(full or head-averaged) that carry gradients. See ``crossattn.cross_attention``.
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
from . import nn  # noqa: E402  (after the functional API it is built on)
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
    "__version__",
]
