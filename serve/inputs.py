"""What a caller may hand the predictor, checked before anything is decoded.

An image or a sound arrives as a path, bytes, a PIL image or an
(array, rate) waveform. Each is turned into the bytes of a file and checked
from its header alone: an image's size (PIL opens lazily, so a PNG that
claims 50,000 x 50,000 pixels is refused before a pixel is decoded), a
sound's length (the WAV or FLAC header's own count, else soundfile.info).
Decoding itself is the training loader's (serve.predictor).

Every refusal is an InputError: a ValueError of one line that names the
input, with the HTTP status the service answers it with (413 for a size
over a limit, 422 for anything unusable).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The image formats read. PIL opens many more (some through external
# programs); these are the ones a camera, a browser or a dataset writes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class Limits:
    """What one input may be. The defaults suit a service; a trusted caller
    of the Python API may raise them."""

    max_image_pixels: int = 40_000_000
    max_audio_s: float = 600.0
    max_text_chars: int = 10_000
    max_classes: int = 1000

    def check(self) -> None:
        for name in ("max_image_pixels", "max_audio_s", "max_text_chars", "max_classes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


class InputError(ValueError):
    """An input that cannot be used, in one line naming it; `status` is the
    HTTP status the service answers with, `field` the input's name."""

    def __init__(self, message: str, *, status: int = 422, field: str = ""):
        super().__init__(" ".join(message.split()))
        self.status, self.field = status, field


def one_line(e: BaseException | str) -> str:
    """An exception (or its text) as a short line, without the in-memory
    file objects PIL and soundfile put in their messages."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", text)
    return " ".join(text.split())[:300]


def label(field: str, value) -> str:
    """How an input is named in a message: its field, and its path if it is one."""
    return f"{field} {os.fspath(value)!r}" if isinstance(value, (str, os.PathLike)) else field


def read_file(value, name: str, field: str) -> bytes:
    try:
        with open(value, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file", field=field) from None
    except OSError as e:
        raise InputError(f"{name}: cannot read it ({e.strerror or e})", field=field) from None


def as_bytes(value) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


# -- images ---------------------------------------------------------------
def image_bytes(value, limits: Limits, *, field: str = "image") -> bytes:
    """The encoded image behind `value` (a path, bytes or a PIL image),
    checked to be a readable image within the pixel limit."""
    name = label(field, value)
    if isinstance(value, Image.Image):
        check_pixels(*value.size, limits, name, field)
        # The loader decodes files: the image is handed to it as a lossless
        # PNG of the same pixels (image_pixels converts to RGB as here).
        img = value if value.mode == "RGB" else value.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    data = as_bytes(value)
    if data is None and isinstance(value, (str, os.PathLike)):
        data = read_file(value, name, field)
    if data is None:
        raise InputError(
            f"{name}: a {type(value).__name__} is not an image; give a path, bytes or a PIL image", field=field
        )
    check_image(data, limits, name=name, field=field)
    return data


def check_image(data: bytes, limits: Limits, *, name: str, field: str) -> None:
    """Reads the header only: the format and the size."""
    if not data:
        raise InputError(f"{name}: empty file", field=field)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:
        raise InputError(
            f"{name}: over max_image_pixels={limits.max_image_pixels} ({e})", status=413, field=field
        ) from None
    except Exception as e:  # PIL's plugins raise many kinds on a malformed header
        raise InputError(
            f"{name}: not a readable image ({one_line(e)}); send {', '.join(IMAGE_FORMATS)}", field=field
        ) from None
    check_pixels(w, h, limits, name, field)


def check_pixels(w: int, h: int, limits: Limits, name: str, field: str) -> None:
    if w * h > limits.max_image_pixels:
        raise InputError(
            f"{name}: {w}x{h} = {w * h} pixels is over max_image_pixels={limits.max_image_pixels}",
            status=413,
            field=field,
        )
    if w < 1 or h < 1:
        raise InputError(f"{name}: {w}x{h} pixels", field=field)


# -- sounds ---------------------------------------------------------------
def audio_bytes(value, limits: Limits, *, sample_rate: int, window: int, field: str = "audio") -> bytes:
    """The encoded sound behind `value`: a path, bytes, or an (array, rate)
    waveform (written as a float WAV of its first `window` samples at
    `sample_rate`'s worth, all the loader reads), checked against max_audio_s
    from its header."""
    name = label(field, value)
    if isinstance(value, tuple):
        return wave_file(value, limits, sample_rate=sample_rate, window=window, name=name, field=field)
    if isinstance(value, np.ndarray):
        raise InputError(f"{name}: a waveform needs its sample rate: give (array, rate)", field=field)
    data = as_bytes(value)
    if data is None and isinstance(value, (str, os.PathLike)):
        data = read_file(value, name, field)
    if data is None:
        raise InputError(
            f"{name}: a {type(value).__name__} is not a sound; give a path, bytes or (array, rate)", field=field
        )
    if not data:
        raise InputError(f"{name}: empty file", field=field)
    try:
        seconds = audio_seconds(data)
    except Exception as e:
        raise InputError(f"{name}: not a readable sound ({one_line(e)})", field=field) from None
    check_seconds(seconds, limits, name, field)
    return data


def check_seconds(seconds: float | None, limits: Limits, name: str, field: str) -> None:
    if seconds is not None and seconds > limits.max_audio_s:
        raise InputError(f"{name}: {seconds:.1f} s is over max_audio_s={limits.max_audio_s:g}", status=413, field=field)


def audio_seconds(data: bytes) -> float | None:
    """The length a sound's header claims, in seconds (None: it does not
    say). WAV and FLAC are read from their own headers: libsndfile clamps a
    WAV's count to the bytes present, so a header claiming ten hours over a
    few bytes would pass for short."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return wav_seconds(data)
    if data[:4] == b"fLaC":
        return flac_seconds(data)
    import soundfile

    info = soundfile.info(io.BytesIO(data))
    return info.frames / info.samplerate if info.frames > 0 and info.samplerate > 0 else None


def wav_seconds(data: bytes) -> float | None:
    """From the data chunk's size and the fmt chunk's byte rate."""
    pos, byte_rate, size = 12, None, None
    for _ in range(64):  # a WAV has a handful of chunks; more is not a WAV worth reading
        if pos + 8 > len(data):
            break
        chunk, length = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk == b"fmt ":
            if length < 16 or pos + 24 > len(data):
                raise ValueError("WAV fmt chunk too short")
            _, channels, rate, byte_rate, align = struct.unpack("<HHIIH", data[pos + 8 : pos + 22])
            if not channels or not rate or not byte_rate:
                raise ValueError(f"WAV header: {channels} channels at {rate} Hz, {byte_rate} bytes/s")
        elif chunk == b"data":
            # 0 or 0xFFFFFFFF: a stream written without knowing its length; the bytes present count.
            size = len(data) - pos - 8 if length in (0, 0xFFFFFFFF) else length
            break
        pos += 8 + length + (length & 1)
    if byte_rate is None or size is None:
        raise ValueError("WAV without a fmt and a data chunk")
    return size / byte_rate


def flac_seconds(data: bytes) -> float | None:
    """From STREAMINFO, the first metadata block: 20 bits of sample rate and
    36 of total samples (0: unknown)."""
    if len(data) < 42 or data[4] & 0x7F != 0:
        raise ValueError("FLAC without STREAMINFO")
    info = data[8:42]
    rate = (info[10] << 12) | (info[11] << 4) | (info[12] >> 4)
    total = ((info[13] & 0x0F) << 32) | int.from_bytes(info[14:18], "big")
    if rate == 0:
        raise ValueError("FLAC STREAMINFO gives a sample rate of 0")
    return total / rate if total else None


def wave_file(value: tuple, limits: Limits, *, sample_rate: int, window: int, name: str, field: str) -> bytes:
    """An (array, rate) waveform as a float32 WAV, so the loader decodes it
    as it would the same samples in a file: mono by the mean of the
    channels, resampled by soxr, cropped. Only the samples that yield
    `window` samples at `sample_rate` (and a margin for the resampler)
    are written; the loader reads no more of any file."""
    import soundfile

    if len(value) != 2:
        raise InputError(f"{name}: give a waveform as (array, rate)", field=field)
    array, rate = value
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise InputError(f"{name}: rate={rate!r} must be a positive whole number of Hz", field=field)
    wav = np.asarray(array)
    if wav.dtype.kind not in "fi" or (wav.dtype.kind == "i" and wav.dtype not in (np.int16, np.int32)):
        raise InputError(f"{name}: {wav.dtype} samples; give float, int16 or int32", field=field)
    if wav.ndim not in (1, 2) or wav.shape[0] == 0 or (wav.ndim == 2 and not 1 <= wav.shape[1] <= 64):
        raise InputError(f"{name}: shape {wav.shape}; give a 1-D mono or frames x channels waveform", field=field)
    check_seconds(wav.shape[0] / int(rate), limits, name, field)
    keep = math.ceil(window * int(rate) / sample_rate) + 128
    wav = wav[:keep]
    if wav.dtype.kind == "f":
        wav = wav.astype(np.float32)
        if not np.isfinite(wav).all():
            raise InputError(f"{name}: the waveform holds NaN or infinite samples", field=field)
    buf = io.BytesIO()
    soundfile.write(buf, wav, int(rate), format="WAV", subtype="FLOAT")
    return buf.getvalue()


# -- text -----------------------------------------------------------------
def text_bytes(value, limits: Limits, *, field: str = "text") -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{field}: a {type(value).__name__} is not text; give a str", field=field)
    if len(value) > limits.max_text_chars:
        raise InputError(
            f"{field}: {len(value)} characters is over max_text_chars={limits.max_text_chars}", status=413, field=field
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{field}: not valid Unicode text ({e.reason})", field=field) from None


def class_names(classes, limits: Limits) -> list[str]:
    """Zero-shot class names: a non-empty list of distinct, non-empty strings."""
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)):
        raise InputError("classes: give a list of class names", field="classes")
    if not classes:
        raise InputError("classes: give at least one class name", field="classes")
    if len(classes) > limits.max_classes:
        raise InputError(
            f"classes: {len(classes)} names is over max_classes={limits.max_classes}", status=413, field="classes"
        )
    names = []
    for i, c in enumerate(classes):
        text_bytes(c, limits, field=f"classes[{i}]")
        if not c.strip():
            raise InputError(f"classes[{i}]: an empty class name", field="classes")
        names.append(c)
    if len(set(names)) != len(names):
        raise InputError("classes: a class name is given twice", field="classes")
    return names
