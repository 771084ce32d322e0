"""data.cache_dir: remote shards kept on the node's disk, bounded in size,
least recently read evicted first, never a partial file in place. The
remote side here is a function returning a stream; tests/test_object_store.py
runs the cache against a real S3 server."""

from __future__ import annotations

import errno
import io
import os

import pytest

from data_pipeline.cache import PART, ShardCache


class Remote:
    """Objects by URL; counts fetches; can fail part-way."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects, self.fetches, self.fail_after = objects, [], None

    def __call__(self, url: str):
        self.fetches.append(url)
        data = self.objects[url]
        if self.fail_after is not None:
            return _Broken(data[: self.fail_after])
        return io.BytesIO(data)


class _Broken(io.BytesIO):
    def read(self, n=-1):
        chunk = super().read(n)
        if not chunk:
            raise ConnectionResetError("connection reset by peer")
        return chunk


def _objects(sizes: dict[str, int]) -> dict[str, bytes]:
    return {f"s3://bucket/{name}.tar": bytes([i]) * size for i, (name, size) in enumerate(sizes.items())}


def test_a_shard_is_fetched_once_then_read_from_the_cache(tmp_path):
    remote = Remote(_objects({"a": 3000}))
    cache = ShardCache(tmp_path / "cache", max_bytes=10_000)
    url = "s3://bucket/a.tar"
    for _ in range(3):
        with cache.open(url, remote) as f:
            assert f.read() == remote.objects[url]
    assert remote.fetches == [url]
    # One file, named by a hash: the URL (and any credential in one) is not written.
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.suffix == ".tar" and "bucket" not in entry.name


def test_least_recently_read_shards_are_evicted_beyond_the_bound(tmp_path):
    remote = Remote(_objects({"a": 4000, "b": 4000, "c": 4000}))
    cache = ShardCache(tmp_path, max_bytes=9000)  # room for two
    read = lambda name: cache.open(f"s3://bucket/{name}.tar", remote).close()  # noqa: E731
    read("a")
    read("b")
    os.utime(cache.path("s3://bucket/a.tar"), (1, 1))  # "a" read long ago, "b" since
    os.utime(cache.path("s3://bucket/b.tar"), (2, 2))
    read("a")  # a hit makes "a" the most recent
    read("c")  # over the bound: "b" goes
    assert cache.path("s3://bucket/a.tar").exists() and cache.path("s3://bucket/c.tar").exists()
    assert not cache.path("s3://bucket/b.tar").exists()
    assert cache.size() == 8000 <= cache.max_bytes
    assert remote.fetches == ["s3://bucket/a.tar", "s3://bucket/b.tar", "s3://bucket/c.tar"]


def test_a_shard_larger_than_the_cache_is_read_without_it(tmp_path):
    remote = Remote(_objects({"big": 5000}))
    cache = ShardCache(tmp_path, max_bytes=4000)
    with cache.open("s3://bucket/big.tar", remote) as f:
        assert f.read() == remote.objects["s3://bucket/big.tar"]
    assert cache.size() == 0 and not any(tmp_path.iterdir())


def test_a_shard_whose_size_the_store_states_is_not_downloaded_twice(tmp_path):
    """An object store's file (fsspec's) knows its size: one too large for
    the cache is streamed at once, not copied up to the bound, dropped and
    fetched again."""
    import fsspec

    store = fsspec.filesystem("memory")
    store.pipe("/bucket/big.tar", bytes(range(256)) * 20)
    fetches = []

    def fetch(url):
        fetches.append(url)
        return store.open("/bucket/big.tar", "rb")

    cache = ShardCache(tmp_path, max_bytes=4000)
    with cache.open("s3://bucket/big.tar", fetch) as f:
        assert f.read() == bytes(range(256)) * 20
    assert fetches == ["s3://bucket/big.tar"] and not any(tmp_path.iterdir())
    store.rm("/bucket/big.tar")


def test_a_download_that_breaks_leaves_nothing_in_the_cache(tmp_path):
    remote = Remote(_objects({"a": 3000}))
    remote.fail_after = 1000
    cache = ShardCache(tmp_path, max_bytes=10_000)
    with pytest.raises(ConnectionResetError):
        cache.open("s3://bucket/a.tar", remote)
    assert not any(tmp_path.iterdir())  # no partial shard, no temporary file
    remote.fail_after = None
    with cache.open("s3://bucket/a.tar", remote) as f:  # the next read fetches it whole
        assert f.read() == remote.objects["s3://bucket/a.tar"]


def test_a_cache_the_disk_refuses_reads_remotely(tmp_path, monkeypatch):
    remote = Remote(_objects({"a": 3000}))
    cache = ShardCache(tmp_path / "cache", max_bytes=10_000)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(PART):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with cache.open("s3://bucket/a.tar", remote) as f:
        assert f.read() == remote.objects["s3://bucket/a.tar"]
    assert cache.size() == 0


def test_downloads_abandoned_long_ago_are_removed(tmp_path):
    stale, fresh = tmp_path / f"x.tar.1.ab{PART}", tmp_path / f"y.tar.2.cd{PART}"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    ShardCache(tmp_path, max_bytes=10).evict()
    assert not stale.exists() and fresh.exists()  # another process may still be writing the fresh one
