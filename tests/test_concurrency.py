"""Several processes on one artifacts folder: a run folder has one owner at a time (``run.Run``'s lock), and
results tables are built from finished runs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpo_lab import pipeline
from dpo_lab.loop import is_due
from dpo_lab.presets import get_preset, project_root
from dpo_lab.run import RunLockedError, read_metrics


def _evaluated_steps(max_steps: int, eval_every: int) -> list[int]:
    return [0, *(s for s in range(1, max_steps + 1) if is_due(s, eval_every, max_steps))]


def _expected_points(preset) -> int:
    """How many frontier points a complete smoke reproduction has: every evaluation of every run."""
    dpo_steps = _evaluated_steps(preset.dpo.max_steps, preset.dpo.eval_every)
    baseline_steps = _evaluated_steps(preset.baselines.max_steps or preset.dpo.max_steps,
                                      preset.dpo.eval_every)
    ppo_steps = _evaluated_steps(preset.ppo.max_steps, preset.ppo.eval_every)
    per_method = {"DPO": dpo_steps, "Unlikelihood": baseline_steps, "Preferred-FT": baseline_steps,
                  "PPO": ppo_steps, "PPO-GT": ppo_steps}
    return sum(len(per_method[m]) for m, _ in pipeline.frontier_runs(preset))


@pytest.mark.slow
def test_two_concurrent_reproductions_publish_identical_complete_tables(tmp_path: Path) -> None:
    """Issue 11, fault 1: two ``reproduce --preset smoke`` on one artifacts folder at once. Before run locks,
    one truncated a run's metrics.jsonl while the other appended to it, and a table came out with 18 of 25
    points and wrong final numbers, exit 0. Now the second process waits for each run and reuses it."""
    base = {**os.environ, "DPO_LAB_ARTIFACTS": str(tmp_path / "artifacts"), "DPO_LAB_PRESET": "smoke",
            "TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dpo_lab", "reproduce", "--preset", "smoke"]
    # The first names its folders on the command line (--out, --artifacts), the second in the environment.
    unused = str(tmp_path / "unused")
    runs = [(command + ["--out", str(tmp_path / "f1"), "--artifacts", str(tmp_path / "artifacts")],
             {**base, "DPO_LAB_ARTIFACTS": unused, "DPO_LAB_FIGURES": unused}),
            (command, {**base, "DPO_LAB_FIGURES": str(tmp_path / "f2")})]
    procs = [subprocess.Popen(argv, env=env, cwd=project_root(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for argv, env in runs]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]

    tables = [(tmp_path / f"f{i}" / "frontier_smoke_points.csv").read_text() for i in (1, 2)]
    assert tables[0] == tables[1]
    points = pd.read_csv(tmp_path / "f1" / "frontier_smoke_points.csv")
    preset = get_preset("smoke")
    assert len(points) == _expected_points(preset)
    assert not points.duplicated(["method", "hyperparameter", "step"]).any()
    for i in (1, 2):
        assert (tmp_path / f"f{i}" / "results_smoke.csv").read_text() == \
            (tmp_path / "f1" / "results_smoke.csv").read_text()
    results = sorted((tmp_path / "artifacts" / "training").glob("*/result.json"))
    assert len(results) == len(pipeline.frontier_runs(preset))
    for result in results:  # each step exactly once, in order
        steps = [r["step"] for r in read_metrics(result.parent / "metrics.jsonl")]
        assert steps == list(range(json.loads(result.read_text())["steps"] + 1)), result.parent.name
    assert not (tmp_path / "unused").exists()


def test_reproduce_exits_with_the_holder_named_when_the_lock_wait_runs_out(tmp_path, monkeypatch, capsys):
    from dpo_lab import reproduce
    from dpo_lab.__main__ import main

    calls = []

    def locked(preset, *, out_dir=None, **kw):
        calls.append(out_dir)
        raise RunLockedError("artifacts/training/x is in use by pid 7 on host h since 2024-01-01 00:00:00")

    monkeypatch.setattr(reproduce, "reproduce", locked)
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "out")]) == 1
    assert calls == [tmp_path / "out"]
    assert "error: artifacts/training/x is in use by pid 7 on host h" in capsys.readouterr().err
