"""Secrets inside lists are redacted: `data.sources` is a list of
`{url, weight}` that goes to W&B, each checkpoint's meta.json and the
export's model.json, and a signed URL in it must reach none of them."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, clean_env, inspect_wandb, python, serve_directory
from omegaconf import OmegaConf

from train.secrets import REDACTED, redact

SECRET = "SECRETVALUE8d2f"


def test_a_signed_url_inside_a_list_of_sources_is_redacted():
    url = f"https://127.0.0.1:1/x.tar?X-Amz-Signature={SECRET}"
    config = {
        "data": {
            "sources": [{"url": url, "weight": 0.7}, {"url": "/data/b-{000..009}.tar", "weight": 0.3}],
            "require": ["image", "text"],
        },
        "nested": [[f"https://alice:{SECRET}@h/a.tar"], ({"token": SECRET},)],
    }
    out = redact(config)
    assert SECRET not in json.dumps(out)
    assert out["data"]["sources"] == [
        {"url": f"https://127.0.0.1:1/x.tar?X-Amz-Signature={REDACTED}", "weight": 0.7},
        {"url": "/data/b-{000..009}.tar", "weight": 0.3},
    ]
    assert out["data"]["require"] == ["image", "text"]
    assert out["nested"] == [[f"https://{REDACTED}@h/a.tar"], [{"token": REDACTED}]]
    assert SECRET in json.dumps(config)  # a copy: the config itself is unchanged


def test_the_config_a_run_writes_has_its_sources_redacted():
    """What train/__main__.py hands to W&B, the checkpoints and the export:
    redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))."""
    from train.config import compose

    url = f"https://127.0.0.1:1/x-{{000..003}}.tar?X-Amz-Signature={SECRET}"
    cfg = compose([f"data.sources=[{{url:'{url}',weight:1.0}}]"])
    assert cfg.data.sources[0].url == url
    resolved = redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    assert SECRET not in json.dumps(resolved)
    assert resolved["data"]["sources"] == [
        {"url": f"https://127.0.0.1:1/x-{{000..003}}.tar?X-Amz-Signature={REDACTED}", "weight": 1.0}
    ]


@pytest.mark.integration
def test_a_run_from_signed_sources_writes_the_signature_nowhere(demo_shards, tmp_path):
    """A real run whose training shards come over HTTP from data.sources, the
    URL signed: no file of the run directory (meta.json, the export's
    model.json, the W&B run, Hydra's saved config, the logs) holds the
    signature, and the W&B config shows it redacted."""
    server = serve_directory(demo_shards["root"])
    url = f"http://127.0.0.1:{server.server_port}/train/shard-{{000000..000003}}.tar?X-Amz-Signature={SECRET}"
    run = tmp_path / "run"
    cmd = [python(), "-m", "train", f"hydra.run.dir={run}", f"data.sources=[{{url:'{url}',weight:1.0}}]",
           f"data.heldout={demo_shards['heldout']}", "trainer.max_steps=2", "trainer.micro_batch_size=16",
           "trainer.eval_batch_size=32", "trainer.log_every=1", "deepspeed.precision=fp32",
           "data.num_workers=0", "logger.mode=offline"]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    meta = json.loads((run / "checkpoints" / "step_000002" / "meta.json").read_text())
    model_json = json.loads((run / "export" / "model.json").read_text())
    for written in (meta["config"], model_json):  # the sources were written, redacted
        assert written["data"]["sources"] == [{"url": url.replace(SECRET, REDACTED), "weight": 1.0}]
    leaks = [str(p.relative_to(run)) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    sources = inspect_wandb(run)["config"]["data"]
    assert SECRET not in json.dumps(sources) and f"X-Amz-Signature={REDACTED}" in json.dumps(sources)
