"""The reward-KL frontier (paper Fig. 2 left): a point is one checkpoint's (mean sequence KL(pi || pi_ref),
mean r*) on held-out test prompts (docs/design.md, "Definitions"); :func:`report` turns every point of every
run into the figure, the per-run table and the dominance counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dpo_lab.cache import atomic_write_text
from dpo_lab.plots import check_points, plot_frontier, plot_reward_vs_cost
from dpo_lab.run import read_metrics

EVAL_COLUMNS = ["reward_mean", "reward_se", "kl_mean", "kl_se"]
# Scores read beside r* on the same samples: the audit's (every frontier run; docs/design.md) and the learned
# r_phi's, where a run was evaluated with it (notebook 12's proxy reward).
AUDIT_SCORES = ("audit_sentiment", "audit_fluency", "distinct_words")
SCORE_COLUMNS = [f"{name}_{stat}" for name in (*AUDIT_SCORES, "proxy_reward") for stat in ("mean", "se")]
# What a run had cost at each point, running totals written by the trainers (see README, "budgets").
COST_COLUMNS = ["cost/policy_forward_tokens", "cost/policy_backward_tokens", "cost/samples",
                "cost/reward_queries", "cost/optimizer_steps", "cost/wall_s"]
# The paper's figure has three PPO-family series (PPO, PPO-GT own, PPO-GT TRL); counting its points gives
# 26/27, 28/29 and 34/35 (an audit of the figure, not numbers the paper states).
DOMINANCE_SERIES = {"PPO": ("PPO",), "PPO-GT": ("PPO-GT",), "PPO + PPO-GT": ("PPO", "PPO-GT")}
PAPER_DOMINANCE = "26/27, 28/29 and 34/35 over its three PPO-family series (counted from its figure)"


def evaluation_points(metrics_path: str | Path, **labels: Any) -> pd.DataFrame:
    """One run's evaluation rows (frontier points) labelled by ``labels``, with what it had cost by then
    (``COST_COLUMNS``, 0 at the start) and the scores read beside r* (``SCORE_COLUMNS``)."""
    rows = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    scores = [c for c in SCORE_COLUMNS if any(c in r for r in rows)]
    frame = pd.DataFrame(rows, columns=["step", *EVAL_COLUMNS, "logratio_kl_mean", *scores, *COST_COLUMNS])
    frame[COST_COLUMNS] = frame[COST_COLUMNS].fillna(0.0)
    for name, value in labels.items():
        frame.insert(0, name, value)
    return frame


def dominance(points: pd.DataFrame, *, challenger: str | Sequence[str] = "DPO",
              others: Sequence[str] = ("PPO",), noise_aware: bool = False, score: str = "reward",
              ) -> tuple[int, int]:
    """(dominated, total) over the distinct points of ``others`` past step 0: how many have a ``challenger``
    point with strictly lower KL and strictly higher ``score`` (by more than the combined standard error
    sqrt(se_challenger^2 + se_other^2) if ``noise_aware``, so a win inside the noise is not a win)."""
    cols = ["kl_mean", f"{score}_mean", *((f"{score}_se",) if noise_aware else ())]
    check_points(points, *cols)
    ours = points[points.method.isin([challenger] if isinstance(challenger, str) else challenger)]
    ours = ours[cols].to_numpy(dtype=float)[:, None]  # (ours, 1, cols) against (theirs, cols)
    theirs = (points[points.method.isin(others) & (points.step > 0)]
              .drop_duplicates(subset=["kl_mean", "reward_mean"])[cols].to_numpy(dtype=float))
    margin = np.hypot(ours[..., 2], theirs[:, 2]) if noise_aware else 0.0
    beaten = (ours[..., 0] < theirs[:, 0]) & (ours[..., 1] - margin > theirs[:, 1])
    return int(beaten.any(axis=0).sum()), len(theirs)


def dominance_counts(points: pd.DataFrame, score: str = "reward") -> dict[str, dict[str, Any]]:
    """:func:`dominance` of DPO over each PPO-family series in ``points``, plain and noise-aware, with shares;
    and the other way (``dpo_dominated``, ``dpo_dominated_noise_aware`` of ``dpo_total``)."""
    present = set(points.method)
    if "DPO" not in present:
        return {}
    out = {}
    aware = f"{score}_se" in points.columns
    for name, others in DOMINANCE_SERIES.items():
        if not set(others) <= present:
            continue
        d, n = dominance(points, others=others, score=score)
        dn, _ = dominance(points, others=others, noise_aware=aware, score=score)
        back, n_dpo = dominance(points, challenger=others, others=("DPO",), score=score)
        back_n, _ = dominance(points, challenger=others, others=("DPO",), noise_aware=aware, score=score)
        out[name] = {"dominated": d, "total": n, "share": d / n if n else None,
                     "dominated_noise_aware": dn, "share_noise_aware": dn / n if n else None,
                     "dpo_dominated": back, "dpo_dominated_noise_aware": back_n, "dpo_total": n_dpo}
    return out


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per run: the starting point, the final point and the best reward reached."""
    rows = []
    for (method, hp), run in points.groupby(["method", "hyperparameter"], sort=False):
        run = run.sort_values("step")
        first, last = run.iloc[0], run.iloc[-1]
        rows.append({"method": method, "hyperparameter": hp, "steps": int(last.step),
                     "reward_start": first.reward_mean, "reward_final": last.reward_mean,
                     "reward_final_se": last.reward_se, "kl_final": last.kl_mean, "kl_final_se": last.kl_se,
                     "reward_best": run.reward_mean.max(),
                     **{f"{s}_final": last[f"{s}_mean"] for s in AUDIT_SCORES if f"{s}_mean" in run.columns},
                     **{c.removeprefix("cost/"): last[c] for c in COST_COLUMNS if c in run.columns}})
    return pd.DataFrame(rows)


def report(points: pd.DataFrame, out_dir: str | Path, name: str, *, title: str = "") -> dict[str, Any]:
    """Write ``frontier_<name>{,_audit}.png``, ``cost_<name>.png``, ``frontier_<name>_points.csv`` and
    ``results_<name>.{csv,md}`` to ``out_dir`` (figures closed); return the table and dominance counts."""
    out_dir = Path(out_dir)
    figure = plot_frontier(points, out_dir / f"frontier_{name}.png",
                           title=title or f"IMDb sentiment, '{name}': reward vs KL")
    plt.close(figure)
    if {"cost/policy_backward_tokens", "cost/wall_s"} <= set(points.columns):
        plt.close(plot_reward_vs_cost(points, out_dir / f"cost_{name}.png",
                                      title=f"'{name}': reward against what each run spent"))
    audited = {f"{s}_mean" for s in AUDIT_SCORES} <= set(points.columns)
    if audited:
        plt.close(plot_frontier(points, out_dir / f"frontier_{name}_audit.png", scores=AUDIT_SCORES,
                                title=f"'{name}': the same points read by the audit, which no run optimises"))
    table = summary_table(points)
    atomic_write_text(out_dir / f"frontier_{name}_points.csv", points.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{name}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{name}.md", table.to_markdown(index=False, floatfmt=".3f"))
    return {"table": table, "dominance": dominance_counts(points),
            "dominance_audit": dominance_counts(points, "audit_sentiment") if audited else {},
            "figure": out_dir / f"frontier_{name}.png"}
