"""Shared fixtures: a small demo corpus written as real shards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from data_pipeline.demo import write_raw
from data_pipeline.manifest import read_manifest
from data_pipeline.writer import write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    """4 train shards of 64 samples and 1 held-out shard of 64, with the
    demo corpus's missing images and audio."""
    root = tmp_path_factory.mktemp("demo")
    train = write_raw(root / "raw", split="train", n=256, seed=0)
    heldout = write_raw(root / "raw", split="heldout", n=64, seed=1)
    write_shards(read_manifest(train), root / "train", max_samples=64)
    write_shards(read_manifest(heldout), root / "heldout", max_samples=64)
    return {"root": root, "train": root / "train", "heldout": root / "heldout", "raw": root / "raw"}


@pytest.fixture
def demo_cwd(tmp_path, demo_shards, monkeypatch) -> Path:
    """A working directory where the default data paths (data/demo/train,
    data/demo/heldout) name the demo shards, as after `make demo-data`."""
    (tmp_path / "data" / "demo").mkdir(parents=True)
    for split in ("train", "heldout"):
        (tmp_path / "data" / "demo" / split).symlink_to(demo_shards[split], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def python() -> str:
    return sys.executable


def venv_bin(name: str) -> str:
    """A console script installed beside the running interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child training run: no inherited rank variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MM_RUN_STAMP")
    }
    env.update(WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def inspect_wandb(run_dir: Path) -> dict:
    """The config and summary of the one offline W&B run under run_dir/wandb,
    read back with `wandb leet inspect` (as a user would, not through mocks)."""
    [wandb_run] = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    return inspect_wandb_run(wandb_run)


def inspect_wandb_run(wandb_run: Path) -> dict:
    """inspect_wandb for one offline run directory (offline-run-*)."""
    import json
    import subprocess

    out = subprocess.run(
        [venv_bin("wandb"), "leet", "inspect", "--summary", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def copy_as_stopped(straight: Path, stopped: Path, *, at: int, last: int) -> None:
    """A copy of a finished run directory as if the run had stopped right
    after its step-`at` checkpoint (its step-`last` checkpoint and the
    metrics after `at` gone)."""
    import json
    import shutil

    shutil.copytree(straight, stopped)
    shutil.rmtree(stopped / "checkpoints" / f"step_{last:06d}")
    (stopped / "checkpoints" / "latest").write_text(f"step_{at:06d}")
    kept = [line for line in (stopped / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= at]
    (stopped / "metrics.jsonl").write_text("\n".join(kept) + "\n")


def serve_directory(root: Path, before_get=None):
    """A quiet threaded HTTP server for `root` on 127.0.0.1 (call .shutdown());
    before_get(path) runs before each GET is answered (to count or hold requests)."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if before_get is not None:
                before_get(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def saved_activation_bytes(model, *inputs) -> int:
    """Bytes autograd keeps for the backward pass of one forward of `model`."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return total


def pytest_collection_modifyitems(config, items):
    """SLURM tests install system packages and start daemons: they run only
    when asked (MM_TEST_SLURM=1, which .ci/run sets)."""
    if os.environ.get("MM_TEST_SLURM") == "1":
        return
    skip = pytest.mark.skip(reason="starts a local SLURM cluster; set MM_TEST_SLURM=1 to run it")
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(skip)


def run_train(run_dir: Path, *overrides: str, nproc: int = 2, timeout: float = 900):
    """`torchrun --nproc_per_node=nproc -m train hydra.run.dir=run_dir OVERRIDES`,
    which must succeed; returns the finished process (stdout, stderr)."""
    import subprocess

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [venv_bin("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "train",
           f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=run_dir.parent, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def wandb_records(wandb_run: Path) -> list[dict]:
    """Every record of an offline W&B run, read back with `wandb leet inspect --json`."""
    import json
    import subprocess

    out = subprocess.run(
        [venv_bin("wandb"), "leet", "inspect", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step, from the run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
