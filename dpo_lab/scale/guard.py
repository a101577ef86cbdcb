"""``python dpo_lab/scale/guard.py PARENT_PID -- COMMAND...``: everything COMMAND starts dies with it.

papermill's kernel runs in a session of its own and may start more (``torchrun``), so no process group
reaches them all: the guard is a child subreaper (orphans below it come to it), and when its parent dies
(even by kill -9), on SIGTERM/SIGINT/SIGHUP or at the command's end it ends every process below it.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
GRACE_S = 5.0  # from SIGTERM to SIGKILL for what is left of the run


def stop_tree(child: subprocess.Popen) -> None:
    """SIGTERM every process below this one, SIGKILL what is left after ``GRACE_S``; reap them all."""
    deadline, signalled = time.monotonic() + GRACE_S, set()
    while True:
        if child.poll() is not None:  # once the child's code is known, reaping the rest cannot take it
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
        alive = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone meanwhile
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
                    if time.monotonic() > deadline:
                        proc.kill()
                    elif proc.pid not in signalled:
                        proc.terminate()
                        signalled.add(proc.pid)
        if child.returncode is not None and not alive:
            return
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python guard.py PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, stopped = int(argv[0]), []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: stopped.append(signum))
    if sys.platform.startswith("linux"):  # elsewhere only the parent's end is noticed, below
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 128 + signal.SIGTERM
    child = subprocess.Popen(argv[2:])
    while child.poll() is None and not stopped and os.getppid() == parent:
        time.sleep(0.1)
    code = child.returncode
    stop_tree(child)  # after a normal end too: nothing the run started outlives it
    if code is None:  # stopped, or the parent is gone
        return 128 + (stopped or [signal.SIGTERM])[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
