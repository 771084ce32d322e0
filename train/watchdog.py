"""Stall detection: every rank exits, naming the rank that is behind, when the
job stops making progress for `trainer.collective_timeout` seconds.

A rank that stalls (a stuck file read, a hung kernel) leaves the others
waiting in their next collective; without help the job hangs until the
process group times out, with an error that names neither the stalled rank
nor what it was doing. Here each rank marks what it is doing (`mark`): the
step, and one of OPS. A daemon thread publishes that record to the job's
c10d store every few seconds, and once its own rank has spent more than the
timeout in one operation it reads every rank's record, logs which rank is
behind and where, and ends the process (exit code EXIT_STALLED). It leaves
that report in the store, and every other rank's thread, checking at each
interval, logs it and exits too: every rank exits within the timeout plus a
few intervals, each naming the rank behind. Under `torchrun --max-restarts`
the job then restarts from its latest checkpoint. The process group's own
timeout is set a minute longer, as a backstop for waits outside the marked
operations.

Tests inject stalls from outside (tests/faults.py wraps `watch_batches`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Iterator

import torch.distributed as dist

from train.distributed import DistInfo, set_collective_timeout

log = logging.getLogger(__name__)

# What a rank can be doing, in the order they happen within a step.
OPS = ("loading data", "training step", "evaluation", "checkpoint")
EXIT_STALLED = 124  # as timeout(1)
BACKSTOP_S = 60  # the process group's timeout is collective_timeout + this


def describe_stall(
    *, me: int, records: dict[int, dict | None], timeout_s: float, now: float, stale_after: float
) -> str:
    """The report every rank logs before exiting; `me` detected the stall. records: rank -> its last
    published record ({"step", "micro", "op", "since", "beat", "host", "pid"})
    or None if it never published one."""
    silent = sorted(r for r, rec in records.items() if rec is None or now - rec["beat"] > stale_after)
    alive = {r: rec for r, rec in records.items() if r not in silent and rec is not None}

    def where(rec: dict) -> str:
        return f"in '{rec['op']}' at step {rec['step']}"

    def progress(rec: dict) -> tuple:
        return rec["step"], rec["micro"], OPS.index(rec["op"])

    lines = []
    behind: list[int] = []
    if alive:
        lowest = min(progress(rec) for rec in alive.values())
        if lowest != max(progress(rec) for rec in alive.values()):
            behind = sorted(r for r, rec in alive.items() if progress(rec) == lowest)
    for r in behind:
        rec = alive[r]
        lines.append(
            f"rank {r} is behind: stalled {where(rec)}, no progress for {now - rec['since']:.0f} s "
            f"(host {rec['host']}, pid {rec['pid']})"
        )
    for r in silent:
        rec = records[r]
        if rec is None:
            lines.append(f"rank {r} is behind: it never reported progress (not started, hung or dead)")
        else:
            lines.append(
                f"rank {r} is behind: no heartbeat for {now - rec['beat']:.0f} s, last seen {where(rec)} "
                f"(host {rec['host']}, pid {rec['pid']}; the process is frozen or dead)"
            )
    waiting: dict[str, list[int]] = {}
    for r, rec in sorted(alive.items()):
        if r not in behind:
            waiting.setdefault(where(rec), []).append(r)
    if not lines:
        lines.append(
            f"no rank is behind: every rank is {', '.join(waiting)} (a collective there hangs on all ranks, "
            f"or one operation takes longer than the timeout)"
        )
    else:
        for place, ranks in waiting.items():
            lines.append(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} waiting {place}")
    return (
        f"stalled job: no progress for {timeout_s:g} s (trainer.collective_timeout); "
        + "; ".join(lines)
        + f" (detected by rank {me})."
    )


class StallWatchdog:
    """One per process. `mark()` from the training thread; the checking runs
    in a daemon thread that talks to the job's store through its own client."""

    def __init__(self, *, timeout_s: float, info: DistInfo, store: dist.Store, namespace: str):
        """namespace: the same on every rank of this attempt, new for each attempt."""
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size = info.rank, info.world_size
        self.interval = max(0.5, min(5.0, self.timeout_s / 10))
        self._store = store
        # A store can outlive a torchrun attempt: an earlier attempt's records and report are not ours.
        self._prefix = f"mm_watchdog/{namespace}/"
        self._host, self._pid = socket.gethostname(), os.getpid()
        # (step, micro batch within it, op or None, wall clock and monotonic start of op)
        self._state: tuple = (0, 0, None, time.time(), time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    @property
    def step(self) -> int:
        return self._state[0]

    def mark(self, op: str, *, step: int | None = None) -> None:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}; one of {OPS}")
        old_step, micro, _, _, _ = self._state
        step = old_step if step is None else step
        micro = (0 if step != old_step else micro) + (op == "loading data")
        self._state = (step, micro, op, time.time(), time.monotonic())

    def next_step(self, step: int) -> None:
        """The step the following marks belong to."""
        _, _, op, since, since_mono = self._state
        self._state = (step, 0, op, since, since_mono)

    def _record(self) -> dict:
        step, micro, op, since, _ = self._state
        return {
            "step": step,
            "micro": micro,
            "op": op,
            "since": since,
            "beat": time.time(),
            "host": self._host,
            "pid": self._pid,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rec = self._record()
            if rec["op"] is not None:
                try:
                    self._store.set(f"{self._prefix}{self.rank}", json.dumps(rec))
                except Exception:  # the store may be gone at shutdown; checking goes on
                    pass
            report = self._report_from_another_rank()
            if report is not None:
                self._exit(report)
            _, _, op, _, since_mono = self._state
            if op is not None and time.monotonic() - since_mono > self.timeout_s and not self._stop.is_set():
                self._abort()

    def _report_from_another_rank(self) -> str | None:
        key = f"{self._prefix}report"
        try:
            return self._store.get(key).decode() if self._store.check([key]) else None
        except Exception:
            return None

    def _read_all(self) -> dict[int, dict | None]:
        out: dict[int, dict | None] = {}
        for r in range(self.world_size):
            key = f"{self._prefix}{r}"
            out[r] = json.loads(self._store.get(key)) if self._store.check([key]) else None
        out[self.rank] = self._record()
        return out

    def _abort(self) -> None:
        try:
            records = self._read_all()
            message = describe_stall(
                me=self.rank,
                records=records,
                timeout_s=self.timeout_s,
                now=time.time(),
                stale_after=3 * self.interval + 2,
            )
        except Exception as e:  # the report must not keep the process alive
            step, _, op, _, _ = self._state
            message = (
                f"stalled job: rank {self.rank} made no progress for {self.timeout_s:g} s in '{op}' "
                f"at step {step} (trainer.collective_timeout); other ranks unknown ({e})."
            )
        try:
            self._store.set(f"{self._prefix}report", message)
        except Exception:
            pass
        # Linger while the others read the report: this rank's exit breaks their collectives.
        self._exit(message, linger_s=2 * self.interval + 1)

    def _exit(self, report: str, linger_s: float = 0.0) -> None:
        log.critical("%s Rank %d exits.", report, self.rank)
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(linger_s)
        os._exit(EXIT_STALLED)

    def close(self) -> None:
        self._state = (self.step, 0, None, time.time(), time.monotonic())
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)


_active: StallWatchdog | None = None


def mark(op: str, *, step: int | None = None) -> None:
    """Records that this rank now does `op` (of OPS); a no-op without a watchdog."""
    if _active is not None:
        _active.mark(op, step=step)


def next_step(step: int) -> None:
    if _active is not None:
        _active.next_step(step)


def mark_idle() -> None:
    """This rank is past its last collective: nothing of it is timed any more
    (rank 0 exporting and uploading while the others have left)."""
    if _active is not None:
        _active.close()


def watch_batches(batches: Iterator[dict]) -> Iterator[dict]:
    """Passes batches through, marking 'loading data' while one is fetched and
    'training step' once it has arrived."""
    while True:
        mark("loading data")
        try:
            batch = next(batches)
        except StopIteration:
            return
        mark("training step")
        yield batch


def _job_store(timeout_s: float) -> dist.Store:
    """A client of the store every rank of this job reaches (the torchrun
    agent's, or rank 0's), separate from the process group's."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


@contextlib.contextmanager
def stall_watchdog(*, timeout_s: float, info: DistInfo):
    """Watches this rank while the block runs (multi-process runs only)."""
    global _active
    if info.world_size <= 1 or not dist.is_initialized():
        yield None
        return
    set_collective_timeout(timeout_s + BACKSTOP_S)
    namespace = [uuid.uuid4().hex]
    dist.broadcast_object_list(namespace, src=0)  # collective: every rank enters here
    _active = StallWatchdog(
        timeout_s=timeout_s, info=info, store=_job_store(min(30.0, timeout_s)), namespace=namespace[0]
    )
    try:
        yield _active
    finally:
        _active.close()
        _active = None
