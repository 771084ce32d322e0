"""Tri-modal (image, audio, text) transformer models. Imports torch only."""

from mm_models.config import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.io import load
from mm_models.model import MultimodalModel, PretrainModel
from mm_models.objectives import MODALITIES, PAIRS, ContrastiveLoss, Gather

__all__ = [
    "EncoderConfig",
    "FusionConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "MultimodalModel",
    "PretrainModel",
    "ContrastiveLoss",
    "Gather",
    "MODALITIES",
    "PAIRS",
    "load",
]
