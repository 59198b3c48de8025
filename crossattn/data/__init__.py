"""Data for the reference models: the synthetic spoken-emotion corpus, MELD and MulT/MMSA
aligned pickles, and batch collation."""
from .collate import EmotionCollator, FeatureCollator
from .meld import MELD_EMOTIONS, MELDDataset
from .mmsa import AlignedPickleDataset
from .synthetic import SyntheticEmotionCorpus, espeak_available, read_wav, write_wav

__all__ = ["AlignedPickleDataset", "EmotionCollator", "FeatureCollator", "MELDDataset",
           "MELD_EMOTIONS", "SyntheticEmotionCorpus", "espeak_available", "read_wav", "write_wav"]
