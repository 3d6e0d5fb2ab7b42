"""One StreamingDataset registration at a time per machine, so that jobs starting together do not collide.

A ``StreamingDataset`` names its shared memory after a prefix number that its job registers on the machine
(``streaming/base/shared/prefix.py``): every local rank looks for the first free number, the ranks meet
at a barrier, and then the local leader creates ``/dev/shm/<number>_locals``. Between the look-up and the
creation nothing is locked, so two jobs (or two processes of one test suite) that build their datasets at
the same moment can choose the same number; the later one then dies with
``FileExistsError: [Errno 17] File exists: '/000001_locals'``, or a rank attaches to the other job's memory.

:func:`one_registration_at_a_time` closes that window: each node's local leader holds an exclusive file
lock in the temporary directory while its job registers, and the job's other ranks (after one barrier)
register inside the same lock. The lock is released when every rank of the job has registered (second
barrier), or by the kernel when the process dies. A leader that cannot get the lock within ``timeout_s``
(two multi-node jobs sharing nodes could wait on each other's locks) goes on without it, with a warning.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
import warnings
from typing import Iterator

LOCK_NAME = "aki-streaming-registration.lock"


def _acquire(lock_file, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextlib.contextmanager
def one_registration_at_a_time(timeout_s: float = 120.0) -> Iterator[None]:
    """Build StreamingDatasets inside this block (every rank of the job enters it together)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    lock_file = open(os.path.join(tempfile.gettempdir(), LOCK_NAME), "a") if leader else None
    try:
        if lock_file is not None and not _acquire(lock_file, timeout_s):
            warnings.warn(f"{lock_file.name}: another job has held the dataset registration lock for {timeout_s:.0f} "
                          "s; registering without it", RuntimeWarning, stacklevel=3)
        if distributed:
            dist.barrier()      # the node's other ranks look for a free prefix only once the lock is held
        yield
        if distributed:
            dist.barrier()      # every rank has registered: the next job may look
    finally:
        if lock_file is not None:
            lock_file.close()   # closing the file releases the lock
