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
# # 08 — Scaling up: sweeps, resuming them, and what the paper's runs cost
#
# *Optional: engineering, not DPO.* Skip it unless you want to run many notebooks as a sweep.
#
# Notebooks 03–07 run the IMDb experiment in one process. A researcher reproducing the paper runs the *same*
# notebooks many times, with different parameters, on GPUs, and compares. This notebook shows the layer
# that does that:
#
# 1. **a sweep**: one notebook (`notebooks/templates/frontier_run.ipynb`: one method at one hyperparameter
#    value) executed by [papermill](https://papermill.readthedocs.io) once per run, each run in its own folder
#    `runs/<sweep>/<run>/`, with one results table and one frontier plot at the end;
# 2. **resuming**: a rerun skips finished runs, so a sweep killed midway is finished by starting it again;
# 3. **the cost** of the `paper` preset and of the TL;DR and Anthropic-HH runs in GPU hours, and the memory a
#    DPO step on gpt2-large needs on one 80 GB GPU.
#
# **What you see, and what it costs.** The outputs below are the `cpu` preset's: its 5-run DPO sweep,
# executed through papermill on the runs notebook 05 (or `make reproduce`) already trained, in a few
# seconds a run on 2 cores (the `seconds` column below). From empty caches the same sweep first trains the
# five runs (their training time is the `wall_s` column: 97.634 to 121.079 s each); at `smoke`
# (`DPO_LAB_PRESET=smoke`) the whole notebook takes 67 s. The GPU-hour and memory figures are estimates,
# not measurements (no GPU was available to this project).
#
# From a shell the same sweep is
#
# ```bash
# .venv/bin/python -m dpo_lab sweep --preset cpu                  # the cpu preset's 19 runs, one at a time
# .venv/bin/python -m dpo_lab sweep --preset cpu --methods DPO --set dpo.max_steps=200
# .venv/bin/python -m dpo_lab sweep sweeps/hh_paper.yaml --dry-run --force # check a spec (--force: no GPU here)
# .venv/bin/python -m dpo_lab sweep --preset paper                 # on a GPU machine with hub access
# ```
#
# On a machine with several GPUs the runner executes one run per GPU at a time (`CUDA_VISIBLE_DEVICES`
# set per run; `--devices 0,1` picks them); on a CPU it runs them one after another. The exit code is 1 if
# any run failed (its error is in the summary and in `runs/<sweep>/<run>/status.json`), 2 if the spec or
# a parameter is wrong, and nothing runs then.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
overrides: dict = {}  # dotted preset overrides for the demo sweep, e.g. {"dpo.max_steps": 200}
methods: list[str] = ["DPO"]  # methods of the demo sweep (one run per value of each method's sweep)
mfu: float = 0.4  # assumed model-FLOPs utilisation of training and forward passes for the cost estimate
decode_mfu: float = 0.05  # assumed utilisation of token-by-token sampling (memory-bound)

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

from dpo_lab.presets import project_root
from dpo_lab.scale import estimate, sweep

pd.set_option("display.width", 140)
pd.set_option("display.max_colwidth", 70)
# The demo writes to a scratch folder so it never mixes with your own runs/ (DPO_LAB_RUNS is the default).
root = Path(tempfile.mkdtemp(prefix="dpo_lab_sweeps_"))

# %% [markdown]
# ## 1. A sweep is a spec: a notebook and its runs
#
# A preset's own frontier sweep is built from the preset (one run per β, α, seed or target KL); a YAML spec
# does the same for any notebook. Every run's parameters are checked against the notebook's `parameters`
# cell *before anything runs*: papermill by itself only warns about an unknown parameter and runs anyway.

# %%
spec = sweep.preset_spec(preset, overrides, methods)
print(f"sweep {spec.name!r}: notebook {spec.notebook}, requires {list(spec.requires) or 'nothing'}")
for run in spec.runs:
    print(f"  {run.name}: {run.parameters}")

# %% tags=["nbval-check-output"]
try:
    sweep.check_parameters(project_root() / spec.notebook, {"method": "DPO", "beta": 0.1})
except sweep.SweepError as err:
    print(str(err).split(";")[0])
try:
    sweep.check_parameters(project_root() / spec.notebook, {"method": "DPO", "value": "0.1"})
except sweep.SweepError as err:
    print(err)

# %% [markdown]
# ## 2. Run it
#
# Each run executes `frontier_run.ipynb` in a fresh kernel and leaves in its folder the executed notebook,
# papermill's log, `metrics.jsonl`, `points.csv` and `result.json`. The stages every run reads (SFT
# policy, r\*, preference pairs) are cached under `artifacts/` by content hash, so the first run builds them
# and the rest reuse them.

# %%
outcomes = sweep.run_sweep(spec, root=root)
print(sweep.summarize(outcomes))
folder = root / spec.name
print(sorted(p.name for p in (folder / spec.runs[0].name).iterdir()))

# %% [markdown]
# ## 3. Resume: a rerun skips what finished
#
# A run is finished when its `status.json` says so, its `result.json` parses, and its parameters are the
# ones the spec gives now. Kill a sweep (or lose the machine) and start it again: finished runs are skipped,
# the interrupted one runs again and its trainer resumes from its last checkpoint. A changed parameter, or
# a truncated `result.json`, makes that run run again — never a silent reuse.

# %% tags=["nbval-check-output"]
again = sweep.run_sweep(spec, root=root, progress=False)
print("the rerun skipped every run:", [o.state for o in again] == ["skipped"] * len(spec.runs))
print("every run done:", sweep.plan(spec, root).state.tolist() == ["done"] * len(spec.runs))

# %% [markdown]
# ## 4. Read the results
#
# `results.csv` / `results.md` hold one row per run (its `result.json`, its state and wall time);
# `frontier_<sweep>_points.csv` every evaluation point of every run; `frontier_<sweep>.png` plots them on the
# reward–KL plane (`frontier.report`, the same code that writes `make reproduce`'s figure).

# %%
table = pd.read_csv(folder / "results.csv")
display(table.drop(columns=["error", "run_path"], errors="ignore").round(3))
display(Image(filename=str(folder / f"frontier_{spec.name}.png")))

# %%
points = pd.read_csv(folder / f"frontier_{spec.name}_points.csv")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for (method, hp), run in points.groupby(["method", "hyperparameter"], sort=False):
    axes[0].plot(run.step, run.reward_mean, marker="o", label=f"{method} {hp}")
    axes[1].plot(run.step, run.kl_mean, marker="o", label=f"{method} {hp}")
axes[0].set(xlabel="step", ylabel="mean r* (held-out prompts)", title="reward during training")
axes[1].set(xlabel="step", ylabel="KL(π ‖ π_ref)", title="KL during training")
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# **What to notice.** Each row's `seconds` (papermill's time for the run's notebook) is a few seconds
# against its `wall_s` (the training it once took): the sweep found the runs finished and only read them
# back. Its final points are notebook 05's (β = 0.1: reward 0.866 at KL 10.023), because both go through the
# same run folders. In the right panel, the smaller β, the higher the KL at each evaluation, except that
# β = 1 and β = 5 stay within 0.3 nats of each other (at step 200 β = 5 is 0.01 higher).
#
# ## 5. The paper's other tasks, as specs
#
# `sweeps/tldr_paper.yaml` (TL;DR summarisation, GPT-J SFT policy, β = 0.5) and `sweeps/hh_paper.yaml`
# (Anthropic-HH single-turn dialogue, Pythia-2.8B, β = 0.1) run `notebooks/templates/preference_dpo.ipynb` on the
# hub's preference data. They need a GPU and the hub (`requires: [gpu, hub]`), so the runner refuses them
# here; a dry run still checks every parameter against the notebook.

# %%
for path in sorted((project_root() / "sweeps").glob("*.yaml")):
    paper_spec = sweep.load_spec(path)
    sweep.validate_spec(paper_spec)
    print(f"{path.name}: {len(paper_spec.runs)} run(s), requires {list(paper_spec.requires)}, "
          f"lacking here: {sweep.check_requirements(paper_spec.requires) or 'nothing'}")

# %% [markdown]
# ## 6. What the `paper` preset would cost
#
# Training a transformer with $N$ parameters (those in matrix multiplies) on $T$ tokens costs about $6NT$
# FLOPs (forward $2NT$, backward $4NT$); a forward pass alone — reference log-probs, scoring, sampling —
# about $2NT$. GPU hours are then
#
# $$\text{GPU hours} = \frac{\text{FLOPs}}{\text{peak FLOP/s} \times \text{utilisation} \times 3600},$$
#
# with an H100's 989 TFLOP/s of dense bf16 and an *assumed* utilisation (`mfu` for training and forward
# passes, `decode_mfu` for token-by-token sampling, which is memory-bound). These are estimates, not
# measurements: the `arithmetic` column shows how each row was made.

# %%
costs = estimate.paper_cost_table(mfu=mfu, decode_mfu=decode_mfu)
display(costs[["task", "stage", "model", "pass", "flops", "gpu_hours"]].round({"gpu_hours": 2}))

# %%
for _, row in costs[costs.stage != "total"].iterrows():
    print(f"{row.task:>6} | {row.stage:<28} {row.arithmetic}")

# %% [markdown]
# ## 7. Memory: does a DPO step on gpt2-large fit on one 80 GB GPU?
#
# Policy weights, gradients and the optimizer state are kept in fp32 (RMSprop keeps one buffer per weight,
# AdamW two); the reference's log-probs are computed once before training, so the reference need not stay on
# the GPU. Activations grow with the micro-batch: gradient accumulation reaches the paper's batch of 64 pairs
# with a micro-batch that fits (`train_dpo` under `accelerate launch -m dpo_lab.scale.launch` does exactly that).

# %%
print(estimate.dpo_batch_plan(global_batch=64, num_processes=1))
one = estimate.dpo_memory_estimate(micro_batch_pairs=16, seq_len=512)
print(f"\nmicro-batch 16 × 512 tokens: {one.total:.1f} GiB of {one.gpu_gib:.0f} (fits: {one.fits})")
