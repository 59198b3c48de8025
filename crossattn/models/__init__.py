"""Reference models built on crossattn's modules: the seed 000 text–audio emotion model,
HCT-DMG (arXiv 2305.13583) and the fusion baselines of arXiv 2501.08085."""
from .baselines import FusionBaseline, ModalityTransformer
from .emotion import (
    EMOTIONS, MetadataEncoder, TextAudioEmotionModel, alignment_loss, attention_entropy,
    attention_statistics, coverage_alignment_loss, diversity_loss, head_entropy_loss,
)
from .encoders import LogMelEncoder, WordTokenizer, masked_mean
from .hct_dmg import HCTDMG, CrossmodalTransformer

__all__ = [
    "EMOTIONS", "HCTDMG", "CrossmodalTransformer", "FusionBaseline", "LogMelEncoder",
    "MetadataEncoder", "ModalityTransformer", "TextAudioEmotionModel", "WordTokenizer",
    "alignment_loss", "attention_entropy", "attention_statistics", "coverage_alignment_loss",
    "diversity_loss", "head_entropy_loss", "masked_mean",
]
