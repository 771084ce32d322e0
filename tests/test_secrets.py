"""Secrets never written: key-based and in-value redaction (URL userinfo,
signed query strings), and a real run from an HTTP source whose URL carries
a token, after which no file of the run directory holds the token."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from conftest import REPO, clean_env, inspect_wandb, python, venv_bin

from train.secrets import REDACTED, RedactingFilter, redact, redact_text

TOKEN = "tok-8c1f5e0d4b2a"


@pytest.mark.parametrize(
    "text,leak",
    [
        ("https://alice:hunter2@example.com/a.tar", "hunter2"),
        ("s3://AKIAXXXX:wJalrXUtnFEMI@bucket/x.tar", "wJalrXUtnFEMI"),
        ("https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA%2F20261130&X-Amz-Signature=deadbeef", "deadbeef"),
        ("https://b.s3.amazonaws.com/x.tar?X-Amz-Credential=AKIA%2F20261130&X-Amz-Signature=deadbeef", "AKIA"),
        ("https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=abc%2Bdef", "abc%2Bdef"),
        ("data.train='http://h/x-{0..3}.tar?token=t0k3n'", "t0k3n"),
        ("http://h/x.tar?a=1&access_token=zzz#frag", "zzz"),
    ],
)
def test_credentials_inside_values_are_redacted(text, leak):
    clean = redact_text(text)
    assert leak not in clean and REDACTED in clean


def test_redaction_keeps_what_is_not_secret():
    assert (
        redact_text("http://host:8080/shards/x-{000..009}.tar?part=2")
        == "http://host:8080/shards/x-{000..009}.tar?part=2"
    )
    config = {
        "data": {"tokenizer": "bpe.json", "train": "/data/x.tar"},
        "logger": {"api_key": "k", "project": "p"},
        "token": "t",
        "max_text_len": 64,
    }
    out = redact(config)
    assert out["data"] == config["data"]  # data.tokenizer is not a token
    assert out["logger"] == {"api_key": REDACTED, "project": "p"} and out["token"] == REDACTED
    assert out["max_text_len"] == 64


def test_a_number_under_a_secret_sounding_key_is_a_setting():
    """model.<m>.token_dropout names a "token" but holds a fraction: redacted,
    every export's model.json lost it and mm_models.load failed on the string."""
    config = {
        "model": {"image": {"token_dropout": 0.5, "freeze": False}, "audio": {"token_dropout": 0}},
        "auth": {"token": "abc"},
        "secret_count": 3,
        "api_token": "xyz",
        "token_refresh": True,
    }
    out = redact(config)
    assert out["model"] == config["model"] and out["secret_count"] == 3 and out["token_refresh"] is True
    assert out["auth"] == REDACTED and out["api_token"] == REDACTED


def test_log_records_are_redacted_by_the_handler_filter():
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_secrets_child")
    logger.addHandler(handler)
    try:
        logger.warning("shard %s broke", f"http://h/a.tar?sig={TOKEN}")
    finally:
        logger.removeHandler(handler)
    assert TOKEN not in stream.getvalue() and "shard http://h/a.tar?sig=<redacted> broke" in stream.getvalue()


@pytest.mark.parametrize(
    "key", ["sasToken", "accessToken", "account_key", "connection_string", "hf_token", "AccountKey", "api-key"]
)
def test_config_keys_naming_a_credential_are_redacted(key):
    assert redact({"store": {key: "v4lue"}}) == {"store": {key: REDACTED}}


@pytest.mark.parametrize(
    "text,leak",
    [
        ("http://h/a.tar?access-token=S1&part=2", "S1"),
        ("http://h/a.tar?api-key=S2", "S2"),
        ("http://h/a.tar?hf_token=S3", "S3"),
        ("http://h/a.tar?private_token=S4", "S4"),
        ("https://storage.googleapis.com/b/a.tar?X-Goog-Signature=S5&X-Goog-Date=1", "S5"),
        ("https://a.blob.core.windows.net/c/a.tar?sv=2022-11-02&se=2026-12-31&sp=r&sig=S6", "S6"),
        ("https://a.blob.core.windows.net/c/a.tar?sv=2022-11-02&se=S7EXPIRY", "S7EXPIRY"),
        ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=S8==;EndpointSuffix=core.windows.net", "S8=="),
        ("AccountKey=S9;AccountName=a", "S9"),
        ("http://h/a.tar?my_secret_thing=S10", "S10"),
        ("http://h/a.tar?x-api-password=S11", "S11"),
    ],
)
def test_query_names_are_caught_by_pattern(text, leak):
    clean = redact_text(text)
    assert leak not in clean and REDACTED in clean, clean


def test_what_a_process_prints_is_redacted_a_line_at_a_time():
    import io

    from train.secrets import RedactingStream

    under = io.StringIO()
    stream = RedactingStream(under)
    stream.write("error: shard http://h/a.tar?api-k")  # a URL split over two writes
    stream.write(f"ey={TOKEN} is unreadable\nprogress 10%\r")
    stream.write("tail without newline")
    stream.flush()
    assert TOKEN not in under.getvalue() and "api-key=<redacted>" in under.getvalue()
    assert under.getvalue().endswith("progress 10%\rtail without newline")


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
    )


@pytest.mark.integration
def test_no_entry_point_writes_or_prints_a_token(demo_shards, tmp_path):
    """Training (2 ranks) from a server that answers 503 to the first request
    for each shard, with tokens under many parameter names and in a config
    value; then train.evaluate, train.predict and errors of train and
    train.evaluate that name a tokened URL. No file written (run directory,
    W&B run, out/) and nothing printed holds the token."""
    from test_http_retries import FlakyServer, once_per_shard

    server = FlakyServer(demo_shards["root"], once_per_shard())
    base = server.base
    run = tmp_path / "run"
    out = tmp_path / "predictions"
    printed = []
    try:
        train = _run(
            [
                venv_bin("torchrun"),
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "train",
                f"hydra.run.dir={run}",
                # quoted for Hydra
                f"data.train='{base}/train/shard-{{000000..000003}}.tar?access-token={TOKEN}&X-Goog-Signature={TOKEN}'",
                f"data.heldout='{base}/heldout/shard-000000.tar?api-key={TOKEN}'",
                f"logger.name='demo AccountKey={TOKEN}'",
                "trainer.max_steps=3",
                "trainer.micro_batch_size=16",
                "trainer.eval_batch_size=32",
                "trainer.log_every=1",
                "deepspeed.precision=fp32",
                "data.num_workers=1",
                "logger.mode=offline",
            ],
            tmp_path,
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-5000:]
        export = run / "export" / "model.safetensors"
        evaluate = _run(
            [
                python(),
                "-m",
                "train.evaluate",
                f"checkpoint={export}",
                f"data.heldout='{base}/heldout/shard-000000.tar?hf_token={TOKEN}'",
            ],
            tmp_path,
        )
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]
        predict = _run(
            [
                python(),
                "-m",
                "train.predict",
                f"checkpoint={export}",
                f"shards='{base}/heldout/shard-000000.tar?sv=2022&se=2030&sig={TOKEN}'",
                f"out={out}",
                "--embed",
            ],
            tmp_path,
        )
        assert predict.returncode == 0, predict.stderr[-3000:]
        # Errors naming a tokened URL, through Hydra's and our own error paths.
        missing = f"{base}/heldout/absent.tar?private_token={TOKEN}"
        failed_eval = _run(
            [python(), "-m", "train.evaluate", f"checkpoint={export}", f"data.heldout='{missing}'"], tmp_path
        )
        assert failed_eval.returncode == 2 and "absent.tar" in failed_eval.stderr, failed_eval.stderr[-3000:]
        failed_train = _run(
            [
                python(),
                "-m",
                "train",
                f"hydra.run.dir={tmp_path / 'failed'}",
                f"data.heldout='{missing}'",
                "data.train=" + str(demo_shards["train"]),
                "logger.mode=offline",
                "trainer.max_steps=1",
            ],
            tmp_path,
        )
        assert failed_train.returncode != 0 and "absent.tar" in failed_train.stderr, failed_train.stderr[-3000:]
        printed = [train, evaluate, predict, failed_eval, failed_train]
    finally:
        server.server.shutdown()
    assert server.counts["/train/shard-000000.tar"] >= 2  # the 503, then the shard
    for proc in printed:
        assert TOKEN not in proc.stdout + proc.stderr, (proc.args, proc.stderr[-2000:])
    files = [p for root in (run, out, tmp_path / "failed") for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "model.json" for p in files) and any(p.name == "meta.json" for p in files)
    assert any(p.name == "manifest.json" for p in files) and any(p.name.endswith(".done.json") for p in files)
    leaks = [str(p.relative_to(tmp_path)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    flat = json.dumps(inspect_wandb(run)["config"])
    assert TOKEN not in flat and "access-token=<redacted>" in flat and "AccountKey=<redacted>" in flat
