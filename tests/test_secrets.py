"""Secrets never written: key-based and in-value redaction (URL userinfo,
signed query strings), and a real run from an HTTP source whose URL carries
a token, after which no file of the run directory holds the token."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from conftest import REPO, clean_env, serve_directory, venv_bin

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


@pytest.mark.integration
def test_a_run_from_a_tokened_url_writes_the_token_nowhere(demo_shards, tmp_path):
    server = serve_directory(demo_shards["root"])
    base = f"http://127.0.0.1:{server.server_port}"
    run = tmp_path / "run"
    try:
        cmd = [
            venv_bin("torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "train",
            f"hydra.run.dir={run}",
            f"data.train='{base}/train/shard-{{000000..000003}}.tar?token={TOKEN}'",  # quoted for Hydra
            f"data.heldout='{base}/heldout/shard-000000.tar?X-Amz-Signature={TOKEN}'",
            "trainer.max_steps=3",
            "trainer.micro_batch_size=16",
            "trainer.eval_batch_size=32",
            "trainer.log_every=1",
            "deepspeed.precision=fp32",
            "data.num_workers=1",
            "logger.mode=offline",
        ]
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert TOKEN not in proc.stdout + proc.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "model.json" for p in files) and any(p.name == "meta.json" for p in files)
    leaks = [str(p.relative_to(run)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    [wandb_run] = sorted((run / "wandb").glob("offline-run-*"))
    out = subprocess.run(
        [venv_bin("wandb"), "leet", "inspect", "--summary", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)["config"]
    flat = json.dumps(config)
    assert TOKEN not in flat and "token=<redacted>" in flat
