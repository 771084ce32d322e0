"""A per-node local copy of remote shards (`data.cache_dir`), bounded in size.

A remote shard (s3://, gs://, az://, http(s)://) is downloaded whole into the
cache directory the first time a process on the node reads it, and read
from there afterwards, by every rank and data worker of the node and by
every later epoch. When the files pass `data.cache_max_gb`, the least
recently read are deleted. Local paths and `pipe:` URLs are read as they
are.

Written here because fsspec's own `filecache` keeps no size bound and
keeps one metadata file that all processes rewrite; this cache needs
neither: a cached file's name is a hash of its URL (so no URL, and no
credential in one, is ever written in clear), and its modification time is
its last use. Concurrent readers of the node are safe without locks: each
download goes to a private temporary file that is renamed into place
whole, so a cached file is always complete, and a file deleted while
another process reads it stays readable to that process (POSIX unlink).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PART = ".part"
STALE_PART_SECONDS = 3600  # a download left behind by a killed process


class ShardCache:
    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def path(self, url: str) -> Path:
        return self.root / (hashlib.sha256(url.encode()).hexdigest()[:40] + ".tar")

    def open(self, url: str, fetch) -> IO[bytes]:
        """A readable stream of url's bytes, from the cache when the shard is
        there; otherwise `fetch(url)` (a readable stream of the remote
        object) is copied into the cache first. A shard larger than the
        whole cache, or one that cannot be stored (disk full), is read
        straight from `fetch`; when the stream states its size (an object
        store's file does), a shard too large is never downloaded twice."""
        path = self.path(url)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            pass
        else:
            _touch(path)
            return f
        src = fetch(url)  # a failed remote read raises: the caller counts the shard as skipped
        size = getattr(src, "size", None)  # object stores' files know it before any byte is read
        if isinstance(size, int) and size > self.max_bytes:
            log.warning("a shard is larger than data.cache_max_gb; it is read without the cache")
            return src
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PART}")
        try:
            with src:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    dst = open(tmp, "wb")
                except OSError as e:
                    raise _StoreFailed(e) from e
                with dst:
                    copied = _copy(src, dst, limit=self.max_bytes)
            if copied is None:
                log.warning("a shard is larger than data.cache_max_gb; it is read without the cache")
                tmp.unlink(missing_ok=True)
                return fetch(url)
            try:
                f = open(tmp, "rb")  # opened before it is in place, where another process may evict it
            except OSError as e:
                raise _StoreFailed(e) from e
            try:
                os.replace(tmp, path)
            except OSError as e:
                f.close()
                raise _StoreFailed(e) from e
        except _StoreFailed as e:
            tmp.unlink(missing_ok=True)
            log.warning("cannot store a shard in data.cache_dir (%s); reading it without the cache", e.__cause__)
            return fetch(url)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.evict(keep=path)
        return f

    def evict(self, keep: Path | None = None) -> None:
        """Deletes the least recently used shards until the cache holds at
        most max_bytes (never `keep`), and downloads abandoned long ago."""
        entries = []
        now = time.time()
        for p in self.root.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # deleted by another process meanwhile
                continue
            if p.name.endswith(PART):
                if now - st.st_mtime > STALE_PART_SECONDS:
                    p.unlink(missing_ok=True)
                continue
            if p.suffix == ".tar":
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.tar")) if self.root.is_dir() else 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # its last use: eviction goes oldest first
    except OSError:
        pass  # evicted meanwhile: the open file is still readable


class _StoreFailed(Exception):
    """The local disk refused the copy (full, read-only, no permission)."""


def _copy(src: IO[bytes], dst: IO[bytes], *, limit: int) -> int | None:
    """Bytes copied, or None once more than `limit` would be."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            return None
        try:
            dst.write(chunk)
        except OSError as e:
            raise _StoreFailed(e) from e
    return copied


def from_config(cache_dir: str, max_gb: float) -> ShardCache | None:
    return ShardCache(os.path.expanduser(cache_dir), int(max_gb * 2**30)) if cache_dir else None
