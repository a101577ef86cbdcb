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
# # 13 · Lab: whose samples are the pairs made of? On-policy, off-policy and one round of iterative DPO
#
# The outputs are the `cpu` preset's, seed 0; what a run costs is in the README, "Running the notebooks".
#
# The paper builds its IMDb pairs from samples of $\pi_{\rm SFT}$, the same model that DPO then uses as
# $\pi_{\rm ref}$ and starts from (§6.1): the pairs are **on-policy** at step 0. Many preference data sets
# are not: their completions come from other models (Anthropic-HH, UltraFeedback). And "online" or
# **iterative** DPO (Xu et al. 2023; Yuan et al. 2024; Guo et al. 2024) keeps resampling from the policy
# being trained. This lab asks, at an equal number of pairs, labelled by the same r*, trained with the same
# settings and β:
#
# 1. **on-policy**: pairs of $\pi_{\rm SFT}$'s samples (notebook 05's run);
# 2. **off-policy**: pairs of a *sibling*'s samples, a model of the same size trained by the same recipe on
#    the same train reviews with the same tokenizer, from another seed (its own initialisation and data order);
# 3. **iterative, round 2**: resample 4 completions per train prompt from the round-1 DPO policy
#    $\pi_1$, label them with r*, and train again from $\pi_1$ with $\pi_1$ as the reference;
# 4. **round 2 on the old pairs**: the same second round on round 1's own pairs, so that resampling is the
#    only difference between 3 and 4.
#
# Every run is placed on the frontier as the others are: mean r* and exact sequence KL to
# $\pi_{\rm SFT}$ on the held-out test prompts.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, every run and every evaluation
overrides: dict = {}  # dotted preset overrides for every run, e.g. {"dpo.max_steps": 100}
beta: float = 0.1  # the KL coefficient of every run here (Eq. 7)
sampler_seed: int = 1  # the sibling: pi_SFT's recipe and data, this seed for its initialisation and order

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, labs, pipeline
from dpo_lab.logprobs import completion_logprobs
from dpo_lab.plots import METHOD_COLORS, plot_frontier, upper_envelope
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 140)
started = time.perf_counter()
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
print(f"preset {config.name!r}: beta {beta}, {config.dpo.max_steps} steps a run, sibling seed {sampler_seed}")

# %% [markdown]
# ## Three sources of pairs
# The same train prompts, 4 samples each, every pair labelled by r* (ties and empty completions dropped),
# then cut to the same number of pairs (`labs.equal_count`: a seeded subset, in order).

# %%
sft, tokenizer, _ = pipeline.sft_policy(config)
round_1 = pipeline.dpo(config, beta)
sources = {"on-policy (pi_SFT)": pipeline.preference_data(config),
           f"off-policy (sibling, seed {sampler_seed})": labs.sibling_preference_data(config, sampler_seed),
           "resampled from pi_1": labs.resampled_preference_data(config, round_1)}
n_pairs = min(len(pairs) for pairs, _ in sources.values())
for name, (pairs, stats) in sources.items():
    print(f"{name:28s} {len(pairs):6d} pairs ({stats['n_ties']} ties, {stats['n_empty']} empty dropped); "
          f"median r* gap {stats['gap_quantiles']['q0.5']:.3f}")
pairs_of = {name: labs.equal_count(pairs, n_pairs, seed=config.seed) for name, (pairs, _) in sources.items()}
print(f"every run trains on {n_pairs} pairs")

# %% [markdown]
# ## How off-policy is each source?
# One number per source: the mean log-probability per token that $\pi_{\rm SFT}$ (the reference of the
# first round) gives to its completions. DPO's gradient on a pair is weighted by how wrong the implicit
# reward is on it, and its log-ratios start at 0 on every pair whatever their source; what changes with the
# source is *where* in completion space the policy is pushed. The cell writes out the log-prob of one
# completion (shift by one, gather, sum over the completion's tokens) and checks it against the library routine
# (`logprobs.completion_logprobs`) that scores the rest.

# %% tags=["nbval-check-output"]
def token_ids(texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


prompt, completion = sources["on-policy (pi_SFT)"][0]["prompt"][0], sources["on-policy (pi_SFT)"][0]["chosen"][0]
(x,), (y,) = token_ids([prompt]), token_ids([completion])
with torch.no_grad():
    logits = sft(torch.tensor([x + y])).logits[0]
by_hand = torch.log_softmax(logits[len(x) - 1:-1].double(), -1).gather(-1, torch.tensor(y)[:, None]).sum()
library = completion_logprobs(sft, [x], [[y]], batch_size=64, pad_token_id=tokenizer.pad_token_id)[0, 0]
print("written out == library:", abs(by_hand.item() - library) < 1e-3)
assert abs(by_hand.item() - library) < 1e-3

# %%
rows = {}
for name, pairs in pairs_of.items():
    subset = pairs.select(range(min(len(pairs), 500)))
    ys = token_ids(list(subset["chosen"]) + list(subset["rejected"]))
    logps = completion_logprobs(sft, token_ids(list(subset["prompt"]) * 2), [[y] for y in ys], batch_size=64,
                                pad_token_id=tokenizer.pad_token_id)
    n_tokens = np.array([len(y) for y in ys])
    rows[name] = {"log pi_SFT per token": logps.sum() / n_tokens.sum(), "tokens per completion": n_tokens.mean()}
display(pd.DataFrame(rows).T.round(3))

# %% [markdown]
# ## The runs
# Runs 1–2 start at $\pi_{\rm SFT}$, the reference. Runs 3–4 start at $\pi_1$ (round 1: the frontier's
# DPO run at this β, which is run 1 whenever every source kept all its pairs, as at `cpu`) with
# $\pi_1$ as the reference: round 2's KL penalty keeps the policy near $\pi_1$, while the frontier's KL
# axis is still measured to $\pi_{\rm SFT}$, so round 2 starts where round 1 ended. Its steps are counted
# on from round 1's.

# %%
on_policy = pairs_of["on-policy (pi_SFT)"]
if len(on_policy) < len(sources["on-policy (pi_SFT)"][0]):  # not at cpu: there every source has all pairs
    print(f"run 1 trains on {n_pairs} of the on-policy pairs; round 2 starts from the run on all of them")
runs = {"1 on-policy": round_1 if len(on_policy) == len(sources["on-policy (pi_SFT)"][0])
        else labs.lab_dpo(config, on_policy, beta),
        "2 off-policy": labs.lab_dpo(config, pairs_of[f"off-policy (sibling, seed {sampler_seed})"], beta),
        "3 round 2, resampled": labs.lab_dpo(config, pairs_of["resampled from pi_1"], beta, start=round_1),
        "4 round 2, old pairs": labs.lab_dpo(config, on_policy, beta, start=round_1)}
frames = []
for name, result in runs.items():
    run_points = frontier.evaluation_points(result.metrics_path, method=name, hyperparameter=name)
    if name.split()[1] == "round":  # continue round 1's step count and cost
        last = frontier.evaluation_points(round_1.metrics_path).iloc[-1]
        cost = [c for c in frontier.COST_COLUMNS if c in run_points.columns]
        run_points = run_points.assign(step=run_points.step + last.step)
        run_points[cost] = run_points[cost] + last[cost].to_numpy(dtype=float)
    frames.append(run_points)
points = pd.concat(frames, ignore_index=True)
print(f"{len(runs)} runs, {len(points)} evaluation points; loaded or trained in "
      f"{time.perf_counter() - started:.0f} s since the start")

# %% tags=["nbval-check-output"]
first_end = frontier.evaluation_points(round_1.metrics_path).iloc[-1]
for name in ("3 round 2, resampled", "4 round 2, old pairs"):
    start = points[points.method == name].iloc[0]
    same = (start.reward_mean, start.kl_mean) == (first_end.reward_mean, first_end.kl_mean)
    print(f"{name}: starts at round 1's final point: {same}")
    assert same

# %% [markdown]
# ## On the frontier
# The grey steps are the frontier's DPO envelope (notebook 05's β sweep, on-policy pairs); each run's path is
# drawn in step order, round 2 continuing from round 1's last point.

# %%
palette = ["tab:red", "tab:blue", "tab:green", "tab:olive"]
METHOD_COLORS.update(dict(zip(runs, palette, strict=True)))
fig = plot_frontier(points, figures_dir() / "13_pair_sources.png", label_runs=True,
                    title=f"Whose samples? DPO beta={beta:g}, {config.name} preset")
sweep = pipeline.frontier(config, ("DPO",))
xs, ys = upper_envelope(sweep.kl_mean.to_numpy(), sweep.reward_mean.to_numpy())
fig.axes[0].step(xs, ys, where="post", color="grey", lw=2, alpha=0.35, label="DPO sweep envelope")
fig.axes[0].legend(loc="lower right", fontsize=8)
fig.savefig(figures_dir() / "13_pair_sources.png", dpi=150)
plt.show()

# %% [markdown]
# **What to notice.** Each run's path is labelled at its end. The two second rounds start where round 1
# ended, not at the star (a cell under "The runs" checks it), so their KL to $\pi_{\rm SFT}$ adds to round
# 1's. Compare each end point with the grey DPO sweep envelope at the same KL: above it means more r* than
# DPO on $\pi_{\rm SFT}$'s pairs reaches at that KL.

# %% [markdown]
# ## Results
# Final point of each run, and what it cost in all: round 2's columns include round 1's training, and its
# `samples` and `reward_queries` add the 4 samples per train prompt drawn and labelled for its pairs (as on
# the frontier, the samples that built runs 1 and 2's pairs are not counted: every DPO run reads such a data
# set).

# %%
table = frontier.summary_table(points).drop(columns="hyperparameter")
fresh = sources["resampled from pi_1"][1]["n_prompts"] * config.preferences.samples_per_prompt
for column in ("samples", "reward_queries"):
    if column in table.columns:
        table.loc[table.method == "3 round 2, resampled", column] += fresh
shown = ["method", "steps", "reward_start", "reward_final", "reward_final_se", "kl_final", "kl_final_se",
         "policy_backward_tokens", "samples", "reward_queries", "wall_s"]
display(table[[c for c in shown if c in table.columns]].round(3))

# %% [markdown]
# ## What the final policies write
# One completion of the same two test prompts from each run's final policy (temperature 1), with its r*.
# A mean r* near 1 says the classifier is convinced, not that the reviews read well.

# %%
reward, _ = pipeline.reward_model(config)
shown = labs.final_samples(config, runs, tokenizer, 2, {"r*": reward})
for i, row in enumerate(shown):
    if i == 0 or row["run"] != shown[i - 1]["run"]:
        print(f"--- {row['run']}")
    print(f"  r* {row['r*']:.2f}  {row['text'][:150]!r}")

# %% [markdown]
# ## Reading the lab
# What the `cpu` run shows (seed 0, β = 0.1, 9,000 pairs per run; r* ± one SE over 256 test prompts):
#
# * **Off-policy pairs: a little less reward, at a little less KL.** On the sibling's pairs DPO ends at
#   0.836 ± 0.009 with KL 9.654, against 0.866 ± 0.007 at KL 10.023 on $\pi_{\rm SFT}$'s own pairs. Same
#   pair count, labeller, β and steps. In the figure its end point lies just under the grey envelope, so
#   most of the 0.030 is a shorter way along the frontier, not a worse frontier. The sibling shares
#   $\pi_{\rm SFT}$'s reviews, tokenizer and recipe, yet its completions are 0.247 nats a token less likely
#   under $\pi_{\rm SFT}$ (−5.414 against −5.167), while their median r* gap is about the same (0.219
#   against 0.223). One seed cannot say whether the difference is the source or chance (README, "Seeds").
# * **Resampling from the policy climbs further, and further out.** $\pi_1$'s samples lie between the two
#   sources in likelihood under $\pi_{\rm SFT}$ (−5.274 nats a token), and their median r* gap is well
#   under half as large (0.083 against 0.223), because $\pi_1$'s samples already score high (run 1 ends at
#   0.866). A second round on them ends at 0.996 at KL 33.521; the same second round on the old pairs ends
#   at 0.949 ± 0.004 at KL 23.574. Both cost 500 DPO steps; the resampled one also drew and labelled 6,000
#   samples. The two never share a KL in the figure, so this is no comparison at equal KL.
# * **A second round takes the KL budget off.** Round 2's penalty is to $\pi_1$, not to $\pi_{\rm SFT}$,
#   so the same β no longer bounds the KL to $\pi_{\rm SFT}$: both second rounds continue the frontier far
#   to the right of where any single-round DPO run of the β sweep ends (the grey envelope's last step).
# * **r* near 1 is not a better review.** The samples above are strings of "best", "great" and
#   "excellent": the classifier r* is saturated and gamed. Iterating is a fast way to climb a reward; whether
#   that is what anyone wanted needs a gold reward that reads the text (notebook 12 draws the same lesson).
#
# One seed and one β: the differences are single trajectories, to be read against their error bars.

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
