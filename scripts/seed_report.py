"""The seed study read from files: every envelope, gap, interval and dominance count the README quotes.

    # collect the sweeps' per-seed points into one committed file, then compute everything from it
    .venv/bin/python scripts/seed_report.py --collect runs/imdb-cpu-seeds --budget runs/imdb-cpu-budget
    # recompute from the committed file alone (what tests/test_seed_report.py does)
    .venv/bin/python scripts/seed_report.py

Reads figures/frontier_cpu_seed_points.csv (one row per evaluation point: method, hyperparameter, seed, step,
KL and every score with its standard error), keeps the seeds that have every run (a seed with part of its
runs would bias its envelope), and writes, beside it:
- seeds_cpu_envelopes.{csv,md}: per method, score and KL budget b, the best mean score among a seed's points
  with KL <= b (the envelope read at b; the SFT start included), its mean over seeds and a 95% t interval
  (seeds - 1 degrees of freedom);
- seeds_cpu_gaps.{csv,md}: PPO-GT - DPO and PPO - DPO at each budget, paired by seed (a seed's methods share
  its SFT policy), mean and 95% t interval;
- seeds_cpu_dominance.{csv,md}: per seed and summed, both directions (DPO points beating the series' points,
  the series' points beating DPO's), distinct points, plain and noise-aware, under r* and the audit sentiment;
- frontier_cpu_seeds.png: the envelopes with their intervals, under r* and the audit, and the 2x-budget runs
  (figures/frontier_cpu_budget_points.csv) drawn over them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dpo_lab.frontier import dominance_counts

FIGURES = Path(__file__).resolve().parents[1] / "figures"
BUDGETS = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
SCORES = {"reward": "r*", "audit_sentiment": "audit sentiment"}
METHODS = ("DPO", "PPO", "PPO-GT")
COLORS = {"DPO": "tab:red", "PPO": "tab:blue", "PPO-GT": "tab:green"}


def collect(sweep: Path) -> pd.DataFrame:
    """Every finished run's points.csv in a sweep folder, one frame."""
    frames = [pd.read_csv(f / "points.csv") for f in sorted(sweep.iterdir())
              if (f / "result.json").is_file() and (f / "points.csv").is_file()]
    if not frames:
        raise SystemExit(f"no finished runs in {sweep}")
    return pd.concat(frames, ignore_index=True)


def envelope_at(points: pd.DataFrame, score: str, budget: float) -> float:
    """Best mean score among ``points`` with KL <= budget (NaN if none)."""
    inside = points.loc[points.kl_mean <= budget, f"{score}_mean"]
    return float(inside.max()) if len(inside) else float("nan")


def t_interval(values: np.ndarray) -> tuple[float, float, float, int]:
    """Mean, 95% t interval and degrees of freedom of per-seed values."""
    values = values[~np.isnan(values)]
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    if n < 2:
        return mean, float("nan"), float("nan"), max(n - 1, 0)
    half = stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half, n - 1


def per_seed_envelopes(points: pd.DataFrame, budgets: tuple[float, ...] = BUDGETS) -> pd.DataFrame:
    """One row per (method, score, budget, seed): the seed's envelope at the budget."""
    rows = []
    for (method, seed), group in points[points.method.isin(METHODS)].groupby(["method", "seed"]):
        for score in SCORES:
            for budget in budgets:
                rows.append({"method": method, "score": score, "kl_budget": budget, "seed": seed,
                             "value": envelope_at(group, score, budget)})
    return pd.DataFrame(rows)


def envelope_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, score, budget), group in per_seed.groupby(["method", "score", "kl_budget"], sort=False):
        mean, low, high, df = t_interval(group.value.to_numpy())
        rows.append({"method": method, "score": score, "kl_budget": budget, "seeds": df + 1,
                     "mean": mean, "ci95_low": low, "ci95_high": high, "df": df})
    return pd.DataFrame(rows)


def gap_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Series minus DPO at each budget, paired by seed (only seeds that have both)."""
    wide = per_seed.pivot_table(index=["score", "kl_budget", "seed"], columns="method", values="value")
    rows = []
    for series in ("PPO-GT", "PPO"):
        if series not in wide or "DPO" not in wide:
            continue
        diff = (wide[series] - wide["DPO"]).dropna()
        for (score, budget), values in diff.groupby(level=["score", "kl_budget"], sort=False):
            mean, low, high, df = t_interval(values.to_numpy())
            rows.append({"gap": f"{series} - DPO", "score": score, "kl_budget": budget, "seeds": df + 1,
                         "mean": mean, "ci95_low": low, "ci95_high": high, "df": df})
    return pd.DataFrame(rows)


def dominance_table(points: pd.DataFrame) -> pd.DataFrame:
    """Both directions, plain and noise-aware, per seed and summed, under each score."""
    rows = [{"seed": seed, "score": score, "series": series, "dpo_beats": c["dominated"],
             "series_points": c["total"], "series_beats": c["dpo_dominated"], "dpo_points": c["dpo_total"],
             "dpo_beats_noise_aware": c["dominated_noise_aware"],
             "series_beats_noise_aware": c["dpo_dominated_noise_aware"]}
            for seed, group in points.groupby("seed") for score in SCORES
            for series, c in dominance_counts(group, score).items()]
    table = pd.DataFrame(rows)
    counts = [c for c in table.columns if c not in ("seed", "score", "series")]
    total = table.groupby(["score", "series"], sort=False)[counts].sum().reset_index().assign(seed="all")
    return pd.concat([table, total], ignore_index=True)[["seed", "score", "series", *counts]]


GRID = tuple(np.round(np.arange(0.0, 14.01, 0.25), 2))


def _draw(ax, points: pd.DataFrame, score: str) -> None:
    """Each method's mean envelope over ``points``' seeds, with its 95% t band when there are several."""
    table = envelope_table(per_seed_envelopes(points, GRID))
    for method in METHODS:
        rows = table[(table.method == method) & (table.score == score)]
        if rows.empty:
            continue
        seeds = int(rows.seeds.max())
        label = f"{method}, {seeds} seed{'s' if seeds > 1 else ''}" + (", 95% t band" if seeds > 1 else "")
        ax.step(rows.kl_budget, rows["mean"], where="post", color=COLORS[method], lw=1.6, label=label)
        if seeds > 1:
            ax.fill_between(rows.kl_budget, rows.ci95_low, rows.ci95_high, step="post", color=COLORS[method],
                            alpha=0.18, lw=0)


def plot(points: pd.DataFrame, budget_points: pd.DataFrame | None, out: Path) -> None:
    """Left r*, right the audit: each method's envelope over the seeds, with its band, and the 2x-budget runs
    step by step."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (score, title) in zip(axes, SCORES.items(), strict=True):
        _draw(ax, points, score)
        if budget_points is not None:
            trained = budget_points[budget_points.step > 0]
            for (method, _), run in trained.groupby(["method", "hyperparameter"]):
                ax.plot(run.kl_mean, run[f"{score}_mean"], "o--", ms=3, lw=0.8, color=COLORS[method],
                        alpha=0.8)
        ax.set(xlabel="sequence KL to pi_ref (test prompts)", ylabel=f"mean {title}", title=title,
               xlim=(0, 17))
    if budget_points is not None:  # DPO beta = 0.05 at 2x runs on to KL 30, off the right edge
        axes[0].plot([], [], "o--", ms=3, lw=0.8, color="0.3", label="2x-budget run, seed 0 (to KL 17 shown)")
    axes[0].legend(fontsize=6.5, loc="lower right")
    fig.suptitle("cpu frontier across seeds: best score within a KL budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def write(table: pd.DataFrame, stem: Path) -> None:
    table.to_csv(stem.with_suffix(".csv"), index=False, float_format="%.4f")
    stem.with_suffix(".md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")


def complete_seeds(points: pd.DataFrame) -> pd.DataFrame:
    """The points of the seeds that have every run some seed has (a seed with part of its runs would bias its
    envelope)."""
    have = points.groupby("seed")[["method", "hyperparameter"]].apply(
        lambda g: frozenset(map(tuple, g.drop_duplicates().to_numpy())))
    runs = frozenset().union(*have)
    keep = [seed for seed, got in have.items() if runs <= got]
    dropped = sorted(set(have.index) - set(keep))
    if dropped:
        print(f"left out (runs missing): seed(s) {dropped}; kept {keep}, the seeds with all {len(runs)} runs")
    return points[points.seed.isin(keep)]


def report(points_file: Path, out: Path) -> dict[str, pd.DataFrame]:
    points = complete_seeds(pd.read_csv(points_file))
    per_seed = per_seed_envelopes(points)
    tables = {"envelopes": envelope_table(per_seed), "gaps": gap_table(per_seed),
              "dominance": dominance_table(points)}
    for name, table in tables.items():
        write(table, out / f"seeds_cpu_{name}")
    budget_file = out / "frontier_cpu_budget_points.csv"
    plot(points, pd.read_csv(budget_file) if budget_file.is_file() else None, out / "frontier_cpu_seeds.png")
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", type=Path, help="a seed-study sweep folder to collect points from first")
    parser.add_argument("--budget", type=Path, help="the 2x-budget sweep folder to collect points from first")
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args()
    if args.collect:
        collect(args.collect).to_csv(args.out / "frontier_cpu_seed_points.csv", index=False)
    if args.budget:
        collect(args.budget).to_csv(args.out / "frontier_cpu_budget_points.csv", index=False)
    tables = report(args.out / "frontier_cpu_seed_points.csv", args.out)
    for name, table in tables.items():
        print(f"\n{name}\n\n{table.to_markdown(index=False, floatfmt='.3f')}")


if __name__ == "__main__":
    main()
