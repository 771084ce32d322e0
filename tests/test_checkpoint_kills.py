"""A kill at the worst moment of a save leaves a checkpoint to resume from:
a stop arriving on a checkpoint step saves that step once (a second save
rewrote, in place, the directory `latest` names, so a SIGKILL during it
left nothing whole), and a kill between meta.json and `latest` leaves
`latest` on the previous complete checkpoint."""

from __future__ import annotations

import subprocess
import time

import pytest
from conftest import REPO, clean_env
from test_robustness import _cmd

pytestmark = pytest.mark.integration


def run_with_faults(cmd, tmp_path, log, **faults: str) -> str:
    """Runs `python -m train` with faults (tests/faults.py) until it exits or
    a fault hangs it; a hung run is SIGKILLed. Returns its log."""
    cmd = [cmd[0], str(REPO / "tests" / "faults.py"), *cmd[3:]]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO), **faults), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 600
            while proc.poll() is None and "fault injection: killed" not in log.read_text():
                if "fault injection: hangs" in log.read_text():
                    break
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait(timeout=60)
    return log.read_text()


def resume(run, demo_shards, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(run, demo_shards, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.export=false"),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_stop_on_a_checkpoint_step_saves_it_once(demo_shards, tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, demo_shards, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.export=false")
    # SIGTERM during step 4, a checkpoint step; a second save of step 4 would be killed half-way.
    text = run_with_faults(
        cmd, tmp_path, tmp_path / "train.log", MM_TEST_STOP_AFTER_STEP="4", MM_TEST_KILLED_IN_REWRITE="1"
    )
    assert "fault injection: SIGTERM during step 4" in text, text[-3000:]
    assert "killed half-way" not in text, "step 4 was saved a second time, over `latest`"
    assert "stopped by a signal after step 4" in text, text[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    resumed = resume(run, demo_shards, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_000004'} at step 4" in resumed.stdout + resumed.stderr


def test_a_kill_between_meta_and_latest_resumes_from_the_previous_checkpoint(demo_shards, tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, demo_shards, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.export=false")
    text = run_with_faults(cmd, tmp_path, tmp_path / "train.log", MM_TEST_HANG_BEFORE_LATEST_AT_STEP="4")
    assert "hangs before `latest` of step 4 (meta.json True)" in text, text[-3000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    resumed = resume(run, demo_shards, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_000002'} at step 2" in resumed.stdout + resumed.stderr
    assert (ckpts / "latest").read_text().strip() == "step_000006"
