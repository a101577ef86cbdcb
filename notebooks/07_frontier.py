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
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · The reward–KL frontier: DPO against PPO and the baselines
#
# The paper's Fig. 2 (left) is one plot: for every run of every method, each evaluation checkpoint becomes a
# point (mean sequence-level KL to $\pi_{\rm ref}$, mean ground-truth reward $r^*$ on held-out test
# prompts). A method is better when its points sit **up and to the left**: more reward for the same
# departure from the reference. The claim is that DPO's frontier dominates PPO's, even PPO with the true
# reward (PPO-GT): counting the points on the paper's figure, DPO beats 26 of 27, 28 of 29 and 34 of 35
# points of its three PPO-family series, in both reward and KL at once (the paper states no count).
#
# `pipeline.frontier` trains every run of the preset's sweeps (DPO β, Unlikelihood α, Preferred-FT seeds,
# PPO and PPO-GT target KLs), or loads it if it finished before: after notebooks 05–06 or
# `python -m dpo_lab reproduce` at the same preset, this notebook only reads `metrics.jsonl` files.
#
# **What you see, and what it costs.** The outputs below are the `cpu` preset's (the default), executed on
# its cached stages. *Run all* on a 2-core laptop (measured on this project's 2-core machines, often while
# other runs shared them, so an idle laptop may be faster):
#
# | preset | first time (empty caches) | stages cached |
# |---|---|---|
# | `smoke` (`DPO_LAB_PRESET=smoke`: seconds-long toy runs, for checking) | 159 s (it trains every smoke run) | |
# | `cpu` (default) | every run of 05 and 06: 5,380 s of runs at one thread each; `python -m dpo_lab reproduce` trains them two at a time in 45 min 33 s, after which this notebook only reads them | 50 s |
# | `gpu`, `paper` | need a GPU (not measured: none was available to this project) | |

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, every run and every evaluation
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
methods: list[str] = []  # methods on the plot, e.g. ["DPO", "PPO"]; [] plots all five (pipeline.METHODS)

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.paths import figures_dir
from dpo_lab.plots import plot_frontier, plot_reward_vs_cost
from dpo_lab.presets import get_preset
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 120)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
shown_methods = tuple(methods) or pipeline.METHODS
print(f"preset {config.name!r}; methods {list(shown_methods)}")

# %% [markdown]
# ## Every run of every method
# One row per evaluation point: the run (`method`, `hyperparameter`), its `step` (0 = the SFT policy every
# run starts from), the mean reward and mean KL with their standard errors over test prompts.

# %%
points = pipeline.frontier(config, shown_methods)
display(points[["method", "hyperparameter", "step", *frontier.EVAL_COLUMNS]].head(8).round(4))

# %% [markdown]
# The shape of the sweep (runs per method, evaluation points per method) follows from the preset alone:

# %%
shape = points.groupby("method", sort=False).agg(runs=("hyperparameter", "nunique"), points=("step", "size"))
print(shape.to_string())

# %% tags=["nbval-check-output"]
wanted = pd.Series([m for m, _ in pipeline.frontier_runs(config, shown_methods)]).value_counts(sort=False)
print("one run per value of each method's sweep:", shape.runs.to_dict() == wanted.to_dict())
print("every run evaluated at its start and at its last step:",
      all(run.step.min() == 0 and run.step.max() > 0 for _, run in points.groupby(["method", "hyperparameter"])))
start = points[points.step == 0]
assert np.allclose(start.kl_mean, 0.0, atol=1e-6), "every run starts at pi_ref: KL 0"
assert start.reward_mean.nunique() == 1, "every run starts from the same SFT policy and evaluation samples"
print(f"SFT start: every run's step-0 point is the same policy (KL {abs(start.kl_mean.max()):.1f})")

# %% [markdown]
# ## The frontier
# Each dot is one checkpoint; the star is the shared start $\pi^{\rm SFT}$; each method's step line is its
# **upper envelope** (the points no other point of the same method beats on both axes).

# %%
title = f"IMDb sentiment, preset '{config.name}': reward vs KL"
fig = plot_frontier(points, figures_dir() / "07_frontier.png", title=title)
plt.show()

# %% [markdown]
# ## What each run spent
# A frontier compares outcomes; a fair comparison also compares budgets. Every run logs running totals of
# what it cost (`frontier.COST_COLUMNS`): policy tokens through the forward and backward passes, samples
# drawn, reward-model queries, optimizer steps and wall seconds. The budget rule of the `cpu` preset is
# **equal policy backward tokens** for DPO and PPO (README, "The budget rule"): the policy-gradient work each
# method may do. PPO pays on top of it for sampling its rollouts and querying the reward, which DPO's fixed
# pairs already hold; the right panel shows what that costs in time.

# %%
fig = plot_reward_vs_cost(points[points.method.isin(shown_methods)], figures_dir() / "07_reward_vs_cost.png",
                          title=f"preset '{config.name}': reward against what each run spent")
plt.show()
display(frontier.summary_table(points)[["method", "hyperparameter", "steps", "reward_final", "kl_final",
                                        "policy_backward_tokens", "samples", "reward_queries", "wall_s"]]
        .groupby("method", sort=False).agg("mean", numeric_only=True).round(1))

# %% [markdown]
# ## Dominance: the paper's count, honestly counted
# For each PPO-family series: how many of its **distinct** evaluation points (starting checkpoints excluded;
# two runs that took the same path count once) have some DPO point with **both** strictly higher reward and
# strictly lower KL (`frontier.dominance`); and the noise-aware count, where the reward gap must exceed the
# two points' combined standard error $\sqrt{\mathrm{se}_{\rm DPO}^2 + \mathrm{se}_{\rm PPO}^2}$.

# %%
counts = frontier.dominance_counts(points[points.method.isin(shown_methods)])
display(pd.DataFrame([{"series": name, "dominated by DPO": f"{c['dominated']}/{c['total']}",
                       "share": c["share"], "beyond 1 SE": f"{c['dominated_noise_aware']}/{c['total']}"}
                      for name, c in counts.items()]).round(3))
print(f"paper: {frontier.PAPER_DOMINANCE}, about 0.97 overall")
print("(the paper's third series is TRL's PPO-GT; here the third row pools our PPO and PPO-GT points)")

# %% [markdown]
# ## Per run: start, end, best
# `reward_final ± reward_final_se` and `kl_final` are the run's last checkpoint; `reward_best` its best
# evaluation. (`python -m dpo_lab reproduce` writes the same table to `figures/results_<preset>.md`.)

# %%
table = frontier.summary_table(points)
display(table.round(3))

# %% [markdown]
# ## What the figure shows, and why
#
# **Read it at equal KL.** Reward alone is not the goal: Eq. 3 trades reward against
# $\mathbb D_{\rm KL}[\pi\,\|\,\pi_{\rm ref}]$, and a policy can always buy reward by drifting far from
# $\pi_{\rm ref}$ (toward repetitive, degenerate text that the classifier likes). So compare methods by
# their envelopes: at a given KL, which reaches more reward? The starting star is the same for every run.
#
# **Why DPO should sit on or above PPO's envelope.** DPO and PPO optimise the same objective, Eq. 3.
# DPO's loss (Eq. 7) fits the policy whose implied reward $\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$
# (Eq. 5) explains the preferences; its minimiser is Eq. 4's exact solution of Eq. 3 for that reward. It
# uses the data in a supervised way: exact log-probabilities of fixed pairs, a low-variance gradient, no
# sampling, no critic. PPO reaches for the same optimum through estimates: every step it samples one
# completion per prompt, scores it, and follows a policy gradient whose advantage comes from a value head
# that is still learning (notebook 06). §5.2 of the paper names the cause: the normaliser of Eq. 10, the
# soft value function of $\pi_{\rm ref}$, has to be estimated, and without a good estimate the gradient has
# high variance. The KL penalty, too, is estimated from the same few samples, and the adaptive β moves while
# the policy trains, so PPO's points scatter below the trade-off it could reach in principle. PPO with the
# learned reward adds one more error: $r_\phi$ ranks some pairs wrongly (its validation accuracy, notebook
# 06), and PPO optimises those mistakes too. PPO-GT removes that error with the oracle $r^*$; in the paper
# DPO still dominates it, which points at the optimisation, not the reward model, as PPO's handicap.
#
# **The baselines.** Preferred-FT only imitates the chosen completions, and a chosen completion is often
# barely better than its rejected twin: in the paper its points stay near the start, with little reward
# gained. Unlikelihood pushes the rejected tokens down with no anchor to $\pi_{\rm ref}$: it can gain
# reward, but no knob of its loss controls the KL it pays for it.
#
# **What the `cpu` figure above shows** (one seed; the numbers quoted are from `figures/results_cpu.md` and
# the README, measured by `python -m dpo_lab reproduce --preset cpu`). With PPO given the same policy
# backward tokens as DPO, DPO beats most PPO points with the learned $r_\phi$ (14 of 18 distinct points,
# 12 beyond one combined SE) but only 7 of 18 PPO-GT points. DPO is ahead at small KL (best $r^*$ within
# KL 4: DPO 0.757, PPO-GT 0.672) and PPO-GT ahead from KL ≈ 6.5 on (within KL 13: 0.905 against 0.826).
# The paper's argument above does not fail here so much as meet its limits at this scale: PPO-GT climbs
# $r^*$ itself on its own fresh samples, while DPO learns from 9,000 fixed pairs of SFT samples and its
# best run stops gaining reward beyond KL ≈ 8. PPO's gap to PPO-GT at every target is the cost of
# $r_\phi$'s ranking errors (0.758 held-out pair accuracy against $r^*$'s 1.0). Xu et al. (2024) report
# the same reversal for a carefully tuned PPO. The README gives the evidence in full, and at `smoke` (what
# CI runs) the points prove nothing: they check the plumbing.
#
# **Across seeds.** One seed is an anecdote. The seed study (`python -m dpo_lab sweep
# sweeps/imdb_cpu_seeds.yaml`: DPO, PPO and PPO-GT at seeds 0, 1, 2, each seed a whole new pipeline) averages
# each method's envelope over seeds; the band is ± one SE across seeds. It agrees with the single seed:
# DPO ahead up to KL 6, the three level within about one SE at KL 8–10, PPO-GT ahead at KL 13; summed over
# seeds DPO beats 40 of 56 PPO points and 27 of 56 PPO-GT points (README, "Seeds").
#
# ![seed envelopes](../figures/frontier_cpu_seeds.png)
