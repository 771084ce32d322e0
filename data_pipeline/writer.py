"""Raw files or a manifest -> WebDataset tar shards + an index file.

Input is read as-is (bytes are copied, not re-encoded), so a shard member is
byte-identical to its source file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from data_pipeline.decode import AUDIO_EXTS, IMAGE_EXTS

INDEX_NAME = "index.json"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class RawSample:
    key: str
    image: Path | None = None
    audio: Path | None = None
    text: str | None = None
    meta: dict = field(default_factory=dict)


def _safe_key(key: str) -> str:
    # WebDataset splits member names at the first dot: keys must not carry one.
    return _KEY_UNSAFE.sub("_", key)


def _path(value: str | None, base: Path) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    p = Path(str(value).strip())
    return p if p.is_absolute() else base / p


def read_manifest(path: Path) -> Iterator[RawSample]:
    """JSONL or CSV rows with columns image, audio (paths relative to the
    manifest), text (the caption), optional key; other columns go to .json."""
    base = path.parent
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows: Iterable[dict] = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        row = dict(row)
        key = _safe_key(str(row.pop("key", "") or f"{i:09d}"))
        yield RawSample(
            key=key,
            image=_path(row.pop("image", None), base),
            audio=_path(row.pop("audio", None), base),
            text=(row.pop("text", None) or None),
            meta=row,
        )


def read_directory(root: Path) -> Iterator[RawSample]:
    """Files that share a stem form one sample: a.jpg + a.txt + a.flac + a.json."""
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            stem = str(p.relative_to(root).with_suffix(""))
            groups.setdefault(stem, {})[p.suffix.lower().lstrip(".")] = p
    for stem, files in groups.items():
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        audio = next((files[e] for e in AUDIO_EXTS if e in files), None)
        text = files["txt"].read_text(encoding="utf-8").strip() if "txt" in files else None
        meta = json.loads(files["json"].read_text(encoding="utf-8")) if "json" in files else {}
        if image or audio or text:
            yield RawSample(key=_safe_key(stem), image=image, audio=audio, text=text, meta=meta)


def read_input(path: str | Path) -> Iterator[RawSample]:
    path = Path(path)
    if path.is_dir():
        return read_directory(path)
    if path.suffix in (".jsonl", ".json", ".csv"):
        return read_manifest(path)
    raise ValueError(f"input {str(path)!r} is neither a directory nor a .jsonl/.csv manifest")


def _member_ext(p: Path) -> str:
    ext = p.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def to_record(sample: RawSample) -> dict:
    """The tar members of one sample, as bytes."""
    record: dict = {"__key__": sample.key}
    if sample.image is not None:
        record[_member_ext(sample.image)] = sample.image.read_bytes()
    if sample.audio is not None:
        record[_member_ext(sample.audio)] = sample.audio.read_bytes()
    if sample.text is not None:
        record["txt"] = sample.text.encode("utf-8")
    record["json"] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
    return record


def write_shards(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_samples: int = 1000,
    max_bytes: int = 1 << 30,
    total: int | None = None,
) -> dict:
    """Writes PREFIX-%06d.tar shards and an index; returns the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: dict[str, dict] = {}
    with wds.ShardWriter(
        str(out_dir / f"{prefix}-%06d.tar"), maxcount=max_samples, maxsize=max_bytes, verbose=0
    ) as writer:
        for sample in tqdm(samples, total=total, desc=f"writing {out_dir.name}", unit="sample"):
            record = to_record(sample)
            writer.write(record)
            entry = shards.setdefault(
                os.path.basename(writer.fname),
                {"samples": 0, "image": 0, "audio": 0, "text": 0},
            )
            entry["samples"] += 1
            entry["image"] += sample.image is not None
            entry["audio"] += sample.audio is not None
            entry["text"] += sample.text is not None
    for name, entry in shards.items():
        entry["bytes"] = (out_dir / name).stat().st_size
    index = {
        "shards": [{"name": n, **e} for n, e in sorted(shards.items())],
        "samples": sum(e["samples"] for e in shards.values()),
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index
