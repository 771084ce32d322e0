"""Shard writing, streaming, decoding and collation of image-text-audio samples.

The batch contract produced by :func:`build_loader` (the README's "What the loader yields")::

    image      B×3×H×W float   image_mask B bool
    audio      B×M×T   float   audio_mask B bool   (log-mel, M mel bins, T frames)
    text       B×L     long    text_mask  B bool   text_pad B×L bool (True = padding)
    __key__    list[str]
"""

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader, collate
from data_pipeline.tokenizer import ByteTokenizer

__all__ = ["DataConfig", "ByteTokenizer", "build_loader", "collate"]
