"""Data for the reference models: the synthetic spoken-emotion corpus, MELD and MulT/MMSA
aligned pickles, and batch collation."""
from .collate import EmotionCollator, FeatureCollator
from .meld import MELD_EMOTIONS, MELDDataset
from .mmsa import AlignedPickleDataset, iemocap_metrics, mmsa_regression_metrics
from .synthetic import SyntheticEmotionCorpus, espeak_available, read_wav, write_wav

__all__ = ["AlignedPickleDataset", "EmotionCollator", "FeatureCollator", "MELDDataset",
           "MELD_EMOTIONS", "SyntheticEmotionCorpus", "espeak_available", "iemocap_metrics", "mmsa_regression_metrics",
           "read_wav", "write_wav"]
