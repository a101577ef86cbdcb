"""The README's main job: the IMDb reward-KL frontier end to end at one preset, written to figures/."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dpo_lab import frontier, pipeline
from dpo_lab.cache import atomic_write_json
from dpo_lab.presets import Preset, check_writable, figures_dir, validate

T = TypeVar("T")

def _timed(name: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
    print(f"==> {name}", flush=True)
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"    {name}: {timings[name]:.1f} s", flush=True)
    return out


def _machine() -> dict[str, str]:
    """What the numbers were computed on: float rounding, hence every number, depends on the CPU and the
    library versions (README, "Cost")."""
    from importlib.metadata import version

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    packages = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "datasets")
    return {"cpu": cpu, "python": platform.python_version(), **{p: version(p) for p in packages}}


def reproduce(preset: Preset, *, progress: bool = True, out_dir: Path | None = None,
              workers: int = 1) -> dict[str, Any]:
    """Run every stage (each cached: a rerun redoes only unfinished work; processes sharing the artifacts
    folder wait for and reuse each other's runs), ``workers`` frontier runs at a time, and write the figure,
    tables and summary to ``out_dir`` (default :func:`presets.figures_dir`)."""
    validate(preset)  # a preset built by hand is checked too, before any stage runs
    out_dir = Path(out_dir) if out_dir is not None else figures_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    check_writable(out_dir, "--out")
    timings: dict[str, float] = {}
    print(preset.describe() if progress else f"preset {preset.name}", flush=True)
    _, _, sft_report = _timed("SFT policy", timings, lambda: pipeline.sft_policy(preset, progress=progress))
    _, reward_report = _timed("reward model r*", timings, lambda: pipeline.reward_model(preset))
    *_, audit_report = _timed("audit judges", timings,
                              lambda: pipeline.audit_judges(preset, progress=progress))
    _, pair_stats = _timed("preference pairs", timings,
                           lambda: pipeline.preference_data(preset, progress=progress))
    run_seconds: dict[str, float] = {}
    points = _timed("frontier runs", timings,
                    lambda: pipeline.frontier(preset, progress=progress, timings=run_seconds,
                                                      workers=workers))
    timings.update({f"runs: {m}": round(t, 1) for m, t in run_seconds.items()})
    results = frontier.report(points, out_dir, preset.name,
                              title=f"IMDb sentiment, preset '{preset.name}': reward vs KL")
    # r_phi (trained by the first PPO run): chosen on its validation pairs, its accuracy on its test pairs
    # beside r*'s own (the ceiling) and the audit classifier's agreement with r* on them.
    learned = pipeline.learned_reward(preset, progress=False).report
    learned_keys = ("best_val_accuracy", "best_step", "test_accuracy", "n_train_pairs", "n_val_pairs",
                    "n_test_pairs", "rstar_test_accuracy", "test_accuracy_by_gap")
    learned_summary = {**{k: learned.get(k) for k in learned_keys},
                       "audit_test_accuracy": pipeline.audit_pair_accuracy(preset)}
    summary = {"preset": preset.name, "workers": workers, "machine": _machine(), "timings_s": timings,
               "sft": {k: v for k, v in sft_report.items() if not isinstance(v, list)},
               "reward": reward_report, "audit": audit_report, "pairs": pair_stats,
               "learned_reward": learned_summary,
               "runs": points.groupby("method", sort=False).hyperparameter.nunique().to_dict(),
               "points": len(points),
               "dominance_paper": frontier.PAPER_DOMINANCE, "dominance": results["dominance"],
               "dominance_audit": results["dominance_audit"]}
    atomic_write_json(out_dir / f"summary_{preset.name}.json", summary)
    print(results["table"].to_markdown(index=False, floatfmt=".3f"))
    for judge, counts in (("r*", results["dominance"]), ("the audit", results["dominance_audit"])):
        for name, count in counts.items():
            print(f"under {judge}: DPO dominates {count['dominated']}/{count['total']} distinct {name} "
                  "points "
                  f"({count['dominated_noise_aware']}/{count['total']} by more than the combined SE); "
                  f"{name} dominates {count['dpo_dominated']}/{count['dpo_total']} DPO points")
    print(f"(paper: {frontier.PAPER_DOMINANCE})")
    print(f"figure: {results['figure']}")
    return summary
