"""Every error `python -m train` raises at start is also caught by
`launch.slurm --dry-run`, before anything is submitted (train.preflight)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest

from launch import slurm

# (overrides, what both error messages must name). One case per start-up check.
START_ERRORS = [
    (["trainer.global_batch_size=7"], "trainer.global_batch_size=7"),
    (["deepspeed.precision=fp16"], "deepspeed.precision=fp16 needs a CUDA GPU"),
    (["deepspeed.stage=5"], "deepspeed.stage=5"),
    (["deepspeed.offload_param=cpu", "deepspeed.stage=2"], "deepspeed.offload_param needs deepspeed.stage=3"),
    (["deepspeed.precision=fp8"], "deepspeed.precision"),
    (["trainer.max_stesp=3"], "did you mean trainer.max_steps?"),
    (["trainer.unmasked_steps=-1"], "trainer.unmasked_steps=-1"),
    (["model.image.token_dropout=1.5"], "model.image.token_dropout"),
    (["model.text.arch=hf"], "model.text.arch=hf needs model.text.pretrained"),
    (["data.num_workers=lots"], "data.num_workers"),
    (["data.train=missing/train-*.tar"], "data.train='missing/train-*.tar'"),
    (["data.heldout="], "data.heldout is empty"),
    (["data.train=pipe:cat shard.tar"], "data.allow_pipe=true"),
    (["data.tokenizer=missing/tokenizer.json"], "data.tokenizer='missing/tokenizer.json'"),
    (["model.vocab_size=100"], "set model.vocab_size=260"),
    (["task=classify", "task.num_classes=3", "data.label_key=", "data.class_key="], "set data.label_key"),
    (["task=classify", "task.num_classes=3", "task.lr_decay=2"], "task.lr_decay=2"),
    (["task=classify", "task.num_classes=3", "task.init=missing/init.safetensors"], "task.init=missing/init"),
    (["task=classify", "task.num_classes=0"], "task:"),
    (["trainer.resume=missing/checkpoints"], "trainer.resume='missing/checkpoints'"),
    (
        ["trainer.compile=true", "trainer.micro_batch_size=4", "trainer.contrastive_batch=16"],
        "set trainer.compile=false or trainer.contrastive_batch=0",
    ),
]


def _train_start(overrides: list[str], tmp_path: Path) -> tuple[int, str]:
    """`python -m train OVERRIDES` (its real main()), in a forked child so
    the imports are paid once for all the cases: (exit code, its output)."""
    out = tmp_path / "train.out"
    argv = ["train", *overrides, "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"]
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = os.fdopen(fd, "w", buffering=1)
            sys.argv = argv
            from train.__main__ import main

            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported in the output, as a traceback
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text()


@pytest.mark.integration  # forks a real `python -m train` start per case: not in the fast tier
@pytest.mark.parametrize("overrides,named", START_ERRORS, ids=[" ".join(o) for o, _ in START_ERRORS])
def test_every_start_error_is_caught_before_submission(overrides, named, demo_cwd, capsys):
    code, output = _train_start(overrides, demo_cwd)
    assert code != 0, output
    assert named in output, output
    assert "Traceback" not in output, output  # a clear error, not a stack trace

    assert slurm.main(["--nodes", "1", "--dry-run", "--", *overrides]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert "#SBATCH" not in capsys.readouterr().out


def test_the_job_world_size_decides_the_batch_arithmetic(capsys, demo_cwd):
    """A global batch one rank divides but the job's 2 × 2 ranks do not."""
    overrides = ["trainer.micro_batch_size=4", "trainer.global_batch_size=8"]
    assert slurm.main(["--nodes", "1", "--nproc-per-node", "2", "--dry-run", "--", *overrides]) == 0
    capsys.readouterr()
    assert slurm.main(["--nodes", "2", "--nproc-per-node", "2", "--dry-run", "--", *overrides]) == 2
    assert "trainer.micro_batch_size=4 × 4 ranks = 16" in capsys.readouterr().err
