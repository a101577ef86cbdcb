"""The reward-KL frontier (paper Fig. 2 left), reward against cost, and over-optimisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# One colour per method, in the paper's legend order.
METHOD_COLORS: dict[str, str] = {"DPO": "tab:red", "Unlikelihood": "tab:orange", "PPO": "tab:blue",
                                 "PPO-GT": "tab:purple", "Preferred-FT": "tab:green", "SFT": "black"}


def check_points(points: pd.DataFrame, *columns: str) -> None:
    """A ValueError naming the columns ``points`` lacks of a frontier's and ``columns``."""
    missing = [c for c in ("method", "step", "kl_mean", "reward_mean", *columns) if c not in points.columns]
    if missing:
        raise ValueError(f"frontier points are missing column(s) {missing}; have {list(points.columns)}")


def _finish(fig: plt.Figure, path: str | Path | None) -> plt.Figure:  # laid out, and saved if given a path
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def upper_envelope(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front of (kl, reward) points, those no other point beats on both axes, sorted by KL."""
    kl, reward = np.asarray(kl, dtype=float), np.asarray(reward, dtype=float)
    order = np.lexsort((-reward, kl))  # by KL; at equal KL the best reward first
    kl, reward = kl[order], reward[order]
    best_before = np.fmax.accumulate(np.concatenate(([-np.inf], reward)))[:-1]  # fmax: a NaN never counts
    return kl[reward > best_before], reward[reward > best_before]


SCORE_LABELS: dict[str, str] = {  # a frontier panel's y axis, by the score it reads (``<score>_mean``)
    "reward": r"mean reward $r^*$ on test prompts", "distinct_words": "audit: distinct-word ratio",
    "audit_sentiment": "audit: p(positive), word-order classifier",
    "audit_fluency": "audit: log-likelihood per token, fluency LM"}


def plot_frontier(points: pd.DataFrame, path: str | Path | None = None, *, title: str = "",
                  label_runs: bool = False, scores: Sequence[str] = ("reward",)) -> plt.Figure:
    """Every point (± 1 SE bars where given), the SFT start and each method's upper envelope: KL on x, mean r*
    (or each of ``scores``, a panel each) on y; ``label_runs`` draws each run's path, labelled at its end."""
    check_points(points, *(f"{s}_mean" for s in scores))
    fig, axes = plt.subplots(1, len(scores), figsize=(6.4 * len(scores) ** 0.8, 4.4), squeeze=False)
    start = points[points.step == 0]
    for ax, score in zip(axes[0], scores, strict=True):
        y, se = f"{score}_mean", f"{score}_se"
        for method, group in points[points.step > 0].groupby("method", sort=False):
            color = METHOD_COLORS.get(str(method))
            ax.scatter(group.kl_mean, group[y], s=18, alpha=0.75, color=color, label=str(method))
            if se in group.columns and "kl_se" in group.columns:  # one SE over test prompts, each axis
                ax.errorbar(group.kl_mean, group[y], xerr=group.kl_se, yerr=group[se], fmt="none",
                            ecolor=color, alpha=0.35, linewidth=0.8)
            xs, ys = upper_envelope(group.kl_mean.to_numpy(), group[y].to_numpy())
            ax.step(xs, ys, where="post", color=color, alpha=0.5, linewidth=1)
        if label_runs:
            for name, run in points.sort_values("step").groupby("hyperparameter", sort=False):
                ax.plot(run.kl_mean, run[y], color="grey", lw=0.6, alpha=0.6)
                ax.annotate(str(name), (run.kl_mean.iloc[-1], run[y].iloc[-1]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        if len(start):
            ax.scatter(start.kl_mean.mean(), start[y].mean(), marker="*", s=140, color="black",
                       label="SFT (start)", zorder=5)
        ax.set_xlabel(r"sequence KL$(\pi \,\|\, \pi_\mathrm{ref})$")
        ax.set_ylabel(SCORE_LABELS.get(score, score))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    if len(scores) == 1:
        axes[0][0].set_title(title or "IMDb sentiment generation: reward vs KL")
    else:
        fig.suptitle(title or "IMDb sentiment generation: the audit vs KL")
    return _finish(fig, path)


def plot_reward_vs_cost(points: pd.DataFrame, path: str | Path | None = None, *,
                        costs: Sequence[str] = ("cost/policy_backward_tokens", "cost/wall_s"),
                        title: str = "") -> plt.Figure:
    """Mean r* against what each run had spent by then (``frontier.COST_COLUMNS``), a panel per cost."""
    check_points(points, *costs)
    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 4.0), sharey=True, squeeze=False)
    group_by = ["method", "hyperparameter"] if "hyperparameter" in points.columns else ["method"]
    for ax, cost in zip(axes[0], costs, strict=True):
        seen: set[str] = set()
        for key, run in points.sort_values("step").groupby(group_by, sort=False):
            method = str(key[0] if isinstance(key, tuple) else key)
            ax.plot(run[cost], run.reward_mean, marker="o", markersize=3, lw=1, alpha=0.8,
                    color=METHOD_COLORS.get(method), label=None if method in seen else method)
            seen.add(method)
        name = cost.removeprefix("cost/")
        ax.set_xlabel(f"{name.removesuffix('_s').replace('_', ' ')} (s)" if name.endswith("_s")
                      else name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(r"mean reward $r^*$ on test prompts")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "Reward against what each run spent")
    return _finish(fig, path)


def plot_proxy_and_gold(points: pd.DataFrame, path: str | Path | None = None, *,
                        reference: pd.DataFrame | None = None, title: str = "") -> plt.Figure:
    """Over-optimisation (Gao et al. 2022): each ``run``'s gold r* (left) and proxy r_phi (right) against KL,
    ± 1 SE; ``reference`` (runs trained on r*'s labels) adds its upper envelope to the gold panel."""
    check_points(points, "run", "proxy_reward_mean")
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), sharex=True)
    if reference is not None and len(reference):
        xs, ys = upper_envelope(reference.kl_mean.to_numpy(), reference.reward_mean.to_numpy())
        axes[0].step(xs, ys, where="post", color="grey", lw=2, alpha=0.4, label="DPO on r* labels (envelope)")
    for name, run in points.sort_values("step").groupby("run", sort=False):
        color = METHOD_COLORS.get(str(name))
        for ax, column in zip(axes, ("reward", "proxy_reward"), strict=True):
            line = ax.errorbar(run.kl_mean, run[f"{column}_mean"], yerr=run.get(f"{column}_se"), marker="o",
                               markersize=3, lw=1.2, capsize=0, elinewidth=0.6, color=color, label=str(name))
            color = line[0].get_color()
    axes[0].set_ylabel(r"gold: mean $r^*$ on test prompts")
    axes[1].set_ylabel(r"proxy: mean $r_\phi$ on the same samples")
    for ax in axes:
        # Gao et al.'s axis: the square root spreads the small-KL points that a run passes quickly
        ax.set_xscale("function", functions=(lambda x: np.sqrt(np.clip(x, 0, None)), np.square))
        top = float(points.kl_mean.max()) * 1.05
        ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if t <= max(top, 1)])
        ax.set_xlabel(r"sequence KL$(\pi \,\|\, \pi_\mathrm{ref})$ (square-root scale)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Optimising a proxy: what the proxy says and what the gold reward says")
    return _finish(fig, path)
