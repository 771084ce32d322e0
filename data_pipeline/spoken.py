"""A synthetic corpus with spoken captions: 32 classes of coloured shapes.

Each sample is one of 32 classes: shape (4) × colour (4) × size (2).
- image: the shape drawn in its colour and size on a noisy background, at a
  random position (64 px, as in the demo corpus);
- text: a caption naming size, colour and shape, from several templates;
- audio: the caption spoken by espeak-ng, in one of several voices, speeds
  and pitches, after a random pause, with a little noise.
About 5% of samples lack the image and 5% lack the audio.

Unlike the demo corpus, whose audio encodes the class in pitch and beeps, the
audio here is speech: the audio encoder has to learn words from sound. It
needs the espeak-ng program (Debian: `apt-get install espeak-ng`).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from data_pipeline.demo import COLORS, SIZE_WORDS, TEMPLATES, sample_row

SHAPES = ("circle", "square", "triangle", "star")
SPOKEN_COLORS = ("red", "green", "blue", "yellow")
CLASSES = [(s, c, z) for s in SHAPES for c in SPOKEN_COLORS for z in ("small", "large")]
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f2", "en-gb+f3", "en-us+m5")
SPEEDS = (130, 150, 170, 190)
SAMPLE_RATE = 16000
MAX_SECONDS = 2.5
ESPEAK = "espeak-ng"
assert set(SPOKEN_COLORS) <= set(COLORS)


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed."""


def require_espeak() -> str:
    path = shutil.which(ESPEAK)
    if path is None:
        raise SpeechUnavailable(
            "the spoken corpus needs espeak-ng, a speech synthesiser: install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return path


def speak(text: str, *, voice: str, speed: int, pitch: int, espeak: str = ESPEAK) -> np.ndarray:
    """The text spoken by espeak-ng: mono float32 at SAMPLE_RATE."""
    # The text is passed as one argument after "--": never through a shell.
    wav_bytes = subprocess.run(
        [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--", text],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    wav, sr = soundfile.read(io.BytesIO(wav_bytes), dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if sr != SAMPLE_RATE:
        wav = soxr.resample(wav, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return wav


def place(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A clip of MAX_SECONDS: a random pause (up to 0.3 s), the speech
    (cut if longer), noise, and a random gain."""
    n = int(SAMPLE_RATE * MAX_SECONDS)
    out = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, int(0.3 * SAMPLE_RATE)))
    piece = speech[: n - start]
    peak = float(np.abs(piece).max()) or 1.0
    out[start : start + piece.size] = piece / peak * rng.uniform(0.3, 0.8)
    out += rng.normal(0, 0.003, n).astype(np.float32)
    return out


def write_raw(out: Path, *, split: str, n: int, seed: int, threads: int = 2) -> Path:
    """Writes n samples' files under out/split and returns the JSONL manifest."""
    espeak = require_espeak()
    rng = np.random.default_rng(seed)
    files = out / split
    files.mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for i in range(n):
        row, (shape, color, size), drop = sample_row(i, split=split, classes=CLASSES, files=files, rng=rng)
        key = row["key"]
        words = dict(size=SIZE_WORDS[size][int(rng.integers(3))], color=color, shape=shape)
        row["text"] = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(**words)
        if not 0.05 <= drop < 0.10:
            voice = VOICES[int(rng.integers(len(VOICES)))]
            jobs.append(
                (
                    key,
                    row["text"],
                    voice,
                    int(rng.choice(SPEEDS)),
                    int(rng.integers(30, 71)),
                    int(rng.integers(1 << 31)),
                )
            )
            row["audio"] = f"{split}/{key}.flac"
        rows.append(row)

    def synth(job) -> None:
        key, text, voice, speed, pitch, clip_seed = job
        clip = place(
            speak(text, voice=voice, speed=speed, pitch=pitch, espeak=espeak), np.random.default_rng(clip_seed)
        )
        soundfile.write(files / f"{key}.flac", clip, SAMPLE_RATE, format="FLAC")

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in tqdm(pool.map(synth, jobs), total=len(jobs), desc=f"speech {split}", unit="clip"):
            pass
    manifest = out / f"{split}.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return manifest
