"""scripts/identity_check.py's cpu check compares a retrain with the cached run's own schedule."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("identity_check", ROOT / "scripts" / "identity_check.py")
identity_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(identity_check)


def _run(folder: Path, last_step: int, checkpoint: int) -> None:
    """A finished run's files as far as the check reads them: metrics lines 0..last_step, one checkpoint."""
    (folder / "checkpoints" / f"step-{checkpoint:06d}").mkdir(parents=True)
    (folder / "checkpoints" / f"step-{checkpoint:06d}" / "trainer_state.pt").write_bytes(b"")
    lines = [json.dumps({"step": s, "loss": 0.5, "cost/wall_s": float(s)}) for s in range(last_step + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_a_run_continued_in_place_is_compared_at_its_own_schedule(tmp_path: Path) -> None:
    # As in the cpu artifacts: the budget sweep continued DPO beta=0.1 to 563 steps in the frontier run's
    # folder, and the 250-step run the frontier reads lives in <run>-steps250.
    run = tmp_path / "training" / "dpo-beta0.1-abc"
    _run(run, 563, 563)
    _run(run.with_name(run.name + "-steps250"), 250, 250)
    old = identity_check.cached_metrics(tmp_path, Path("/scratch/training") / run.name, 250)
    assert old == run.with_name(run.name + "-steps250") / "metrics.jsonl"
    assert json.loads(old.read_text().splitlines()[-1])["step"] == 250


def test_a_run_not_continued_is_compared_in_its_own_folder(tmp_path: Path) -> None:
    run = tmp_path / "training" / "dpo-beta0.1-abc"
    _run(run, 250, 250)
    assert identity_check.cached_metrics(tmp_path, run, 250) == run / "metrics.jsonl"


def test_wall_clock_fields_are_left_out_of_the_comparison(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"
    for path, wall in ((first, 1.0), (second, 2.0)):
        path.parent.mkdir()
        path.write_text(json.dumps({"step": 1, "loss": 0.5, "cost/wall_s": wall, "time/eval": wall}) + "\n")
    assert identity_check.digest(first) == identity_check.digest(second)
    second.write_text(json.dumps({"step": 1, "loss": 0.25, "cost/wall_s": 2.0}) + "\n")
    assert identity_check.digest(first) != identity_check.digest(second)
