"""Drop-in ``torch.nn`` modules built on crossattn's functional API."""
from .modules import BidirectionalCrossAttention, CrossModalAttention
from .multihead import MultiheadAttention, convert_multihead_attention

__all__ = [
    "BidirectionalCrossAttention",
    "CrossModalAttention",
    "MultiheadAttention",
    "convert_multihead_attention",
]
