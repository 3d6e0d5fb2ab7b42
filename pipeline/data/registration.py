"""One StreamingDataset registration at a time per machine, so that jobs starting together do not collide.

A ``StreamingDataset`` names its shared memory after a prefix number that its job registers on the machine
(``streaming/base/shared/prefix.py``): every local rank looks for the first free number, the ranks meet
at a barrier, and then the local leader creates ``/dev/shm/<number>_locals``. Between the look-up and the
creation nothing is locked, so two jobs (or two processes of one test suite) that build their datasets at
the same moment can choose the same number; the later one then dies with
``FileExistsError: [Errno 17] File exists: '/000001_locals'``, or a rank attaches to the other job's memory.

:func:`one_registration_at_a_time` closes that window: each node's local leader holds an exclusive file
lock beside the shared memory (in ``/dev/shm``, so exactly the jobs that share it share the lock; the
temporary directory where there is none) while its job registers, and the job's other ranks (after one barrier)
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
SHARED_MEMORY_DIR = "/dev/shm"


def lock_path() -> str:
    """The lock file: in the shared-memory folder where there is one (Linux), else the temporary directory."""
    folder = SHARED_MEMORY_DIR if os.path.isdir(SHARED_MEMORY_DIR) else tempfile.gettempdir()
    return os.path.join(folder, LOCK_NAME)


def _lock(timeout_s: float) -> int | None:
    """An open descriptor of the lock file holding the lock, or None (with a warning) without it.

    The file is opened read-only: ``flock`` needs no write access, so the jobs of every user of the node
    can take the lock in a file one of them created.
    """
    path = lock_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError as err:
        warnings.warn(f"{path}: cannot open the dataset registration lock ({err}); registering without it",
                      RuntimeWarning, stacklevel=4)
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                warnings.warn(f"{path}: another job has held the dataset registration lock for {timeout_s:.0f} s; "
                              "registering without it", RuntimeWarning, stacklevel=4)
                return None
            time.sleep(0.02)


@contextlib.contextmanager
def one_registration_at_a_time(timeout_s: float = 120.0) -> Iterator[None]:
    """Build StreamingDatasets inside this block (every rank of the job enters it together)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    fd = _lock(timeout_s) if leader else None
    try:
        if distributed:
            dist.barrier()      # the node's other ranks look for a free prefix only once the lock is held
        yield
        if distributed:
            dist.barrier()      # every rank has registered: the next job may look
    finally:
        if fd is not None:
            os.close(fd)        # closing the descriptor releases the lock
