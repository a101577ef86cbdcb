"""Issue #23's tuning sweep read by the rule fixed in docs/design.md ("Tuning protocol"): per method and
learning rate, the upper envelope of validation r* over KL of all its runs' points (the SFT point included),
as a step function, averaged over KL in [0, 12]; the audit's sentiment the same way, beside it (it does not
choose). Writes the table (markdown and CSV) and a figure of the envelopes (PNG), and marks each method's
choice; runs not finished yet are counted and left out.

    .venv/bin/python scripts/tuning_table.py runs/imdb-cpu-tuning --out figures/tuning_cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dpo_lab.plots import upper_envelope

KL_MAX, TIE = 12.0, 0.001


def envelope_mean(kl: np.ndarray, score: np.ndarray, kl_max: float = KL_MAX) -> float:
    """Mean over KL in [0, kl_max] of the step function 'best score among points with KL <= x'."""
    grid = np.linspace(0.0, kl_max, 1201)
    xs, ys = upper_envelope(kl, score)
    index = np.searchsorted(xs, grid, side="right") - 1
    return float(np.where(index >= 0, ys[np.clip(index, 0, None)], np.nan).mean())


def plot(points: pd.DataFrame, table: pd.DataFrame, out: Path) -> None:
    """One panel per method: every run's validation points; each learning rate's envelope, the chosen bold."""
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(points.method))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    colors = {lr: c for lr, c in zip(sorted(points.lr.unique()), ("tab:blue", "tab:orange", "tab:red"),
                                     strict=True)}
    for ax, method in zip(axes[0], methods, strict=True):
        for lr, group in points[points.method == method].groupby("lr", sort=True):
            color = colors[lr]
            chosen = (table[(table.method == method) & (table.lr == f"{lr:g}")].chosen == "yes").any()
            ax.scatter(group.kl_mean, group.reward_mean, s=9, color=color, alpha=0.45)
            kl, best = upper_envelope(group.kl_mean.to_numpy(), group.reward_mean.to_numpy())
            ax.step(kl, best, where="post", color=color, lw=2.6 if chosen else 1.2,
                    label=f"lr {lr:g}" + (" (chosen)" if chosen else ""))
        ax.axvspan(0, KL_MAX, color="0.93", zorder=-1)
        ax.set(title=method, xlabel="sequence KL (validation prompts)", xlim=(0, None))
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("mean r* (validation prompts)")
    fig.suptitle("Tuning sweep, seed 100: envelope of r* over KL per learning rate "
                 "(shaded: the rule's KL range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes STEM.{md,csv,png}")
    args = parser.parse_args()
    spec = yaml.safe_load((args.sweep / "sweep.yaml").read_text())
    expected = {run["parameters"]["method"]: 0 for run in spec["runs"]}
    for run in spec["runs"]:
        expected[run["parameters"]["method"]] += 1
    frames = []
    for folder in sorted(p for p in args.sweep.iterdir() if p.is_dir()):
        if (folder / "points.csv").is_file() and (folder / "result.json").is_file():
            params = yaml.safe_load((folder / "parameters.yaml").read_text())
            lr = next(iter(params.get("overrides", {}).values()))
            frames.append(pd.read_csv(folder / "points.csv").assign(lr=lr, run=folder.name))
    points = pd.concat(frames, ignore_index=True)
    rows = []
    for score in ("reward", "audit_sentiment"):
        points[f"{score}_mean"] = points[f"{score}_mean"].astype(float)
    for (method, lr), group in points.groupby(["method", "lr"], sort=False):
        row = {"method": method, "lr": f"{lr:g}", "runs": group.run.nunique()}
        for score in ("reward", "audit_sentiment"):
            kl, values = group.kl_mean.to_numpy(), group[f"{score}_mean"].to_numpy()
            row[f"{score}_envelope_mean"] = round(envelope_mean(kl, values), 4)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["method", "lr"], key=lambda c: c.map(
        lambda v: float(v) if c.name == "lr" else v)).reset_index(drop=True)
    table["chosen"] = ""
    for method, group in table.groupby("method"):
        if group.runs.sum() < expected[method]:
            table.loc[table.method == method, "chosen"] = "(unfinished)"
            continue  # the rule reads a method's whole sweep, not part of it
        best = group.reward_envelope_mean.max()
        tied = group[group.reward_envelope_mean >= best - TIE]
        pick = min(tied.lr, key=float)  # a tie goes to the lower learning rate
        table.loc[(table.method == method) & (table.lr == pick), "chosen"] = "yes"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    note = (f"{points.run.nunique()} of {sum(expected.values())} runs finished; validation prompts, "
            f"seed 100; envelope means over KL in [0, {KL_MAX:g}] (docs/design.md, 'Tuning protocol').\n\n")
    text = note + table.to_markdown(index=False, disable_numparse=True) + "\n"
    args.out.with_suffix(".md").write_text(text)
    plot(points, table, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
