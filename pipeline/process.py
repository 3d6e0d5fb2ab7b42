"""Process-wide memory-management setting of the pipeline's commands (training, data prep, evaluation).

A process that has imported torch, transformers and DeepSpeed holds several hundred thousand objects
created at import time: modules, classes, functions, docstrings. They are never freed, yet Python's cyclic
garbage collector walks all of them at every full collection. Measured on a 2-core x86 CPU
(Python 3.11, torch 2.14, transformers 4.57, DeepSpeed 0.19):

* one full collection takes ~0.3 s. During training it lands on whichever step crosses the allocation
  threshold;
* the interpreter's final collections at exit take ~1.5 s of every process, on every rank.

:func:`freeze_setup_objects` collects once, then moves every object alive at that moment into the
collector's permanent generation (``gc.freeze``). Later collections and the exit skip those objects.
Objects created afterwards are collected as usual, so freeing a phase's data loader still works.

:func:`run_command` does the same when a command's ``main()`` has returned, for the exit alone.
With the freeze, a 6-step two-rank run of the tiny recipe under torchrun took 15.9 s instead of 17.6 s
(mean of 4 runs each, same machine).
"""
from __future__ import annotations

import gc
import sys
from typing import Callable, NoReturn


def freeze_setup_objects() -> None:
    """Collect the garbage of the set-up, then exempt everything alive now from later collections.

    Call it once the model (and engine) are built, before the data loaders: whatever the caller still
    holds then lives to the end of the process anyway. The collection first means that no unreachable
    cycle (a temporary full-size tensor of the model build, say) is frozen and kept for good.
    """
    gc.collect()
    gc.freeze()


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())`` for a command's ``__main__`` block, freezing what is left first: the collection
    finalises the command's garbage (files flushed and closed), and the exit then skips the ~1.5 s of
    collections over the imported modules. An exception leaves as usual, with its traceback."""
    code = main()
    freeze_setup_objects()
    sys.exit(code)


__all__ = ["freeze_setup_objects", "run_command"]
