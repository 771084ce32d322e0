"""launch.slurm: the sbatch script it renders, what it rejects before
submission, and real jobs on a two-node SLURM cluster on this machine
(tests/slurm/cluster.sh): 2-node ZeRO-2 training equal to a single-node run,
and a preemption warning that checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, clean_env, python

import launch.slurm as slurm
from train.sample_log import read_sample_logs
from train.signals import STOPPED_FILE

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _overrides(shards, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "deepspeed=zero2",
        "deepspeed.precision=fp32",
        "trainer.deterministic=true",
        "trainer.threads=1",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=32",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=0",
        *extra,
    ]


# -- the script and the checks before submission (no cluster needed) ---------


def test_dry_run_renders_one_torchrun_per_node_with_c10d_restarts_and_preemption(capsys, demo_cwd):
    tmp_path = demo_cwd
    argv = [
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "2-00:00:00",
        "--account",
        "proj",
        "--job-name",
        "big",
        "--warning-seconds",
        "600",
        "--max-restarts",
        "2",
        "--dry-run",
        "--",
        "model=small",
        "trainer.max_steps=100",
    ]
    assert slurm.main(argv) == 0
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --job-name=big",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        f"#SBATCH --output={tmp_path}/outputs/slurm/big-%j.out",
        "#SBATCH --open-mode=append",
    ):
        assert line + "\n" in script
    assert "--nnodes=$SLURM_NNODES --nproc_per_node=8 --max-restarts=2" in script
    assert "--rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID --rdzv_endpoint=$HEAD_NODE:29500" in script
    assert f'RUN_DIR={tmp_path}/outputs/slurm/"$SLURM_JOB_ID"' in script
    assert '-m train "hydra.run.dir=$RUN_DIR" model=small trainer.max_steps=100 &' in script
    assert "export NCCL_DEBUG=" in script and "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and f'"$RUN_DIR/{STOPPED_FILE}"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell

    # CPU nodes: gloo, N processes per node; a given hydra.run.dir is every attempt's directory.
    assert slurm.main(["--nodes", "2", "--nproc-per-node", "3", "--dry-run", "--", "hydra.run.dir=runs/a"]) == 0
    script = capsys.readouterr().out
    assert "--gpus-per-node" not in script and "NCCL" not in script and "--nproc_per_node=3" in script
    assert f"RUN_DIR={tmp_path}/runs/a\n" in script and script.count("hydra.run.dir") == 1


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (["trainer.max_stesp=3"], "max_stesp"),
        (["deepspeed=zero9"], "zero2"),
        (["deepspeed.precision=fp8"], "deepspeed.precision"),
        (["hydra.rn.dir=x"], "hydra.rn.dir"),
        (["trainer.resume=none"], "trainer.resume=auto"),
    ],
)
def test_overrides_that_would_fail_are_rejected_before_submission(capsys, overrides, reason, demo_cwd):
    # No --dry-run: it would submit if the overrides passed (and there is no sbatch call before them).
    assert slurm.main(["--nodes", "2", "--", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.slurm: ") and reason in err


def test_time_limits_in_slurm_formats():
    assert [slurm.time_limit_seconds(t) for t in ("90", "5:30", "1:00:00", "2-0", "1-2:3", "1-0:0:5")] == [
        5400,
        330,
        3600,
        172800,
        93780,
        86405,
    ]
    with pytest.raises(slurm.LaunchError, match="--time"):
        slurm.time_limit_seconds("soon")
    assert slurm.main(["--nodes", "1", "--time", "4:00", "--warning-seconds", "300", "--dry-run"]) == 2


def test_the_script_and_the_trainer_agree_on_the_stopped_file():
    assert slurm.STOPPED_FILE == STOPPED_FILE


# -- a real cluster ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """munged, slurmctld and slurmd n1, n2 on 127.0.0.1; stopped afterwards if this started them."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root: tests/slurm/cluster.sh installs slurm-wlm and munge and starts daemons")
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.skip(f"a local SLURM cluster could not be started: {(proc.stderr or proc.stdout).strip()[-800:]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def _submit(cwd: Path, overrides: list[str], *, name: str, launcher: tuple[str, ...] = ()) -> tuple[str, Path, Path]:
    """Submits through `python -m launch.slurm --nodes 2 [launcher]`; returns (job id, run dir, log)."""
    cmd = [
        python(),
        "-m",
        "launch.slurm",
        "--nodes",
        "2",
        *launcher,
        "--job-name",
        name,
        "--output-dir",
        "out",
        "--port",
        "29511",
        "--",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) if ": " in line else ("job", line) for line in proc.stdout.splitlines())
    job_id = lines["job"].removeprefix("submitted job ")
    return job_id, Path(lines["run directory"]), Path(lines["log"])


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait(predicate, *, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log.exists() else "(no log)"
            raise AssertionError(f"timed out waiting for {what}; log:\n{tail}")
        time.sleep(0.05)


def _wait_done(job_id: str, log: Path, timeout: float = 600) -> dict[str, str]:
    _wait(lambda: _job(job_id).get("JobState") in DONE, timeout=timeout, what=f"job {job_id} to end", log=log)
    return _job(job_id)


def _wait_for_step(step: int, metrics: Path, log: Path) -> None:
    """Until the run has logged `step` training steps."""
    # Counts '"train/loss":' (not its per-objective sub-keys); a line still being written counts at most once.
    _wait(
        lambda: metrics.exists() and metrics.read_text().count('"train/loss":') >= step,
        timeout=600,
        what=f"step {step}",
        log=log,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slurm
@pytest.mark.integration
def test_two_node_job_trains_zero2_and_matches_a_single_node_run(cluster, demo_shards, tmp_path):
    steps = 8  # one epoch: 256 samples / (2 ranks × 16)
    overrides = _overrides(demo_shards, f"trainer.max_steps={steps}", "logger.mode=disabled")
    job_id, run_dir, log = _submit(tmp_path, overrides, name="two-nodes")
    try:
        job = _wait_done(job_id, log)
    finally:
        subprocess.run(["scancel", job_id])
    assert job["JobState"] == "COMPLETED", log.read_text()[-5000:]
    assert job["NumNodes"] == "2" and job["NodeList"] == "n[1-2]"
    assert f"job {job_id} (requeued 0 times) on n[1-2]" in log.read_text()

    ckpts = run_dir / "checkpoints"
    step_dir = ckpts / (ckpts / "latest").read_text().strip()
    assert step_dir.name == f"step_{steps:06d}" and (step_dir / "meta.json").is_file()
    assert len(list(step_dir.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # ZeRO-2: one shard per rank
    for rank in (0, 1):
        loader = json.loads((step_dir / f"loader_rank{rank}.json").read_text())
        assert loader["fingerprint"]["world_size"] == 2 and loader["batches"] == steps

    # The same config on one node, 2 processes, as torchrun --standalone runs it.
    reference = tmp_path / "one-node"
    proc = subprocess.run(
        [python(), "-m", "launch.local", "--nproc", "2", "--", f"hydra.run.dir={reference}", *overrides],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two_nodes, one_node = _losses(run_dir), _losses(reference)
    assert sorted(two_nodes) == list(range(1, steps + 1))
    assert two_nodes == one_node  # bitwise: fp32, one thread per process, same batches on each rank


def _train_keys(shards: Path) -> Counter:
    keys: Counter = Counter()
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update({name.split(".", 1)[0] for name in tar.getnames()})
    return keys


@pytest.mark.slurm
@pytest.mark.integration
def test_preemption_warning_checkpoints_requeues_and_the_job_resumes_to_the_end(cluster, demo_shards, tmp_path):
    steps, per_epoch = 16, 8  # two epochs
    overrides = _overrides(demo_shards, f"trainer.max_steps={steps}", "trainer.log_samples=true", "logger.mode=offline")
    job_id, run_dir, log = _submit(tmp_path, overrides, name="preempted")
    metrics = run_dir / "metrics.jsonl"
    try:
        _wait_for_step(2, metrics, log)
        # What SLURM sends --warning-seconds before the time limit: USR1 to the batch script.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        job = _wait_done(job_id, log)
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-5000:]
    assert "preemption warning" in text and f"requeueing job {job_id}" in text
    assert f"job {job_id} (requeued 1 times)" in text
    stopped_at = int(text.split("stopped by a signal after step ")[1].split(";")[0])
    assert 2 <= stopped_at < steps
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:06d} at step {stopped_at}" in text
    assert not (run_dir / STOPPED_FILE).exists()

    # Every step trained exactly once, across both attempts; one results line at the end.
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert steps_logged == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    assert sum(line.startswith('{"heldout"') for line in text.splitlines()) == 1

    # One W&B run: the stop checkpoint's id is the final one's, and the resumed attempt logged into it.
    run_ids = {
        json.loads((run_dir / "checkpoints" / f"step_{s:06d}" / "meta.json").read_text())["wandb_run_id"]
        for s in (stopped_at, steps)
    }
    assert len(run_ids) == 1
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and {p.name.rsplit("-", 1)[1] for p in attempts} == run_ids

    # Exactly-once audit: each rank read each batch position once, and each epoch saw every sample once.
    logs = read_sample_logs(run_dir)
    assert sorted(logs) == [0, 1]
    expected = _train_keys(demo_shards["train"])
    for epoch in (0, 1):
        seen: Counter = Counter()
        for rank, records in logs.items():
            positions = [r["batch"] for r in records if r["epoch"] == epoch]
            assert positions == list(range(1, per_epoch + 1)), (rank, epoch, positions)
            seen.update(k for r in records if r["epoch"] == epoch for k in r["keys"])
        assert seen == expected, (
            f"epoch {epoch}: {len(seen)} distinct of {len(expected)}, max count {max(seen.values())}"
        )


@pytest.mark.slurm
@pytest.mark.integration
def test_a_job_requeued_onto_one_node_resumes_there_and_finishes(cluster, demo_shards, tmp_path):
    """--nodes 2 --min-nodes 1: node n2 is drained and the job preempted; the
    requeued job, resized to 1 node while it waits, starts on n1, resumes
    the 2-rank ZeRO-1 checkpoint on 1 rank (universal checkpoint,
    accumulation 2 for the same global batch) and finishes, every sample of each epoch read
    once across the change."""
    steps, per_epoch = 16, 8  # the change falls in epoch 0; epoch 1 is read on one node
    overrides = _overrides(
        demo_shards, f"trainer.max_steps={steps}", "trainer.log_samples=true", "logger.mode=disabled"
    )
    # ZeRO-1 here (the 2 → 1 → 2 rank tests in test_world_size.py cover stages 2 and 3).
    overrides = ["deepspeed=zero1" if o == "deepspeed=zero2" else o for o in overrides]
    job_id, run_dir, log = _submit(tmp_path, overrides, name="shrunk", launcher=("--min-nodes", "1"))
    metrics = run_dir / "metrics.jsonl"
    try:
        _wait_for_step(2, metrics, log)
        # n2 leaves (its running job goes on), then the job is preempted and requeues itself.
        subprocess.run(["scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=test_slurm"], check=True)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        _wait(
            lambda: (lambda j: j.get("JobState") == "PENDING" and j.get("Restarts") == "1")(_job(job_id)),
            timeout=600,
            what="the job to be requeued",
            log=log,
        )
        # What a user (or a cluster's own tooling) does with a job that can no longer get 2 nodes.
        # One task per node (--ntasks-per-node=1): the task count follows the node count.
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1"], check=True)
        job = _wait_done(job_id, log)
    finally:
        subprocess.run(["scancel", job_id])
        subprocess.run(["scontrol", "update", "NodeName=n2", "State=RESUME"], capture_output=True)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-5000:]
    assert job["NodeList"] == "n1" and job["NumNodes"] == "1", job
    assert f"job {job_id} (requeued 1 times) on n1:" in text
    stopped_at = int(text.split("stopped by a signal after step ")[1].split(";")[0])
    assert 2 <= stopped_at < per_epoch
    assert "resuming on 1 ranks a run saved on 2: global batch 32 = 16 micro × 2 accum × 1 ranks" in text
    assert (run_dir / "checkpoints" / f"step_{stopped_at:06d}" / "universal").is_dir()
    assert text.count("ZeRO-1, float32 | global batch 32") == 2  # both starts

    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert steps_logged == list(range(1, steps + 1))
    expected = _train_keys(demo_shards["train"])
    logs = read_sample_logs(run_dir)
    assert sorted(logs) == [0, 1]
    for epoch in (0, 1):
        seen = Counter(k for records in logs.values() for r in records if r["epoch"] == epoch for k in r["keys"])
        assert seen == expected, f"epoch {epoch}: {len(seen)} distinct of {len(expected)}, max {max(seen.values())}"
    # Rank 1 read nothing after the change: epoch 1 came from rank 0 alone.
    assert all(r["epoch"] == 0 for r in logs[1])


@pytest.mark.slurm
@pytest.mark.integration
def test_slurm_rejects_an_unknown_partition_before_anything_is_submitted(cluster, demo_cwd):
    tmp_path = demo_cwd
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = subprocess.run(
        [
            python(),
            "-m",
            "launch.slurm",
            "--nodes",
            "2",
            "--partition",
            "nope",
            "--output-dir",
            "out",
            "--",
            "trainer.max_steps=1",
        ],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "SLURM rejects the job: invalid partition specified: nope" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_min_nodes_fixes_the_global_batch_and_checks_every_node_count(capsys, demo_cwd):
    assert slurm.main(["--nodes", "2", "--min-nodes", "1", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script and "trainer.global_batch_size=" in script
    # 16 × 3 nodes = 48 is no multiple of 16 × 2: refused for the 2-node size.
    assert slurm.main(["--nodes", "3", "--min-nodes", "2", "--dry-run", "--", "trainer.micro_batch_size=16"]) == 2
    err = capsys.readouterr().err
    assert "on 2 node(s) (--min-nodes 2)" in err and "not a multiple" in err
