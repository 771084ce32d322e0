"""The data pipeline's own config: where shards live and how samples are decoded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # Shard locations: a directory of .tar files, a glob, or a brace pattern
    # ("shards/train-{000000..000011}.tar"). Several may be joined with "::".
    train: str = "data/demo/train"
    heldout: str = "data/demo/heldout"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    # `pipe:` URLs run a shell command per shard; refused unless enabled.
    allow_pipe: bool = False

    # Image decoding: shorter side resized to image_size, then centre-cropped.
    image_size: int = 64
    # Audio decoding: mono at sample_rate, log-mel with n_mels bins; clips are
    # cropped or zero-padded to audio_frames frames of hop_length samples.
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 320
    n_mels: int = 64
    audio_frames: int = 48
    # Fixed affine normalisation of the log-mel (not per sample, so loudness
    # stays informative).
    log_mel_mean: float = -6.0
    log_mel_std: float = 4.0
    # Text: byte-level ids, truncated to max_text_len tokens (BOS/EOS included).
    max_text_len: int = 64

    @property
    def audio_samples(self) -> int:
        """Samples per clip: exactly enough for audio_frames frames."""
        return self.audio_frames * self.hop_length
