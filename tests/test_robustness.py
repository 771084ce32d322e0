"""Integration: non-finite losses and stop signals, on real training processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import REPO, clean_env, python
from train.checkpoint import _prune

pytestmark = pytest.mark.integration


def _cmd(run_dir, shards, *extra: str) -> list[str]:
    return [
        python(), "-m", "train", f"hydra.run.dir={run_dir}", "trainer.micro_batch_size=16", "trainer.log_every=1",
        "trainer.eval_batch_size=32", "deepspeed.precision=fp32", f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}", "data.num_workers=0", "logger.mode=disabled", *extra,
    ]


def test_non_finite_losses_stop_the_run_with_a_clear_error(demo_shards, tmp_path):
    # A zero log-mel scale turns every audio clip into infinities: every loss is NaN.
    cmd = _cmd(tmp_path / "run", demo_shards, "trainer.max_steps=20", "trainer.max_bad_steps=3", "data.log_mel_std=0")
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_signal_checkpoints_stops_and_the_rerun_finishes(demo_shards, tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, demo_shards, "trainer.max_steps=400")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    logs = out + err  # Hydra's console log goes to stdout
    assert "received SIGUSR1" in logs and "stopped by a signal" in logs
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped_at < 400
    assert '"heldout"' not in out  # no results line: the run did not finish

    finish = subprocess.run(_cmd(run, demo_shards, f"trainer.max_steps={stopped_at + 2}"), cwd=tmp_path,
                            env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert json.loads(finish.stdout.strip().splitlines()[-1])["step"] == stopped_at + 2
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if "train/loss" in l]
    assert steps == list(range(1, stopped_at + 3))  # every step once, none repeated


def test_prune_keeps_the_newest_checkpoints(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "latest").write_text("step_000008")
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000006", "step_000008"]


def test_prune_orders_steps_by_number_past_a_million(tmp_path):
    """step_1000000 sorts before step_999999 as a string: the newest must survive."""
    for step in (999_998, 999_999, 1_000_000):
        (tmp_path / f"step_{step:06d}").mkdir()
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1000000", "step_999999"]


def test_sigkill_while_saving_leaves_the_previous_checkpoint_to_resume(demo_shards, tmp_path):
    """A process killed mid-save (model=small: a save takes long enough to
    land in) leaves a step directory without `latest` pointing at it; resume
    picks the previous, complete checkpoint."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cmd = _cmd(run, demo_shards, "model=small", "trainer.max_steps=8", "trainer.checkpoint_every=1",
               "trainer.keep_last=2", "trainer.micro_batch_size=2", "trainer.eval_batch_size=8", "trainer.export=false")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_in = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        latest = ckpts / "latest"
        if latest.is_file():
            done = int(latest.read_text().strip().removeprefix("step_"))
            saving = ckpts / f"step_{done + 1:06d}"
            if saving.is_dir() and any(saving.iterdir()):
                proc.kill()  # SIGKILL: no handler, no cleanup
                killed_in = saving
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_in is not None, "the run ended before a save could be interrupted"
    previous = ckpts / (ckpts / "latest").read_text().strip()
    assert previous.name < killed_in.name and (previous / "meta.json").is_file()
    assert not (killed_in / "meta.json").exists()  # the interrupted save never completed

    resumed = subprocess.run(
        _cmd(run, demo_shards, "model=small", f"trainer.max_steps={int(previous.name[5:]) + 1}",
             "trainer.micro_batch_size=2", "trainer.eval_batch_size=8", "trainer.export=false", "trainer.keep_last=2"),
        cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {previous}" in resumed.stdout + resumed.stderr
    assert (ckpts / "latest").read_text().strip() == f"step_{int(previous.name[5:]) + 1:06d}"
