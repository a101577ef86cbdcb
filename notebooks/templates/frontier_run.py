# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One run of the IMDb reward–KL frontier
#
# The unit of work of a sweep (`python -m dpo_lab sweep --preset cpu`): one method at one hyperparameter
# value — DPO at a β, Unlikelihood at an α, Preferred-FT at a seed, PPO or PPO-GT at a target KL — trained
# from π_SFT and evaluated every few steps on held-out test prompts (mean r\* and the exact sequence-level
# KL to π_ref, paper Fig. 2 left). The stages it reads (SFT policy, r\*, preference pairs, learned reward) are
# cached under `artifacts/` by content hash, so the first run of a sweep builds them and the others reuse
# them; an interrupted run resumes from its last checkpoint.
#
# The sweep runner passes `run_dir`; this notebook writes there `metrics.jsonl` (every training step),
# `points.csv` (the evaluation points) and `result.json` (one row of the sweep's results table).

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5, "dpo.max_steps": 200}
method: str = "DPO"  # DPO | Unlikelihood | Preferred-FT | PPO | PPO-GT
value: float = 0.1  # the method's knob: β (DPO), α (Unlikelihood), seed (Preferred-FT), target KL (PPO)
seed: int = 0  # seeds the SFT policy, the pairs, r_phi and every evaluation (the split and r* are fixed)
eval_split: str = "test"  # prompts the run is evaluated on: "test" (the frontier) or "validation" (tuning)
run_dir: str = ""  # folder for this run (the sweep runner sets it; empty: runs/single/METHOD-VALUE)
processes: int = 1  # >1: a pairwise method trains on this many processes (one per GPU) under torchrun

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.cache import atomic_write_json, atomic_write_text
from dpo_lab.plots import plot_frontier
from dpo_lab.presets import get_preset
from dpo_lab.scale import launch
from dpo_lab.scale.sweep import runs_root
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
config = get_preset(preset, seed=seed, **overrides)  # an unknown key or a wrong type is named here
seed_everything(config.seed)
label = f"{pipeline.hyperparameter_name(method)}={value:g}"
out = Path(run_dir) if run_dir else runs_root() / "single" / f"{method.lower()}-{label.replace('=', '')}"
out.mkdir(parents=True, exist_ok=True)
print(f"preset {config.name!r}, {method} {label} -> {out}")

# %% [markdown]
# ## Train (or load the finished run)

# %%
if processes > 1:  # the same run, trained data-parallel in child processes; then read back finished below
    launch.train_in_processes(config.name, {**overrides, "seed": seed}, method, value, processes)
result = pipeline.result(config, method, value, split=eval_split)
points = frontier.evaluation_points(result.metrics_path, method=method, hyperparameter=label,
                                    seed=config.seed, eval_split=eval_split)
display(points.round(4))

# %% [markdown]
# ## The run on the reward–KL plane
#
# Each point is one checkpoint: mean r\* of samples on held-out test prompts against the mean exact
# sequence KL(π‖π_ref). The run starts at the SFT point (KL 0) and, as training goes on, trades KL for reward.

# %%
fig = plot_frontier(points, out / "frontier.png", title=f"{method} {label}", label_runs=True)
plt.show()

# %% [markdown]
# ## Results for the sweep table

# %%
atomic_write_text(out / "metrics.jsonl", result.metrics_path.read_text())
atomic_write_text(out / "points.csv", points.to_csv(index=False))
row = json.loads(frontier.summary_table(points).to_json(orient="records"))[0]  # plain JSON types
row.update(preset=config.name, value=value, eval_split=eval_split, run_path=str(result.metrics_path.parent))
atomic_write_json(out / "result.json", row)
print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
