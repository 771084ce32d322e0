"""Helpers that write small real tar shards for loader tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image


def png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def flac(seed: int, n: int = 4000, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """samples: [{"__key__": k, ext: bytes, ...}] written in order."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def text_shards(
    root: Path, sizes: list[int], *, prefix: str = "s", with_images: bool = False, index: bool = False
) -> list[str]:
    """Shards of the given sizes; every key is unique across them."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    entries = []
    for i, n in enumerate(sizes):
        samples = []
        for j in range(n):
            key = f"{prefix}{i:02d}_{j:04d}"
            sample = {"__key__": key, "txt": f"caption {key}".encode()}
            if with_images:
                sample["png"] = png(i * 10_000 + j)
            samples.append(sample)
            keys.append(key)
        name = f"{prefix}-{i:06d}.tar"
        write_tar(root / name, samples)
        entries.append({"name": name, "samples": n})
    if index:
        (root / "index.json").write_text(json.dumps({"shards": entries, "samples": sum(sizes)}))
    return keys


def read_tars(out: Path) -> dict[str, dict[str, bytes]]:
    """Every shard under out, read back as {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples
