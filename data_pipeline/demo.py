"""A synthetic tri-modal corpus with a learnable cross-modal link.

Each sample is one of 72 classes: shape (6) × colour (6) × size (2).
- image: the shape drawn in its colour and size on a noisy background,
  at a random position;
- text: a caption naming size, colour and shape, from several templates;
- audio: colour sets the pitch, shape the number of beeps, size the timbre
  (pure tone when small, with harmonics when large).
About 5% of samples lack the image and 5% lack the audio.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw
from tqdm import tqdm

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
PITCH_HZ = {"red": 220.0, "green": 330.0, "blue": 494.0, "yellow": 740.0, "magenta": 1109.0, "cyan": 1661.0}
TEMPLATES = (
    "a {size} {color} {shape}",
    "a picture of a {size} {color} {shape}",
    "{size} {color} {shape}",
    "there is a {size} {color} {shape}",
    "the {shape} is {color} and {size}",
)
CLASSES = [(s, c, z) for s in SHAPES for c in COLORS for z in SIZES]
IMAGE_PX = 64
SAMPLE_RATE = 16000
AUDIO_SECONDS = 1.0


def class_name(shape: str, color: str, size: str) -> str:
    return f"{size} {color} {shape}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius_at, phase: float):
        return [
            (
                cx + radius_at(k) * math.cos(phase + 2 * math.pi * k / n),
                cy + radius_at(k) * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "triangle":
        return ring(3, lambda k: r, -math.pi / 2)
    if shape == "diamond":
        return ring(4, lambda k: r, 0.0)
    if shape == "star":
        return ring(10, lambda k: r if k % 2 == 0 else 0.45 * r, -math.pi / 2)
    raise ValueError(shape)


def draw_image(shape: str, color: str, size: str, rng: np.random.Generator) -> bytes:
    bg = rng.integers(20, 90)
    noise = rng.normal(0, 12, (IMAGE_PX, IMAGE_PX, 3))
    arr = np.clip(bg + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(7, 10) if size == "small" else rng.uniform(17, 23)
    cx, cy = rng.uniform(r + 2, IMAGE_PX - r - 2, size=2)
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        s = r * 0.85
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=rgb)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synth_audio(shape: str, color: str, size: str, rng: np.random.Generator) -> np.ndarray:
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    f0 = PITCH_HZ[color] * rng.uniform(0.98, 1.02)
    tone = np.sin(2 * np.pi * f0 * t)
    if size == "large":
        tone = tone + 0.6 * np.sin(2 * np.pi * 2 * f0 * t) + 0.4 * np.sin(2 * np.pi * 3 * f0 * t)
    beeps = SHAPES.index(shape) + 1
    slot = n // beeps
    on = int(slot * 0.6)
    envelope = np.zeros(n)
    shift = int(rng.integers(0, slot - on))
    ramp = np.hanning(on)
    for k in range(beeps):
        start = k * slot + shift
        envelope[start : start + on] = ramp[: max(0, min(on, n - start))]
    wav = rng.uniform(0.3, 0.6) * envelope * tone / np.abs(tone).max()
    wav += rng.normal(0, 0.002, n)
    return wav.astype(np.float32)


def sample_row(i: int, *, split: str, classes: list, files: Path, rng: np.random.Generator):
    """What every synthetic corpus draws first for sample i: its class and
    whether it lacks a modality (drop < 0.05: no image; 0.05-0.10: no audio),
    and its image file. Returns (manifest row, (shape, colour, size), drop)."""
    label = int(rng.integers(len(classes)))
    shape, color, size = classes[label]
    key = f"{split}_{i:06d}"
    drop = rng.random()
    # Coarser labels for fine-tuning examples: one attribute (data.label_key=color
    # with task.classes), or all three as a multi-label set ("tags").
    row = {
        "key": key,
        "label": label,
        "class": class_name(shape, color, size),
        "shape": shape,
        "color": color,
        "size": size,
        "tags": [shape, color, size],
    }
    if drop >= 0.05:
        (files / f"{key}.jpg").write_bytes(draw_image(shape, color, size, rng))
        row["image"] = f"{split}/{key}.jpg"
    return row, (shape, color, size), drop


def write_raw(out: Path, *, split: str, n: int, seed: int) -> Path:
    """Writes n samples' files under out/split and returns the JSONL manifest."""
    rng = np.random.default_rng(seed)
    files = out / split
    files.mkdir(parents=True, exist_ok=True)
    manifest = out / f"{split}.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i in tqdm(range(n), desc=f"demo {split}", unit="sample"):
            row, (shape, color, size), drop = sample_row(i, split=split, classes=CLASSES, files=files, rng=rng)
            key = row["key"]
            if not 0.05 <= drop < 0.10:
                buf = io.BytesIO()
                soundfile.write(buf, synth_audio(shape, color, size, rng), SAMPLE_RATE, format="FLAC")
                (files / f"{key}.flac").write_bytes(buf.getvalue())
                row["audio"] = f"{split}/{key}.flac"
            words = dict(size=SIZE_WORDS[size][int(rng.integers(3))], color=color, shape=shape)
            row["text"] = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(**words)
            f.write(json.dumps(row) + "\n")
    return manifest
