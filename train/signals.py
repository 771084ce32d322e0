"""Stop requests (SIGTERM, SIGUSR1) that every rank acts on at the same step.

A signal reaches one process (or some of them, at different moments); each
rank records it, and at every step the ranks all-reduce the flag, so all of
them checkpoint and stop after the same step. SLURM's `--signal=USR1@T`
preemption warning and a scheduler's SIGTERM both land here.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
# SIGTERM: scancel, SLURM's time limit, Kubernetes, systemd; SIGINT: Ctrl-C
# (a second one stops at once); SIGUSR1: SLURM's preemption warning.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Written into the run directory by rank 0 when a run stopped on a signal
# (checkpointed, not finished); removed when the run starts again.
STOPPED_FILE = "stopped.json"


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """Installs handlers for STOP_SIGNALS; `requested` turns True on receipt.

    Installed first thing at start (train.__main__), so a signal that
    arrives while the run is still starting (counting shards, building the
    engine) is remembered and honoured after the first step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._pid = os.getpid()
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # A forked data worker inherits the handler; a scheduler signalling every
            # process of the job (SLURM does) must not make it log a stop too.
            return
        if signum == signal.SIGINT and self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "received %s: checkpointing and stopping after this step%s",
            self.signal_name,
            " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
        )

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
