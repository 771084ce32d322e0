"""Data workers and a model that take turns on the CPU cores.

On a machine without an accelerator the model's forward runs on the same
cores as the DataLoader workers that decode its input. Running both at once
costs more than their sum: the model's operators split their work evenly
among its threads and wait for the slowest, so a worker that takes a core
from one thread for a moment stalls them all. Taking turns avoids it: the
main process opens the gate while it waits for a run of batches (every
worker decodes, on every core), and closes it while the model computes
them (the workers pause at their next sample). A DataLoader, whose workers
prefetch as soon as a batch is taken, cannot be told to pause; hence this.
"""

from __future__ import annotations

import multiprocessing
import os


class Turns:
    """The gate, made in the main process before its DataLoaders start
    their workers (they inherit it). Workers call wait() before each sample."""

    def __init__(self) -> None:
        self._open = multiprocessing.get_context().Event()
        self._owner = os.getpid()

    def open(self) -> None:
        """The workers' turn."""
        self._open.set()

    def close(self) -> None:
        """The model's turn: workers pause before their next sample."""
        self._open.clear()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def wait(self) -> None:
        """Returns once the gate is open. In the main process (a loader
        without workers) it never waits; in a worker whose main process is
        gone it ends the worker rather than wait for ever."""
        if os.getpid() == self._owner:
            return
        while not self._open.wait(timeout=1.0):
            if os.getppid() != self._owner:
                raise SystemExit(0)
