"""``python dpo_lab/scale/guard.py PARENT_PID -- COMMAND...``: everything COMMAND starts dies with it.

papermill's kernel runs in a session of its own and may start more (``torchrun``), so no process group
reaches them all: the guard is a child subreaper (orphans below it come to it), and when its parent dies
(even by kill -9), on SIGTERM/SIGINT/SIGHUP or at the command's end it ends every process below it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
GRACE_S = 5.0  # from SIGTERM to SIGKILL for what is left of the run


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where the platform has none."""
    try:
        return sys.platform.startswith("linux") and ctypes.CDLL(None).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_tree(child: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM every process below this one, SIGKILL what is left after ``grace`` seconds; reap them all."""
    deadline, signalled = time.monotonic() + grace, set()
    while True:
        if child.poll() is not None:  # once the child's code is known, reaping the rest cannot take it
            _reap()
        late, alive = time.monotonic() > deadline, []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
                    if late or proc.pid not in signalled:
                        (proc.kill if late else proc.terminate)()
                        signalled.add(proc.pid)
            except psutil.Error:  # gone meanwhile
                pass
        if child.returncode is not None and not alive:
            return
        time.sleep(0.05)


def _reap() -> None:  # every ended child, orphans re-parented here included
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python guard.py PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, stopped = int(argv[0]), []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: stopped.append(signum))
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 128 + signal.SIGTERM
    child = subprocess.Popen(argv[2:])
    while child.poll() is None and not stopped and os.getppid() == parent:
        time.sleep(0.1)
    if child.returncode is None and not stopped:
        stopped.append(signal.SIGTERM)  # the parent is gone
    stop_tree(child)  # after a normal end too: nothing the run started outlives it
    if stopped:
        return 128 + stopped[0]
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
