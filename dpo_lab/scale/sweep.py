"""Sweeps: one notebook executed many times with different parameters (papermill), results in one table.

A spec (``sweeps/*.yaml``, or a preset's frontier sweep) names a notebook and its runs (explicit, or a grid).
Each run lives in ``runs/<sweep>/<run>/`` and executes under ``guard.py``, which holds the run's lock while
any process of the run lives; a rerun skips finished runs. No grid value writes outside the sweep's folder.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import papermill
import yaml
from tqdm.auto import tqdm

from dpo_lab import cache
from dpo_lab.presets import project_root

FRONTIER_NOTEBOOK = Path("notebooks/templates/frontier_run.ipynb")
GUARD = Path(__file__).with_name("guard.py")
LOCK_NAME = ".sweep.lock"
MAX_COMPONENT = 96
_SIMPLE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class SweepError(ValueError):
    """A spec or a parameter that cannot run; the message names the problem."""


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal; its running runs were stopped and marked ``interrupted``."""

    def __init__(self, signum: int, outcomes: Sequence[RunOutcome]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.outcomes = signum, list(outcomes)


def safe_component(text: Any) -> str:
    """``text`` itself when simple (letters, digits, ``.``, ``_``, ``-``, no leading dot, at most 96
    characters), else a readable slug plus a hash of the whole text: never empty, ``..`` or with a brace."""
    text = str(text)
    if _SIMPLE.fullmatch(text) and len(text) <= MAX_COMPONENT:
        return text
    digest = cache.content_hash(text, length=8)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    slug = re.sub(r"_*-_*", "-", re.sub(r"\.{2,}", ".", slug))[:MAX_COMPONENT - len(digest) - 1].rstrip("._-")
    return f"{slug}-{digest}" if slug else digest


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless ``name`` is safe and the path resolves inside ``folder``."""
    if safe_component(name) != name:
        raise SweepError(f"{name!r} is not a safe folder name (letters, digits, '.', '_', '-')")
    path, base = folder / name, folder.resolve()
    if path.resolve() == base or not path.resolve().is_relative_to(base):
        raise SweepError(f"{path} resolves to {path.resolve()}, outside {base}")
    return path


def _papermill_path(path: Path) -> str:
    """papermill formats its paths with the parameters (``str.format``): a brace is doubled to stay itself."""
    return str(path).replace("{", "{{").replace("}", "}}")


# ------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class RunSpec:
    name: str
    parameters: dict[str, Any]
    after: tuple[str, ...] = ()  # runs that must finish first (e.g. the one that trains its reference)


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep: safe unique names, known requirements, no run setting ``run_dir`` (the runner sets
    it), every ``after`` naming a run of the sweep and no run waiting (through others) for itself."""

    name: str
    notebook: Path  # relative to the project root, or absolute
    runs: tuple[RunSpec, ...]
    requires: tuple[str, ...] = ()
    source: str = field(default="", compare=False)  # where the spec came from, for messages

    def __post_init__(self) -> None:
        where, names = self.source, [r.name for r in self.runs]
        # explicit runs come first: i is their index in the spec (grid runs get safe names)
        for what, name in [("'name'", self.name), *((f"runs[{i}].name", n) for i, n in enumerate(names))]:
            if not isinstance(name, str) or safe_component(name) != name:
                raise SweepError(f"{where}: {what} must be a non-empty string of letters, digits, '.', '_' "
                                 f"and '-' (no '/', spaces, braces or leading dot; at most {MAX_COMPONENT} "
                                 f"characters), got {name!r}")
        for run in self.runs:
            if "run_dir" in run.parameters:
                raise SweepError(f"{where}: run {run.name!r} sets ['run_dir'], which the runner sets itself")
            if unknown := sorted(set(run.after) - set(names)):
                raise SweepError(f"{where}: run {run.name!r} waits for unknown run(s) {unknown}")
        if not names:
            raise SweepError(f"{where}: no runs; give 'runs' or 'grid'")
        if duplicated := sorted({n for n in names if names.count(n) > 1}):
            raise SweepError(f"{where}: duplicated run name(s) {duplicated}")
        if bad := [r for r in self.requires if r not in ("gpu", "hub")]:
            raise SweepError(f"{where}: unknown requirement(s) {bad}; choose from ['gpu', 'hub']")
        done: set[str] = set()
        while ready := {r.name for r in self.runs if r.name not in done and set(r.after) <= done}:
            done |= ready
        if waiting := sorted(set(names) - done):
            raise SweepError(f"{where}: runs {waiting} wait for each other in a cycle")


_SHAPES = {"name": (str, "be a name"), "notebook": (str, "be a path"), "description": (str, "be text"),
           "parameters": (Mapping, "map parameter names to values"),
           "grid": (Mapping, "map parameter names to non-empty lists of values"),
           "runs": (list, "be a list of {name, parameters, after}"), "requires": (list, "be a list")}


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is not None and (not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value)):
        raise SweepError(f"{what} must map parameter names to values, got {value!r}")
    return dict(value or {})


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> SweepSpec:
    """Build a spec from its YAML mapping; every problem is named with ``source``."""
    if not isinstance(data, Mapping):
        raise SweepError(f"{source}: a sweep spec is a mapping with keys name, notebook, runs/grid")
    if unknown := sorted(set(data) - set(_SHAPES)):
        raise SweepError(f"{source}: unknown key(s) {unknown}; expected {', '.join(_SHAPES)}")
    if missing := [k for k in ("name", "notebook") if k not in data]:
        raise SweepError(f"{source}: missing required key {missing[0]!r}")
    for key, value in data.items():
        if value is not None and not isinstance(value, _SHAPES[key][0]) or key == "notebook" and not value:
            raise SweepError(f"{source}: {key!r} must {_SHAPES[key][1]}, got {value!r}")
    shared, runs = _mapping(data.get("parameters"), f"{source}: 'parameters'"), []
    for i, entry in enumerate(data.get("runs") or []):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise SweepError(f"{source}: runs[{i}] needs a 'name' (and optional 'parameters')")
        after = entry.get("after") or []
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise SweepError(f"{source}: runs[{i}].after must be a list of run names")
        own = _mapping(entry.get("parameters"), f"{source}: runs[{i}].parameters")
        runs.append(RunSpec(entry["name"], {**shared, **own}, tuple(after)))
    grid = data.get("grid") or {}
    if any(not isinstance(k, str) or not isinstance(v, list) or not v for k, v in grid.items()):
        raise SweepError(f"{source}: 'grid' maps parameter names to non-empty lists of values")
    for values in itertools.product(*grid.values()) if grid else ():
        point = dict(zip(grid, values, strict=True))  # run name: x0.5-seed1, or a slug plus hash
        name = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in point.items())
        runs.append(RunSpec(safe_component(name), {**shared, **point}))
    requires = tuple(data.get("requires") or ())
    return SweepSpec(data["name"], Path(data["notebook"]), tuple(runs), requires, source)


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML sweep spec."""
    if not Path(path).is_file():
        raise SweepError(f"sweep spec {str(path)!r} not found")
    try:
        return spec_from_dict(yaml.safe_load(Path(path).read_text()), source=str(path))
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err


def preset_spec(preset: str, overrides: Mapping[str, Any] | None = None,
                methods: Sequence[str] | None = None) -> SweepSpec:
    """The preset's frontier sweep: a run of ``notebooks/templates/frontier_run`` per (method, value)."""
    from dpo_lab import pipeline
    from dpo_lab.presets import get_preset

    overrides = dict(overrides or {})
    config = get_preset(preset, **overrides)  # a bad override fails here, before any run starts
    runs = tuple(RunSpec(safe_component(f"{method.lower()}-{pipeline.hyperparameter_name(method)}{value:g}"),
                         {"preset": preset, "overrides": overrides, "method": method, "value": value})
                 for method, value in pipeline.frontier_runs(config, tuple(methods or pipeline.METHODS)))
    suffix = f"-{cache.content_hash(overrides, length=8)}" if overrides else ""
    name = safe_component(f"imdb-{preset}{suffix}")
    requires = {"paper": ("gpu", "hub"), "gpu": ("gpu",)}.get(preset, ())
    return SweepSpec(name, FRONTIER_NOTEBOOK, runs, requires, source=f"preset {preset!r}")


# -------------------------------------------------------------------------------------- parameter checks
def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The notebook's parameters (name -> inferred type, default, help), as papermill sees them."""
    if not Path(notebook).is_file():
        raise SweepError(f"notebook {str(notebook)!r} not found")
    return dict(papermill.inspect_notebook(_papermill_path(Path(notebook))))


def _matches(type_name: str, value: Any) -> bool:
    """Does ``value`` fit papermill's inferred type name (``float``, ``list[int]``, ``dict``, ...)?"""
    type_name = type_name.replace(" ", "")
    if type_name in ("None", "") or type_name.startswith(("Any", "Optional")) or "|" in type_name:
        return True  # no annotation, or a union: nothing sure to check
    scalars = {"str": str, "int": int, "float": (int, float), "bool": bool}
    if type_name in scalars:
        return isinstance(value, scalars[type_name]) and (type_name == "bool" or not isinstance(value, bool))
    base, _, inner = type_name.partition("[")
    if base in ("list", "tuple"):
        inner = inner.rstrip("]")
        return isinstance(value, list | tuple) and (not inner or all(_matches(inner, v) for v in value))
    return isinstance(value, dict) if base == "dict" else True


def check_parameters(notebook: str | Path, parameters: Mapping[str, Any], *, where: str = "") -> None:
    """Raise naming every unknown parameter or wrong type (papermill itself only warns and injects)."""
    declared = notebook_parameters(notebook)
    prefix, name = f"{where}: " if where else "", Path(notebook).resolve()
    name = name.relative_to(project_root()) if name.is_relative_to(project_root()) else notebook
    if unknown := sorted(set(parameters) - set(declared)):
        raise SweepError(f"{prefix}unknown parameter(s) {unknown} for {name}; it declares {sorted(declared)}")
    for key, value in parameters.items():
        if _matches(expected := declared[key]["inferred_type_name"], value):
            continue
        hint = ""
        if isinstance(value, str) and expected in ("float", "int") and re.fullmatch(
                r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value):
            hint = ("; YAML reads 1e-6 (no dot) as a string: write 1.0e-6" if re.fullmatch(
                r"[+-]?\d+[eE][+-]?\d+", value) else "; a number in quotes is a string")
        raise SweepError(f"{prefix}parameter {key!r} of {name} expects {expected}, "
                         f"got {type(value).__name__} ({value!r}){hint}")


def check_requirements(requires: Sequence[str]) -> list[str]:
    """The requirements this machine lacks (a GPU; a reachable Hugging Face hub)."""
    import torch

    missing = ["gpu"] if "gpu" in requires and not torch.cuda.is_available() else []
    if "hub" in requires:
        try:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise OSError("offline")
            socket.create_connection(("huggingface.co", 443), timeout=3.0).close()
        except OSError:
            missing.append("hub")
    return missing


def validate_spec(spec: SweepSpec, devices: Sequence[str | None] | None = None) -> Path:
    """Check each run's parameters against the notebook, and its ``processes`` (a whole number >= 1, at most
    the GPUs in ``devices``), before anything runs. Return the notebook."""
    notebook = spec.notebook if spec.notebook.is_absolute() else project_root() / spec.notebook
    if not notebook.is_file():
        raise SweepError(f"{spec.source}: notebook {str(spec.notebook)!r} not found")
    gpus = [d for d in devices or () if d is not None]
    for run in spec.runs:
        check_parameters(notebook, run.parameters, where=(where := f"{spec.source}, run {run.name!r}"))
        wanted = run.parameters.get("processes", 1)
        if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
            raise SweepError(f"{where}: processes must be a whole number >= 1, got {wanted!r}")
        if gpus and wanted > len(gpus):
            raise SweepError(f"{where}: processes {wanted} needs {wanted} GPUs; this sweep has {len(gpus)} "
                             f"({list(devices or ())})")
    return notebook


def preflight(spec: SweepSpec, *, root: Path | None = None, devices: Sequence[str | None] | None = None,
              force: bool = False, jobs: int = 1) -> tuple[Path, list[str | None], Path, list[str]]:
    """Every check before a sweep's first run (``run_sweep`` and ``--dry-run``); returns (notebook, devices,
    folder, missing requirements). Devices: each visible CUDA device if several, else ``jobs`` CPU workers."""
    if devices is None:
        import torch

        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise SweepError(f"jobs must be a whole number >= 1, got {jobs!r}")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [str(i) for i in range(n)] if n > 1 else [None] * jobs
    notebook = validate_spec(spec, devices)
    if (missing := check_requirements(spec.requires)) and not force:
        raise SweepError(f"{spec.source} requires {list(spec.requires)}; this machine lacks {missing} "
                         f"(pass force=True / --force to try anyway)")
    folder = existing = sweep_folder(spec, root)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SweepError(f"cannot write {folder}: {existing} is not a folder or not writable")
    return notebook, list(devices), folder, missing


# -------------------------------------------------------------------------------------------- run state
def runs_root() -> Path:
    """Where sweeps write: ``DPO_LAB_RUNS`` or ``<project root>/runs``."""
    return Path(os.environ.get("DPO_LAB_RUNS", project_root() / "runs"))


def sweep_folder(spec: SweepSpec, root: Path | None = None) -> Path:
    return inside(Path(root) if root is not None else runs_root(), spec.name)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None if absent; a truncated or corrupt one is a ValueError naming it."""
    return cache.read_json_object(path, advice="delete it or rerun the run") if path.is_file() else None


def parameters_key(parameters: Mapping[str, Any]) -> str:
    return cache.content_hash(dict(parameters))


def holder(run_dir: Path) -> str:
    """Who holds the run's lock, i.e. runs it now ("" if nobody); asks without locking or writing."""
    with contextlib.suppress(OSError), open(run_dir / LOCK_NAME) as lock:  # no lock file: nobody
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails only against an exclusive holder
        except BlockingIOError:
            return cache.lock_holder(run_dir / LOCK_NAME)
    return ""


def run_state(run_dir: Path, parameters: Mapping[str, Any], *, claimed: bool = False) -> tuple[str, str]:
    """("done" | "todo" | "failed" | "changed" | "corrupt" | "interrupted" | "running", why) of one run
    folder; ``claimed``: the caller holds the run's lock."""
    if running := "" if claimed else holder(run_dir):
        return "running", f"running elsewhere ({running})"
    try:
        status, result = read_json(run_dir / "status.json"), read_json(run_dir / "result.json")
    except ValueError as err:
        return "corrupt", str(err)
    if status is None:
        return "todo", "not started"
    if status.get("parameters_key") != parameters_key(parameters):
        return "changed", "its parameters changed since it ran"
    if (state := status.get("state")) == "done" and result is None:
        return "corrupt", f"{run_dir / 'result.json'} is missing although the run finished"
    if state in ("done", "failed"):
        return state, status.get("error", "")
    if state == "running":
        who = f"pid {status.get('pid')} on {status.get('host')}"
        return "interrupted", f"interrupted: its process ({who}) is gone"
    return "interrupted", status.get("error") or "interrupted"


@dataclass
class RunOutcome:
    name: str
    state: str  # done | failed | skipped | interrupted
    error: str = ""


# ------------------------------------------------------------------------------------------------ running
@dataclass
class _Job:
    """A run this sweep started: its guard process, lock, devices and status."""

    run_dir: Path
    proc: subprocess.Popen
    lock: contextlib.ExitStack  # holds the run's lock until closed
    held: list[str | None]
    who: dict[str, Any]
    start: float = field(default_factory=time.monotonic)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _claim(run_dir: Path, said: set[Path]) -> tuple[contextlib.ExitStack, int] | None:
    """The run's lock (closing the stack releases it) and its file descriptor, or None while another process
    holds it (which is said once)."""
    name = f"{run_dir.parent.name}/{run_dir.name}"
    if running := holder(run_dir):
        if run_dir not in said:
            print(f"{name}: running elsewhere ({running}); waiting for it", file=sys.stderr)
            said.add(run_dir)
        return None
    stack = contextlib.ExitStack()
    with contextlib.suppress(cache.RunLockedError):  # taken since we looked: look again next time
        return stack, stack.enter_context(cache.file_lock(run_dir / LOCK_NAME, name, timeout=0))
    return None


def _start(notebook: Path, run_dir: Path, run: RunSpec, claim: tuple[contextlib.ExitStack, int],
           held: list[str | None], devices: list[str | None]) -> _Job:
    """Start the run's notebook (papermill) under the guard, which inherits the run's held lock, on the
    GPUs ``held`` (on a CPU running several runs at once, on its share of the cores)."""
    sweep_dir, cores = str(run_dir.parent.resolve()), max(1, (os.cpu_count() or 1) // len(devices))
    env = ({"CUDA_VISIBLE_DEVICES": ",".join(map(str, held))} if held[0] is not None else
           {"OMP_NUM_THREADS": str(cores)} if len(devices) > 1 else {})
    params = {k: v.replace("{sweep_dir}", sweep_dir) if isinstance(v, str) else v
              for k, v in run.parameters.items()}
    cache.atomic_write_text(run_dir / "parameters.yaml", yaml.safe_dump(
        {**params, "run_dir": str(run_dir.resolve())}, sort_keys=True))
    (run_dir / "result.json").unlink(missing_ok=True)  # a rerun must not collect the last attempt's result
    cmd = [sys.executable, "-m", "papermill", _papermill_path(notebook),
           _papermill_path(run_dir / "notebook.ipynb"), "-f", str(run_dir / "parameters.yaml"),
           "-k", "python3", "--cwd", str(project_root()), "--log-output", "--no-progress-bar"]
    with open(run_dir / "papermill.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(GUARD), str(os.getpid()), "--", *cmd], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **env}, pass_fds=(claim[1],))
    who = {"pid": proc.pid, "host": socket.gethostname(), "sweep_pid": os.getpid(),
           "parameters_key": parameters_key(run.parameters)}
    cache.atomic_write_json(run_dir / "status.json", {"state": "running", "started": _now(), **who})
    return _Job(run_dir, proc, claim[0], held, who)


def _error_of(notebook: Path, log: Path) -> str:
    """The first error a failed execution left: the notebook's error output, else the log's last line."""
    try:
        for index, cell in enumerate(nbformat.read(notebook, as_version=4).cells):
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    return f"{output['ename']}: {output['evalue']} (cell {index})"
    except Exception:  # noqa: BLE001 - no notebook, or an unreadable one: the log tells
        pass
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "failed without output"


def _finish(job: _Job, stopped: str) -> RunOutcome:
    """Record how the run ended (``stopped``: why the sweep ended it) and release its lock."""
    code, log, result = job.proc.wait(), job.run_dir / "papermill.log", job.run_dir / "result.json"
    if stopped:
        with open(log, "a") as handle:
            handle.write(f"\n{stopped}\n")
    error = stopped or ("" if code == 0 else _error_of(job.run_dir / "notebook.ipynb", log))
    try:
        if not error and read_json(result) is None:
            error = f"the notebook finished but wrote no {result}"
    except ValueError as err:
        error = str(err)
    state = "interrupted" if stopped else "failed" if error else "done"
    seconds = round(time.monotonic() - job.start, 1)
    cache.atomic_write_json(job.run_dir / "status.json", {"state": state, "finished": _now(), "error": error,
                                                          "seconds": seconds, "returncode": code, **job.who})
    job.lock.close()
    return RunOutcome(job.run_dir.name, state, error)


def plan(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Each run's state without running anything (``--dry-run``)."""
    folder = sweep_folder(spec, root)
    rows = [(run.name, *run_state(inside(folder, run.name), run.parameters)) for run in spec.runs]
    return pd.DataFrame(rows, columns=["run", "state", "why"])


def run_sweep(spec: SweepSpec, *, root: Path | None = None, devices: Sequence[str | None] | None = None,
              force: bool = False, retry_failed: bool = True, progress: bool = True,
              jobs: int = 1) -> list[RunOutcome]:
    """Run every unfinished run (one per device at a time, or ``jobs`` at once on a CPU; each once the runs
    in its ``after`` are done), then collect. A run another process runs is waited for, never started twice.
    SIGINT, SIGTERM or SIGHUP (in the main thread) end every running run and raise ``SweepInterrupted``."""
    notebook, devices, folder, _ = preflight(spec, root=root, devices=devices, force=force, jobs=jobs)
    cache.atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(
        {"name": spec.name, "notebook": str(spec.notebook), "requires": list(spec.requires),
         "runs": [{"name": r.name, "parameters": r.parameters, "after": list(r.after)} for r in spec.runs]},
        sort_keys=False))
    bar = tqdm(total=len(spec.runs), desc=spec.name, unit="run", disable=not progress)
    outcomes: dict[str, RunOutcome] = {}
    todo, running, free, said, stopped, previous = list(spec.runs), [], list(devices), set(), [], {}

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopped:  # os.write: print may not be re-entered from a signal handler
            os.write(2, f"\n{signal.Signals(signum).name}: stopping the running run(s)\n".encode())
        stopped.append(signum)

    def record(outcome: RunOutcome) -> None:
        outcomes[outcome.name] = outcome
        bar.update()
        bar.set_postfix_str(f"{outcome.name}: {outcome.state}")

    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while todo or running:
            halt = (f"interrupted: the sweep was stopped by {signal.Signals(stopped[0]).name}"
                    if stopped else "")
            if halt:  # start nothing more; each guard ends every process of its run
                for run in todo:
                    record(RunOutcome(run.name, "interrupted", f"not started: {halt}"))
                todo.clear()
                for job in running:
                    job.proc.terminate()  # nothing if it has ended
            for run in [] if stopped else [r for r in todo if set(r.after) <= outcomes.keys()]:
                n = 1 if None in devices else min(int(run.parameters.get("processes", 1)), len(devices))
                run_dir = inside(folder, run.name)
                if failed := sorted(a for a in run.after if outcomes[a].state not in ("done", "skipped")):
                    record(RunOutcome(run.name, "failed", f"not run: it waits for failed run(s) {failed}"))
                elif n <= len(free) and (claim := _claim(run_dir, said)):
                    state, why = run_state(run_dir, run.parameters, claimed=True)
                    if state == "done" or state == "failed" and not retry_failed:
                        claim[0].close()
                        record(RunOutcome(run.name, "skipped" if state == "done" else "failed", why))
                    else:
                        if state != "todo":
                            print(f"{spec.name}/{run.name}: {why}; running it again", file=sys.stderr)
                        running.append(_start(notebook, run_dir, run, claim, free[:n], devices))
                        del free[:n]
                else:
                    continue
                todo.remove(run)
            for job in [j for j in running if halt or j.proc.poll() is not None]:
                running.remove(job)
                free += job.held
                record(_finish(job, halt if job.proc.returncode is None else ""))
            time.sleep(0.2)
    finally:
        for job in running:  # the sweep failed: its runs end too
            job.proc.terminate()
            job.lock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        bar.close()
    ordered = [outcomes[run.name] for run in spec.runs]
    if stopped:
        raise SweepInterrupted(stopped[0], ordered)
    collect(spec, root=root)
    return ordered


# ----------------------------------------------------------------------------------------------- results
def collect(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Every run's result.json as one row (plus state and seconds) -> results.{csv,md}; the runs' points.csv
    -> ``frontier.report`` (for several seeds, the points only: ``scripts/seed_report.py --collect``)."""
    folder, rows, frames = sweep_folder(spec, root), [], []
    for run in spec.runs:
        state, why = run_state(run_dir := inside(folder, run.name), run.parameters)
        rows.append({"run": run.name, "state": state, "seconds": None, "error": why})
        with contextlib.suppress(ValueError):
            rows[-1]["seconds"] = (read_json(run_dir / "status.json") or {}).get("seconds")
        if state == "done":
            rows[-1].update(read_json(run_dir / "result.json") or {})
            if (run_dir / "points.csv").is_file():
                frames.append(pd.read_csv(run_dir / "points.csv"))
    table = pd.DataFrame(rows)
    first = [c for c in ("run", "state", "method", "hyperparameter") if c in table.columns]
    last = [c for c in ("seconds", "error", "run_path") if c in table.columns]
    table = table[first + [c for c in table.columns if c not in first + last] + last]
    cache.atomic_write_text(folder / "results.csv", table.to_csv(index=False))
    cache.atomic_write_text(folder / "results.md", table.to_markdown(index=False, floatfmt=".3f"))
    points = pd.concat(frames, ignore_index=True) if frames else None
    seeds = points is not None and points.get("seed", pd.Series([0])).nunique() > 1
    if points is not None and not seeds and {"method", "kl_mean", "reward_mean"} <= set(points.columns):
        from dpo_lab.frontier import report

        report(points, folder, spec.name, title=f"sweep {spec.name}: reward vs KL")
    elif points is not None:
        cache.atomic_write_text(folder / f"frontier_{spec.name}_points.csv", points.to_csv(index=False))
    return table


def summarize(outcomes: Sequence[RunOutcome]) -> str:
    """Counts, then one line per failed or interrupted run with its error."""
    n = {s: sum(o.state == s for o in outcomes) for s in ("done", "skipped", "failed", "interrupted")}
    lines = [f"{n['done']} run(s) done, {n['skipped']} already finished, {n['failed']} failed"
             + (f", {n['interrupted']} interrupted" if n["interrupted"] else "")]
    return "\n".join(lines + [f"  {o.state.upper()} {o.name}: {o.error}" for o in outcomes
                              if o.state in ("failed", "interrupted")])
