"""Shards in an object store (s3://), against a real S3-compatible server
(moto's server mode) on 127.0.0.1: written there, listed, read back byte
for byte as the local copy, and trained from, with the credentials in no
output."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from conftest import REPO, clean_env, venv_bin

from data_pipeline import DataConfig, build_loader
from data_pipeline.demo import write_raw
from data_pipeline.manifest import read_manifest
from data_pipeline.sources import expand_shards, read_shard, shard_sizes
from data_pipeline.writer import write_dataset

SECRET = "moto-secret-7f3e91"  # must appear in no output
# Every test here talks to a server process: not in the fast tier.
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server; the AWS_* variables point boto at it (as a user's
    environment or ~/.aws would point at theirs)."""
    if shutil.which(venv_bin("moto_server")) is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    pytest.importorskip("s3fs")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([venv_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    env = {
        "AWS_ACCESS_KEY_ID": "moto-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("shards")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """The same samples written locally and to s3://shards/{train,heldout}."""
    root = tmp_path_factory.mktemp("objects")
    out = {}
    for split, n, seed in (("train", 96, 0), ("heldout", 32, 1)):
        samples = list(read_manifest(write_raw(root / "raw", split=split, n=n, seed=seed)))
        write_dataset(samples, root / split, max_samples=32)
        write_dataset(samples, f"s3://shards/{split}", max_samples=32)
        out[split] = root / split
    return out


def test_writing_to_a_bucket_gives_the_local_shards_and_index(bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("shards/train"))
    assert names == sorted(p.name for p in bucket["train"].iterdir())  # shards, index.json, rejects.jsonl
    remote_index = json.loads(fs.cat("shards/train/index.json"))
    local_index = json.loads((bucket["train"] / "index.json").read_text())
    assert remote_index == local_index and local_index["samples"] == 96


@pytest.mark.parametrize(
    "pattern", ["s3://shards/train", "s3://shards/train/*.tar", "s3://shards/train/shard-{000000..000002}.tar"]
)
def test_prefix_glob_and_brace_patterns_list_the_same_shards(bucket, pattern):
    urls = expand_shards(pattern)
    assert urls == [f"s3://shards/train/shard-{i:06d}.tar" for i in range(3)]
    assert shard_sizes(urls) == [32, 32, 32]  # from the index, read once


def test_a_pattern_matching_nothing_is_named(bucket):
    with pytest.raises(FileNotFoundError, match="s3://shards/nothing"):
        expand_shards("s3://shards/nothing/*.tar")


def test_samples_read_from_the_bucket_are_byte_identical_to_the_local_copy(bucket):
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        remote = list(read_shard(f"s3://shards/train/{name}", size=32))
        local = list(read_shard(str(bucket["train"] / name), size=32))
        assert len(remote) == len(local) == 32
        for r, loc in zip(remote, local):
            assert {k: v for k, v in r.items() if k != "__url__"} == {k: v for k, v in loc.items() if k != "__url__"}


def test_the_loader_streams_the_bucket_like_the_local_directory(bucket):
    def keys(train: str) -> list[str]:
        cfg = DataConfig(train=train, heldout=train, num_workers=2, image_size=32, n_mels=32, audio_frames=32)
        loader = build_loader(cfg, split="train", batch_size=16)
        # Two epochs (the training stream does not end): 96 samples, 16 a batch.
        return [k for _, batch in zip(range(12), loader) for k in batch["__key__"]]

    remote = keys("s3://shards/train")
    assert remote == keys(str(bucket["train"]))
    assert len(set(remote[:96])) == len(set(remote[96:])) == 96


def test_training_from_the_bucket_on_two_ranks(bucket, s3, tmp_path):
    run = tmp_path / "run"
    cmd = [venv_bin("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "train", "experiment=demo", "model=tiny",
           "trainer.max_steps=4", "trainer.log_every=2", "trainer.micro_batch_size=8", "trainer.eval_batch_size=32",
           "trainer.log_samples=true", "trainer.export=false", "data.num_workers=1", "logger.mode=offline",
           "data.train=s3://shards/train", "data.heldout=s3://shards/heldout", f"hydra.run.dir={run}"]  # fmt: skip
    env = clean_env(PYTHONPATH=str(REPO), **s3)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "results.json").read_text())["step"] == 4
    seen = [
        k
        for r in (0, 1)
        for line in (run / f"samples_rank{r}.jsonl").read_text().splitlines()
        for k in json.loads(line)["keys"]
    ]
    assert len(seen) == len(set(seen)) == 4 * 2 * 8  # 4 steps × 2 ranks × 8, each sample once
    # The secret key is in the environment only: no log, config, checkpoint or W&B file holds it.
    assert SECRET not in proc.stdout + proc.stderr
    for path in run.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_node_cache_keeps_the_shards_and_later_epochs_read_them_from_disk(bucket, tmp_path):
    """data.cache_dir: a loader with 2 workers reads s3:// shards once into the
    cache; with the objects then deleted from the bucket, a new loader on the
    same cache streams the same samples, so they come from the cache."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for name in ("index.json", *(f"shard-{i:06d}.tar" for i in range(3))):
        fs.copy(f"shards/train/{name}", f"shards/cached/{name}")
    cache = tmp_path / "cache"

    def batches(train: str) -> list[dict]:
        cfg = DataConfig(
            train=train, heldout=train, num_workers=2, image_size=32, n_mels=32, audio_frames=32, cache_dir=str(cache)
        )
        return [batch for _, batch in zip(range(6), build_loader(cfg, split="train", batch_size=16))]  # one epoch

    shards = "s3://shards/cached/shard-{000000..000002}.tar"  # named, not listed: the bucket loses them below
    first = batches(shards)
    assert len(list(cache.iterdir())) == len(list(cache.glob("*.tar"))) == 3  # no temporary file left behind
    assert sum(p.stat().st_size for p in cache.glob("*.tar")) == sum(
        (bucket["train"] / f"shard-{i:06d}.tar").stat().st_size for i in range(3)
    )
    fs.rm([f"shards/cached/shard-{i:06d}.tar" for i in range(3)])  # the index stays: the loader lists it
    second = batches(shards)
    assert [b["__key__"] for b in second] == [b["__key__"] for b in first]
    for a, b in zip(first, second):
        for k in ("image", "audio", "text"):
            assert (a[k] == b[k]).all()
