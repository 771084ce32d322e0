"""Test-only fault injection: runs `python -m train` with faults patched in.

    python tests/faults.py OVERRIDES...                      (one process)
    torchrun --nproc_per_node=2 tests/faults.py OVERRIDES... (several ranks)

The production modules know nothing of this: each fault wraps a function
of theirs from outside, chosen by environment variables (so torchrun passes
them to every rank):

- MM_TEST_STALL_RANK=r, MM_TEST_STALL_AT_STEP=s: rank r stalls while it
  loads the data of step s, until the stall watchdog ends it.
- MM_TEST_SLOW_EXPORT_S=t: rank 0's end-of-run export waits t seconds first
  (legitimate work after the last collective, not a stall).
- MM_TEST_HANG_IN_SAVE_AT_STEP=s: every rank hangs inside the checkpoint
  save of step s, after DeepSpeed wrote its files and before our metadata
  and `latest`, so a test can SIGKILL a save at a known point.
- MM_TEST_STOP_AFTER_STEP=s: each rank sends itself SIGTERM while it
  runs step s, as a scheduler's stop arriving during that step.
- MM_TEST_KILLED_IN_REWRITE=1: a save into a step directory that is
  already complete (its meta.json written) leaves DeepSpeed's files half
  written and hangs, as a SIGKILL in the middle of that rewrite would.
- MM_TEST_HANG_BEFORE_LATEST_AT_STEP=s: rank 0 hangs in the save of step s
  after meta.json is written and before `latest` is.

Each fault logs a line starting with "fault injection:" when it fires.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
import time

log = logging.getLogger("train.faults")


def _forever() -> None:
    while True:
        time.sleep(3600)


def _stall(rank: int, at_step: int) -> None:
    from train import watchdog

    real = watchdog.watch_batches

    def stalling(batches):
        while True:
            active = watchdog._active
            if active is not None and active.rank == rank and active.step == at_step:
                log.warning("fault injection: rank %d stalls in 'loading data' at step %d", rank, at_step)
                _forever()
            try:
                yield next(batches)
            except StopIteration:
                return

    # Inside the real wrapper, so the stall happens while 'loading data' is marked.
    watchdog.watch_batches = lambda batches: real(stalling(iter(batches)))


def _slow_export(delay_s: float) -> None:
    from train import run

    real = run.export

    def slow(*args, **kwargs):
        log.warning("fault injection: the export waits %g s first", delay_s)
        time.sleep(delay_s)
        return real(*args, **kwargs)

    run.export = slow


def _hang_in_save(step: int) -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine.save_checkpoint

    def hanging(self, save_dir, tag=None, *args, **kwargs):
        result = real(self, save_dir, tag, *args, **kwargs)
        if tag == f"step_{step:06d}":
            log.warning("fault injection: hangs in the save of %s", tag)
            _forever()
        return result

    DeepSpeedEngine.save_checkpoint = hanging


def _stop_after_step(step: int) -> None:
    import signal

    from train import run

    real, calls = run.train_step, [0]

    def stopping(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == step:
            log.warning("fault injection: SIGTERM during step %d", step)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    run.train_step = stopping


def _killed_in_rewrite() -> None:
    from pathlib import Path

    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine.save_checkpoint

    def rewriting(self, save_dir, tag=None, *args, **kwargs):
        step_dir = Path(save_dir) / str(tag)
        if not (step_dir / "meta.json").is_file():
            return real(self, save_dir, tag, *args, **kwargs)
        for f in step_dir.glob("*.pt"):  # the files being rewritten, cut short
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        log.warning("fault injection: killed half-way through rewriting %s", tag)
        _forever()

    DeepSpeedEngine.save_checkpoint = rewriting


def _hang_before_latest(step: int) -> None:
    import json

    from train import checkpoint

    real = checkpoint.os.replace

    def replacing(src, dst):
        if str(dst).endswith("latest") and checkpoint.Path(src).read_text().strip() == f"step_{step:06d}":
            meta = checkpoint.Path(dst).parent / f"step_{step:06d}" / "meta.json"
            log.warning("fault injection: hangs before `latest` of step %d (meta.json %s)", step, meta.is_file())
            json.loads(meta.read_text())  # written whole before `latest`
            _forever()
        return real(src, dst)

    checkpoint.os.replace = replacing


def install() -> None:
    env = os.environ
    if "MM_TEST_STALL_RANK" in env and "MM_TEST_STALL_AT_STEP" in env:
        _stall(int(env["MM_TEST_STALL_RANK"]), int(env["MM_TEST_STALL_AT_STEP"]))
    if float(env.get("MM_TEST_SLOW_EXPORT_S", "0") or 0) > 0:
        _slow_export(float(env["MM_TEST_SLOW_EXPORT_S"]))
    if "MM_TEST_HANG_IN_SAVE_AT_STEP" in env:
        _hang_in_save(int(env["MM_TEST_HANG_IN_SAVE_AT_STEP"]))
    if "MM_TEST_STOP_AFTER_STEP" in env:
        _stop_after_step(int(env["MM_TEST_STOP_AFTER_STEP"]))
    if env.get("MM_TEST_KILLED_IN_REWRITE") == "1":
        _killed_in_rewrite()
    if "MM_TEST_HANG_BEFORE_LATEST_AT_STEP" in env:
        _hang_before_latest(int(env["MM_TEST_HANG_BEFORE_LATEST_AT_STEP"]))


if __name__ == "__main__":
    install()
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)
