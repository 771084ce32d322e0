"""Where shards come from: URL expansion, opening (file, http(s), pipe:),
shard sizes (index.json or a scan), and reading a shard as exactly the number
of samples its index promises.

A shard read never raises for bad data: a sample that cannot be had becomes a
`Skip` carrying the reason, so that positions in the stream stay fixed and a
resumed run lines up with an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from typing import IO, Iterator

from braceexpand import braceexpand

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
_REMOTE = ("http://", "https://")
# WebDataset's grouping rule: the key is the member path up to the first dot
# of its basename; the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


@dataclass(frozen=True)
class Skip:
    """A sample position that yields no usable sample, and why."""

    reason: str
    shard: str
    detail: str = ""


def expand_shards(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """Turns "dir", "glob*", "brace-{000..009}.tar" (joined by "::") into URLs.

    Local patterns that match nothing fail here, naming the pattern.
    """
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if part.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(
                    f"shard source {part!r} is a pipe: URL, which runs a shell command; "
                    "set data.allow_pipe=true to allow it"
                )
            urls.extend(braceexpand(part))
        elif part.startswith(_REMOTE):
            urls.extend(braceexpand(part))
        else:
            if os.path.isdir(part):
                found = sorted(glob.glob(os.path.join(part, "*.tar")))
            else:
                found = sorted({m for p in braceexpand(part) for m in glob.glob(p)})
            if not found:
                raise FileNotFoundError(f"shard pattern {part!r} matched no .tar files")
            urls.extend(found)
    if not urls:
        raise FileNotFoundError(f"no shards given (pattern {spec!r})")
    return urls


def open_url(url: str, *, timeout: float = 60.0) -> IO[bytes]:
    """A readable binary stream for a local path, http(s):// URL or pipe: command."""
    if url.startswith(_REMOTE):
        return urllib.request.urlopen(url, timeout=timeout)
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    return open(url, "rb")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _load_index(parent: str) -> dict[str, int]:
    """{shard file name: samples} from parent/index.json, or {} if absent."""
    location = f"{parent}/{INDEX_NAME}"
    try:
        if parent.startswith(_REMOTE):
            with urllib.request.urlopen(location, timeout=30) as f:
                index = json.load(f)
        elif os.path.isfile(location):
            with open(location, encoding="utf-8") as f:
                index = json.load(f)
        else:
            return {}
        return {s["name"]: int(s["samples"]) for s in index["shards"]}
    except Exception as e:  # a bad index is not fatal: the shards get scanned
        log.warning("ignoring unreadable shard index %s (%s)", location, e)
        return {}


def count_samples(url: str) -> int:
    """Samples in a shard, by reading its member names (no decoding). A shard
    that breaks part-way counts the samples before the break."""
    n, last = 0, None
    try:
        with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                m = _KEY_EXT.match(member.name) if member.isfile() else None
                if m and m.group(1) != last:
                    n, last = n + 1, m.group(1)
    except Exception as e:
        # The sample being read when it broke is incomplete: leave it out.
        n = max(0, n - 1)
        log.warning("shard %s is unreadable after %d samples (%s); using those", url, n, e)
    return n


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from index.json beside the shards where present,
    otherwise counted by scanning the shard once (slow for remote data:
    write an index with `python -m data_pipeline write`)."""
    indexes: dict[str, dict[str, int]] = {}
    sizes = []
    for url in urls:
        parent = _parent(url)
        if parent not in indexes and not url.startswith("pipe:"):
            indexes[parent] = _load_index(parent)
        size = indexes.get(parent, {}).get(url.rsplit("/", 1)[-1])
        if size is None:
            size = count_samples(url)
        sizes.append(size)
    return sizes


def _samples(tar: tarfile.TarFile, url: str) -> Iterator[dict]:
    """Groups consecutive members sharing a key into {"__key__", ext: bytes}."""
    current: dict | None = None
    for member in tar:
        if not member.isfile():
            continue
        m = _KEY_EXT.match(member.name)
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def read_shard(url: str, *, size: int, skip: int = 0, take: int | None = None) -> Iterator[dict | Skip]:
    """Yields exactly `take` items (default: size - skip), samples skip.. of the
    shard: raw sample dicts, or Skip where the shard is short or broken.

    Skipped leading samples are read past, not decoded.
    """
    take = size - skip if take is None else take
    if take <= 0:
        return
    produced = 0
    position = 0
    try:
        with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for sample in _samples(tar, url):
                if position >= skip:
                    yield sample
                    produced += 1
                    if produced == take:
                        return
                position += 1
    except Exception as e:
        reason, detail = "truncated_shard", f"{type(e).__name__}: {e}"
        log.warning("shard %s broke after %d samples (%s)", url, position, detail)
    else:
        reason, detail = "short_shard", f"index promised {size} samples, found {position}"
    for _ in range(take - produced):
        yield Skip(reason, url, detail)
