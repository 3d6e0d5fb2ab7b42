"""A per-rank watchdog that turns a stalled training step into stack dumps and a non-zero exit.

A job can stall where no timeout reaches: a download that never finishes, a rank that died or hangs in
its data loader while the others wait in a collective, a stuck collective. :class:`StepWatchdog` is a
daemon thread per rank: the trainer calls :meth:`~StepWatchdog.beat` after every optimizer step and
checkpoint; when no beat comes for ``train.step_timeout`` seconds, the thread prints one line naming the
rank and the step, the stack of every thread of the process (``faulthandler.dump_traceback``), and ends
the process with :data:`EXIT_STALLED`. torchrun then stops the other ranks — which, stalled too, print
their own stacks when their watchdogs fire — and the job ends instead of holding its allocation.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from typing import NoReturn

EXIT_STALLED = 124      # the status of timeout(1): no progress within the limit
EXIT_GRACE_S = 30.0     # the longest exit_now waits for its message to be written
# Failures that a later attempt may not meet: EX_TEMPFAIL (storage unreachable past the retry window,
# pipeline.data.remote.EXIT_STORAGE) and a stall. exit_now appends their line to the file named by
# AKI_REQUEUE_FILE (set by slurm/common.sh), and the batch script requeues the job (AKI_MAX_REQUEUES).
REQUEUE_STATUSES = frozenset({75, EXIT_STALLED})
REQUEUE_FILE_ENV = "AKI_REQUEUE_FILE"


def exit_now(message: str, status: int, before_exit=None) -> NoReturn:
    """End this process at once with ``status`` after printing ``error: [rank R] message`` as one line.

    ``os._exit``: no thread, collective or data loader of this process can hold it up. Under torchrun the
    line is also written to the launcher's error file (``TORCHELASTIC_ERROR_FILE``), so its failure summary
    shows it instead of "To enable traceback see ...". ``before_exit`` (e.g. a stack dump) runs after the
    line is printed. If writing blocks (a console pipe nobody reads), the process still ends after
    :data:`EXIT_GRACE_S` seconds.
    """
    rank = os.environ.get("RANK")
    line = f"{f'[rank {rank}] ' if rank is not None else ''}{message}"
    # a console that nobody reads (a full pipe) would block the printing below: end the process anyway
    threading.Timer(EXIT_GRACE_S, os._exit, args=(status,)).start()
    try:
        sys.stdout.flush()
        print(f"\nerror: {line}", file=sys.stderr, flush=True)     # a new line: not after a progress bar
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
        if status in REQUEUE_STATUSES and os.environ.get(REQUEUE_FILE_ENV):
            with open(os.environ[REQUEUE_FILE_ENV], "a") as f:      # the batch script requeues the job
                f.write(f"{status} {line}\n")
        if before_exit is not None:
            before_exit()
        sys.stderr.flush()
    finally:
        os._exit(status)


class StepWatchdog:
    """``start()`` before the loop, ``beat(step)`` after each step (and save), ``stop()`` after the loop.

    ``timeout`` None or 0: the watchdog does nothing.
    """

    def __init__(self, timeout: float | None, rank: int, what: str = "train.step_timeout"):
        self.timeout = float(timeout) if timeout else 0.0
        self.rank, self.what = rank, what
        self._last = time.monotonic()
        self._step: int | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config, rank: int) -> "StepWatchdog":
        """The watchdog of a recipe (``train.step_timeout``)."""
        return cls(config.train.step_timeout, rank)

    def start(self, step: int | None = None) -> None:
        """Begin watching (the first beat is due ``timeout`` seconds from now)."""
        if not self.timeout or self._thread is not None:
            return
        self.beat(step)
        self._stopped.clear()
        self._thread = threading.Thread(target=self._watch, name=f"step-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()

    def beat(self, step: int | None = None) -> None:
        """Progress: the next beat is due ``timeout`` seconds from now."""
        self._last, self._step = time.monotonic(), step

    def stop(self) -> None:
        """Stop watching (the loop is over, or the process is about to do something long on purpose)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stopped.wait(max(0.05, self._last + self.timeout - time.monotonic())):
            if time.monotonic() - self._last >= self.timeout:
                self._fire()

    def _fire(self) -> None:
        after = "the start" if self._step is None else f"step {self._step}"
        os.environ.setdefault("RANK", str(self.rank))
        exit_now(f"no training step finished within {self.timeout:g} s after {after} ({self.what}); the stacks "
                 f"of this process's threads follow, then it exits with status {EXIT_STALLED}", EXIT_STALLED,
                 before_exit=lambda: faulthandler.dump_traceback(file=sys.stderr, all_threads=True))


__all__ = ["EXIT_STALLED", "REQUEUE_STATUSES", "REQUEUE_FILE_ENV", "StepWatchdog", "exit_now"]
