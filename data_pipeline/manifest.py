"""Reading the writer's input: a JSONL/CSV manifest or a directory of files
sharing a stem, as RawSample records (paths, not yet opened)."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data_pipeline.decode import AUDIO_EXTS, IMAGE_EXTS

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class RawSample:
    key: str
    image: Path | None = None
    audio: Path | None = None
    text: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = ""  # where it came from: "manifest.jsonl:12" or a directory stem
    error: tuple[str, str] | None = None  # (reason, detail) when the row itself is unreadable


def _safe_key(key: str) -> str:
    # WebDataset splits member names at the first dot: keys must not carry one.
    return _KEY_UNSAFE.sub("_", key)


def _text(value: object) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)


def _path(value: object, base: Path) -> Path | None:
    return None if _text(value) is None else base / str(value).strip()  # an absolute path stays absolute


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | ValueError]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, ValueError(f"invalid JSON: {e}")
                continue
            yield line_no, row if isinstance(row, dict) else ValueError(f"a JSON {type(row).__name__}, not an object")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict | ValueError]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # DictReader files surplus cells under the key None
                header = len(reader.fieldnames or [])
                yield reader.line_num, ValueError(f"{header + len(row[None])} cells, the header has {header}")
            else:
                yield reader.line_num, row


def read_manifest(path: Path) -> Iterator[RawSample]:
    """JSONL or CSV rows with columns image, audio (paths relative to the
    manifest), text (the caption), optional key; other columns go to .json."""
    path = Path(path)
    rows = _csv_rows(path) if path.suffix == ".csv" else _jsonl_rows(path)
    try:
        for i, (line_no, row) in enumerate(rows):
            source, default_key = f"{path}:{line_no}", f"{i:09d}"
            if isinstance(row, ValueError):
                yield RawSample(key=default_key, source=source, error=("bad_row", str(row)))
                continue
            row = dict(row)
            yield RawSample(
                key=_safe_key(str(row.pop("key", None) or default_key)),
                image=_path(row.pop("image", None), path.parent),
                audio=_path(row.pop("audio", None), path.parent),
                text=_text(row.pop("text", None)),
                meta=row,
                source=source,
            )
    except UnicodeDecodeError as e:
        raise ValueError(f"manifest {str(path)!r} is not UTF-8 text: {e}") from e


def _directory_sample(root: Path, stem: str, files: dict[str, Path]) -> RawSample:
    sample = RawSample(
        key=_safe_key(stem),
        image=next((files[e] for e in IMAGE_EXTS if e in files), None),
        audio=next((files[e] for e in AUDIO_EXTS if e in files), None),
        source=str(root / stem),
    )
    if "txt" in files:
        try:
            sample.text = _text(files["txt"].read_text(encoding="utf-8").strip())
        except UnicodeDecodeError as e:
            sample.error = ("bad_text", f"{files['txt']} is not UTF-8: {e}")
    if "json" in files:
        try:
            sample.meta = json.loads(files["json"].read_text(encoding="utf-8"))
            if not isinstance(sample.meta, dict):
                raise ValueError(f"a JSON {type(sample.meta).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            sample.meta, sample.error = {}, ("bad_meta", f"{files['json']}: {e}")
    return sample


def read_directory(root: Path) -> Iterator[RawSample]:
    """Files that share a stem form one sample: a.jpg + a.txt + a.flac + a.json."""
    root = Path(root)
    groups: dict[str, dict[str, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            stem = str(p.relative_to(root).with_suffix(""))
            groups.setdefault(stem, {})[p.suffix.lower().lstrip(".")] = p
    sample_exts = {*IMAGE_EXTS, *AUDIO_EXTS, "txt", "json"}
    for stem, files in groups.items():
        if sample_exts & set(files):
            yield _directory_sample(root, stem, files)


def read_input(path: str | Path) -> Iterator[RawSample]:
    path = Path(path)
    if path.is_dir():
        return read_directory(path)
    if path.suffix in (".jsonl", ".json", ".csv"):
        return read_manifest(path)
    raise ValueError(f"input {str(path)!r} is neither a directory nor a .jsonl/.csv manifest")


# --- validating and re-encoding one sample (runs in the workers) -------------
