"""The data pipeline's own config: where shards live and how samples are decoded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, List


class Mode(StrEnum):
    """data.mode (see DataConfig); members equal their strings."""

    epoch = "epoch"
    resampled = "resampled"


MODES = tuple(Mode)


class AudioFeatures(StrEnum):
    """data.audio_features (see DataConfig); members equal their strings."""

    log_mel = "log_mel"
    whisper = "whisper"
    kaldi = "kaldi"


@dataclass
class SourceConfig:
    """One weighted shard source: a directory, glob or brace pattern, local or
    http(s)://, several joined with "::"."""

    url: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # Training shards; `sources` (if non-empty) replaces `train` with several
    # weighted sources. Patterns: a directory of .tar files, a glob, or a brace
    # pattern ("shards/train-{000000..000011}.tar"), joined with "::".
    train: str = "data/demo/train"
    sources: List[SourceConfig] = field(default_factory=list)
    heldout: str = "data/demo/heldout"
    # epoch: every sample exactly once per epoch over all ranks and workers,
    # the same number of batches on every rank. resampled: an endless mix of
    # the sources, drawn by weight.
    mode: Mode = Mode.epoch
    # DataLoader worker processes per rank. "auto": the CPUs this process may
    # use, shared among the ranks on this node, one left for the trainer
    # itself (at least 1, at most 8); see worker_count.
    num_workers: Any = "auto"
    # Samples are shuffled in blocks of this many (plus a seeded shard order).
    shuffle_buffer: int = 1000
    seed: int = 0
    # `pipe:` URLs run a shell command per shard; refused unless enabled.
    allow_pipe: bool = False
    # Modalities a sample must have; one lacking any is skipped and counted.
    require: List[str] = field(default_factory=list)
    # The run stops, naming the shard, after this many bad samples in a row.
    max_consecutive_errors: int = 100
    # Untrusted shards: a tar member larger than this is never read into
    # memory; its sample is a counted skip (data/skipped/oversized_member).
    max_member_bytes: int = 256 << 20
    # Remote shards (s3://, gs://, az://, http(s)://) are kept in this local
    # directory, one per node, and read from there by every rank, worker and
    # epoch; "" (the default) reads them remotely each time. Bounded by
    # cache_max_gb: the least recently read shards are deleted beyond it.
    cache_dir: str = ""
    cache_max_gb: float = 50.0
    # "byte" (no training needed) or the path of a tokenizer JSON.
    tokenizer: str = "byte"

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
    # What the audio tower reads (data_pipeline.decode.log_mel):
    # log_mel: our log-mel: power STFT of centred Hann frames, Slaney mel
    #   filters, natural log, then (x - log_mel_mean) / log_mel_std.
    # whisper: Whisper's feature extractor's: the same mels, but log10,
    #   floored 8 below the clip's peak, then (x + 4) / 4 (log_mel_* unused).
    # kaldi: Kaldi filterbanks as an Audio Spectrogram Transformer's feature
    #   extractor computes them: frames of n_fft samples every hop_length, not
    #   centred (each one's DC removed, pre-emphasis 0.97, a symmetric Hann
    #   window, the FFT padded to a power of two), HTK-style mel filters from
    #   20 Hz, natural log; then (x - log_mel_mean) / log_mel_std (AST's own:
    #   its mean and twice its std).
    # A pretrained audio backbone (model.audio.arch=hf) is checked at start to
    # get the features its extractor makes.
    audio_features: AudioFeatures = AudioFeatures.log_mel
    # Text: token ids, truncated to max_text_len tokens (BOS/EOS included).
    max_text_len: int = 64

    # Zero-shot classification (evaluation): a sample's .json may carry an
    # integer class label under label_key and its class name under class_key.
    # Each class is scored by the mean text embedding of the prompts, each
    # with "{}" replaced by the class name. label_key "" turns labels off.
    label_key: str = "label"
    class_key: str = "class"
    prompts: List[str] = field(default_factory=lambda: ["{}", "a {}"])

    @property
    def audio_samples(self) -> int:
        """Samples per clip: exactly enough for audio_frames frames (centred
        ones; with kaldi features, frames that start at the clip's start)."""
        if self.audio_features == AudioFeatures.kaldi:
            return (self.audio_frames - 1) * self.hop_length + self.n_fft
        return self.audio_frames * self.hop_length


def worker_count(value: Any, *, local_ranks: int | None = None) -> int:
    """data.num_workers as a number: an integer >= 0 as given, or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if local_ranks is None:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(1, min(8, cpus // max(1, local_ranks) - 1))
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"data.num_workers must be an integer >= 0 or 'auto', got {value!r}")
    return n
