"""``srun`` and ``scontrol`` for a two-"node" job on one machine, when SLURM cannot run two nodes here.

Installed under both names in a folder on PATH (:func:`install`), it lets the real
``slurm/pretrain.sbatch`` and ``slurm/common.sh`` run their multi-node path unchanged:

* ``srun --nodes=N ... CMD``: starts CMD once per node, each in its own session with ``SLURM_NODEID``,
  ``SLURM_PROCID``, its own ``TMPDIR`` (``$FAKE_SLURM_ROOT/node<i>/tmp``: the node-local disk) and its own
  ``/dev/shm`` (a private mount: needs root), labels
  every output line with the node index like ``srun --label``, passes USR1/TERM to every process of the
  step (as srun does), and with ``--kill-on-bad-exit`` ends the step when a node fails;
* ``scontrol show hostnames``: 127.0.0.1 once per node; ``scontrol requeue ID``: records the requeue in
  ``$FAKE_SLURM_ROOT/requeued`` and ends the batch script, as SLURM does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def _pump(stream, node: int, out) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(f"{node}: ".encode() + line)
        out.flush()


def _own_shared_memory(command: list[str]) -> list[str]:
    """``command`` run with a private /dev/shm, as on its own host (streaming's per-node shared memory
    would collide otherwise); needs root and util-linux ``unshare``."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node", *command]


def srun(args: list[str]) -> int:
    nodes, i = 1, 0
    while i < len(args) and args[i].startswith("-"):
        if args[i].startswith("--nodes="):
            nodes = int(args[i].split("=", 1)[1])
        i += 1
    command, root = args[i:], os.environ["FAKE_SLURM_ROOT"]
    procs, pumps = [], []
    for node in range(nodes):
        tmp = os.path.join(root, f"node{node}", "tmp")
        os.makedirs(tmp, exist_ok=True)
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
               "TMPDIR": tmp}
        proc = subprocess.Popen(_own_shared_memory(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            pumps.append(threading.Thread(target=_pump, args=(stream, node, out), daemon=True))
            pumps[-1].start()

    def forward(signum, _frame) -> None:
        """Signal every process of the step, as srun does (torchrun starts its ranks in new sessions)."""
        import psutil

        for proc in procs:
            try:
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for member in family:
                try:
                    member.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    codes = [None] * nodes
    while None in codes:
        for n, proc in enumerate(procs):
            if codes[n] is None and proc.poll() is not None:
                codes[n] = proc.returncode
                if proc.returncode != 0:             # --kill-on-bad-exit
                    forward(signal.SIGKILL, None)
        threading.Event().wait(0.2)
    for pump in pumps:
        pump.join(timeout=5)
    return next((c for c in codes if c), 0)


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(["127.0.0.1"] * int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))))
        return 0
    if args[:1] == ["requeue"]:
        with open(os.path.join(os.environ["FAKE_SLURM_ROOT"], "requeued"), "a") as f:
            f.write(f"{args[1]}\n")
        os.kill(os.getppid(), signal.SIGKILL)         # SLURM ends the batch script of a requeued job
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


def install(folder: str) -> str:
    """Write ``srun`` and ``scontrol`` into ``folder`` (to put first on PATH); returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for role in ("srun", "scontrol"):
        path = os.path.join(folder, role)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.abspath(__file__)}" {role} "$@"\n')
        os.chmod(path, 0o755)
    return folder


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
