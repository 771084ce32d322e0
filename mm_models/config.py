"""Model configs: plain dataclasses (Hydra registers them from `train`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


# Keys with a fixed set of choices are Enums: composing a config with any
# other value fails, naming the key and the choices. Members equal their
# strings, so code and YAML use plain strings.
class Positions(StrEnum):
    learned = "learned"
    rotary = "rotary"


class RnnCell(StrEnum):
    gru = "gru"
    lstm = "lstm"


class FusionName(StrEnum):
    none = "none"
    concat = "concat"
    weighted_sum = "weighted_sum"
    attention = "attention"


class Contrastive(StrEnum):
    infonce = "infonce"
    siglip = "siglip"


@dataclass
class EncoderConfig:
    # The encoder (mm_models.encoders.ENCODERS): "transformer" (image, audio:
    # a ViT over patches, alias "vit"; text: over token embeddings),
    # "conv_transformer" (image, audio: the ViT with a convolutional stem,
    # alias "vit_conv"), "cnn" (image, audio: ResNet-style), "rnn" (text: a
    # bidirectional GRU or LSTM), "hf" (any modality: a Hugging Face
    # transformers backbone loaded from `pretrained`).
    arch: str = "transformer"
    # Output width of every encoder (tokens and pooled features): the
    # transformer's width, the CNN's last stage, the RNN's two directions
    # together; an hf backbone of another width is projected to it.
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    # Side of the square patches cut from images and spectrograms (ignored by text).
    patch_size: int = 8
    # "learned" absolute position embeddings, or "rotary" (RoPE on queries and
    # keys, over the token order; patches in raster order).
    positions: Positions = Positions.learned
    # Recompute each block's (CNN: stage's) activations in the backward pass to save memory.
    activation_checkpointing: bool = False
    # FLIP: in training, drop this fraction of the patches at random before
    # the transformer (image and audio, arch transformer or conv_transformer,
    # learned positions); evaluation and inference see every patch.
    token_dropout: float = 0.0
    # rnn: "gru" or "lstm".
    rnn_cell: RnnCell = RnnCell.gru
    # hf: a local directory in Hugging Face's save_pretrained layout.
    pretrained: str = ""
    # Lock the encoder (LiT): its weights get no gradient and no optimizer
    # state and stay in eval mode; only its projection into the shared
    # embedding space trains.
    freeze: bool = False


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
    # none: late fusion, contrastive alignment only (CLIP / ImageBind style);
    # concat, weighted_sum, attention: one fused embedding per tuple.
    name: FusionName = FusionName.none
    width: int = 256  # hidden width of the fusion MLP / transformer
    depth: int = 2  # attention: fusion transformer blocks
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class ObjectiveConfig:
    # Contrastive alignment over every modality pair: "infonce" (symmetric
    # softmax, CLIP) or "siglip" (pairwise sigmoid with a learnable bias).
    contrastive: Contrastive = Contrastive.infonce
    contrastive_weight: float = 1.0
    temperature_init: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    siglip_bias_init: float = -10.0
    # Fused-tuple objectives (need fusion != none): aligned vs shuffled tuples
    # with hard negatives, and masked text modelling on the fused tokens
    # (fusion=attention). Weight 0 switches one off.
    matching_weight: float = 0.0
    masked_text_weight: float = 0.0
    mask_prob: float = 0.15
