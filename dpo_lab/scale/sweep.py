"""Sweeps: one notebook executed many times with different parameters (papermill), results in one table.

A sweep is a spec (YAML, or a preset's own frontier sweep) naming a notebook and its runs. Every run lives
in ``runs/<sweep>/<run>/``: ``parameters.yaml`` (what it was given), ``notebook.ipynb`` (the executed
notebook), ``papermill.log``, what the notebook writes (``result.json``, ``metrics.jsonl``, ``points.csv``)
and ``status.json`` (running / done / failed / interrupted, with the error, the pid and the host). Rerunning
a sweep skips every finished run, so a sweep killed midway is finished by starting it again; a failing run
is recorded and the others go on.

Spec format::

    name: tldr-paper                       # runs/<name>/<run>/
    notebook: notebooks/templates/preference_dpo.ipynb
    requires: [gpu, hub]                   # refused (unless forced) where these are missing
    parameters: {task: tldr, beta: 0.5}    # shared by every run
    runs:                                  # explicit runs; their parameters override the shared ones
      - name: sft
        parameters: {objective: preferred_ft}
      - name: beta0.5
        parameters: {beta: 0.5, model: "{sweep_dir}/sft/policy"}
        after: [sft]                       # starts only once run sft is done
    grid: {seed: [0, 1]}                   # and/or a cartesian grid (run names from the values)

``{sweep_dir}`` in a string parameter becomes the sweep's folder, so one run can read another's output
wherever ``runs/`` is (``DPO_LAB_RUNS``).

Every folder name comes from ``safe_component``: explicit names must already be safe (letters, digits,
``.``, ``_``, ``-``), and a grid run's name is a readable slug of its values plus a short hash when a value
is not that simple (a path, a dict of overrides), so no run folder can leave the sweep's folder and no
brace reaches papermill (which formats the notebook paths with the parameters).

A run is started through ``dpo_lab.scale.guard`` in a session of its own, and holds a lock on
``<run>/.sweep.lock`` for as long as any of its processes lives; ``status.json`` records the guard's pid and
host. SIGINT/SIGTERM/SIGHUP to the sweep stop every running run (its whole process tree) and mark it
``interrupted``; if the sweep itself is killed, the guard ends the run. A ``running`` status whose run
still holds its lock is running elsewhere (the sweep waits for it); one whose lock is free was interrupted
and runs again.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from queue import Queue
from typing import Any

import nbformat
import pandas as pd
import papermill
import yaml
from tqdm.auto import tqdm

from dpo_lab.cache import atomic_write_json, atomic_write_text, content_hash, pid_alive, read_json_object
from dpo_lab.paths import project_root

RESERVED_PARAMETERS = ("run_dir",)  # the runner passes each run its own folder
REQUIREMENTS = ("gpu", "hub")
FRONTIER_NOTEBOOK = Path("notebooks/templates/frontier_run.ipynb")
GUARD = Path(__file__).with_name("guard.py")  # runs each run's papermill (standard library only)
LOCK_NAME = ".sweep.lock"  # held (flock) by a run's guard process for as long as the run lives
STOP_GRACE_S = 15.0  # from SIGTERM to a run's process group to SIGKILL (the guard itself allows 5 s)
MAX_COMPONENT = 96  # longest folder name safe_component makes


class SweepError(ValueError):
    """A spec or a parameter that cannot run; the message names the problem."""


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal; its running runs were stopped and marked ``interrupted``."""

    def __init__(self, signum: int, outcomes: Sequence[RunOutcome]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.outcomes = list(outcomes)


# ------------------------------------------------------------------------------------------ folder names
_SIMPLE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def safe_component(text: Any) -> str:
    """A folder name for ``text``: itself when it is already simple (letters, digits, ``.``, ``_``, ``-``;
    not starting with a dot; at most 96 characters), else a readable slug of it plus a short hash of the
    whole text, so two different values never share a folder. Never empty, ``.``, ``..`` or with a brace."""
    text = str(text)
    if _SIMPLE.fullmatch(text) and len(text) <= MAX_COMPONENT:
        return text
    digest = content_hash(text, length=8)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    slug = re.sub(r"_*-_*", "-", re.sub(r"\.{2,}", ".", slug))[:MAX_COMPONENT - len(digest) - 1].rstrip("._-")
    return f"{slug}-{digest}" if slug else digest


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless ``name`` is a safe component and the result resolves inside
    ``folder`` (a symlinked run folder pointing elsewhere included)."""
    if safe_component(name) != name:
        raise SweepError(f"{name!r} is not a safe folder name (letters, digits, '.', '_', '-')")
    path = folder / name
    base = folder.resolve()
    if path.resolve() == base or not path.resolve().is_relative_to(base):
        raise SweepError(f"{path} resolves to {path.resolve()}, outside {base}")
    return path


def _papermill_path(path: Path) -> str:
    """A path as papermill's command line must get it: papermill formats the input and output paths with
    the parameters (``str.format``), so a brace is doubled to reach the file system as itself."""
    return str(path).replace("{", "{{").replace("}", "}}")


# ------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class RunSpec:
    name: str
    parameters: dict[str, Any]
    after: tuple[str, ...] = ()  # runs that must finish first (e.g. the one that trains this run's reference)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    notebook: Path  # relative to the project root, or absolute
    runs: tuple[RunSpec, ...]
    requires: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)  # where the spec came from, for messages


def _run_name(values: Mapping[str, Any]) -> str:
    """A grid run's folder name from its values: ``x0.5-seed1``; a slug plus hash for paths, dicts, ..."""
    return safe_component("-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                                   for k, v in values.items()))


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or safe_component(name) != name:
        raise SweepError(f"{what} must be a non-empty string of letters, digits, '.', '_' and '-' (no '/', "
                         f"'\\', spaces, braces or leading dot; at most {MAX_COMPONENT} characters), "
                         f"got {name!r}")
    return name


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> SweepSpec:
    """Build a spec from its YAML mapping; every problem is named with ``source``."""
    if not isinstance(data, Mapping):
        raise SweepError(f"{source}: a sweep spec is a mapping with keys name, notebook, runs/grid")
    unknown = set(data) - {"name", "notebook", "parameters", "runs", "grid", "requires", "description"}
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {sorted(unknown)}; expected name, notebook, parameters, "
                         f"runs, grid, requires, description")
    for key in ("name", "notebook"):
        if key not in data:
            raise SweepError(f"{source}: missing required key {key!r}")
    name = _check_name(data["name"], f"{source}: 'name'")
    if not isinstance(data["notebook"], str) or not data["notebook"]:
        raise SweepError(f"{source}: 'notebook' must be a path, got {data['notebook']!r}")
    shared = _mapping(data.get("parameters"), f"{source}: 'parameters'")
    requires = data.get("requires") or ()
    if not isinstance(requires, list | tuple):
        raise SweepError(f"{source}: 'requires' must be a list, e.g. [gpu, hub]; got {requires!r}")
    requires = tuple(requires)
    bad = [r for r in requires if r not in REQUIREMENTS]
    if bad:
        raise SweepError(f"{source}: unknown requirement(s) {bad}; choose from {list(REQUIREMENTS)}")
    runs: list[RunSpec] = []
    if not isinstance(data.get("runs") or [], list):
        raise SweepError(f"{source}: 'runs' must be a list of {{name, parameters, after}} entries")
    for i, entry in enumerate(data.get("runs") or ()):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise SweepError(f"{source}: runs[{i}] needs a 'name' (and optional 'parameters')")
        after = entry.get("after") or []
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise SweepError(f"{source}: runs[{i}].after must be a list of run names")
        own = _mapping(entry.get("parameters"), f"{source}: runs[{i}].parameters")
        runs.append(RunSpec(_check_name(entry["name"], f"{source}: runs[{i}].name"), {**shared, **own},
                            tuple(after)))
    grid = data.get("grid") or {}
    if (not isinstance(grid, Mapping) or any(not isinstance(v, list) or not v for v in grid.values())
            or not all(isinstance(k, str) for k in grid)):
        raise SweepError(f"{source}: 'grid' maps parameter names to non-empty lists of values")
    for values in itertools.product(*grid.values()) if grid else ():
        point = dict(zip(grid, values, strict=True))
        runs.append(RunSpec(_run_name(point), {**shared, **point}))
    if not runs:
        raise SweepError(f"{source}: no runs; give 'runs' or 'grid'")
    names = [r.name for r in runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SweepError(f"{source}: duplicated run name(s) {duplicated}")
    _check_order(runs, source)
    for run in runs:
        taken = sorted(set(run.parameters) & set(RESERVED_PARAMETERS))
        if taken:
            raise SweepError(f"{source}: run {run.name!r} sets {taken}, which the runner sets itself")
    return SweepSpec(name=name, notebook=Path(data["notebook"]), runs=tuple(runs), requires=requires,
                     description=str(data.get("description", "")), source=source)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SweepError(f"{what} must map parameter names to values, got {value!r}")
    return dict(value)


def _check_order(runs: Sequence[RunSpec], source: str) -> None:
    """Every ``after`` names a run of the sweep, and no run waits (through others) for itself."""
    names = {r.name for r in runs}
    waits = {r.name: set(r.after) for r in runs}
    for run in runs:
        unknown = sorted(set(run.after) - names)
        if unknown:
            raise SweepError(f"{source}: run {run.name!r} waits for unknown run(s) {unknown}")
    done: set[str] = set()
    while len(done) < len(names):
        ready = {n for n in names - done if waits[n] <= done}
        if not ready:
            raise SweepError(f"{source}: runs {sorted(names - done)} wait for each other in a cycle")
        done |= ready


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML sweep spec."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    return spec_from_dict(data, source=str(path))


def preset_spec(preset: str, overrides: Mapping[str, Any] | None = None,
                methods: Sequence[str] | None = None) -> SweepSpec:
    """The preset's own frontier sweep: a run of ``notebooks/templates/frontier_run`` per (method, value)."""
    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset

    overrides = dict(overrides or {})
    config = get_preset(preset, **overrides)  # a bad override fails here, before any run starts
    runs = []
    for method, value in pipeline.frontier_runs(config, tuple(methods or pipeline.METHODS)):
        name = safe_component(f"{method.lower()}-{pipeline.hyperparameter_name(method)}{value:g}")
        parameters = {"preset": preset, "overrides": overrides, "method": method, "value": value}
        runs.append(RunSpec(name, parameters))
    suffix = f"-{content_hash(overrides, length=8)}" if overrides else ""
    requires = {"paper": ("gpu", "hub"), "gpu": ("gpu",)}.get(preset, ())
    return SweepSpec(name=safe_component(f"imdb-{preset}{suffix}"), notebook=FRONTIER_NOTEBOOK,
                     runs=tuple(runs), requires=requires,
                     description=f"IMDb reward-KL frontier, preset {preset!r}", source=f"preset {preset!r}")


# -------------------------------------------------------------------------------------- parameter checks
def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The notebook's documented parameters (name -> inferred type, default, help), as papermill sees them."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise SweepError(f"notebook {str(notebook)!r} not found")
    return dict(papermill.inspect_notebook(_papermill_path(notebook)))  # it formats the path too


_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _matches(type_name: str, value: Any) -> bool:
    """Does ``value`` fit papermill's inferred type name (``float``, ``list[int]``, ``dict``, ...)?"""
    type_name = type_name.replace(" ", "")
    if type_name in ("None", "") or type_name.startswith(("Any", "Optional")) or "|" in type_name:
        return True  # no annotation, or a union: nothing sure to check
    if type_name in _SCALARS:
        return isinstance(value, _SCALARS[type_name]) and (type_name == "bool" or not isinstance(value, bool))
    base, _, inner = type_name.partition("[")
    if base in ("list", "tuple"):
        inner = inner.rstrip("]")
        return isinstance(value, (list, tuple)) and (not inner or all(_matches(inner, v) for v in value))
    if base == "dict":
        return isinstance(value, dict)
    return True


def _shown(path: str | Path) -> str:
    """A path as messages show it: relative to the project root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def check_parameters(notebook: str | Path, parameters: Mapping[str, Any], *, where: str = "") -> None:
    """Raise naming every unknown parameter or wrong type (papermill itself only warns and injects)."""
    declared = notebook_parameters(notebook)
    notebook = _shown(notebook)
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise SweepError(f"{prefix}unknown parameter(s) {unknown} for {notebook}; "
                         f"it declares {sorted(declared)}")
    for name, value in parameters.items():
        expected = declared[name]["inferred_type_name"]
        if not _matches(expected, value):
            hint = ""
            if isinstance(value, str) and expected in ("float", "int") and _is_number(value):
                yaml_exponent = re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value)
                hint = ("; YAML reads 1e-6 (no dot) as a string: write 1.0e-6" if yaml_exponent
                        else "; a number in quotes is a string")
            raise SweepError(f"{prefix}parameter {name!r} of {notebook} expects {expected}, "
                             f"got {type(value).__name__} ({value!r}){hint}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_requirements(requires: Sequence[str]) -> list[str]:
    """The requirements this machine lacks (a GPU; a reachable Hugging Face hub)."""
    missing = []
    if "gpu" in requires:
        import torch

        if not torch.cuda.is_available():
            missing.append("gpu")
    if "hub" in requires and not hub_reachable():
        missing.append("hub")
    return missing


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- run state
def runs_root() -> Path:
    """Where sweeps write: ``DPO_LAB_RUNS`` or ``<project root>/runs``."""
    return Path(os.environ.get("DPO_LAB_RUNS", project_root() / "runs"))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None if absent; a truncated or corrupt file is named in the error."""
    if not path.is_file():
        return None
    try:
        return read_json_object(path, advice="delete it or rerun the run")
    except ValueError as err:
        raise SweepError(str(err)) from err


def parameters_key(parameters: Mapping[str, Any]) -> str:
    return content_hash(dict(parameters))


# A run's lock: ``<run>/.sweep.lock``, flock-ed by the sweep that starts the run and inherited by the run's
# guard process, so it is held exactly while some process of the run lives (a killed sweep's guard still
# holds it while it ends the run) and released by the kernel however they end.
def try_claim(run_dir: Path) -> int | None:
    """A file descriptor holding ``run_dir``'s lock (close it to release), or None if another holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _lock_held(run_dir: Path) -> bool | None:
    """Whether some process holds ``run_dir``'s lock; None where the run has no lock file."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: fails only against an exclusive holder
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _who(status: Mapping[str, Any] | None) -> str:
    status = status or {}
    where = f" on {status['host']}" if status.get("host") else ""
    since = f" since {status['started']}" if status.get("started") else ""
    return f"pid {status.get('pid', '?')}{where}{since}"


def holder(run_dir: Path, status: Mapping[str, Any] | None) -> str:
    """Who is running this run now ("" if nobody): the run's lock decides; a run folder without a lock file
    falls back to its ``running`` status naming a live pid on this host."""
    held = _lock_held(run_dir)
    if held:
        return _who(status) if (status or {}).get("state") == "running" else "a process holding its lock"
    if held is None and status and status.get("state") == "running" and isinstance(status.get("pid"), int):
        if status.get("host") == socket.gethostname() and pid_alive(status["pid"]):
            return _who(status)
    return ""


def run_state(run_dir: Path, parameters: Mapping[str, Any], *, claimed: bool = False) -> tuple[str, str]:
    """("done" | "todo" | "failed" | "changed" | "corrupt" | "interrupted" | "running", why) for one run
    folder. "running": a process runs it now (elsewhere, or in this sweep); "interrupted": it was stopped,
    or its ``running`` status names a process that is gone. ``claimed``: the caller holds the run's lock."""
    try:
        status = read_json(run_dir / "status.json")
    except SweepError as err:
        status, corrupt = None, str(err)
    else:
        corrupt = ""
    running = "" if claimed else holder(run_dir, status)
    if running:
        return "running", f"running elsewhere ({running})"
    try:
        result = read_json(run_dir / "result.json")
    except SweepError as err:
        corrupt = corrupt or str(err)
    if corrupt:
        return "corrupt", corrupt
    if status is None:
        return "todo", "not started"
    if status.get("parameters_key") != parameters_key(parameters):
        return "changed", "its parameters changed since it ran"
    if status.get("state") == "done":
        if result is None:
            return "corrupt", f"{run_dir / 'result.json'} is missing although the run finished"
        return "done", ""
    if status.get("state") == "failed":
        return "failed", status.get("error", "")
    if status.get("state") == "interrupted":
        return "interrupted", status.get("error") or "interrupted"
    if status.get("state") == "running":
        return "interrupted", f"interrupted: its process ({_who(status)}) is gone"
    return "todo", "interrupted"


def _error_of(notebook: Path, log: Path) -> str:
    """The first error a failed execution left: the notebook's error output, else the log's last line."""
    if notebook.is_file():
        try:
            nb = nbformat.read(notebook, as_version=4)
            for index, cell in enumerate(nb.cells):
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "error":
                        return f"{output['ename']}: {output['evalue']} (cell {index})"
        except Exception:  # noqa: BLE001 - an unreadable notebook falls back to the log
            pass
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "failed without output"


@dataclass
class RunOutcome:
    name: str
    state: str  # done | failed | skipped | interrupted | running (elsewhere, not waited for)
    seconds: float = 0.0
    error: str = ""


class Stop(threading.Event):
    """Set, with a reason, to stop a sweep's running runs (``execute_run(stop=...)``)."""

    reason = ""
    signum = 0  # the signal that stopped the sweep, if one did

    def stop(self, reason: str, signum: int = 0) -> None:
        if not self.is_set():
            self.reason, self.signum = reason, signum
        self.set()


def _end_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the run's process group (its guard then ends every process of the run, kernel and
    ``torchrun`` included), SIGKILL the group after ``grace`` seconds; wait for the guard."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group exists while its leader, the guard, is not reaped
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def execute_run(notebook: Path, run_dir: Path, parameters: Mapping[str, Any], *,
                env: Mapping[str, str] | None = None, kernel: str = "python3",
                timeout_s: float | None = None,
                key_parameters: Mapping[str, Any] | None = None, stop: Stop | None = None,
                claim: int | None = None) -> RunOutcome:
    """Execute one run's notebook with papermill in a child process and record its status
    (``key_parameters``: the spec's parameters, before ``{sweep_dir}`` was filled in).

    papermill runs under ``dpo_lab.scale.guard`` in a session of its own, so that the run's processes end
    with it and with this process; ``stop`` (set) or ``timeout_s`` end the whole run (status
    ``interrupted`` / ``failed``). The run's lock is held throughout: ``claim``, a descriptor from
    ``try_claim`` the caller holds, or else taken here (a run another process holds is refused)."""
    if claim is None:
        own = try_claim(run_dir)
        if own is None:
            running = holder(run_dir, read_json(run_dir / "status.json"))
            raise SweepError(f"{run_dir} is running elsewhere ({running}); not started a second time")
        try:
            return execute_run(notebook, run_dir, parameters, env=env, kernel=kernel, timeout_s=timeout_s,
                               key_parameters=key_parameters, stop=stop, claim=own)
        finally:
            os.close(own)
    key = parameters_key(parameters if key_parameters is None else key_parameters)
    params = {**parameters, "run_dir": str(run_dir.resolve())}
    atomic_write_text(run_dir / "parameters.yaml", yaml.safe_dump(params, sort_keys=True))
    for stale in ("result.json",):  # a rerun must not collect the previous attempt's result
        (run_dir / stale).unlink(missing_ok=True)
    out_nb, log = run_dir / "notebook.ipynb", run_dir / "papermill.log"
    cmd = [sys.executable, "-m", "papermill", _papermill_path(notebook), _papermill_path(out_nb),
           "-f", str(run_dir / "parameters.yaml"), "-k", kernel,
           "--cwd", str(project_root()), "--log-output", "--no-progress-bar"]
    # The guard is started (and so watches) from this thread, which waits for it to the end: its
    # parent-death signal fires when the thread that started it ends, which is only when this process dies.
    guarded = [sys.executable, str(GUARD), str(os.getpid()), "--", *cmd]  # a script: no dpo_lab import
    start = time.perf_counter()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log, "w") as handle:
        proc = subprocess.Popen(guarded, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True, pass_fds=(claim,))
    who = {"pid": proc.pid, "host": socket.gethostname(), "sweep_pid": os.getpid()}
    atomic_write_json(run_dir / "status.json", {"state": "running", "started": _now(), "parameters_key": key,
                                                **who})
    ended = ""
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop is not None and stop.is_set():
            ended = stop.reason or "interrupted"
        elif deadline is not None and time.monotonic() > deadline:
            ended = f"run exceeded its {timeout_s} s limit"
        if ended:
            _end_group(proc)
            code = proc.returncode
            with open(log, "a") as handle:
                handle.write(f"\n{ended}\n")
            break
    seconds = round(time.perf_counter() - start, 1)
    error = ended
    if code == 0 and not ended:
        try:
            if read_json(run_dir / "result.json") is None:
                error = f"the notebook finished but wrote no {run_dir / 'result.json'}"
        except SweepError as err:
            error = str(err)
    elif not ended:
        error = _error_of(out_nb, log)
    state = "interrupted" if ended and stop is not None and stop.is_set() else "failed" if error else "done"
    atomic_write_json(run_dir / "status.json", {"state": state, "finished": _now(), "seconds": seconds,
                                                "parameters_key": key, "error": error, "returncode": code,
                                                **who})
    return RunOutcome(run_dir.name, state, seconds, error)


# ----------------------------------------------------------------------------------------------- sweeps
def resolve_notebook(spec: SweepSpec) -> Path:
    path = spec.notebook if spec.notebook.is_absolute() else project_root() / spec.notebook
    if not path.is_file():
        raise SweepError(f"{spec.source}: notebook {str(spec.notebook)!r} not found")
    return path


def validate(spec: SweepSpec, devices: Sequence[str | None] | None = None) -> Path:
    """Check what every run would trip on, before anything runs: the sweep's and runs' folder names, each
    run's parameters against the notebook, ``processes`` (a whole number >= 1, and with ``devices`` given,
    no more than there are GPUs). Return the notebook."""
    _check_name(spec.name, f"{spec.source}: the sweep's name")
    names = [_check_name(r.name, f"{spec.source}: run name") for r in spec.runs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SweepError(f"{spec.source}: duplicated run name(s) {duplicated}")
    notebook = resolve_notebook(spec)
    gpus = [d for d in devices or () if d is not None]
    for run in spec.runs:
        where = f"{spec.source}, run {run.name!r}"
        taken = sorted(set(run.parameters) & set(RESERVED_PARAMETERS))
        if taken:
            raise SweepError(f"{where} sets {taken}, which the runner sets itself")
        check_parameters(notebook, run.parameters, where=where)
        if "processes" in run.parameters:
            wanted = run.parameters["processes"]
            if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
                raise SweepError(f"{where}: processes must be a whole number >= 1, got {wanted!r}")
            if gpus and wanted > len(gpus):
                raise SweepError(f"{where}: processes {wanted} needs {wanted} GPUs; this sweep has "
                                 f"{len(gpus)} ({list(devices or ())})")
    return notebook


def sweep_folder(spec: SweepSpec, root: Path | None = None) -> Path:
    """``<root>/<sweep name>``, refused unless it lies inside ``root``."""
    return inside(Path(root) if root is not None else runs_root(), spec.name)


def _check_writable(folder: Path) -> None:
    """A sweep can create and write ``folder`` (checked before any run starts, and by ``--dry-run``)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SweepError(f"cannot create {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SweepError(f"cannot write {folder}: {existing} is not writable (choose another --runs-dir)")


def preflight(spec: SweepSpec, *, root: Path | None = None, devices: Sequence[str | None] | None = None,
              force: bool = False, jobs: int = 1) -> tuple[Path, list[str | None], Path, list[str]]:
    """Every check a sweep makes before its first run, shared by ``run_sweep`` and ``--dry-run``:
    ``validate``, the machine's requirements (an error unless ``force``), a writable sweep folder.
    Return (notebook, devices, sweep folder, missing requirements)."""
    devices = list(devices) if devices is not None else default_devices(jobs)
    notebook = validate(spec, devices)
    missing = check_requirements(spec.requires)
    if missing and not force:
        raise SweepError(f"{spec.source} requires {list(spec.requires)}; this machine lacks {missing} "
                         f"(pass force=True / --force to try anyway)")
    folder = sweep_folder(spec, root)
    _check_writable(folder)
    return notebook, devices, folder, missing


def plan(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Each run's state without running anything (``--dry-run``)."""
    folder = sweep_folder(spec, root)
    rows = [(run.name, *run_state(inside(folder, run.name), run.parameters)) for run in spec.runs]
    return pd.DataFrame(rows, columns=["run", "state", "why"])


def default_devices(jobs: int = 1) -> list[str | None]:
    """One worker per visible CUDA device; on a CPU, ``jobs`` workers (default one: sequential)."""
    import torch

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"jobs must be a whole number >= 1, got {jobs!r}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(n)] if n > 1 else [None] * jobs


def cpu_env(devices: Sequence[str | None]) -> dict[str, str]:
    """With several CPU workers, each run gets an equal share of the cores as its torch threads, so that
    N runs side by side do not each start one thread per core and fight over them."""
    cpu_workers = sum(d is None for d in devices)
    if cpu_workers <= 1:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cpu_workers))}


def _claim(run_dir: Path, stop: Stop, label: str) -> int | None:
    """Take the run's lock, waiting (with a message) while another process runs it; None if stopped."""
    announced = False
    while not stop.is_set():
        try:
            status = read_json(run_dir / "status.json")
        except SweepError:
            status = None
        running = holder(run_dir, status)
        fd = None if running else try_claim(run_dir)
        if fd is not None:
            return fd
        if not announced:
            print(f"{label}: running elsewhere ({running or 'another process holds its lock'}); "
                  f"waiting for it to end", file=sys.stderr)
            announced = True
        stop.wait(1.0)
    return None


def _on_stop_signals(stop: Stop) -> dict[int, Any]:
    """In the main thread: SIGINT, SIGTERM and SIGHUP set ``stop``; return the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        if not stop.is_set():  # os.write: print may not be re-entered from a signal handler
            os.write(2, f"\n{signal.Signals(signum).name}: stopping the running run(s)\n".encode())
        stop.stop(f"interrupted: the sweep was stopped by {signal.Signals(signum).name}", signum)

    return {signum: signal.signal(signum, handler)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def run_sweep(spec: SweepSpec, *, root: Path | None = None, devices: Sequence[str | None] | None = None,
              force: bool = False, retry_failed: bool = True, progress: bool = True,
              timeout_s: float | None = None, jobs: int = 1) -> list[RunOutcome]:
    """Run every unfinished run (several at once when several devices are given, or ``jobs`` at once on a
    CPU machine), then collect.

    A run another process is running is waited for, not started twice. SIGINT, SIGTERM or SIGHUP (when
    called from the main thread) end every running run's processes, mark those runs ``interrupted``,
    start no more, and raise ``SweepInterrupted``."""
    notebook, devices, folder, _ = preflight(spec, root=root, devices=devices, force=force, jobs=jobs)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(
        {"name": spec.name, "notebook": str(spec.notebook), "requires": list(spec.requires),
         "description": spec.description,
         "runs": [{"name": r.name, "parameters": r.parameters, "after": list(r.after)} for r in spec.runs]},
        sort_keys=False))
    outcomes: list[RunOutcome] = []
    todo = []
    for run in spec.runs:
        state, why = run_state(inside(folder, run.name), run.parameters)
        if state == "done" or (state == "failed" and not retry_failed):
            outcomes.append(RunOutcome(run.name, "skipped" if state == "done" else "failed", error=why))
        else:
            if state in ("corrupt", "changed", "interrupted"):
                print(f"{spec.name}/{run.name}: {why}; running it again", file=sys.stderr)
            todo.append(run)
    free: Queue[str | None] = Queue()
    for device in devices:
        free.put(device)

    taking = threading.Lock()
    stop = Stop()

    def work(run: RunSpec) -> RunOutcome:
        not_started = RunOutcome(run.name, "interrupted", error=f"not started: {stop.reason}")
        run_dir = inside(folder, run.name)
        claim = _claim(run_dir, stop, f"{spec.name}/{run.name}")
        if claim is None:
            return not_started
        try:
            state, why = run_state(run_dir, run.parameters, claimed=True)  # whoever held it may have finished
            if state == "done":
                return RunOutcome(run.name, "skipped")
            if state == "failed" and not retry_failed:
                return RunOutcome(run.name, "failed", error=why)
            # A run with ``processes: N`` trains on N GPUs at once (one on a CPU machine: gloo processes).
            on_cpu = all(d is None for d in devices)
            wanted = 1 if on_cpu else min(int(run.parameters.get("processes", 1)), len(devices))
            with taking:  # one run collects its devices at a time, so two runs never hold half each
                held = [free.get() for _ in range(wanted)]
            try:
                if stop.is_set():
                    return RunOutcome(run.name, "interrupted", error=f"not started: {stop.reason}")
                device = None if held == [None] else ",".join(str(d) for d in held)
                env = cpu_env(devices) if device is None else {"CUDA_VISIBLE_DEVICES": device}
                parameters = {k: v.replace("{sweep_dir}", str(folder.resolve())) if isinstance(v, str) else v
                              for k, v in run.parameters.items()}
                outcome = execute_run(notebook, run_dir, parameters, env=env, timeout_s=timeout_s,
                                      key_parameters=run.parameters, stop=stop, claim=claim)
                outcome.name = run.name
                return outcome
            finally:
                for d in held:
                    free.put(d)
        finally:
            os.close(claim)

    bar = tqdm(total=len(spec.runs), initial=len(spec.runs) - len(todo), desc=spec.name, unit="run",
               disable=not progress)
    # Waves: each starts the runs whose ``after`` runs are finished, several at once when devices allow.
    ended = {o.name: o.state for o in outcomes}
    previous = _on_stop_signals(stop)
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            while todo and not stop.is_set():
                unfinished = {a for r in todo for a in r.after
                              if a in ended and ended[a] not in ("done", "skipped")}
                blocked = [r for r in todo if set(r.after) & unfinished]
                ready = [r for r in todo if r not in blocked and all(ended.get(a) in ("done", "skipped")
                                                                     for a in r.after)]
                skipped = [RunOutcome(r.name, "failed", error=f"not run: it waits for failed run(s) "
                                      f"{sorted(set(r.after) & unfinished)}") for r in blocked]
                # The bar moves as each run of the wave ends, not when the whole wave has.
                futures = [pool.submit(work, r) for r in ready]
                for outcome in itertools.chain(skipped, (f.result() for f in as_completed(futures))):
                    outcomes.append(outcome)
                    ended[outcome.name] = outcome.state
                    bar.update()
                    bar.set_postfix_str(f"{outcome.name}: {outcome.state}")
                todo = [r for r in todo if r.name not in ended]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        bar.close()
    order = {r.name: i for i, r in enumerate(spec.runs)}
    if stop.is_set():
        outcomes += [RunOutcome(r.name, "interrupted", error=f"not started: {stop.reason}") for r in todo]
        raise SweepInterrupted(stop.signum or signal.SIGTERM, sorted(outcomes, key=lambda o: order[o.name]))
    collect(spec, root=root)
    return sorted(outcomes, key=lambda o: order[o.name])


# ----------------------------------------------------------------------------------------------- results
def collect(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Every run's result.json as one row (plus state and seconds) -> results.csv / results.md; every
    run's points.csv -> ``frontier.report``: frontier_<sweep>.png, frontier_<sweep>_points.csv and
    results_<sweep>.{csv,md}, as ``make reproduce`` writes them."""
    folder = sweep_folder(spec, root)
    rows, point_frames = [], []
    for run in spec.runs:
        run_dir = inside(folder, run.name)
        state, why = run_state(run_dir, run.parameters)
        try:
            status = read_json(run_dir / "status.json")
        except SweepError:
            status = None
        row: dict[str, Any] = {"run": run.name, "state": state,
                               "seconds": (status or {}).get("seconds"), "error": why}
        if state == "done":
            row.update(read_json(run_dir / "result.json") or {})
            if (run_dir / "points.csv").is_file():
                point_frames.append(pd.read_csv(run_dir / "points.csv"))
        rows.append(row)
    table = pd.DataFrame(rows)
    first = [c for c in ("run", "state", "method", "hyperparameter") if c in table.columns]
    last = [c for c in ("seconds", "error", "run_path") if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first + last] + last]
    atomic_write_text(folder / "results.csv", table.to_csv(index=False))
    atomic_write_text(folder / "results.md", table.to_markdown(index=False, floatfmt=".3f"))
    if point_frames:
        points = pd.concat(point_frames, ignore_index=True)
        if {"method", "kl_mean", "reward_mean"} <= set(points.columns):
            from dpo_lab.frontier import report, seed_report  # the same figure and tables as make reproduce

            if points.get("seed", pd.Series([0])).nunique() > 1:  # a seed study: envelopes across seeds
                seed_report(points, folder, spec.name, title=f"sweep {spec.name}: reward vs KL across seeds")
            else:
                report(points, folder, spec.name, title=f"sweep {spec.name}: reward vs KL")
        else:
            atomic_write_text(folder / f"frontier_{spec.name}_points.csv", points.to_csv(index=False))
    return table


def summarize(outcomes: Sequence[RunOutcome]) -> str:
    """A short text summary: counts, then one line per failed run with its error."""
    counts = {s: sum(o.state == s for o in outcomes) for s in ("done", "skipped", "failed", "interrupted")}
    lines = [f"{counts['done']} run(s) done, {counts['skipped']} already finished, {counts['failed']} failed"
             + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")]
    lines += [f"  FAILED {o.name}: {o.error}" for o in outcomes if o.state == "failed"]
    lines += [f"  INTERRUPTED {o.name}: {o.error}" for o in outcomes if o.state == "interrupted"]
    return "\n".join(lines)


__all__ = ["FRONTIER_NOTEBOOK", "RunOutcome", "RunSpec", "Stop", "SweepError", "SweepInterrupted",
           "SweepSpec", "check_parameters", "check_requirements", "collect", "execute_run", "holder",
           "inside", "load_spec", "notebook_parameters", "pid_alive", "plan", "preflight", "preset_spec",
           "run_state", "run_sweep", "runs_root", "safe_component", "spec_from_dict", "summarize",
           "sweep_folder", "try_claim", "validate"]
