"""pipeline.process: the training command exempts its set-up objects from garbage collection without
keeping the set-up's garbage, and what it creates afterwards is still collected (a freed data loader must
release its shared memory). Run in a fresh interpreter: freezing would change this test process's collector."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import gc, weakref
gc.disable()                                   # only the explicit collections below
from pipeline.process import freeze_setup_objects

class Node:
    pass

def unreachable_cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

kept = Node()
setup_garbage = unreachable_cycle()
freeze_setup_objects()
assert setup_garbage() is None, "the set-up's garbage was frozen, not collected"
assert gc.get_freeze_count() > 0, "nothing was frozen"
later_garbage = unreachable_cycle()
gc.collect()
assert later_garbage() is None, "garbage made after the freeze was not collected"
print("ok")
"""


def test_the_setup_is_frozen_without_its_garbage_and_later_garbage_is_collected():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
