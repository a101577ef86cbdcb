"""scripts/seed_report.py: the README's seed-study numbers recomputed from the committed per-seed points."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
spec = importlib.util.spec_from_file_location("seed_report", ROOT / "scripts" / "seed_report.py")
seed_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_report)


def toy_points() -> pd.DataFrame:
    """Two seeds, DPO and PPO-GT, a start point and two trained points each."""
    rows = []
    for seed, lift in ((0, 0.0), (1, 0.1)):
        for method, path in (("DPO", [(0, 0.5), (2, 0.7), (9, 0.8)]),
                             ("PPO-GT", [(0, 0.5), (3, 0.6), (8, 0.9)])):
            for step, (kl, reward) in enumerate(path):
                rows.append({"method": method, "hyperparameter": "x", "seed": seed, "step": step * 50,
                             "kl_mean": kl, "reward_mean": reward + lift * (step > 0), "reward_se": 0.01,
                             "audit_sentiment_mean": reward, "audit_sentiment_se": 0.01})
    return pd.DataFrame(rows)


def test_envelopes_and_paired_gaps_on_a_toy_study():
    per_seed = seed_report.per_seed_envelopes(toy_points(), budgets=(2.0, 8.0))
    table = seed_report.envelope_table(per_seed).set_index(["method", "score", "kl_budget"])
    assert table.loc[("DPO", "reward", 2.0), "mean"] == pytest.approx(0.75)  # 0.7 and 0.8
    assert table.loc[("PPO-GT", "reward", 2.0), "mean"] == pytest.approx(0.5)  # only the start fits
    half = 12.706204736 * np.std([0.7, 0.8], ddof=1) / np.sqrt(2)  # t(0.975, df=1)
    assert table.loc[("DPO", "reward", 2.0), "ci95_high"] == pytest.approx(0.75 + half)
    assert table.loc[("DPO", "reward", 2.0), "df"] == 1
    gaps = seed_report.gap_table(per_seed).set_index(["gap", "score", "kl_budget"])
    assert gaps.loc[("PPO-GT - DPO", "reward", 8.0), "mean"] == pytest.approx(0.2)  # 0.9-0.7, 1.0-0.8
    assert gaps.loc[("PPO-GT - DPO", "reward", 8.0), "ci95_low"] == pytest.approx(0.2)  # no spread
    dominance = seed_report.dominance_table(toy_points())
    total = dominance[(dominance.seed == "all") & (dominance.score == "reward")].iloc[0]
    # per seed: DPO's (2, 0.7) beats PPO-GT's (3, 0.6), PPO-GT's (8, 0.9) beats DPO's (9, 0.8)
    assert (total.dpo_beats, total.series_points, total.series_beats, total.dpo_points) == (2, 4, 2, 4)


def test_a_seed_with_part_of_its_runs_is_left_out():
    points = toy_points()
    partial = points[(points.seed == 1) & (points.method == "DPO")]
    kept = seed_report.complete_seeds(pd.concat([points[points.seed == 0], partial]))
    assert set(kept.seed) == {0}
    assert set(seed_report.complete_seeds(points).seed) == {0, 1}


COMMITTED = FIGURES / "frontier_cpu_seed_points.csv"


def test_committed_tables_and_readme_numbers_follow_from_the_committed_points(tmp_path):
    budget = FIGURES / "frontier_cpu_budget_points.csv"
    (tmp_path / COMMITTED.name).write_bytes(COMMITTED.read_bytes())
    if budget.is_file():
        (tmp_path / budget.name).write_bytes(budget.read_bytes())
    seed_report.report(tmp_path / COMMITTED.name, tmp_path)
    cells = set()
    tables = ("envelopes", "gaps", "dominance")
    for name in tables:
        fresh = (tmp_path / f"seeds_cpu_{name}.csv").read_text()
        assert fresh == (FIGURES / f"seeds_cpu_{name}.csv").read_text(), f"seeds_cpu_{name}.csv is stale"
        cells |= set(re.findall(r"-?\d+\.\d{3}", (tmp_path / f"seeds_cpu_{name}.md").read_text()))
        table = pd.read_csv(tmp_path / f"seeds_cpu_{name}.csv")
        cells |= {str(v) for v in table.select_dtypes("int").to_numpy().ravel()}
    # every number in the README's seed-study block is one of the tables' cells
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- seed_report -->(.*?)<!-- /seed_report -->", readme, re.S)
    assert block, "README has no <!-- seed_report --> block"
    quoted = re.findall(r"(?<![\w.])-?\d+\.\d{3}(?!\d)", block.group(1))
    missing = [q for q in quoted if q not in cells and q.replace("-", "−") not in cells]
    assert not missing, f"README quotes numbers no seed table holds: {missing}"
    # and its dominance rows are the summed counts: a/b (noise-aware) per score and direction
    dominance = pd.read_csv(tmp_path / "seeds_cpu_dominance.csv", dtype={"seed": str})
    total = dominance[dominance.seed == "all"].set_index(["series", "score"])
    rows = re.findall(r"^\| (PPO[^|]*?) \|(.*)\|$", block.group(1), re.M)
    assert rows, "the README's seed-study block has no dominance rows"
    for series, cells_text in rows:
        series = series.replace(" (r_φ)", "")
        found = re.findall(r"(\d+)/(\d+) \((\d+)\)", cells_text)
        expected = []
        for score in ("reward", "audit_sentiment"):
            row = total.loc[(series, score)]
            expected += [(row.dpo_beats, row.series_points, row.dpo_beats_noise_aware),
                         (row.series_beats, row.dpo_points, row.series_beats_noise_aware)]
        assert [tuple(map(int, f)) for f in found] == [tuple(map(int, e)) for e in expected], series
