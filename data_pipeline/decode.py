"""Decoders from shard bytes to model-ready tensors.

image bytes -> 3×S×S float in [-1, 1]               (decode_image)
audio bytes -> n_mels×audio_frames normalised log-mel (decode_audio)
text        -> 1-D long ids (see tokenizer.py)

The loader splits the first two: its workers decode each sample to uint8
pixels (image_pixels) and a fitted waveform (audio_wave), and collate()
finishes a whole batch at once (scale_pixels, log_mel), which costs far
less than finishing sample by sample.
"""

from __future__ import annotations

import io
from functools import lru_cache

import miniaudio
import numpy as np
import soundfile
import soxr
import torch
from PIL import Image

from data_pipeline.config import AudioFeatures, DataConfig

MODALITIES = ("image", "audio", "text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
TEXT_EXTS = ("txt", "caption")


def image_pixels(data: bytes, *, size: int) -> torch.Tensor:
    """Decodes, resizes the shorter side to `size`, centre-crops: 3×size×size
    uint8. collate() scales a batch of them to [-1, 1] in one operation."""
    with Image.open(io.BytesIO(data)) as img:
        # JPEG draft mode decodes large images at a reduced scale (fast path).
        img.draft("RGB", (size, size))
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1)


def scale_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any leading shape) -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def decode_image(data: bytes, *, size: int) -> torch.Tensor:
    """Decodes, resizes the shorter side to `size`, centre-crops: 3×size×size float in [-1, 1]."""
    return scale_pixels(image_pixels(data, size=size))


def _source_frames(max_samples: int, source_rate: int, sample_rate: int) -> int:
    """The source frames behind max_samples output samples, plus a margin for the resampler's filter."""
    return int(np.ceil(max_samples * source_rate / sample_rate)) + (64 if source_rate != sample_rate else 0)


def _read_lossless(data: bytes, *, sample_rate: int, max_samples: int | None) -> tuple[np.ndarray, int] | None:
    """The start of a short FLAC or WAV that yields max_samples at
    `sample_rate`, through miniaudio's dr_flac/dr_wav: frames × channels
    float32 at the file's own rate, and that rate. None sends the file to
    soundfile instead: another format, a whole file (max_samples None), a
    file longer than twice the window (soundfile decodes just its start),
    and any file these decoders do not give exactly as soundfile would.

    Why not soundfile for these: libsndfile reads in-memory bytes through
    Python callbacks, one call per read and seek, which cost more than the
    decoding itself; miniaudio decodes straight from the buffer, in about a
    third of the time for a one-second FLAC. Both formats are lossless, so
    the two give the same samples (tests/test_loader.py checks it)."""
    if max_samples is None:
        return None
    if data[:4] == b"fLaC":
        read_info = miniaudio.flac_get_info
    elif data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        read_info = miniaudio.wav_get_info
    else:
        return None
    try:
        info = read_info(data)
    except miniaudio.MiniaudioError:
        return None
    if (
        not 1 <= info.nchannels <= 8
        or info.sample_rate <= 0
        or info.num_frames <= 0  # no count in the header, nothing to check the decoding against
        # dr_wav scales unsigned 8-bit as u/127.5 - 1, libsndfile as (u - 128)/128.
        or info.sample_format == miniaudio.SampleFormat.UNSIGNED8
    ):
        return None
    frames = min(info.num_frames, _source_frames(max_samples, info.sample_rate, sample_rate))
    if info.num_frames > 2 * frames:
        return None  # a long file: soundfile decodes only the start the window needs
    # The whole file and one frame more, in a buffer of that size (at most
    # twice the window, whatever the file holds): dr_flac drops a damaged
    # frame without a word (libFLAC reports it) and trusts no count, so a
    # frame short is damage and a frame over a header that undercounts.
    # soundfile then gives its verdict: a counted skip in the loader.
    try:
        stream = miniaudio.stream_memory(
            data,
            output_format=miniaudio.SampleFormat.FLOAT32,
            nchannels=info.nchannels,
            sample_rate=info.sample_rate,
            frames_to_read=info.num_frames + 1,
        )
        try:
            samples = next(stream, None)
        finally:
            stream.close()
    except miniaudio.MiniaudioError:
        return None
    if samples is None or len(samples) != info.num_frames * info.nchannels:
        return None
    wav = np.frombuffer(samples, dtype=np.float32).reshape(-1, info.nchannels)
    return wav[:frames], info.sample_rate


def load_audio(data: bytes, *, sample_rate: int, max_samples: int | None = None) -> np.ndarray:
    """Decodes any soundfile format to mono float32 at `sample_rate`. With
    max_samples, only the start that yields them is decoded (an hour-long
    file costs what its first seconds do). The window of a short FLAC or
    WAV is decoded by miniaudio (faster from memory; see _read_lossless),
    everything else by soundfile."""
    lossless = _read_lossless(data, sample_rate=sample_rate, max_samples=max_samples)
    if lossless is not None:
        wav, sr = lossless
    else:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            frames = -1 if max_samples is None else _source_frames(max_samples, sr, sample_rate)
            wav = f.read(frames=frames, dtype="float32", always_2d=True)
    wav = wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)
    if sr != sample_rate:
        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    return wav


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / _MEL_LOG_STEP
    return np.where(hz >= 1000.0, log_part, hz / (200.0 / 3.0))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(_MEL_LOG_STEP * (mel - 15.0)), mel * (200.0 / 3.0))


_MEL_LOG_STEP = np.log(6.4) / 27.0  # 27 mels per factor 6.4 above 1 kHz


@lru_cache(maxsize=8)
def mel_filterbank(*, sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Slaney-style mel filters, area-normalised (librosa.filters.mel's
    default, from 0 Hz to Nyquist), as an n_mels×(n_fft//2 + 1) tensor:
    triangles between successive points equally spaced in mels, each
    scaled by 2 / its width in Hz.

    Written here, not taken from librosa: importing librosa.filters pulls
    in scipy.signal and numba, about 2 s in every process that builds a
    loader, for 15 lines of arithmetic (tests/test_loader.py checks both
    this and the whole log-mel against librosa).
    Cached: the loader builds it once in the main process before workers fork.
    """
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # the STFT's bin frequencies
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))
    fb = _triangles(edges, bins) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(fb.astype(np.float32))


def _triangles(points: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """len(points) - 2 triangular filters over `bins` (on the scale of
    `points`): filter i rises from points[i] to 1 at points[i + 1] and falls
    to 0 at points[i + 2]."""
    widths = np.diff(points)
    offsets = points[:, None] - bins[None, :]  # points × bins
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    return np.maximum(0.0, np.minimum(rising, falling))


def _kaldi_mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@lru_cache(maxsize=8)
def kaldi_filterbank(*, sample_rate: int, fft_size: int, n_mels: int) -> torch.Tensor:
    """Kaldi's mel filters (as torchaudio.compliance.kaldi.fbank and
    transformers' ASTFeatureExtractor make them): triangles equally spaced
    on the mel scale 1127 ln(1 + f/700) from 20 Hz to Nyquist, triangular
    in mels, unnormalised; n_mels × (fft_size//2 + 1)."""
    points = np.linspace(_kaldi_mel(20.0), _kaldi_mel(sample_rate // 2), n_mels + 2)
    bins = _kaldi_mel(sample_rate / fft_size * np.arange(fft_size // 2 + 1))
    return torch.from_numpy(_triangles(points, bins).astype(np.float32))


@lru_cache(maxsize=8)
def _hann(n_fft: int, periodic: bool = True) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=periodic)


PREEMPHASIS = 0.97  # Kaldi's default, and AST's
KALDI_FLOOR = float(np.finfo(np.float32).eps)  # the smallest mel energy before the log


def kaldi_fbank(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """B×n_mels×audio_frames Kaldi filterbank log energies of a batch of
    fitted waveforms (cfg.audio_samples each), as an Audio Spectrogram
    Transformer's feature extractor computes them (before its
    normalisation): frames of n_fft samples every hop_length from the
    clip's start, each with its DC removed, pre-emphasis, a symmetric Hann
    window, an FFT padded to the next power of two; power, Kaldi mel
    filters, natural log floored at float32's epsilon."""
    frames = x.unfold(-1, cfg.n_fft, cfg.hop_length)[:, : cfg.audio_frames]  # B×T×n_fft
    frames = frames - frames.mean(dim=-1, keepdim=True)
    frames = torch.cat([frames[..., :1] * (1 - PREEMPHASIS), frames[..., 1:] - PREEMPHASIS * frames[..., :-1]], -1)
    size = 1 << (cfg.n_fft - 1).bit_length()
    spec = torch.fft.rfft(frames * _hann(cfg.n_fft, periodic=False), n=size)
    power = spec.real.square().add_(spec.imag.square())  # B×T×F
    mel = power @ kaldi_filterbank(sample_rate=cfg.sample_rate, fft_size=size, n_mels=cfg.n_mels).T
    return mel.clamp_(min=KALDI_FLOOR).log_().transpose(1, 2)


def fit_wave(wav: np.ndarray, n: int) -> torch.Tensor:
    """The first n samples of a waveform, zero-padded to n: a float32 tensor."""
    x = torch.zeros(n, dtype=torch.float32)
    clip = torch.from_numpy(np.ascontiguousarray(wav[:n], dtype=np.float32))
    x[: clip.numel()] = clip
    return x


def _centred(x: torch.Tensor, *, n_fft: int, hop: int, frames: int) -> torch.Tensor:
    """B×L waveforms padded as stft(center=True) pads them, n_fft//2
    reflected samples at each end, but only as far as the first `frames`
    frames reach: the kept frames of a fitted clip seldom reach its end, and
    torch's reflect pad of a whole batch costs a third of the STFT. Then
    stft(center=False) gives exactly those frames."""
    half = n_fft // 2
    end = (frames - 1) * hop - half + n_fft  # where the last kept frame ends, in x's samples
    length = x.shape[-1]
    if half >= length or end - length >= length:
        # Too short to reflect (torch refuses too): the plain centred pad says why.
        return torch.nn.functional.pad(x.unsqueeze(1), (half, half), mode="reflect").squeeze(1)
    parts = [x[..., 1 : half + 1].flip(-1), x[..., :end]]
    if end > length:
        parts.append(x[..., length - 1 - (end - length) : length - 1].flip(-1))
    return torch.cat(parts, dim=-1)


def log_mel(wav, cfg: DataConfig) -> torch.Tensor:
    """n_mels×audio_frames log-mel of one waveform (cropped or padded to
    cfg.audio_samples), or B×n_mels×audio_frames of a B×audio_samples batch
    of fitted ones (fit_wave): power spectrogram, centred Hann frames, Slaney
    mel filters (librosa's melspectrogram), then the log and scaling
    cfg.audio_features names (Whisper's: log10, floored 8 below each clip's
    peak, (x + 4) / 4; or, for kaldi, kaldi_fbank's features instead).

    collate() runs it once per batch: one STFT and one matrix product for
    every clip costs a third of doing them clip by clip. It avoids work: a
    cached window, the power from the real and imaginary parts (no square
    root), only the kept frames, in-place arithmetic."""
    x = torch.as_tensor(wav)
    if x.dim() == 1:
        return log_mel(fit_wave(x.numpy(), cfg.audio_samples).unsqueeze(0), cfg)[0]
    if cfg.audio_features == AudioFeatures.kaldi:
        return kaldi_fbank(x, cfg).sub_(cfg.log_mel_mean).div_(cfg.log_mel_std)
    spec = torch.stft(
        _centred(x, n_fft=cfg.n_fft, hop=cfg.hop_length, frames=cfg.audio_frames),
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        window=_hann(cfg.n_fft),
        center=False,
        return_complex=True,
    )
    parts = torch.view_as_real(spec)
    power = parts[..., 0].square().add_(parts[..., 1].square())  # B×F×T; a third of pow(2).sum(-1)'s time
    mel = mel_filterbank(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels) @ power  # B×M×T
    if cfg.audio_features == AudioFeatures.whisper:
        mel = mel.clamp_(min=1e-10).log10_()
        peak = mel.amax(dim=(1, 2), keepdim=True)
        return torch.maximum(mel, peak - 8.0).add_(4.0).div_(4.0)
    return mel.add_(1e-6).log_().sub_(cfg.log_mel_mean).div_(cfg.log_mel_std)


def audio_wave(data: bytes, cfg: DataConfig) -> torch.Tensor:
    """Decodes a sound to the cfg.audio_samples mono waveform log_mel() reads."""
    return fit_wave(load_audio(data, sample_rate=cfg.sample_rate, max_samples=cfg.audio_samples), cfg.audio_samples)


def decode_audio(data: bytes, cfg: DataConfig) -> torch.Tensor:
    """Decodes a sound to its n_mels×audio_frames normalised log-mel."""
    return log_mel(audio_wave(data, cfg).unsqueeze(0), cfg)[0]


def first_present(sample: dict, exts: tuple[str, ...]):
    """The value of the first extension in `exts` that the sample carries."""
    for ext in exts:
        value = sample.get(ext)
        if value is not None:
            return value
    return None


_WARM: set = set()


def warm_decoders(cfg: DataConfig) -> None:
    """Decodes one tiny image and sound in this process, once. The first
    decode pays for lazy imports and codec set-up (about 2 s here); done
    before the DataLoader forks its workers, every worker inherits it
    instead of paying it again for each new loader (each epoch, each shard
    that train.predict reads)."""
    key = (cfg.image_size, cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.hop_length, cfg.audio_frames, cfg.audio_features)
    if key in _WARM:
        return
    image, sound = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8), (128, 64, 32)).save(image, "JPEG")
    soundfile.write(sound, np.zeros(1600, dtype=np.float32), 8000, format="FLAC")  # resampled: soxr warms too
    decode_image(image.getvalue(), size=cfg.image_size)
    decode_audio(sound.getvalue(), cfg)
    _WARM.add(key)
