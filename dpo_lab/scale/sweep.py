"""Sweeps: one notebook executed many times with different parameters (papermill), results in one table.

A sweep is a spec (YAML, or a preset's own frontier sweep) naming a notebook and its runs. Every run lives
in ``runs/<sweep>/<run>/``: ``parameters.yaml`` (what it was given), ``notebook.ipynb`` (the executed
notebook), ``papermill.log``, what the notebook writes (``result.json``, ``metrics.jsonl``, ``points.csv``)
and ``status.json`` (running / done / failed, with the error). Rerunning a sweep skips every finished run,
so a sweep killed midway is finished by starting it again; a failing run is recorded and the others go on.

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
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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

from dpo_lab.cache import atomic_write_json, atomic_write_text, content_hash, read_json_object
from dpo_lab.paths import project_root

RESERVED_PARAMETERS = ("run_dir",)  # the runner passes each run its own folder
REQUIREMENTS = ("gpu", "hub")
FRONTIER_NOTEBOOK = Path("notebooks/templates/frontier_run.ipynb")


class SweepError(ValueError):
    """A spec or a parameter that cannot run; the message names the problem."""


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
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in values.items())


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise SweepError(f"{what} must be a non-empty string without '/', '\\', spaces or a leading dot, "
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
    shared = dict(data.get("parameters") or {})
    requires = tuple(data.get("requires") or ())
    bad = [r for r in requires if r not in REQUIREMENTS]
    if bad:
        raise SweepError(f"{source}: unknown requirement(s) {bad}; choose from {list(REQUIREMENTS)}")
    runs: list[RunSpec] = []
    for i, entry in enumerate(data.get("runs") or ()):
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise SweepError(f"{source}: runs[{i}] needs a 'name' (and optional 'parameters')")
        after = entry.get("after") or []
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise SweepError(f"{source}: runs[{i}].after must be a list of run names")
        runs.append(RunSpec(_check_name(entry["name"], f"{source}: runs[{i}].name"),
                            {**shared, **dict(entry.get("parameters") or {})}, tuple(after)))
    grid = data.get("grid") or {}
    if not isinstance(grid, Mapping) or any(not isinstance(v, list) or not v for v in grid.values()):
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
        name = f"{method.lower()}-{pipeline.hyperparameter_name(method)}{value:g}"
        parameters = {"preset": preset, "overrides": overrides, "method": method, "value": value}
        runs.append(RunSpec(name, parameters))
    suffix = f"-{content_hash(overrides, length=8)}" if overrides else ""
    requires = ("gpu", "hub") if preset == "paper" else ()
    return SweepSpec(name=f"imdb-{preset}{suffix}", notebook=FRONTIER_NOTEBOOK, runs=tuple(runs),
                     requires=requires, description=f"IMDb reward-KL frontier, preset {preset!r}",
                     source=f"preset {preset!r}")


# -------------------------------------------------------------------------------------- parameter checks
def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The notebook's documented parameters (name -> inferred type, default, help), as papermill sees them."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise SweepError(f"notebook {str(notebook)!r} not found")
    return dict(papermill.inspect_notebook(str(notebook)))


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


def run_state(run_dir: Path, parameters: Mapping[str, Any]) -> tuple[str, str]:
    """("done" | "todo" | "failed" | "changed" | "corrupt", why) for one run folder."""
    try:
        status = read_json(run_dir / "status.json")
        result = read_json(run_dir / "result.json")
    except SweepError as err:
        return "corrupt", str(err)
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
    state: str  # done | failed | skipped
    seconds: float = 0.0
    error: str = ""


def execute_run(notebook: Path, run_dir: Path, parameters: Mapping[str, Any], *,
                env: Mapping[str, str] | None = None, kernel: str = "python3",
                timeout_s: float | None = None,
                key_parameters: Mapping[str, Any] | None = None) -> RunOutcome:
    """Execute one run's notebook with papermill in a child process and record its status
    (``key_parameters``: the spec's parameters, before ``{sweep_dir}`` was filled in)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = parameters_key(parameters if key_parameters is None else key_parameters)
    params = {**parameters, "run_dir": str(run_dir.resolve())}
    atomic_write_text(run_dir / "parameters.yaml", yaml.safe_dump(params, sort_keys=True))
    for stale in ("result.json",):  # a rerun must not collect the previous attempt's result
        (run_dir / stale).unlink(missing_ok=True)
    atomic_write_json(run_dir / "status.json", {"state": "running", "started": _now(), "parameters_key": key,
                                                "pid": os.getpid()})
    out_nb, log = run_dir / "notebook.ipynb", run_dir / "papermill.log"
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(out_nb),
           "-f", str(run_dir / "parameters.yaml"), "-k", kernel,
           "--cwd", str(project_root()), "--log-output", "--no-progress-bar"]
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -1
            handle.write(f"\nrun exceeded its {timeout_s} s limit\n")
    seconds = round(time.perf_counter() - start, 1)
    error = ""
    if code == 0:
        try:
            if read_json(run_dir / "result.json") is None:
                error = f"the notebook finished but wrote no {run_dir / 'result.json'}"
        except SweepError as err:
            error = str(err)
    else:
        error = _error_of(out_nb, log)
    state = "failed" if error else "done"
    atomic_write_json(run_dir / "status.json", {"state": state, "finished": _now(), "seconds": seconds,
                                                "parameters_key": key, "error": error, "returncode": code})
    return RunOutcome(run_dir.name, state, seconds, error)


# ----------------------------------------------------------------------------------------------- sweeps
def resolve_notebook(spec: SweepSpec) -> Path:
    path = spec.notebook if spec.notebook.is_absolute() else project_root() / spec.notebook
    if not path.is_file():
        raise SweepError(f"{spec.source}: notebook {str(spec.notebook)!r} not found")
    return path


def validate(spec: SweepSpec) -> Path:
    """Check every run's parameters against the notebook before anything runs; return the notebook."""
    notebook = resolve_notebook(spec)
    for run in spec.runs:
        check_parameters(notebook, run.parameters, where=f"{spec.source}, run {run.name!r}")
    return notebook


def plan(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Each run's state without running anything (``--dry-run``)."""
    folder = (root or runs_root()) / spec.name
    rows = [(run.name, *run_state(folder / run.name, run.parameters)) for run in spec.runs]
    return pd.DataFrame(rows, columns=["run", "state", "why"])


def default_devices() -> list[str | None]:
    """One worker per visible CUDA device; one (sequential) worker on a CPU."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(n)] if n > 1 else [None]


def run_sweep(spec: SweepSpec, *, root: Path | None = None, devices: Sequence[str | None] | None = None,
              force: bool = False, retry_failed: bool = True, progress: bool = True,
              timeout_s: float | None = None) -> list[RunOutcome]:
    """Run every unfinished run (several at once when several devices are given), then collect."""
    notebook = validate(spec)
    missing = check_requirements(spec.requires)
    if missing and not force:
        raise SweepError(f"{spec.source} requires {list(spec.requires)}; this machine lacks {missing} "
                         f"(pass force=True / --force to try anyway)")
    folder = (root or runs_root()) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(
        {"name": spec.name, "notebook": str(spec.notebook), "requires": list(spec.requires),
         "description": spec.description,
         "runs": [{"name": r.name, "parameters": r.parameters, "after": list(r.after)} for r in spec.runs]},
        sort_keys=False))
    outcomes: list[RunOutcome] = []
    todo = []
    for run in spec.runs:
        state, why = run_state(folder / run.name, run.parameters)
        if state == "done" or (state == "failed" and not retry_failed):
            outcomes.append(RunOutcome(run.name, "skipped" if state == "done" else "failed", error=why))
        else:
            if state in ("corrupt", "changed"):
                print(f"{spec.name}/{run.name}: {why}; running it again", file=sys.stderr)
            todo.append(run)
    devices = list(devices) if devices is not None else default_devices()
    for run in todo:
        wanted = run.parameters.get("processes", 1)
        if devices != [None] and isinstance(wanted, int) and wanted > len(devices):
            raise SweepError(f"{spec.source}, run {run.name!r}: processes {wanted} needs {wanted} GPUs; "
                             f"this sweep has {len(devices)} ({devices})")
    free: Queue[str | None] = Queue()
    for device in devices:
        free.put(device)

    taking = threading.Lock()

    def work(run: RunSpec) -> RunOutcome:
        # A run with ``processes: N`` trains on N GPUs at once (one on a CPU machine: gloo processes).
        wanted = min(int(run.parameters.get("processes", 1)), len(devices)) if devices != [None] else 1
        with taking:  # one run collects its devices at a time, so two runs never hold half each
            held = [free.get() for _ in range(wanted)]
        try:
            device = None if held == [None] else ",".join(str(d) for d in held)
            env = {} if device is None else {"CUDA_VISIBLE_DEVICES": device}
            parameters = {k: v.replace("{sweep_dir}", str(folder.resolve())) if isinstance(v, str) else v
                          for k, v in run.parameters.items()}
            return execute_run(notebook, folder / run.name, parameters, env=env, timeout_s=timeout_s,
                               key_parameters=run.parameters)
        finally:
            for d in held:
                free.put(d)

    bar = tqdm(total=len(spec.runs), initial=len(spec.runs) - len(todo), desc=spec.name, unit="run",
               disable=not progress)
    # Waves: each starts the runs whose ``after`` runs are finished, several at once when devices allow.
    ended = {o.name: o.state for o in outcomes}
    with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
        while todo:
            blocked = [r for r in todo if any(ended.get(a) == "failed" for a in r.after)]
            ready = [r for r in todo if r not in blocked and all(ended.get(a) in ("done", "skipped")
                                                                 for a in r.after)]
            wave = [RunOutcome(r.name, "failed", error=f"not run: it waits for failed run(s) "
                               f"{[a for a in r.after if ended.get(a) == 'failed']}") for r in blocked]
            wave += list(pool.map(work, ready))
            for outcome in wave:
                outcomes.append(outcome)
                ended[outcome.name] = outcome.state
                bar.update()
                bar.set_postfix_str(f"{outcome.name}: {outcome.state}")
            todo = [r for r in todo if r.name not in ended]
    bar.close()
    collect(spec, root=root)
    order = {r.name: i for i, r in enumerate(spec.runs)}
    return sorted(outcomes, key=lambda o: order[o.name])


# ----------------------------------------------------------------------------------------------- results
def collect(spec: SweepSpec, root: Path | None = None) -> pd.DataFrame:
    """Every run's result.json as one row (plus state and seconds) -> results.csv / results.md; every
    run's points.csv -> ``frontier.report``: frontier_<sweep>.png, frontier_<sweep>_points.csv and
    results_<sweep>.{csv,md}, as ``make reproduce`` writes them."""
    folder = (root or runs_root()) / spec.name
    rows, point_frames = [], []
    for run in spec.runs:
        run_dir = folder / run.name
        state, why = run_state(run_dir, run.parameters)
        status = read_json(run_dir / "status.json") if state != "corrupt" else None
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
            from dpo_lab.frontier import report  # the same figure and tables as make reproduce

            report(points, folder, spec.name, title=f"sweep {spec.name}: reward vs KL")
        else:
            atomic_write_text(folder / f"frontier_{spec.name}_points.csv", points.to_csv(index=False))
    return table


def summarize(outcomes: Sequence[RunOutcome]) -> str:
    """A short text summary: counts, then one line per failed run with its error."""
    counts = {s: sum(o.state == s for o in outcomes) for s in ("done", "skipped", "failed")}
    lines = [f"{counts['done']} run(s) done, {counts['skipped']} already finished, {counts['failed']} failed"]
    lines += [f"  FAILED {o.name}: {o.error}" for o in outcomes if o.state == "failed"]
    return "\n".join(lines)


__all__ = ["FRONTIER_NOTEBOOK", "RunOutcome", "RunSpec", "SweepError", "SweepSpec", "check_parameters",
           "check_requirements", "collect", "execute_run", "load_spec", "notebook_parameters", "plan",
           "preset_spec", "run_state", "run_sweep", "runs_root", "spec_from_dict", "summarize", "validate"]
