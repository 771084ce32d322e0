"""`python -m launch.slurm --nodes N [options] -- [train overrides]`: a SLURM job.

Renders an sbatch script and submits it (or prints it, with --dry-run):

- `srun` starts one `torchrun` per node; torchrun starts the node's processes
  (one per GPU, or --nproc-per-node on CPU) and meets the other nodes at a
  c10d rendezvous on the job's first node. With --max-restarts it restarts
  every process when one fails; they resume from the latest checkpoint.
- All ranks, and every requeue of the job, share one run directory
  (OUTPUT_DIR/JOBID unless the overrides set hydra.run.dir), so
  `trainer.resume=auto` finds the checkpoints and the W&B run id in them.
- Preemption: the job asks SLURM for USR1 --warning-seconds before its time
  limit (`--signal=B:USR1@T`). The script forwards it to the trainers, which
  agree on a step, checkpoint and stop (train.signals); the script then
  requeues the job, which resumes into the same run and W&B run.
- Fewer nodes after a requeue: with --min-nodes M, the job may be resized
  while it waits (`scontrol update JobId=ID NumNodes=K NumTasks=K`, M <= K <= --nodes),
  for example when a node fails or is drained. The overrides are checked for
  every K, the global batch is fixed (trainer.global_batch_size, at its
  value on --nodes nodes unless given), and the run resumes on K nodes with
  the accumulation derived for them (train.topology).

Before anything is submitted, the overrides are composed and validated as
`python -m train` would, and `sbatch --test-only` checks the SLURM options;
either failure is printed with its reason and nothing is submitted.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

STOPPED_FILE = "stopped.json"  # train.signals.STOPPED_FILE: the trainers stopped on a signal, checkpointed


class LaunchError(Exception):
    """A problem found before submission; the message names it."""


@dataclass
class SlurmJob:
    nodes: int
    min_nodes: int | None = None  # the job may be resized to min_nodes..nodes nodes
    gpus_per_node: int = 0
    nproc_per_node: int = 1  # processes per node: one per GPU, or this many on CPU
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "mmpretrain"
    warning_seconds: int = 300
    max_restarts: int = 3
    port: int = 29500
    output_dir: Path = Path("outputs/slurm")
    workdir: Path = Path(".")
    python: str = sys.executable
    overrides: list[str] = field(default_factory=list)

    def log_path(self, job_id: str = "%j") -> Path:
        return self.output_dir / f"{self.job_name}-{job_id}.out"

    def run_dir(self, job_id: str) -> Path:
        given = _hydra_run_dir(self.overrides)
        return Path(given).absolute() if given else self.output_dir / job_id


def _hydra_run_dir(overrides: list[str]) -> str | None:
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+~") == "hydra.run.dir":
            return value
    return None


def time_limit_seconds(limit: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not m:
        raise LaunchError(f"--time {limit!r}: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        return ((int(days) * 24 + int(a)) * 60 + int(b or 0)) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def check_overrides(overrides: list[str], *, world_size: int = 1, cuda: bool = False) -> None:
    """Composes the training config as `python -m train` would and makes
    the same start-up checks (train.preflight) for `world_size` ranks;
    raises LaunchError naming what was rejected."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from train.cli import one_line
    from train.config import compose
    from train.preflight import check_start

    try:
        compose(overrides, hydra_keys=True)  # hydra.* overrides are checked too
        cfg = OmegaConf.to_object(compose(overrides))
        given = _hydra_run_dir(overrides)  # an existing run's directory: its checkpoint must fit this job
        check_start(cfg, world_size=world_size, cuda=cuda, run_dir=Path(given) if given else None)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise LaunchError(f"train overrides rejected: {one_line(e)}") from None
    if cfg.trainer.resume != "auto":
        raise LaunchError(
            f"trainer.resume={cfg.trainer.resume!r}: a requeued or restarted job must resume from its own latest "
            "checkpoint; leave trainer.resume=auto"
        )


def render(job: SlurmJob) -> str:
    """The sbatch script."""
    q = shlex.quote
    sbatch = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the node's processes
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []),
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--time={job.time}"] if job.time else []),
        *([f"--account={job.account}"] if job.account else []),
        f"--chdir={job.workdir}",
        f"--output={job.log_path()}",
        "--open-mode=append",  # a requeued job appends to the same log
        "--requeue",
        f"--signal=B:USR1@{job.warning_seconds}",  # to this script, before the time limit
    ]
    given = _hydra_run_dir(job.overrides)
    run_dir = q(str(Path(given).absolute())) if given else f'{q(str(job.output_dir))}/"$SLURM_JOB_ID"'
    overrides = [o for o in job.overrides if o.partition("=")[0].lstrip("+~") != "hydra.run.dir"]
    if job.gpus_per_node:
        backend = [
            "# GPUs: NCCL for GPU tensors (gloo for CPU ones); fail fast on a broken collective.",
            "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
        ]
    else:
        backend = ["# CPU: gloo. Set GLOO_SOCKET_IFNAME if the nodes' default interface cannot reach each other."]
    if job.cpus_per_task:
        backend.append(f"export OMP_NUM_THREADS={max(1, job.cpus_per_task // job.nproc_per_node)}")
    # One torchrun per node of this allocation, said outright: a job resized while it waited
    # (NumNodes=K) still carries the task count of its submission in its environment.
    srun = ["srun", "--kill-on-bad-exit=1", "--nodes=$SLURM_JOB_NUM_NODES", "--ntasks=$SLURM_JOB_NUM_NODES",
            "--ntasks-per-node=1"]  # fmt: skip
    if job.cpus_per_task:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    # One line each: launcher, topology, rendezvous, trainer. $-variables are for the shell.
    torchrun = [
        [q(job.python), "-m", "torch.distributed.run"],
        ["--nnodes=$SLURM_NNODES", f"--nproc_per_node={job.nproc_per_node}", f"--max-restarts={job.max_restarts}"],
        ["--rdzv_backend=c10d", "--rdzv_id=$SLURM_JOB_ID", f"--rdzv_endpoint=$HEAD_NODE:{job.port}"],
        ["-m", "train", '"hydra.run.dir=$RUN_DIR"', *map(q, overrides)],
    ]
    command = " \\\n    ".join(" ".join(part) for part in torchrun)
    lines = [
        "#!/bin/bash",
        f"# Rendered by `python -m launch.slurm`: {job.nodes} node(s) x {job.nproc_per_node} process(es).",
        *(f"#SBATCH {o}" for o in sbatch),
        "",
        "# One run directory for all ranks and every requeue: trainer.resume=auto finds its checkpoints.",
        f"RUN_DIR={run_dir}",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        *backend,
        "# A fresh c10d store for every torchrun restart (restarted workers hang on the old one: pytorch#135712).",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        'mkdir -p "$RUN_DIR"',
        'echo "[launch.slurm] job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} times) on $SLURM_JOB_NODELIST:'
        ' run directory $RUN_DIR"',
        "",
        "# Preemption warning: forward USR1 to every process of the job step. torchrun ignores it",
        "# (below); the trainers checkpoint at the next step all ranks agree on, and stop.",
        "preempted=0",
        "on_warning() {",
        "    preempted=1",
        '    echo "[launch.slurm] preemption warning: checkpointing and stopping"',
        '    scancel --signal=USR1 "$SLURM_JOB_ID"',
        "}",
        "trap on_warning USR1",
        "",
        # `trap ''` makes torchrun ignore USR1, and survives exec; the trainers install their own handler.
        f'{" ".join(srun)} bash -c \'trap "" USR1; exec "$@"\' torchrun \\\n    {command} &',
        "step=$!",
        "# A trapped signal interrupts `wait`: wait until srun has really ended.",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; rc=$?',
        "",
        f'if [ "$preempted" = 1 ] && [ -f "$RUN_DIR/{STOPPED_FILE}" ]; then',
        '    echo "[launch.slurm] checkpointed after the warning: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'echo "[launch.slurm] training exited with $rc"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


def fix_global_batch(job: SlurmJob) -> None:
    """With --min-nodes, the number of nodes may differ from one start of the
    job to the next: unless the overrides fix the global batch, fix it at
    its value on --nodes nodes (micro batch × accumulation × ranks)."""
    if not job.min_nodes or job.min_nodes == job.nodes:
        return
    from omegaconf import OmegaConf

    from train.config import compose

    try:
        trainer = OmegaConf.to_object(compose(job.overrides)).trainer
    except Exception:  # noqa: BLE001 - check_overrides reports what is wrong with them
        return
    if trainer.global_batch_size <= 0:
        total = trainer.micro_batch_size * trainer.grad_accum_steps * job.nodes * job.nproc_per_node
        job.overrides = [*job.overrides, f"trainer.global_batch_size={total}"]


def _sbatch(args: list[str], script: str) -> subprocess.CompletedProcess:
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: run this on a SLURM login node (or print the script with --dry-run)")
    return subprocess.run(["sbatch", *args], input=script, capture_output=True, text=True, timeout=120)


def check_with_slurm(script: str) -> None:
    """`sbatch --test-only`: SLURM's own check of partition, account, time and node counts."""
    proc = _sbatch(["--test-only"], script)
    if proc.returncode != 0:
        reason = "; ".join((proc.stderr or proc.stdout).strip().replace("sbatch: error: ", "").splitlines())
        raise LaunchError(f"SLURM rejects the job: {reason}")


def submit(script: str) -> str:
    proc = _sbatch(["--parsable"], script)
    if proc.returncode != 0:
        raise LaunchError(f"sbatch failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip().split(";")[0]


def parse_args(argv: list[str]) -> tuple[SlurmJob, bool]:
    """(the job, whether to only print its script)"""
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        help="the job may be resized down to this many nodes while it waits "
        "(scontrol update JobId=ID NumNodes=K NumTasks=K) "
        "and resume there; the global batch stays fixed",
    )
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one process each (0: CPU)")
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="processes per node (default: --gpus-per-node, or 1 on CPU)"
    )
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node for its processes")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name", default="mmpretrain")
    p.add_argument(
        "--warning-seconds",
        type=int,
        default=300,
        help="USR1 this long before the time limit: checkpoint and requeue (default 300)",
    )
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun restarts after a failure (default 3)")
    p.add_argument("--port", type=int, default=29500, help="c10d rendezvous port on the first node")
    p.add_argument(
        "--output-dir",
        default="outputs/slurm",
        help="logs (JOBNAME-JOBID.out) and run directories (JOBID/) (default outputs/slurm)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate the overrides and print the script")
    a = p.parse_args(argv)
    if a.min_nodes is not None and not 1 <= a.min_nodes <= a.nodes:
        p.error("--min-nodes must be between 1 and --nodes")
    for name in ("nodes", "nproc_per_node"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("gpus_per_node", "warning_seconds", "max_restarts"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0")
    if not 0 < a.port < 65536:
        p.error("--port must be a TCP port (1-65535)")
    if a.gpus_per_node and a.nproc_per_node and a.nproc_per_node != a.gpus_per_node:
        p.error("--nproc-per-node must equal --gpus-per-node (one process per GPU)")
    job = SlurmJob(
        nodes=a.nodes,
        min_nodes=a.min_nodes,
        gpus_per_node=a.gpus_per_node,
        nproc_per_node=a.nproc_per_node or a.gpus_per_node or 1,
        cpus_per_task=a.cpus_per_task,
        partition=a.partition,
        time=a.time,
        account=a.account,
        job_name=a.job_name,
        warning_seconds=a.warning_seconds,
        max_restarts=a.max_restarts,
        port=a.port,
        output_dir=Path(a.output_dir).absolute(),
        workdir=Path.cwd(),
        overrides=overrides,
    )
    return job, a.dry_run


def main(argv: list[str] | None = None) -> int:
    job, dry_run = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if job.time and job.warning_seconds >= time_limit_seconds(job.time):
            raise LaunchError(f"--warning-seconds {job.warning_seconds} is not less than --time {job.time}")
        fix_global_batch(job)
        for nodes in range(job.min_nodes or job.nodes, job.nodes + 1):
            try:
                check_overrides(job.overrides, world_size=nodes * job.nproc_per_node, cuda=job.gpus_per_node > 0)
            except LaunchError as e:
                where = f"on {nodes} node(s) (--min-nodes {job.min_nodes}): " if job.min_nodes else ""
                raise LaunchError(f"{where}{e}") from None
        script = render(job)
        if dry_run:
            print(script, end="")
            return 0
        check_with_slurm(script)
        job.output_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's directory
        job_id = submit(script)
    except LaunchError as e:
        from train.secrets import redact_text

        print(f"launch.slurm: {redact_text(str(e))}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}")
    print(f"log: {job.log_path(job_id)}")
    print(f"run directory: {job.run_dir(job_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
