"""The sweep runner: specs, parameter checks, skipping finished runs, failure isolation, kill and resume."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from dpo_lab.__main__ import main
from dpo_lab.cache import file_lock, pid_alive
from dpo_lab.presets import project_root
from dpo_lab.scale import sweep

# A toy run notebook: records each execution, can fail on request, and can be held at a gate file so a
# test can kill the sweep while it is inside a run; it can start a child of its own (as torchrun does).
TOY_PARAMETERS = '''x: float = 1.0  # the value this run computes with
fail: bool = False  # raise instead of finishing
gate: str = ""  # while this file exists the run waits
spawn: bool = False  # start a child process in a session of its own that sleeps (like a torchrun worker)
extra: dict = {}  # any mapping (as the frontier notebook's overrides), copied into the result
run_dir: str = ""  # the folder the sweep runner gives this run'''
TOY_BODY = '''import json, os, subprocess, sys, time
from pathlib import Path
out = Path(run_dir)
if spawn:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    (out / "child.pid").write_text(str(child.pid))
(out / "kernel.pid").write_text(str(os.getpid()))
with open(out / "executions.log", "a") as log:
    log.write(f"started {time.time()}\\n")
deadline = time.time() + 120  # a test that goes wrong fails instead of hanging
while gate and Path(gate).exists() and time.time() < deadline:
    time.sleep(0.1)
if fail:
    raise RuntimeError(f"boom at x={x}")
(out / "result.json").write_text(json.dumps({"x": x, "y": 2 * x, "end": time.time(), "extra": extra,
                                             "device": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                                             "threads": os.environ.get("OMP_NUM_THREADS", "")}))'''


@pytest.fixture()
def toy_notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(TOY_PARAMETERS, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(TOY_BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "toy.ipynb"
    nbformat.write(nb, path)
    return path


def toy_spec(notebook: Path, tmp_path: Path, after: dict[str, list[str]] | None = None,
             **run_params: dict) -> Path:
    spec = {"name": "toy", "notebook": str(notebook),
            "runs": [{"name": name, "parameters": params, "after": (after or {}).get(name, [])}
                     for name, params in run_params.items()]}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def executions(root: Path, run: str) -> int:
    log = root / "toy" / run / "executions.log"
    return len(log.read_text().splitlines()) if log.is_file() else 0


# ------------------------------------------------------------------------------------------------ specs
def test_grid_and_runs_expand_with_shared_parameters() -> None:
    spec = sweep.spec_from_dict({"name": "s", "notebook": "nb.ipynb", "parameters": {"x": 1.0, "fail": False},
                                 "runs": [{"name": "base", "parameters": {"x": 3.0}}],
                                 "grid": {"x": [0.5, 2.0], "gate": ["a"]}})
    assert [r.name for r in spec.runs] == ["base", "x0.5-gatea", "x2-gatea"]
    assert spec.runs[0].parameters == {"x": 3.0, "fail": False}
    assert spec.runs[2].parameters == {"x": 2.0, "fail": False, "gate": "a"}


@pytest.mark.parametrize("data, message", [
    ({"notebook": "nb.ipynb", "grid": {"x": [1]}}, "missing required key 'name'"),
    ({"name": "s", "notebook": "nb.ipynb"}, "no runs"),
    ({"name": "s", "notebook": "nb.ipynb", "grid": {"x": [1]}, "bogus": 1}, "unknown key"),
    ({"name": "s/t", "notebook": "nb.ipynb", "grid": {"x": [1]}}, "'name' must be"),
    ({"name": "s", "notebook": "nb.ipynb", "runs": [{"name": "a"}, {"name": "a"}]}, "duplicated run name"),
    ({"name": "s", "notebook": "nb.ipynb", "runs": [{"name": "a", "parameters": {"run_dir": "x"}}]},
     "the runner sets itself"),
    ({"name": "s", "notebook": "nb.ipynb", "grid": {"x": []}}, "non-empty lists"),
    ({"name": "s", "notebook": "nb.ipynb", "grid": {"x": [1]}, "requires": ["tpu"]}, "unknown requirement"),
    ({"name": "s", "notebook": "nb.ipynb", "runs": [{"name": "a", "after": ["b"]}]}, "unknown run"),
    ({"name": "s", "notebook": "nb.ipynb",
      "runs": [{"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}]}, "in a cycle"),
])
def test_bad_specs_are_named(data: dict, message: str) -> None:
    with pytest.raises(sweep.SweepError, match=message):
        sweep.spec_from_dict(data, source="spec.yaml")


def test_missing_spec_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(sweep.SweepError, match="not found"):
        sweep.load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(sweep.SweepError, match="not valid YAML"):
        sweep.load_spec(bad)


# ---------------------------------------------------------------------------------------- parameter checks
def test_unknown_parameter_and_wrong_type_are_errors(toy_notebook: Path) -> None:
    sweep.check_parameters(toy_notebook, {"x": 2, "fail": True, "gate": ""})  # an int is a fine float
    with pytest.raises(sweep.SweepError, match=r"unknown parameter\(s\) \['y'\].*declares"):
        sweep.check_parameters(toy_notebook, {"y": 1.0})
    with pytest.raises(sweep.SweepError, match="'x' .* expects float, got str"):
        sweep.check_parameters(toy_notebook, {"x": "big"})
    with pytest.raises(sweep.SweepError, match="write 1.0e-6"):
        sweep.check_parameters(toy_notebook, {"x": "1e-6"})
    with pytest.raises(sweep.SweepError, match="a number in quotes is a string"):
        sweep.check_parameters(toy_notebook, {"x": "0.5"})
    with pytest.raises(sweep.SweepError, match="'fail' .* expects bool, got int"):
        sweep.check_parameters(toy_notebook, {"fail": 1})


def test_typed_lists_and_dicts_are_checked() -> None:
    assert sweep._matches("list[float]", [1, 2.5]) and not sweep._matches("list[float]", [1, "a"])
    assert sweep._matches("dict", {"dpo.lr": 1e-5}) and not sweep._matches("dict", [1])
    assert not sweep._matches("int", True) and sweep._matches("None", object())


def test_every_notebook_documents_its_parameters() -> None:
    """``papermill --help-notebook`` lists each parameter with a type and a help text."""
    notebooks = sorted((project_root() / "notebooks").rglob("*.ipynb"))
    assert len(notebooks) >= 8
    for notebook in notebooks:
        if ".ipynb_checkpoints" in notebook.parts:
            continue
        params = sweep.notebook_parameters(notebook)
        assert params, f"{notebook.name} has no parameters cell"
        # papermill silently skips a line it cannot parse (e.g. a comment holding "="): compare with Python's.
        cell = next(c for c in nbformat.read(notebook, as_version=4).cells
                    if "parameters" in c.metadata.get("tags", []))
        assigned = [n.target.id for n in ast.parse(cell.source).body if isinstance(n, ast.AnnAssign)]
        assert list(params) == assigned, f"{notebook.name}: papermill sees {list(params)}, not {assigned}"
        for name, info in params.items():
            assert info["help"].strip(), f"{notebook.name}: parameter {name!r} has no help comment"
            assert info["inferred_type_name"] != "None", f"{notebook.name}: parameter {name!r} has no type"
    shown = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook",
                            str(project_root() / "notebooks/templates/frontier_run.ipynb")],
                           capture_output=True, text=True, check=True).stdout
    for name in ("preset", "overrides", "method", "value", "run_dir"):
        assert f"{name}:" in shown
    assert "Unable to parse" not in shown


def test_preset_sweep_matches_the_frontier_notebook() -> None:
    spec = sweep.preset_spec("smoke", {"dpo.betas": [0.1, 0.5]}, ["DPO", "PPO"])
    assert [r.name for r in spec.runs] == ["dpo-beta0.1", "dpo-beta0.5", "ppo-target_kl1", "ppo-target_kl4"]
    assert spec.name.startswith("imdb-smoke-") and not spec.requires
    sweep.validate_spec(spec)
    assert sweep.preset_spec("paper").requires == ("gpu", "hub")
    with pytest.raises(TypeError, match="dpo.lr"):
        sweep.preset_spec("smoke", {"dpo.lr": "fast"})


def test_requirements_refuse_without_force(toy_notebook: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = sweep.spec_from_dict({"name": "needs", "notebook": str(toy_notebook), "requires": ["gpu", "hub"],
                                 "grid": {"x": [1.0]}})
    with pytest.raises(sweep.SweepError, match=r"lacks \['gpu', 'hub'\].*--force"):
        sweep.run_sweep(spec, root=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "needs").exists()


# ---------------------------------------------------------------------------------- running and resuming
def test_failure_is_isolated_and_reported(toy_notebook: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs"
    spec = toy_spec(toy_notebook, tmp_path, a={"x": 1.0}, b={"x": 2.0, "fail": True}, c={"x": 3.0})
    code = main(["sweep", str(spec), "--runs-dir", str(root)])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 run(s) done, 0 already finished, 1 failed" in out
    assert "FAILED b: RuntimeError: boom at x=2.0" in out
    table = pd.read_csv(root / "toy" / "results.csv")
    assert table.run.tolist() == ["a", "b", "c"]
    assert table.state.tolist() == ["done", "failed", "done"]
    assert table.y.tolist()[0] == 2.0 and table.y.tolist()[2] == 6.0
    status = json.loads((root / "toy" / "b" / "status.json").read_text())
    assert status["state"] == "failed" and "boom" in status["error"]

    # Rerunning skips what finished; a failed run is retried unless --skip-failed.
    assert main(["sweep", str(spec), "--runs-dir", str(root), "--skip-failed"]) == 1
    assert [executions(root, r) for r in "abc"] == [1, 1, 1]
    assert main(["sweep", str(spec), "--runs-dir", str(root)]) == 1
    assert [executions(root, r) for r in "abc"] == [1, 2, 1]


def test_unknown_parameter_stops_the_sweep_before_any_run(toy_notebook: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs"
    spec = toy_spec(toy_notebook, tmp_path, a={"x": 1.0}, b={"xx": 2.0})
    assert main(["sweep", str(spec), "--runs-dir", str(root)]) == 2
    assert "run 'b': unknown parameter(s) ['xx']" in capsys.readouterr().err
    assert executions(root, "a") == 0


def test_corrupt_or_changed_runs_are_detected_and_rerun(toy_notebook: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    spec = sweep.load_spec(toy_spec(toy_notebook, tmp_path, a={"x": 1.0}, b={"x": 2.0}))
    assert [o.state for o in sweep.run_sweep(spec, root=root, progress=False)] == ["done", "done"]
    assert [o.state for o in sweep.run_sweep(spec, root=root, progress=False)] == ["skipped", "skipped"]
    result = root / "toy" / "a" / "result.json"
    result.write_text(result.read_text()[:5])  # truncated, as by a full disk
    state, why = sweep.run_state(result.parent, spec.runs[0].parameters)
    assert state == "corrupt" and "result.json is truncated or corrupt" in why
    changed = sweep.spec_from_dict({"name": "toy", "notebook": str(toy_notebook),
                                    "runs": [{"name": "a", "parameters": {"x": 1.0}},
                                             {"name": "b", "parameters": {"x": 5.0}}]})
    assert sweep.plan(changed, root).state.tolist() == ["corrupt", "changed"]
    assert [o.state for o in sweep.run_sweep(changed, root=root, progress=False)] == ["done", "done"]
    assert [executions(root, r) for r in "ab"] == [2, 2]
    assert pd.read_csv(root / "toy" / "results.csv").y.tolist() == [2.0, 10.0]


def test_killed_sweep_finishes_on_rerun_without_lost_or_duplicated_results(toy_notebook: Path,
                                                                          tmp_path: Path) -> None:
    root, gate = tmp_path / "runs", tmp_path / "gate"
    gate.write_text("hold")
    spec = toy_spec(toy_notebook, tmp_path, a={"x": 1.0}, b={"x": 2.0, "gate": str(gate)},
                    c={"x": 3.0})
    cmd = [sys.executable, "-m", "dpo_lab", "sweep", str(spec), "--runs-dir", str(root)]
    proc = subprocess.Popen(cmd, cwd=project_root(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = root / "toy" / "b" / "kernel.pid"
    deadline = time.monotonic() + 120
    while not pid_file.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert pid_file.is_file(), "run b never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and papermill die mid-run, like a lost machine...
    proc.wait()
    try:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # ...and so does the kernel
    except ProcessLookupError:
        pass
    assert json.loads((root / "toy" / "b" / "status.json").read_text())["state"] == "running"
    assert not (root / "toy" / "c").exists()
    gate.unlink()

    outcomes = sweep.run_sweep(sweep.load_spec(spec), root=root, progress=False)
    assert [(o.name, o.state) for o in outcomes] == [("a", "skipped"), ("b", "done"), ("c", "done")]
    assert [executions(root, r) for r in "abc"] == [1, 2, 1]  # only the interrupted run ran again
    table = pd.read_csv(root / "toy" / "results.csv")
    assert table.run.tolist() == ["a", "b", "c"] and table.state.eq("done").all()
    assert table.y.tolist() == [2.0, 4.0, 6.0]


@pytest.mark.parametrize("where", ["two GPUs", "a CPU with --jobs 2"])
def test_two_runs_run_at_once_each_with_its_own_device_or_cores(toy_notebook: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 where: str) -> None:
    """With two (pretend) GPUs, two runs execute at the same time, each seeing only its own device; on a
    CPU, ``jobs=2`` runs two at a time, each with half the cores as its threads."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, even on a GPU one
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 4)
    root, gate = tmp_path / "runs", tmp_path / "gate"
    spec = sweep.load_spec(toy_spec(toy_notebook, tmp_path, a={"x": 1.0, "gate": str(gate)},
                                    b={"x": 2.0, "gate": str(gate)}))
    gate.write_text("hold")
    both_started = threading.Event()

    def release_when_both_started() -> None:  # each run waits at the gate until the other has started
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if executions(root, "a") + executions(root, "b") == 2:
                both_started.set()
                break
            time.sleep(0.1)
        gate.unlink()  # one at a time would never get both in: let the sweep finish and fail below

    opener = threading.Thread(target=release_when_both_started)
    opener.start()
    placement = {"devices": ["0", "1"]} if where == "two GPUs" else {"jobs": 2}
    outcomes = sweep.run_sweep(spec, root=root, progress=False, **placement)
    opener.join()
    assert both_started.is_set(), f"the two runs did not run at the same time on {where}"
    assert [o.state for o in outcomes] == ["done", "done"]
    table = pd.read_csv(root / "toy" / "results.csv", dtype={"threads": str, "device": str})
    if where == "two GPUs":
        assert sorted(table.device) == ["0", "1"] and table.threads.isna().all()
    else:  # 4 cores / 2 jobs; no GPU
        assert table.threads.tolist() == ["2", "2"] and table.device.isna().all()
        with pytest.raises(sweep.SweepError, match="jobs must be a whole number"):
            sweep.run_sweep(spec, root=root, jobs=0, progress=False)


def test_runs_wait_for_the_runs_they_read(toy_notebook: Path, tmp_path: Path) -> None:
    """``after`` holds a run back until its inputs exist, even with a free device; ``{sweep_dir}`` names them;
    a run whose input failed is not started."""
    root = tmp_path / "runs"
    spec = toy_spec(toy_notebook, tmp_path, after={"b": ["a"], "d": ["c"]},
                    b={"x": 2.0, "gate": "{sweep_dir}/a/no-gate"}, a={"x": 1.0},
                    c={"x": 3.0, "fail": True}, d={"x": 4.0})
    outcomes = sweep.run_sweep(sweep.load_spec(spec), root=root, devices=["0", "1"], progress=False)
    assert [(o.name, o.state) for o in outcomes] == [("b", "done"), ("a", "done"), ("c", "failed"),
                                                      ("d", "failed")]
    assert "waits for failed run(s) ['c']" in outcomes[3].error and executions(root, "d") == 0
    started = {r: float((root / "toy" / r / "executions.log").read_text().split()[1]) for r in "ab"}
    ended_a = json.loads((root / "toy" / "a" / "result.json").read_text())["end"]
    assert started["b"] > ended_a  # b started after a had finished
    parameters = yaml.safe_load((root / "toy" / "b" / "parameters.yaml").read_text())
    assert parameters["gate"] == str((root / "toy").resolve() / "a" / "no-gate")
    assert sweep.plan(sweep.load_spec(spec), root).state.tolist() == ["done", "done", "failed", "todo"]


# ------------------------------------------------------------------------------------------ folder names
def test_safe_component_keeps_simple_names_and_slugs_the_rest() -> None:
    assert [sweep.safe_component(t) for t in ("x0.5-seed1", "dpo-beta0.1", "a_B-9")] == \
        ["x0.5-seed1", "dpo-beta0.1", "a_B-9"]
    odd = ["a/b", "../../x", "..", ".", "", "{}", "{x}", ".hidden", "a b", "é", "x" * 300, "a\\b", "{'k': 1}"]
    names = [sweep.safe_component(t) for t in odd]
    assert len(set(names)) == len(odd)  # the hash keeps different values apart
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name) and len(name) <= 96, name
        assert sweep.safe_component(name) == name  # a made name is itself simple
    assert sweep.safe_component("data/fixtures/hh_rlhf").startswith("data_fixtures_hh_rlhf-")


def test_a_run_folder_must_resolve_inside_its_sweep(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    assert sweep.inside(folder, "run") == folder / "run"
    for name in ("..", "../x", "a/b", "{}", ""):
        with pytest.raises(sweep.SweepError, match="not a safe folder name"):
            sweep.inside(folder, name)
    (folder / "link").symlink_to(tmp_path)  # a run folder that points elsewhere
    with pytest.raises(sweep.SweepError, match="outside"):
        sweep.inside(folder, "link")


@pytest.mark.parametrize("name", ["a{b}", "..", "a/../b", "x" * 97, ".hidden"])
def test_explicit_run_and_sweep_names_must_be_safe(name: str) -> None:
    with pytest.raises(sweep.SweepError, match="runs\\[0\\].name must be"):
        sweep.spec_from_dict({"name": "s", "notebook": "nb.ipynb", "runs": [{"name": name}]}, source="s.yaml")
    with pytest.raises(sweep.SweepError, match="'name' must be"):
        sweep.spec_from_dict({"name": name, "notebook": "nb.ipynb", "grid": {"x": [1]}}, source="spec.yaml")


@pytest.mark.parametrize("data, message", [
    ({"name": "s", "notebook": 3, "grid": {"x": [1]}}, "'notebook' must be a path"),
    ({"name": "s", "notebook": "nb.ipynb", "parameters": [1], "grid": {"x": [1]}}, "'parameters' must map"),
    ({"name": "s", "notebook": "nb.ipynb", "runs": {"a": 1}}, "'runs' must be a list"),
    ({"name": "s", "notebook": "nb.ipynb", "runs": [{"name": "a", "parameters": "x=1"}]},
     r"runs\[0\].parameters must map"),
    ({"name": "s", "notebook": "nb.ipynb", "grid": {"x": [1]}, "requires": "gpu"}, "'requires' must be"),
])
def test_malformed_specs_are_named_not_tracebacks(data: dict, message: str) -> None:
    with pytest.raises(sweep.SweepError, match=message):
        sweep.spec_from_dict(data, source="spec.yaml")


def test_grid_values_with_slash_dotdot_and_braces_stay_inside_and_run_once(toy_notebook: Path,
                                                                           tmp_path: Path) -> None:
    """A grid value with '/' re-ran a finished run 7 times, '..' wrote outside runs/, and a '{}' in a run
    folder (or anywhere in a path papermill sees) failed every run: each gets its own safe folder now."""
    nb_dir = tmp_path / "note{books}"
    nb_dir.mkdir()
    notebook = nb_dir / "toy{}.ipynb"
    notebook.write_bytes(toy_notebook.read_bytes())
    root = tmp_path / "ru{n}s"
    gates = ["no/such/dir", "../../../outside", "{}", "{x}"]
    spec_path = tmp_path / "odd.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "toy", "notebook": str(notebook),
                                         "grid": {"gate": gates, "extra": [{"dpo.lr": 1.0e-5}]}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    spec = sweep.load_spec(spec_path)
    assert len({r.name for r in spec.runs}) == 4
    assert main(["sweep", str(spec_path), "--runs-dir", str(root), "--dry-run"]) == 0
    outcomes = sweep.run_sweep(spec, root=root, progress=False)
    assert [o.state for o in outcomes] == ["done"] * 4, outcomes
    folder = root / "toy"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(r.name for r in spec.runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "ru{n}s"])  # nothing outside
    for run, gate in zip(spec.runs, gates, strict=True):
        assert yaml.safe_load((folder / run.name / "parameters.yaml").read_text())["gate"] == gate
        assert json.loads((folder / run.name / "result.json").read_text())["extra"] == {"dpo.lr": 1e-5}
    again = sweep.run_sweep(spec, root=root, progress=False)  # finished runs are not run again
    assert [o.state for o in again] == ["skipped"] * 4
    assert [executions(root, r.name) for r in spec.runs] == [1] * 4
    assert pd.read_csv(folder / "results.csv").state.eq("done").all()


def test_gridding_over_the_frontier_notebooks_overrides_passes_the_dry_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "overrides.yaml"
    spec.write_text(yaml.safe_dump({"name": "ov", "notebook": str(sweep.FRONTIER_NOTEBOOK),
                                    "parameters": {"preset": "smoke"},
                                    "grid": {"overrides": [{"dpo.lr": 1.0e-5}, {"dpo.betas": [0.1]}]}}))
    assert main(["sweep", str(spec), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    names = [r.name for r in sweep.load_spec(spec).runs]
    assert all(name in out for name in names) and not any("{" in name for name in names)


# ------------------------------------------------------------------------------------- the dry run
def test_dry_run_refuses_what_a_real_run_would(toy_notebook: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def dry(data: dict, *extra: str) -> int:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({"notebook": str(toy_notebook), **data}))
        return main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--dry-run", *extra])

    assert dry({"name": "ok", "grid": {"x": [1.0]}}) == 0
    assert dry({"name": "ok", "runs": [{"name": "a{b}"}]}) == 2
    assert "runs[0].name must be" in capsys.readouterr().err
    assert dry({"name": "ok", "grid": {"xx": [1.0]}}) == 2
    assert "unknown parameter(s) ['xx']" in capsys.readouterr().err
    (tmp_path / "runs").write_text("a file, not a folder")
    assert dry({"name": "ok", "grid": {"x": [1.0]}}) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "runs").unlink()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dry({"name": "ok", "grid": {"x": [1.0]}, "requires": ["gpu"]}) == 2
    assert "a real run here would refuse" in capsys.readouterr().err
    assert dry({"name": "ok", "grid": {"x": [1.0]}, "requires": ["gpu"]}, "--force") == 0


def test_processes_are_checked_against_the_devices_before_any_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    spec = {"name": "p", "notebook": str(sweep.FRONTIER_NOTEBOOK),
            "runs": [{"name": "a", "parameters": {"preset": "smoke", "processes": 3}}]}
    with pytest.raises(sweep.SweepError, match="processes 3 needs 3 GPUs"):
        sweep.validate_spec(sweep.spec_from_dict(spec), devices=["0", "1"])
    sweep.validate_spec(sweep.spec_from_dict(spec), devices=[None])  # on a CPU: gloo processes
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path), "--devices", "0,1", "--dry-run"]) == 2
    assert "processes 3 needs 3 GPUs" in capsys.readouterr().err
    spec["runs"][0]["parameters"]["processes"] = 0
    with pytest.raises(sweep.SweepError, match="processes must be a whole number >= 1"):
        sweep.validate_spec(sweep.spec_from_dict(spec))


# --------------------------------------------------------------------------- stopping and killing a sweep
def start_held_sweep(toy_notebook: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path, dict[str, int]]:
    """A sweep (a CLI process) whose run a waits at a gate after starting a child of its own; b waits for a.
    Returns the process, the runs folder and the pids of run a's guard, kernel and child."""
    root, gate = tmp_path / "runs", tmp_path / "gate"
    gate.write_text("hold")
    spec = toy_spec(toy_notebook, tmp_path, a={"x": 1.0, "gate": str(gate), "spawn": True}, b={"x": 2.0})
    proc = subprocess.Popen([sys.executable, "-m", "dpo_lab", "sweep", str(spec), "--runs-dir", str(root)],
                            cwd=project_root(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run = root / "toy" / "a"
    deadline = time.monotonic() + 120
    while not (run / "kernel.pid").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "kernel.pid").is_file(), f"run a never started: {proc.stderr.read() if proc.poll() else ''}"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "running" and status["host"] == socket.gethostname()
    pids = {"guard": status["pid"], "kernel": int((run / "kernel.pid").read_text()),
            "child": int((run / "child.pid").read_text())}
    assert all(pid_alive(pid) for pid in pids.values()), pids
    return proc, root, pids


def wait_dead(pids: dict[str, int], seconds: float) -> dict[str, int]:
    """The pids still alive after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids.values()):
        time.sleep(0.1)
    return {k: p for k, p in pids.items() if pid_alive(p)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_sweep_stops_every_process_of_its_runs(toy_notebook: Path, tmp_path: Path,
                                                         signum: int) -> None:
    """SIGTERM/SIGINT reach the sweep only (its runs live in sessions of their own); it ends each running
    run's whole process tree, marks the run interrupted, starts nothing more and exits 128 + signal."""
    proc, root, pids = start_held_sweep(toy_notebook, tmp_path)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert wait_dead(pids, 5) == {}
    status = json.loads((root / "toy" / "a" / "status.json").read_text())
    assert status["state"] == "interrupted" and signal.Signals(signum).name in status["error"]
    assert "INTERRUPTED a" in err and not (root / "toy" / "b").exists()
    spec = sweep.load_spec(tmp_path / "toy.yaml")
    assert sweep.plan(spec, root).state.tolist() == ["interrupted", "todo"]  # runs again, even --skip-failed


def test_kill_9_of_a_sweep_leaves_no_process_of_its_run(toy_notebook: Path, tmp_path: Path) -> None:
    """SIGKILL of the sweep alone: the run's guard sees its parent die and ends papermill, the kernel (in a
    session of its own) and the kernel's own child; a rerun then runs the run again and finishes."""
    proc, root, pids = start_held_sweep(toy_notebook, tmp_path)
    proc.kill()
    proc.wait()
    assert wait_dead(pids, 10) == {}
    run = root / "toy" / "a"
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # nobody could record it
    spec = sweep.load_spec(tmp_path / "toy.yaml")
    state, why = sweep.run_state(run, spec.runs[0].parameters)
    assert state == "interrupted" and "is gone" in why
    (tmp_path / "gate").unlink()
    outcomes = sweep.run_sweep(spec, root=root, progress=False)
    assert [(o.name, o.state) for o in outcomes] == [("a", "done"), ("b", "done")]
    assert [executions(root, r) for r in "ab"] == [2, 1]
    assert not pid_alive(int((run / "child.pid").read_text()))  # the rerun's child ended with it too


def test_a_run_another_process_runs_is_waited_for_not_started_twice(toy_notebook: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs"
    spec = sweep.load_spec(toy_spec(toy_notebook, tmp_path, after={"b": ["a"]}, a={"x": 1.0}, b={"x": 2.0}))
    run = root / "toy" / "a"
    key = sweep.parameters_key(spec.runs[0].parameters)
    here = {"state": "running", "parameters_key": key, "host": socket.gethostname()}

    # A "running" status whose lock nobody holds was interrupted.
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({**here, "pid": 4242}))
    gone = f"interrupted: its process (pid 4242 on {here['host']}) is gone"
    assert sweep.run_state(run, spec.runs[0].parameters) == ("interrupted", gone)
    # With the lock held (another sweep's run), the lock decides, and the run is not started again.
    with file_lock(run / sweep.LOCK_NAME, run):
        assert sweep.holder(run).startswith(f"pid {os.getpid()} on host ")
        (run / "status.json").write_text(json.dumps({**here, "pid": os.getpid()}))
        assert sweep.plan(spec, root).state.tolist() == ["running", "todo"]
        outcomes: list = []
        sweeper = threading.Thread(
            target=lambda: outcomes.extend(sweep.run_sweep(spec, root=root, progress=False)))
        sweeper.start()
        time.sleep(3)
        # the sweep waits for a
        assert sweeper.is_alive() and executions(root, "a") == 0 and executions(root, "b") == 0
        (run / "result.json").write_text(json.dumps({"x": 1.0, "y": 2.0}))  # the other process finishes a
        (run / "status.json").write_text(json.dumps({**here, "state": "done", "pid": os.getpid()}))
    sweeper.join(timeout=120)
    assert [(o.name, o.state) for o in outcomes] == [("a", "skipped"), ("b", "done")]
    assert executions(root, "a") == 0 and executions(root, "b") == 1
    assert "toy/a: running elsewhere (pid" in capsys.readouterr().err


def test_a_sweep_over_several_seeds_collects_its_points_for_the_seed_script(tmp_path: Path) -> None:
    """Points of several seeds are written as they are (scripts/seed_report.py --collect reads them), not
    drawn as one frontier that would mix the seeds."""
    spec = sweep.preset_spec("smoke", {"dpo.betas": [0.1]}, ["DPO"])
    for seed, run in enumerate([spec.runs[0], dataclasses.replace(spec.runs[0], name="dpo-beta0.1-seed1")]):
        folder = tmp_path / spec.name / run.name
        folder.mkdir(parents=True)
        status = {"state": "done", "parameters_key": sweep.parameters_key(run.parameters)}
        (folder / "status.json").write_text(json.dumps(status))
        (folder / "result.json").write_text(json.dumps({"method": "DPO"}))
        pd.DataFrame({"method": "DPO", "hyperparameter": "beta=0.1", "seed": seed, "step": [0, 6],
                      "kl_mean": [0.0, 1.0], "reward_mean": [0.5, 0.7]}).to_csv(folder / "points.csv")
    spec = dataclasses.replace(spec, runs=(*spec.runs, run))
    sweep.collect(spec, root=tmp_path)
    points = pd.read_csv(tmp_path / spec.name / f"frontier_{spec.name}_points.csv")
    assert sorted(set(points.seed)) == [0, 1] and len(points) == 4
    assert not (tmp_path / spec.name / f"frontier_{spec.name}.png").exists()


# ---------------------------------------------------------------------------------- the real notebook
def test_frontier_sweep_runs_the_real_notebook_at_smoke(tmp_path: Path) -> None:
    spec = sweep.preset_spec("smoke", {"dpo.betas": [0.1]}, ["DPO"])
    outcomes = sweep.run_sweep(spec, root=tmp_path, progress=False)
    assert [o.state for o in outcomes] == ["done"], outcomes
    folder = tmp_path / spec.name
    table = pd.read_csv(folder / "results.csv")
    assert table.method.tolist() == ["DPO"] and table.steps.tolist() == [12]
    points = pd.read_csv(folder / f"frontier_{spec.name}_points.csv")
    assert points.step.tolist() == [0, 6, 12] and points.kl_mean.iloc[0] == 0.0
    run = folder / "dpo-beta0.1"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(13))  # no step lost or repeated
    assert (folder / f"frontier_{spec.name}.png").stat().st_size > 0 and (run / "notebook.ipynb").is_file()


@pytest.mark.slow
def test_a_sweep_run_trains_on_two_processes(tmp_path: Path) -> None:
    """``processes: 2``: the run's notebook trains DPO on two gloo processes (torchrun) into the pipeline's
    own run folder, then reads the finished run back: one metrics line per step, log 2 at step 1."""
    base = sweep.preset_spec("smoke", {"dpo.betas": [0.3], "dpo.max_steps": 4}, ["DPO"])
    run = dataclasses.replace(base.runs[0], parameters={**base.runs[0].parameters, "processes": 2})
    spec = dataclasses.replace(base, name="two-processes", runs=(run,))
    outcomes = sweep.run_sweep(spec, root=tmp_path, progress=False)
    assert [o.state for o in outcomes] == ["done"], outcomes
    folder = tmp_path / spec.name / run.name
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5))
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(sweep.SweepError, match="processes 3 needs 3 GPUs"):
        sweep.run_sweep(dataclasses.replace(spec, runs=(dataclasses.replace(
            run, parameters={**run.parameters, "processes": 3}),)), root=tmp_path, devices=["0", "1"])


def test_the_progress_bar_moves_as_each_run_ends(toy_notebook: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs at once on two CPU jobs: the quick one is counted while the slow one still runs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    counted: list[str] = []

    class Bar:
        def __init__(self, *args, **kwargs) -> None: ...
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...

        def set_postfix_str(self, text: str) -> None:
            counted.append(text.split(":")[0])

    class Process:  # the slow run ends only once the quick one is on the bar (or after 20 s)
        def __init__(self, slow: bool) -> None:
            self.slow, self.returncode, self.deadline = slow, None, time.monotonic() + 20

        def poll(self) -> int | None:
            if not self.slow or "quick" in counted or time.monotonic() > self.deadline:
                self.returncode = 0
            return self.returncode

        wait = poll

        def terminate(self) -> None: ...

    def start(notebook, run_dir, run, claim, held, devices):
        (run_dir / "result.json").write_text("{}")
        return sweep._Job(run_dir, Process(slow=run.name == "slow"), claim[0], held, {})

    monkeypatch.setattr(sweep, "tqdm", Bar)
    monkeypatch.setattr(sweep, "_start", start)
    monkeypatch.setattr(sweep, "collect", lambda *args, **kwargs: None)
    spec = sweep.load_spec(toy_spec(toy_notebook, tmp_path, quick={"x": 1.0}, slow={"x": 2.0}))
    began = time.monotonic()
    outcomes = sweep.run_sweep(spec, root=tmp_path / "runs", progress=True, jobs=2)
    assert [o.state for o in outcomes] == ["done", "done"] and counted == ["quick", "slow"]
    assert time.monotonic() - began < 15, "the quick run was not counted while the slow one ran"
