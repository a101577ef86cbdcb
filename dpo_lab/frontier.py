"""The reward-KL frontier (paper Fig. 2 left) from evaluation points: one entry point for ``make reproduce``,
a papermill sweep and notebook 07.

A point is one checkpoint of one run: (mean sequence KL(pi || pi_ref), mean r*) on held-out test prompts
(docs/design.md, "Definitions"). :func:`evaluation_points` reads them from a run's ``metrics.jsonl``;
:func:`report` turns every point of every run into the figure, the per-run table and the dominance counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dpo_lab.cache import atomic_write_text
from dpo_lab.plots import REQUIRED_COLUMNS, plot_frontier
from dpo_lab.run import read_metrics

EVAL_COLUMNS = ["reward_mean", "reward_se", "kl_mean", "kl_se"]
# The PPO-family series that the paper's dominance claim is about. The paper's figure has three such
# series (PPO, PPO-GT own, PPO-GT TRL); counting its points gives 26/27, 28/29 and 34/35 (an audit of the
# figure, not numbers the paper states), ~0.97 overall.
DOMINANCE_SERIES = {"PPO": ("PPO",), "PPO-GT": ("PPO-GT",), "PPO + PPO-GT": ("PPO", "PPO-GT")}
PAPER_DOMINANCE = "26/27, 28/29 and 34/35 over its three PPO-family series (counted from its figure)"


def evaluation_points(metrics_path: str | Path, **labels: Any) -> pd.DataFrame:
    """The evaluation rows of one run's metrics.jsonl (one frontier point each), labelled by ``labels``."""
    rows = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    frame = pd.DataFrame(rows, columns=["step", *EVAL_COLUMNS, "logratio_kl_mean"])
    for name, value in labels.items():
        frame.insert(0, name, value)
    return frame


def dominance(points: pd.DataFrame, *, challenger: str = "DPO", others: Sequence[str] = ("PPO",),
              ) -> tuple[int, int]:
    """(dominated, total): how many of the ``others``' evaluation points, starting checkpoints (step 0)
    excluded, have some ``challenger`` point with strictly higher reward AND strictly lower KL."""
    missing = [c for c in REQUIRED_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"frontier points are missing column(s) {missing}; have {list(points.columns)}")
    ours = points[points.method == challenger][["kl_mean", "reward_mean"]].to_numpy()
    theirs = points[points.method.isin(others) & (points.step > 0)][["kl_mean", "reward_mean"]].to_numpy()
    if len(ours) == 0:
        return 0, len(theirs)
    beaten = [bool(np.any((ours[:, 0] < kl) & (ours[:, 1] > r))) for kl, r in theirs]
    return int(sum(beaten)), len(theirs)


def dominance_counts(points: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """:func:`dominance` of DPO over each PPO-family series present in ``points``."""
    present = set(points.method)
    if "DPO" not in present:
        return {}
    return {name: dominance(points, others=others) for name, others in DOMINANCE_SERIES.items()
            if set(others) <= present}


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per run: the starting point, the final point and the best reward reached."""
    rows = []
    for (method, hp), run in points.groupby(["method", "hyperparameter"], sort=False):
        run = run.sort_values("step")
        first, last = run.iloc[0], run.iloc[-1]
        rows.append({"method": method, "hyperparameter": hp, "steps": int(last.step),
                     "reward_start": first.reward_mean, "reward_final": last.reward_mean,
                     "reward_final_se": last.reward_se, "kl_final": last.kl_mean, "kl_final_se": last.kl_se,
                     "reward_best": run.reward_mean.max()})
    return pd.DataFrame(rows)


def report(points: pd.DataFrame, out_dir: str | Path, name: str, *, title: str = "") -> dict[str, Any]:
    """Write ``frontier_<name>.png``, ``frontier_<name>_points.csv`` and ``results_<name>.{csv,md}`` to
    ``out_dir``; return the per-run table and the dominance counts (``{series: {dominated, total, share}}``).
    The figure is saved and closed (a notebook shows the file or calls :func:`plots.plot_frontier` itself)."""
    out_dir = Path(out_dir)
    figure = plot_frontier(points, out_dir / f"frontier_{name}.png",
                           title=title or f"IMDb sentiment, '{name}': reward vs KL")
    plt.close(figure)
    table = summary_table(points)
    atomic_write_text(out_dir / f"frontier_{name}_points.csv", points.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{name}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{name}.md", table.to_markdown(index=False, floatfmt=".3f"))
    counts = {series: {"dominated": d, "total": n, "share": d / n if n else None}
              for series, (d, n) in dominance_counts(points).items()}
    return {"table": table, "dominance": counts, "figure": out_dir / f"frontier_{name}.png"}


__all__ = ["DOMINANCE_SERIES", "EVAL_COLUMNS", "PAPER_DOMINANCE", "dominance", "dominance_counts",
           "evaluation_points", "report", "summary_table"]
