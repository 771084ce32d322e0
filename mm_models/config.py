"""Model configs: plain dataclasses (Hydra registers them from `train`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    # Side of the square patches cut from images and spectrograms (ignored by text).
    patch_size: int = 8


@dataclass
class ModelConfig:
    name: str = "tiny"
    embed_dim: int = 128  # shared embedding space of all modalities
    image: EncoderConfig = field(default_factory=EncoderConfig)
    audio: EncoderConfig = field(default_factory=EncoderConfig)
    text: EncoderConfig = field(default_factory=EncoderConfig)
    # Input geometry; train's config interpolates these from the data config.
    image_size: int = 64
    n_mels: int = 64
    audio_frames: int = 48
    max_text_len: int = 64
    vocab_size: int = 260
    dropout: float = 0.0


@dataclass
class FusionConfig:
    # "none": late fusion, contrastive alignment only (CLIP / ImageBind style).
    name: str = "none"


@dataclass
class ObjectiveConfig:
    contrastive_weight: float = 1.0
    temperature_init: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
