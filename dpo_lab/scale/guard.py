"""Run a command so that everything it starts dies with it, and with whoever started it.

    python dpo_lab/scale/guard.py PARENT_PID -- COMMAND...     # or python -m dpo_lab.scale.guard ...

The sweep runner starts each run's papermill through this guard, in a session of its own. papermill starts
the notebook's kernel in yet another session (``jupyter_client`` does), and the kernel may start more
(``torchrun`` for a ``processes: N`` run), so neither a process group nor a parent-death signal on papermill
reaches all of them. The guard therefore:

- makes itself a *child subreaper* (Linux ``prctl``): a process below it whose parent dies is re-parented
  to the guard instead of to init, so every process of the run stays below the guard;
- asks for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, which fires when the parent *thread* that
  started it ends: the sweep starts each guard from the pool thread that then waits for it to the end, so
  that is only when the sweep dies), and also polls ``getppid`` (platforms without ``prctl``);
- on SIGTERM/SIGINT/SIGHUP, on its parent's death, and after the command ends, terminates every process
  below it (SIGTERM, then SIGKILL after a grace period) and reaps them, then exits with the command's code
  (128 + the signal when stopped).

Only the standard library is imported: the guard starts in a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 5.0  # from SIGTERM to SIGKILL for what is left of the run
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where the platform has none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process /proc shows (empty without /proc)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, state) of every process below ``root``."""
    children: dict[int, list[int]] = {}
    table = _processes()
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        found.append((pid, table[pid][1]))
        todo.extend(children.get(pid, ()))
    return found


def _reap() -> None:
    """Collect every child that has ended (orphans re-parented to this subreaper included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(child: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM ``child`` and every process below this one, SIGKILL what is left after ``grace`` seconds;
    return once none is left."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    signalled: set[int] = set()
    while True:
        late = time.monotonic() > deadline
        if child.poll() is None:
            if late:
                child.kill()
            elif child.pid not in signalled:
                child.terminate()
                signalled.add(child.pid)
        else:
            _reap()  # once the child's own code is known, reaping the rest cannot take it
        alive = [pid for pid, state in descendants(me) if state not in "ZX" and pid != child.pid]
        if child.returncode is not None and not alive:
            return
        for pid in alive:
            if late or pid not in signalled:
                try:
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                except ProcessLookupError:
                    pass
                signalled.add(pid)
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python guard.py PARENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    parent, command = int(argv[0]), argv[2:]
    stopped: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopped.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 128 + signal.SIGTERM
    child = subprocess.Popen(command)
    while child.poll() is None and not stopped and os.getppid() == parent:
        time.sleep(0.1)
    if child.returncode is None and not stopped:
        stopped.append(signal.SIGTERM)  # the parent is gone
    stop_tree(child)  # after a normal end too: nothing the run started outlives it
    if stopped:
        return 128 + stopped[0]
    code = child.returncode
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
