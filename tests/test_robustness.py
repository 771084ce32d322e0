"""Integration: non-finite losses and stop signals, on real training processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import REPO, clean_env, python, serve_directory

from train.checkpoint import _prune

pytestmark = pytest.mark.integration


def _cmd(run_dir, shards, *extra: str) -> list[str]:
    return [
        python(),
        "-m",
        "train",
        f"hydra.run.dir={run_dir}",
        "trainer.micro_batch_size=16",
        "trainer.log_every=1",
        "trainer.eval_batch_size=32",
        "deepspeed.precision=fp32",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
        *extra,
    ]


def test_non_finite_losses_stop_the_run_with_a_clear_error(demo_shards, tmp_path):
    # A zero log-mel scale turns every audio clip into infinities: every loss is NaN.
    cmd = _cmd(tmp_path / "run", demo_shards, "trainer.max_steps=20", "trainer.max_bad_steps=3", "data.log_mel_std=0")
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_signal_checkpoints_stops_and_the_rerun_finishes(demo_shards, tmp_path):
    run = tmp_path / "run"
    cmd = _cmd(run, demo_shards, "trainer.max_steps=400")
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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

    finish = subprocess.run(
        _cmd(run, demo_shards, f"trainer.max_steps={stopped_at + 2}"),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    """A process killed mid-save leaves a step directory without `latest`
    pointing at it; resume picks the previous, complete checkpoint. The save
    of step 3 hangs after DeepSpeed's files, before our metadata and
    `latest` (tests/faults.py), and is killed there: no race with the save."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    log = tmp_path / "train.log"
    cmd = _cmd(
        run,
        demo_shards,
        "trainer.max_steps=8",
        "trainer.checkpoint_every=1",
        "trainer.keep_last=2",
        "trainer.export=false",
    )
    cmd[1:3] = [str(REPO / "tests" / "faults.py")]  # python tests/faults.py OVERRIDES: `python -m train` + the fault
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=clean_env(PYTHONPATH=str(REPO), MM_TEST_HANG_IN_SAVE_AT_STEP="3"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 600
            while "fault injection: hangs in the save of step_000003" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            proc.kill()  # SIGKILL: no handler, no cleanup
        finally:
            proc.kill()
            proc.wait(timeout=60)
    killed_in = ckpts / "step_000003"
    assert any(killed_in.iterdir())  # DeepSpeed's part of the save is on disk...
    assert not (killed_in / "meta.json").exists()  # ...but the save never completed
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert (ckpts / "step_000002" / "meta.json").is_file()

    resumed = subprocess.run(
        _cmd(run, demo_shards, "trainer.max_steps=4", "trainer.export=false", "trainer.keep_last=2"),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_000002'}" in resumed.stdout + resumed.stderr
    assert (ckpts / "latest").read_text().strip() == "step_000004"


def _torchrun_cmd(run_dir, train: str, heldout: str, *extra: str, faults: bool = False) -> list[str]:
    """2 ranks of `python -m train`, or of tests/faults.py (the same, with faults injected)."""
    from conftest import venv_bin

    program = [str(REPO / "tests" / "faults.py")] if faults else ["-m", "train"]
    return [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        *program,
        f"hydra.run.dir={run_dir}",
        "trainer.micro_batch_size=8",
        "trainer.log_every=1",
        "trainer.eval_batch_size=32",
        "deepspeed.precision=fp32",
        f"data.train={train}",
        f"data.heldout={heldout}",
        "logger.mode=disabled",
        *extra,
    ]


def _stopped_step(run) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_ends_in_a_checkpoint(demo_shards, tmp_path, sig):
    """What scancel, a time limit, Kubernetes or Ctrl-C do: the signal reaches
    torchrun, both trainers and their 2 data workers each. The workers keep
    running, the trainers checkpoint the same step and stop; the run resumes."""
    import os

    run = tmp_path / "run"
    cmd = _torchrun_cmd(
        run, str(demo_shards["train"]), str(demo_shards["heldout"]), "trainer.max_steps=400", "data.num_workers=2"
    )
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    logs = out + err
    assert "is killed by signal" not in logs, logs[-3000:]
    assert f"received {sig.name}" in logs and "stopped by a signal" in logs, logs[-3000:]
    stopped_at = _stopped_step(run)
    assert 5 <= stopped_at < 400
    assert (run / "stopped.json").exists()
    if sig != signal.SIGTERM:
        return  # resuming is the same for every signal: once is enough
    finish = subprocess.run(
        _torchrun_cmd(
            run,
            str(demo_shards["train"]),
            str(demo_shards["heldout"]),
            f"trainer.max_steps={stopped_at + 2}",
            "data.num_workers=2",
        ),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "resumed from" in finish.stdout + finish.stderr
    assert json.loads(finish.stdout.strip().splitlines()[-1])["step"] == stopped_at + 2


def test_a_usr1_during_start_up_is_honoured_at_the_first_step(demo_shards, tmp_path):
    """USR1 while the trainers are still counting their shards (served over
    HTTP here, held until the signal is sent): the run checkpoints after its
    first step and stops, so the job script requeues it."""
    import os
    import threading

    asked, release = threading.Semaphore(0), threading.Event()

    def hold(path):
        asked.release()  # each trainer's first request is its shard index
        release.wait(120)

    server = serve_directory(demo_shards["root"], hold)
    run = tmp_path / "run"
    url = f"'http://127.0.0.1:{server.server_port}/train/shard-{{000000..000003}}.tar'"  # quoted for Hydra
    try:
        proc = subprocess.Popen(
            _torchrun_cmd(run, url, str(demo_shards["heldout"]), "trainer.max_steps=400", "data.num_workers=1"),
            cwd=tmp_path,
            env=clean_env(PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2):  # both trainers are counting shards: past start-up's first lines, before any step
            assert asked.acquire(timeout=300), "the trainers never asked for their shards"
        for child in _trainer_pids(proc.pid):
            os.kill(child, signal.SIGUSR1)  # torchrun itself ignores USR1 in the job script (launch.slurm)
        release.set()
        out, err = proc.communicate(timeout=300)
    finally:
        release.set()
        server.shutdown()
    logs = out + err
    assert proc.returncode == 0, logs[-3000:]
    assert "arrived during start-up" in logs and _stopped_step(run) == 1, logs[-3000:]


def _trainer_pids(torchrun_pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(torchrun_pid).children() if "train" in " ".join(p.cmdline())]


def test_a_slow_export_on_rank_0_is_not_a_stall(demo_shards, tmp_path):
    """After the last collective, rank 0 exports (and uploads) while the
    others leave: an export longer than trainer.collective_timeout is work,
    not a stall, and every rank exits 0."""
    run = tmp_path / "run"
    proc = subprocess.run(
        _torchrun_cmd(
            run,
            str(demo_shards["train"]),
            str(demo_shards["heldout"]),
            "trainer.max_steps=2",
            "trainer.collective_timeout=5",
            "data.num_workers=0",
            "trainer.fail_on_export_error=true",
            faults=True,
        ),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), MM_TEST_SLOW_EXPORT_S="15"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-3000:]
    assert "fault injection: the export waits" in logs and "stalled job" not in logs
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("strict", [False, True])
def test_an_export_failure_is_reported_and_fails_the_run_when_asked(demo_shards, tmp_path, strict):
    run = tmp_path / "run"
    run.mkdir()
    (run / "export").write_text("a file where the export directory goes")
    proc = subprocess.run(
        _cmd(run, demo_shards, "trainer.max_steps=2", f"trainer.fail_on_export_error={strict}"),
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = proc.stdout + proc.stderr
    assert "export failed" in logs and "python -m train.export checkpoint=" in logs
    assert (proc.returncode != 0) == strict, logs[-3000:]
    assert (run / "checkpoints" / "latest").exists()  # the training is kept either way


def test_rank_0_reads_the_shard_index_once_for_every_rank(demo_shards, tmp_path):
    """2 ranks over HTTP: each index.json is fetched once (rank 0, shared by
    broadcast), not once per rank and again at every evaluation."""
    import collections

    gets: collections.Counter = collections.Counter()

    def count(path):
        gets[path] += 1

    server = serve_directory(demo_shards["root"], count)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        proc = subprocess.run(
            _torchrun_cmd(
                tmp_path / "run",
                f"'{base}/train/shard-{{000000..000003}}.tar'",
                f"{base}/heldout/shard-000000.tar",
                "trainer.max_steps=4",
                "trainer.eval_every=2",
                "data.num_workers=0",
            ),
            cwd=tmp_path,
            env=clean_env(PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert gets["/train/index.json"] == 1 and gets["/heldout/index.json"] == 1, dict(gets)
