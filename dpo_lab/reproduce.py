"""The README's main job: the IMDb reward-KL frontier end to end at one preset, written to figures/."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from dpo_lab import pipeline
from dpo_lab.cache import atomic_write_json, atomic_write_text
from dpo_lab.paths import figures_dir
from dpo_lab.plots import dominance, plot_frontier
from dpo_lab.presets import Preset

T = TypeVar("T")

# The PPO-family series that the paper's dominance claim is about. The paper's figure has three such
# series (PPO, PPO-GT own, PPO-GT TRL), dominated 26/27, 28/29 and 34/35 (DESIGN.md), ~0.97 overall.
DOMINANCE_SERIES = {"PPO": ("PPO",), "PPO-GT": ("PPO-GT",), "PPO + PPO-GT": ("PPO", "PPO-GT")}
PAPER_DOMINANCE = "26/27, 28/29 and 34/35 over its three PPO-family series"


def _timed(name: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
    print(f"==> {name}", flush=True)
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"    {name}: {timings[name]:.1f} s", flush=True)
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
                     "reward_best": run.reward_mean.max()})
    return pd.DataFrame(rows)


def reproduce(preset: Preset, *, progress: bool = True, out_dir: Path | None = None) -> dict[str, Any]:
    """Run every stage (each cached, so a rerun after an interruption redoes only unfinished work)."""
    out_dir = out_dir or figures_dir()
    timings: dict[str, float] = {}
    print(preset.describe() if progress else f"preset {preset.name}", flush=True)
    _, _, sft_report = _timed("SFT policy", timings, lambda: pipeline.sft_policy(preset, progress=progress))
    _, reward_report = _timed("reward model r*", timings, lambda: pipeline.reward_model(preset))
    _, pair_stats = _timed("preference pairs", timings,
                           lambda: pipeline.preference_data(preset, progress=progress))
    run_seconds: dict[str, float] = {}
    points = _timed("frontier runs", timings,
                    lambda: pipeline.frontier(preset, progress=progress, timings=run_seconds))
    timings.update({f"runs: {m}": round(t, 1) for m, t in run_seconds.items()})
    dominated = {name: dominance(points, others=others) for name, others in DOMINANCE_SERIES.items()}

    stem = f"frontier_{preset.name}"
    plot_frontier(points, out_dir / f"{stem}.png",
                  title=f"IMDb sentiment, preset '{preset.name}': reward vs KL")
    table = summary_table(points)
    atomic_write_text(out_dir / f"{stem}_points.csv", points.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{preset.name}.csv", table.to_csv(index=False))
    atomic_write_text(out_dir / f"results_{preset.name}.md", table.to_markdown(index=False, floatfmt=".3f"))
    summary = {"preset": preset.name, "timings_s": timings,
               "sft": {k: v for k, v in sft_report.items() if not isinstance(v, list)},
               "reward": reward_report, "pairs": pair_stats,
               "runs": points.groupby("method", sort=False).hyperparameter.nunique().to_dict(),
               "points": len(points),
               "dominance_paper": PAPER_DOMINANCE,
               "dominance": {name: {"dominated": d, "total": n, "share": d / n if n else None}
                             for name, (d, n) in dominated.items()}}
    atomic_write_json(out_dir / f"summary_{preset.name}.json", summary)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    for name, (d, n) in dominated.items():
        print(f"DPO dominates {d}/{n} {name} points")
    print(f"(paper: {PAPER_DOMINANCE})")
    print(f"figure: {out_dir / (stem + '.png')}")
    return summary
