"""Integration: torchrun elastic restarts after a killed worker, and a stalled
rank that makes every rank exit with a report naming it (2 gloo processes,
launched by `python -m launch.local`, i.e. torchrun --standalone)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, clean_env, python

from train.export import consolidate
from train.watchdog import describe_stall

pytestmark = pytest.mark.integration
STEPS = 12


def _launch(shards, *extra: str, restarts: int = 0, faults: bool = False) -> list[str]:
    """2 ranks through `python -m launch.local`, or through torchrun straight
    into tests/faults.py (`python -m train` with faults injected)."""
    if faults:
        from conftest import venv_bin

        head = [venv_bin("torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "faults.py")]
    else:
        head = [python(), "-m", "launch.local", "--nproc", "2", "--max-restarts", str(restarts), "--"]
    return [
        *head,
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every=3",
        "trainer.keep_last=0",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=32",
        "trainer.threads=1",
        "trainer.deterministic=true",
        "deepspeed=zero2",
        "deepspeed.precision=fp32",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
        *extra,
    ]


def _run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())


def _wait_for(predicate, *, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return consolidate(run_dir / "checkpoints" / f"step_{STEPS:06d}")


def test_killed_worker_restarts_from_the_latest_checkpoint_and_ends_as_an_uninterrupted_run(demo_shards, tmp_path):
    env = clean_env(PYTHONPATH=str(REPO))
    straight_cwd, elastic_cwd = tmp_path / "straight", tmp_path / "elastic"
    straight_cwd.mkdir()
    elastic_cwd.mkdir()
    straight = subprocess.run(
        _launch(demo_shards), cwd=straight_cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    log = elastic_cwd / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _launch(demo_shards, restarts=2), cwd=elastic_cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            # The first checkpoint (step 3) is complete once `latest` names it.
            _wait_for(
                lambda: any((d / "checkpoints" / "latest").is_file() for d in _run_dirs(elastic_cwd)),
                timeout=600,
                what="the first checkpoint",
                proc=proc,
            )
            workers = [p for p in psutil.Process(proc.pid).children() if "train" in p.cmdline()]
            (rank0,) = [p for p in workers if p.environ().get("RANK") == "0"]
            os.kill(rank0.pid, signal.SIGKILL)
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert rc == 0, output[-5000:]
    assert f"exitcode: -9) local_rank: 0 (pid: {rank0.pid})" in output  # torchrun saw the kill, restarted
    (run_dir,) = _run_dirs(elastic_cwd)  # the restarted workers kept the first attempt's directory
    rank0_log = (run_dir / "train_rank0.log").read_text()
    assert "resumed from" in rank0_log and f"step {STEPS}/{STEPS}" in rank0_log

    expected, got = _final_weights(_run_dirs(straight_cwd)[0]), _final_weights(run_dir)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def test_a_stalled_rank_makes_every_rank_exit_naming_it_and_its_operation(demo_shards, tmp_path):
    timeout_s = 10
    env = clean_env(PYTHONPATH=str(REPO), MM_TEST_STALL_RANK="1", MM_TEST_STALL_AT_STEP="3")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _launch(demo_shards, f"trainer.collective_timeout={timeout_s}", faults=True),
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(
                lambda: "fault injection: rank 1 stalls" in log.read_text(),
                timeout=600,
                what="rank 1 to stall",
                proc=proc,
            )
            # The bound: every rank gone within the timeout + 30 s of the stall.
            rc = proc.wait(timeout=timeout_s + 30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc != 0
    (run_dir,) = _run_dirs(tmp_path)
    report = "rank 1 is behind: stalled in 'loading data' at step 3"
    for rank in (0, 1):
        rank_log = (run_dir / f"train_rank{rank}.log").read_text()
        assert report in rank_log and f"Rank {rank} exits." in rank_log, rank_log[-2000:]
    assert "rank 0 waiting in 'training step' at step 3" in (run_dir / "train_rank0.log").read_text()
    assert "exitcode: 124" in log.read_text()


def _rec(step: int, op: str, *, micro: int = 1, since: float = 0.0, beat: float = 100.0) -> dict:
    return {"step": step, "micro": micro, "op": op, "since": since, "beat": beat, "host": "n1", "pid": 7}


def test_stall_report_names_the_rank_behind_or_says_none_is():
    now = 100.0
    behind = describe_stall(
        me=0,
        now=now,
        timeout_s=10,
        stale_after=5,
        records={
            0: _rec(5, "training step", since=89),
            1: _rec(5, "training step", since=89),
            2: _rec(5, "loading data", since=88),
            3: _rec(4, "checkpoint", since=87, beat=90),
        },
    )
    assert "rank 2 is behind: stalled in 'loading data' at step 5, no progress for 12 s" in behind
    assert "rank 3 is behind: no heartbeat for 10 s, last seen in 'checkpoint' at step 4" in behind
    assert "ranks 0, 1 waiting in 'training step' at step 5" in behind and behind.endswith("(detected by rank 0).")

    missing = describe_stall(me=1, now=now, timeout_s=10, stale_after=5, records={0: None, 1: _rec(2, "evaluation")})
    assert "rank 0 is behind: it never reported progress" in missing

    same = describe_stall(
        me=1, now=now, timeout_s=10, stale_after=5, records={0: _rec(7, "training step"), 1: _rec(7, "training step")}
    )
    assert "no rank is behind: every rank is in 'training step' at step 7" in same
