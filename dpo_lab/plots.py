"""The reward-KL frontier (paper Fig. 2 left), the dominance count behind its claim, and seed bands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

# One colour per method, in the paper's legend order.
METHOD_COLORS: dict[str, str] = {
    "DPO": "tab:red",
    "Unlikelihood": "tab:orange",
    "PPO": "tab:blue",
    "PPO-GT": "tab:purple",
    "Preferred-FT": "tab:green",
    "SFT": "black",
}
REQUIRED_COLUMNS = ("method", "step", "kl_mean", "reward_mean")


def _check_points(points: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in points.columns]
    if missing:
        raise ValueError(f"frontier points are missing column(s) {missing}; have {list(points.columns)}")


def _finish(fig: plt.Figure, path: str | Path | None) -> plt.Figure:
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def upper_envelope(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front of (kl, reward) points: those that no other point beats on both axes,
    sorted by KL (so reward rises along it)."""
    order = np.lexsort((-np.asarray(reward, dtype=float), np.asarray(kl, dtype=float)))
    xs, ys, best = [], [], -np.inf
    for i in order:
        if reward[i] > best:
            xs.append(float(kl[i]))
            ys.append(float(reward[i]))
            best = reward[i]
    return np.array(xs), np.array(ys)


def plot_frontier(points: pd.DataFrame, path: str | Path | None = None, *, title: str = "",
                  label_runs: bool = False) -> plt.Figure:
    """Every evaluation point of every run (one colour per method), the shared SFT start, and each method's
    upper envelope; KL(pi || pi_ref) on x and mean r* on y, as in the paper.

    ``label_runs`` also draws each run's path in step order and labels its final point with its
    ``hyperparameter`` (for a sweep of one method, where colour alone cannot tell the runs apart)."""
    _check_points(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    start = points[points.step == 0]
    for method, group in points[points.step > 0].groupby("method", sort=False):
        color = METHOD_COLORS.get(str(method))
        ax.scatter(group.kl_mean, group.reward_mean, s=18, alpha=0.75, color=color, label=str(method))
        xs, ys = upper_envelope(group.kl_mean.to_numpy(), group.reward_mean.to_numpy())
        ax.step(xs, ys, where="post", color=color, alpha=0.5, linewidth=1)
    if label_runs:
        for name, run in points.sort_values("step").groupby("hyperparameter", sort=False):
            ax.plot(run.kl_mean, run.reward_mean, color="grey", lw=0.6, alpha=0.6)
            ax.annotate(str(name), (run.kl_mean.iloc[-1], run.reward_mean.iloc[-1]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    if len(start):
        ax.scatter(start.kl_mean.mean(), start.reward_mean.mean(), marker="*", s=140, color="black",
                   label="SFT (start)", zorder=5)
    ax.set_xlabel(r"sequence KL$(\pi \,\|\, \pi_\mathrm{ref})$")
    ax.set_ylabel(r"mean reward $r^*$ on test prompts")
    ax.set_title(title or "IMDb sentiment generation: reward vs KL")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _finish(fig, path)


def plot_seed_bands(points: pd.DataFrame, path: str | Path | None = None, *, title: str = "") -> plt.Figure:
    """Each method's path over steps on the reward-KL plane, averaged over seeds, with a band of one
    standard error of the mean reward across seeds. One row per (method, seed, step) evaluation; a method's
    seeds share its evaluation steps, and each step sits at its seed-mean KL (the band is vertical only)."""
    _check_points(points)
    if "seed" not in points.columns:
        raise ValueError(f"seed bands need a 'seed' column; have {list(points.columns)}")
    frame = points.sort_values("step", kind="stable").assign(
        kl=lambda f: f.groupby(["method", "step"]).kl_mean.transform("mean"))
    palette = {m: METHOD_COLORS.get(m, f"C{i}") for i, m in enumerate(frame.method.unique())}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sns.lineplot(frame, x="kl", y="reward_mean", hue="method", palette=palette, errorbar="se", sort=False,
                 marker="o", markersize=4, ax=ax)
    ax.set(xlabel=r"sequence KL$(\pi \,\|\, \pi_\mathrm{ref})$ (nats), mean over seeds",
           ylabel=r"mean reward $r^*$ (p(positive)) on test prompts" + "\n" + "band: ± 1 s.e. across seeds",
           title=title or "Reward vs KL across seeds")
    ax.grid(alpha=0.3)
    return _finish(fig, path)
