"""The README's frontier tables from a committed points file: each method's best score within a KL budget
(the envelope read at fixed KLs), under r* and under each audit score, and each run's final point.

    .venv/bin/python scripts/frontier_tables.py figures/frontier_cpu_points.csv --budgets 2 4 6 8 10 13
"""

from __future__ import annotations

import argparse

import pandas as pd

SCORES = {"reward": "r*", "audit_sentiment": "audit sentiment", "audit_fluency": "audit fluency (nats/token)",
          "distinct_words": "distinct-word ratio"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("points")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 4, 6, 8, 10, 13])
    args = parser.parse_args()
    points = pd.read_csv(args.points)
    trained = points[points.step > 0]
    for score, title in SCORES.items():
        if f"{score}_mean" not in points:
            continue
        print(f"\nbest {title} within a KL budget (points after step 0; start: "
              f"{points[points.step == 0][f'{score}_mean'].mean():.3f})\n")
        rows = []
        for method, group in trained.groupby("method", sort=False):
            row = {"method": method}
            for budget in args.budgets:
                inside = group[group.kl_mean <= budget][f"{score}_mean"]
                row[f"KL<={budget:g}"] = f"{inside.max():.3f}" if len(inside) else "-"
            rows.append(row)
        print(pd.DataFrame(rows).to_markdown(index=False))
    finals = points.sort_values("step").groupby(["method", "hyperparameter"], sort=False).tail(1)
    scores = [f"{s}_mean" for s in SCORES if f"{s}_mean" in points]
    columns = ["method", "hyperparameter", "step", "kl_mean", *scores]
    print("\nfinal points\n")
    print(finals[columns].to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
