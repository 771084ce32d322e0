"""HTTP shards from a server that fails now and then: every request (the
size scan, the read, train.predict's) is retried on transient errors with
the server's Retry-After honoured, a permanent error fails at once, and a
shard that stays unreadable is an error naming it (credentials redacted),
never a size of 0 or a finished part with no rows."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
from collections import Counter

import pytest

from data_pipeline import DataConfig, build_loader
from data_pipeline import fetch as fetch_mod
from data_pipeline.sources import ShardUnavailable, shard_sizes

SECRET = "s3cr3t-9f2c41"


class FlakyServer:
    """A directory on 127.0.0.1 whose answers `fail(path, n)` decides: None
    serves the file; (status, retry_after) answers that status instead (n:
    requests for that path so far)."""

    def __init__(self, root, fail):
        self.fail, self.lock = fail, threading.Lock()
        self.counts: Counter = Counter()
        self.log: list[tuple[float, str, str]] = []
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def _failed(self) -> bool:
                path = self.path.split("?")[0]
                with owner.lock:
                    n = owner.counts[path]
                    owner.counts[path] += 1
                    owner.log.append((time.monotonic(), self.command, path))
                answer = owner.fail(path, n)
                if answer is None:
                    return False
                status, retry_after = answer
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def do_GET(self):
                if not self._failed():
                    super().do_GET()

            def do_HEAD(self):
                if not self._failed():
                    super().do_HEAD()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.log.clear()


@pytest.fixture
def shards(demo_shards, tmp_path):
    """The demo's 4 training shards (64 samples each), without index.json: sizes come from a scan."""
    root = tmp_path / "www"
    root.mkdir()
    for s in sorted(demo_shards["train"].glob("*.tar")):
        shutil.copy(s, root / s.name)
    return root


@pytest.fixture
def serve():
    servers = []

    def start(root, fail):
        servers.append(FlakyServer(root, fail))
        return servers[-1]

    yield start
    for s in servers:
        s.server.shutdown()


def once_per_shard(status=503, retry_after=0):
    return lambda path, n: (status, retry_after) if path.endswith(".tar") and n == 0 else None


def urls_of(server, root) -> list[str]:
    return [f"{server.base}/{p.name}?api-key={SECRET}" for p in sorted(root.glob("*.tar"))]


def test_a_503_for_each_shard_loses_nothing_in_the_size_scan_or_the_read(shards, serve, caplog):
    server = serve(shards, once_per_shard())
    urls = urls_of(server, shards)
    assert shard_sizes(urls) == [64] * 4  # before: each shard sized 0 and left out of the run
    server.reset()
    pattern = "::".join(urls)
    loader = build_loader(
        DataConfig(train=pattern, heldout=pattern, num_workers=0),
        split="heldout",
        batch_size=32,
        sizes=dict.fromkeys(urls, 64),  # as rank 0 hands them to every rank: only the reads remain
    )
    keys = [k for batch in loader for k in batch["__key__"] if k]
    assert len(keys) == len(set(keys)) == 256 and not loader.skipped, loader.skipped
    assert all(server.counts[f"/{p.name}"] == 2 for p in shards.glob("*.tar"))  # the 503, then the shard
    assert SECRET not in caplog.text


def test_a_missing_shard_fails_at_once_and_names_it_without_its_credentials(shards, serve):
    server = serve(shards, lambda path, n: None)
    with pytest.raises(ShardUnavailable, match="HTTP 404") as raised:
        shard_sizes([f"{server.base}/absent.tar?api-key={SECRET}"])
    assert SECRET not in str(raised.value) and "/absent.tar?api-key=<redacted>" in str(raised.value)
    assert server.counts["/absent.tar"] == 1  # not retried


def test_a_shard_that_stays_unavailable_is_an_error_not_an_empty_shard(shards, serve, monkeypatch):
    monkeypatch.setattr(fetch_mod, "HTTP_BACKOFF_S", 0.0)
    server = serve(shards, lambda path, n: (503, None) if path.endswith("000001.tar") else None)
    urls = urls_of(server, shards)
    with pytest.raises(ShardUnavailable, match="000001.tar") as raised:
        shard_sizes(urls)
    assert SECRET not in str(raised.value) and "503" in str(raised.value)
    assert server.counts["/shard-000001.tar"] == fetch_mod.HTTP_TRIES + 1  # the first try and every retry


def test_the_servers_retry_after_is_honoured(shards, serve):
    server = serve(shards, once_per_shard(retry_after=1))
    [url] = urls_of(server, shards)[:1]
    assert shard_sizes([url]) == [64]
    first, second = [t for t, _, path in server.log if path.endswith(".tar")][:2]
    assert second - first >= 0.9, "retried before the server's Retry-After"


def test_train_predict_retries_and_never_finishes_a_shard_it_could_not_read(
    shards, serve, tmp_path, capsys, monkeypatch
):
    from test_predict import pretrained_export

    from train.predict import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(fetch_mod, "HTTP_BACKOFF_S", 0.0)
    broken = {"on": True}

    def fail(path, n):
        if path.endswith("000002.tar") and broken["on"] and n >= 3:  # a 503, sized, probed, then unreadable
            return 500, None
        return once_per_shard()(path, n)

    server = serve(shards, fail)
    export = pretrained_export(tmp_path / "export" / "model.safetensors", seed=0)
    out = tmp_path / "out"
    argv = [
        f"checkpoint={export}",
        f"shards='{server.base}/shard-{{000000..000003}}.tar?api-key={SECRET}'",
        f"out={out}",
        "--embed",
        "data.num_workers=0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and "shard-000002.tar" in err and SECRET not in err, err[-2000:]
    [run] = (out / "parts").iterdir()
    done = [json.loads(p.read_text()) for p in run.glob("*.done.json")]
    assert sorted(d["shard"].rsplit("/", 1)[-1] for d in done) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000003.tar",
    ]
    assert all(d["rows"] == 64 for d in done) and SECRET not in json.dumps(done)
    # The server recovers: the same command reads only the shard it missed.
    broken["on"] = False
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (out / "predictions-rank0.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 256
    assert json.loads((out / "rank0.summary.json").read_text())["resumed_shards"] == 3
    assert not any(SECRET in p.read_text() for p in out.rglob("*.json"))
