"""Where shards come from: URL expansion, opening (file, http(s), object
stores: s3://, gs://, az:// through fsspec, pipe:),
shard sizes (index.json or a scan), and reading a shard as exactly the number
of samples its index promises.

A shard read never raises for bad data: a sample that cannot be had becomes a
`Skip` carrying the reason, so that positions in the stream stay fixed and a
resumed run lines up with an uninterrupted one.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from typing import IO, Iterator

from braceexpand import braceexpand

from data_pipeline.cache import ShardCache
from data_pipeline.fetch import ResumingHTTPReader, ShardUnavailable, http_request
from data_pipeline.redact import redact_text

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
# Object stores, read and written through fsspec (s3fs, gcsfs, adlfs), which
# retry failed requests and read large objects in ranged blocks. Credentials
# come only from the environment and the provider's standard config files
# (AWS_* and ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*); an
# endpoint (an S3-compatible server) from AWS_ENDPOINT_URL.
OBJECT_STORES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "abfss://")
_BACKENDS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
_REMOTE = ("http://", "https://") + OBJECT_STORES
# An index.json larger than this is refused (the shards get scanned instead).
MAX_INDEX_BYTES = 64 << 20
# Read-ahead of an object-store shard: one ranged request per block.
OBJECT_BLOCK_BYTES = 8 << 20
# WebDataset's grouping rule: the key is the member path up to the first dot
# of its basename; the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


@dataclass(frozen=True)
class Skip:
    """A sample position that yields no usable sample, and why."""

    reason: str
    shard: str
    detail: str = ""


def object_store(url: str):
    """(fsspec filesystem, path inside it) for an s3://, gs:// or az:// URL;
    a missing backend package is a ValueError naming it."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = _BACKENDS[scheme]
        raise ValueError(f"{scheme}:// shards need the {package} package: pip install {package}") from None


def _expand_object_store(part: str) -> list[str]:
    """An object-store pattern's shard URLs: explicit .tar names as given
    (brace patterns included; nothing is listed), a glob or a "directory"
    prefix listed once."""
    urls = []
    for name in braceexpand(part):
        if name.endswith(".tar") and not glob.has_magic(name):
            urls.append(name)
            continue
        fs, path = object_store(name)
        scheme = name.split("://", 1)[0]
        pattern = path if glob.has_magic(path) else path.rstrip("/") + "/*.tar"
        urls += [f"{scheme}://{m}" for m in sorted(fs.glob(pattern)) if m.endswith(".tar")]
    if not urls:
        raise FileNotFoundError(f"shard pattern {part!r} matched no .tar objects")
    return urls


def expand_shards(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """Turns "dir", "glob*", "brace-{000..009}.tar" (joined by "::") into URLs.

    Local patterns (and object-store globs and prefixes) that match nothing
    fail here, naming the pattern.
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
        elif part.startswith(OBJECT_STORES):
            urls.extend(_expand_object_store(part))
        elif part.startswith(_REMOTE):
            urls.extend(braceexpand(part))
        else:
            if os.path.isdir(part):
                found = sorted(glob.glob(os.path.join(part, "*.tar")))
            else:
                found = sorted({m for p in braceexpand(part) for m in glob.glob(p)})
            if not found:
                raise FileNotFoundError(f"shard pattern {part!r} matched no .tar files")
            # A file name is data, never a command: a local file called
            # "pipe:..." must not reach open_url as a pipe: URL.
            urls.extend(local_path(m) for m in found)
    if not urls:
        raise FileNotFoundError(f"no shards given (pattern {spec!r})")
    return urls


def local_path(path: str) -> str:
    """A local path that cannot be read as a URL scheme ("pipe:x" -> "./pipe:x")."""
    schemes = ("pipe:", "http:", "https:") + tuple(p.removesuffix("//") for p in OBJECT_STORES)
    return path if os.path.isabs(path) or not path.startswith(schemes) else os.path.join(".", path)


class PipeFailed(OSError):
    """A pipe: command that exited with a non-zero status."""


class PipeReader(io.RawIOBase):
    """The stdout of a pipe: command. At end of output the command's exit
    status is checked: a failing command (a download that broke, a missing
    file) raises PipeFailed with its last stderr line instead of passing for
    a short shard. Closed early (the reader had what it needed), it is
    stopped and its status ignored."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._stderr)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0:
            status = self.proc.wait()
            if status != 0:
                self._stderr.seek(0)
                lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise PipeFailed(
                    f"pipe command exited with status {status}" + (f": {lines[-1][:300]}" if lines else "")
                )
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._stderr.close()
        super().close()


def open_url(url: str, *, timeout: float = 60.0) -> IO[bytes]:
    """A readable binary stream for a local path, http(s):// URL or pipe:
    command (expand_shards lets a pipe: URL through only where the user
    wrote it, with data.allow_pipe=true)."""
    if url.startswith(OBJECT_STORES):
        fs, path = object_store(url)
        return fs.open(path, "rb", block_size=OBJECT_BLOCK_BYTES)
    if url.startswith(_REMOTE):
        return io.BufferedReader(ResumingHTTPReader(url, timeout=timeout), buffer_size=1 << 16)
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeReader(url[5:]))
    return open(url, "rb")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _load_index(parent: str) -> dict[str, int]:
    """{shard file name: samples} from parent/index.json, or {} if absent."""
    location = f"{parent}/{INDEX_NAME}"
    try:
        if parent.startswith(OBJECT_STORES):
            fs, path = object_store(location)
            if not fs.exists(path):
                return {}
            with fs.open(path, "rb") as f:
                index = json.load(f)
        elif parent.startswith(_REMOTE):
            try:
                response = http_request(location, timeout=30)
            except ShardUnavailable as e:
                if "HTTP 404" not in str(e):
                    log.warning("%s; the shards get scanned instead", e)
                return {}
            try:
                body = response.read(MAX_INDEX_BYTES + 1)
            finally:
                response.release_conn()
            if len(body) > MAX_INDEX_BYTES:
                raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
            index = json.loads(body)
        elif os.path.isfile(location):
            with open(location, encoding="utf-8") as f:
                index = json.load(f)
        else:
            return {}
        return {s["name"]: int(s["samples"]) for s in index["shards"]}
    except Exception as e:  # a bad index is not fatal: the shards get scanned
        log.warning("ignoring unreadable shard index %s (%s)", redact_text(location), redact_text(str(e)))
        return {}


def count_samples(url: str) -> int:
    """Samples in a shard, by reading its member names (no decoding). A shard
    whose tar data breaks part-way counts the samples before the break; one
    that cannot be fetched (ShardUnavailable) is an error naming it, never
    a size of 0 that would leave it out of the run."""
    n, last = 0, None
    try:
        with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                m = _KEY_EXT.match(member.name) if member.isfile() else None
                if m and m.group(1) != last:
                    n, last = n + 1, m.group(1)
    except ShardUnavailable:
        raise
    except Exception as e:
        if unavailable(e):
            raise ShardUnavailable(
                f"{redact_text(url)}: cannot be read: {type(e).__name__}: {redact_text(str(e))}"
            ) from None
        # The sample being read when it broke is incomplete: leave it out.
        n = max(0, n - 1)
        log.warning(
            "shard %s is unreadable after %d samples (%s); using those", redact_text(url), n, redact_text(str(e))
        )
    return n


def unavailable(e: BaseException) -> bool:
    """An error getting a shard's bytes (not found, refused, the network),
    as opposed to bytes that are not a valid tar (TarError, EOFError)."""
    return isinstance(e, OSError) and not isinstance(e, PipeFailed)


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


# Largest tar member read into memory (data.max_member_bytes); a larger one
# makes its sample a counted skip ("oversized_member") and is never read.
DEFAULT_MAX_MEMBER_BYTES = 256 << 20


def _samples(tar: tarfile.TarFile, url: str, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Groups consecutive members sharing a key into {"__key__", ext: bytes}.
    A member over max_member_bytes is not read: its sample carries
    "__oversized__" (the member's name and size) instead."""
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
        if member.size > max_member_bytes:
            current["__oversized__"] = f"{member.name}: {member.size} bytes > data.max_member_bytes={max_member_bytes}"
            continue  # a stream-mode tar skips the unread data
        current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def read_shard(
    url: str,
    *,
    size: int,
    skip: int = 0,
    take: int | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    cache: ShardCache | None = None,
) -> Iterator[dict | Skip]:
    """Yields exactly `take` items (default: size - skip), samples skip.. of the
    shard: raw sample dicts, or Skip where the shard is short or broken or a
    sample holds a member over max_member_bytes. A remote shard is read
    through `cache` (data.cache_dir) when one is given.

    Skipped leading samples are read past, not decoded.
    """
    take = size - skip if take is None else take
    if take <= 0:
        return
    produced = 0
    position = 0
    try:
        cached = cache is not None and url.startswith(_REMOTE)
        with cache.open(url, open_url) if cached else open_url(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for sample in _samples(tar, url, max_member_bytes=max_member_bytes):
                if position >= skip:
                    oversized = sample.get("__oversized__")
                    yield Skip("oversized_member", url, oversized) if oversized else sample
                    produced += 1
                    if produced == take:
                        return
                position += 1
    except Exception as e:
        # pipe_failed and truncated_shard are the shard's data; unreadable_shard is
        # the way to it (a rerun may read it: train.predict never marks it finished).
        reason = (
            "pipe_failed" if isinstance(e, PipeFailed) else "unreadable_shard" if unavailable(e) else "truncated_shard"
        )
        detail = redact_text(f"{type(e).__name__}: {e}")
        log.warning("shard %s broke after %d samples (%s)", redact_text(url), position, detail)
    else:
        reason, detail = "short_shard", f"index promised {size} samples, found {position}"
    for _ in range(take - produced):
        yield Skip(reason, url, detail)
