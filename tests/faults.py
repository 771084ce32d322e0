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
    from train import loop

    real = loop.export

    def slow(*args, **kwargs):
        log.warning("fault injection: the export waits %g s first", delay_s)
        time.sleep(delay_s)
        return real(*args, **kwargs)

    loop.export = slow


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


def install() -> None:
    env = os.environ
    if "MM_TEST_STALL_RANK" in env and "MM_TEST_STALL_AT_STEP" in env:
        _stall(int(env["MM_TEST_STALL_RANK"]), int(env["MM_TEST_STALL_AT_STEP"]))
    if float(env.get("MM_TEST_SLOW_EXPORT_S", "0") or 0) > 0:
        _slow_export(float(env["MM_TEST_SLOW_EXPORT_S"]))
    if "MM_TEST_HANG_IN_SAVE_AT_STEP" in env:
        _hang_in_save(int(env["MM_TEST_HANG_IN_SAVE_AT_STEP"]))


if __name__ == "__main__":
    install()
    sys.argv = ["train", *sys.argv[1:]]
    runpy.run_module("train", run_name="__main__", alter_sys=True)
