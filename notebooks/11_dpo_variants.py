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
# # 11 · Lab: DPO's variants on IMDb, one frontier
#
# The outputs are the `cpu` preset's, seed 0; what a run costs is in the README, "Running the notebooks".
#
# Notebook 09 showed on an exact bandit why one might change Eq. 7. This lab trains the changes on the
# **same cached preference data** as notebook 05, with the same optimizer, steps and evaluation, and puts
# every run on one reward–KL plot with DPO's β sweep:
#
# | variant | what it changes |
# |---|---|
# | **IPO** (sum) | regresses the log-ratio margin to a target $1/(2\beta)$ instead of pushing it up forever |
# | **IPO** (mean, as TRL) | the same, on log-probs averaged over the completion's tokens |
# | **cDPO** | assumes each label is flipped with probability ε, which bounds the margin |
# | **hinge** (SLiC) | stops caring about a pair once its implicit-reward margin reaches 1 |
# | **RPO** (DPO + α NLL) | adds the chosen completion's per-token NLL, so its likelihood cannot collapse |
# | **Plackett–Luce** | one likelihood for the ranking of all 4 samples of a prompt, not 6 separate pairs |
#
# Every variant is a setting of the one training loop (`DPOConfig.loss_type`, `label_smoothing`,
# `average_logprobs`, `rpo_alpha`; `train_dpo` in `dpo_lab/dpo_trainer.py`) and of the one loss module
# (`losses.preference_loss`, `mean_token_nll`, `plackett_luce_loss`), so a run differs from DPO's in its loss and
# nothing else.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, every run's batch order and every evaluation
overrides: dict = {}  # dotted preset overrides for every run, e.g. {"dpo.max_steps": 100}
variants: list[dict] = [
    {"name": "IPO (sum)", "beta": 0.1, "dpo.loss_type": "ipo"},
    {"name": "IPO (mean, TRL)", "beta": 2.5, "dpo.loss_type": "ipo", "dpo.average_logprobs": True},
    {"name": "cDPO (eps 0.1)", "beta": 0.1, "dpo.label_smoothing": 0.1},
    {"name": "hinge (SLiC)", "beta": 0.1, "dpo.loss_type": "hinge"},
    {"name": "RPO (alpha 1)", "beta": 0.1, "dpo.rpo_alpha": 1.0},
    {"name": "Plackett-Luce (K 4)", "beta": 0.1, "dpo.loss_type": "plackett_luce"},
]  # one run each: its name on the plot, its beta, and dotted dpo.* overrides of the preset

# %% [markdown]
# **The β of each variant.** For the sigmoid family (DPO, cDPO, RPO, Plackett–Luce) β is the KL
# coefficient of Eqs. 3 and 7; 0.1 is the paper's middle value. The hinge's β sets where a pair stops counting:
# at a log-ratio margin of $1/\beta$ = 10 nats. For **IPO β plays another role**: the loss is
# $(h-\frac1{2\beta})^2$, so β fixes the *target* margin $1/(2\beta)$: 5 nats of summed log-ratio at
# β = 0.1. With per-token means (TRL's IPO) the same margin is per token, so β must grow with the length:
# β = 2.5 targets 0.2 nats a token, about 6.4 nats over the cpu preset's 32-token completions, close to the
# summed run's 5. Each variant's β is a parameter; the DPO curve is the preset's whole β sweep.

# %%
import math
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.losses import mean_token_nll, plackett_luce_loss, preference_loss
from dpo_lab.plots import METHOD_COLORS, plot_frontier
from dpo_lab.presets import Preset, figures_dir, get_preset
from dpo_lab.run import read_metrics
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 130)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
started = time.perf_counter()
print(f"preset {config.name!r}: {config.dpo.max_steps} steps a run, DPO betas {list(config.dpo.betas)}")

# %% [markdown]
# ## The losses, written out
# With $h=\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}$
# (log-probs summed over the completion's tokens, Eq. 7):
#
# * **DPO** (Eq. 7): $\;-\log\sigma(\beta h)$.
# * **IPO** (Azar et al. 2023, Eq. 17): $\;(h-\frac{1}{2\beta})^2$. Its minimum is at a finite margin, so it
#   stops pushing a pair apart once $h$ reaches the target.
# * **IPO, length-normalised** (TRL): the same with $\bar h$, built from $\frac1{|y|}\log\pi(y|x)$, the mean
#   token log-prob; every completion counts the same whatever its length.
# * **cDPO** (Mitchell 2023): $\;-(1-\varepsilon)\log\sigma(\beta h)-\varepsilon\log\sigma(-\beta h)$, the
#   expected DPO loss if each label is flipped with probability ε; its minimum is at
#   $\beta h=\log\frac{1-\varepsilon}{\varepsilon}$ ($\approx 2.2$ at ε = 0.1), not at infinity.
# * **hinge** (SLiC, Zhao et al. 2023): $\;\max(0, 1-\beta h)$: zero loss and zero gradient once
#   $\beta h\ge 1$.
# * **RPO** (Pang et al. 2024, arXiv 2404.19733; Liu et al. 2024, arXiv 2405.16436):
#   $\;-\log\sigma(\beta h)-\alpha\frac{1}{|y_w|}\log\pi_\theta(y_w|x)$, DPO plus the chosen completion's NLL
#   per token (Pang et al.'s normalisation; TRL's `rpo_alpha` averages over the batch's tokens instead).
# * **Plackett–Luce** (the paper's App. A.3, Eq. 18): for a ranking $y_1\succ\dots\succ y_K$ of one prompt's
#   samples, with $h_k=\log\frac{\pi_\theta(y_k|x)}{\pi_{\rm ref}(y_k|x)}$,
#   $\;-\sum_{k=1}^{K}\log\frac{\exp(\beta h_k)}{\sum_{j=k}^{K}\exp(\beta h_j)}$: the probability that a
#   Plackett–Luce model with the implicit rewards $\beta h$ ranks the samples in r*'s order. For $K=2$ it
#   is Eq. 7.
#
# The next cell writes each in a line or two of torch on random log-probs and compares it with the library
# function the trainer calls.

# %% tags=["nbval-check-output"]
F64 = torch.float64
g = torch.Generator().manual_seed(0)
B, T, K = 8, 6, 4
pw, pl, rw, rl = (-(torch.rand(B, generator=g, dtype=F64) * 30) for _ in range(4))  # summed log-probs
tokens = [torch.log(torch.rand(B, T, generator=g, dtype=F64) * 0.98 + 0.01) for _ in range(4)]  # w, l, ref w, l
mask = torch.ones(B, T, dtype=torch.long)
mask[:, T - 2:] = torch.randint(0, 2, (B, 2), generator=g)  # completions of 4 to 6 tokens
b, eps, alpha = 0.1, 0.1, 1.0
h = (pw - rw) - (pl - rl)
mean = [(t * mask).sum(-1) / mask.sum(-1) for t in tokens]  # per-token mean log-probs
h_mean = (mean[0] - mean[2]) - (mean[1] - mean[3])
nll_w = -mean[0]  # RPO's NLL: -log pi(y_w|x) / |y_w|
ranked_policy, ranked_ref = (-(torch.rand(B, K, generator=g, dtype=F64) * 30) for _ in range(2))
z = b * (ranked_policy - ranked_ref)

by_hand = {
    "DPO": -F.logsigmoid(b * h),
    "IPO (sum)": (h - 1 / (2 * b)) ** 2,
    "IPO (mean)": (h_mean - 1 / (2 * b)) ** 2,
    "cDPO": -(1 - eps) * F.logsigmoid(b * h) - eps * F.logsigmoid(-b * h),
    "hinge": torch.relu(1 - b * h),
    "RPO": -F.logsigmoid(b * h) + alpha * nll_w,
    "Plackett-Luce": -sum(z[:, k] - torch.logsumexp(z[:, k:], dim=-1) for k in range(K)),
}
means = [-mean_token_nll(t, mask) for t in tokens]
library = {
    "DPO": preference_loss(pw, pl, rw, rl, beta=b)[0],
    "IPO (sum)": preference_loss(pw, pl, rw, rl, beta=b, loss_type="ipo")[0],
    "IPO (mean)": preference_loss(*means, beta=b, loss_type="ipo")[0],
    "cDPO": preference_loss(pw, pl, rw, rl, beta=b, label_smoothing=eps)[0],
    "hinge": preference_loss(pw, pl, rw, rl, beta=b, loss_type="hinge")[0],
    "RPO": preference_loss(pw, pl, rw, rl, beta=b)[0] + alpha * mean_token_nll(tokens[0], mask),
    "Plackett-Luce": plackett_luce_loss(ranked_policy, ranked_ref, beta=b)[0],
}
for name, mine in by_hand.items():
    same = torch.allclose(mine, library[name], rtol=1e-10, atol=1e-12)
    print(f"{name:14s} written out == library: {same}")
    assert same, name
pl_two = plackett_luce_loss(torch.stack([pw, pl], 1), torch.stack([rw, rl], 1), beta=b)[0]
print("Plackett-Luce with K=2 == DPO:", torch.allclose(pl_two, library["DPO"], rtol=1e-12, atol=1e-12))
rpo_zero = preference_loss(pw, pl, rw, rl, beta=b)[0] + 0.0 * nll_w
print("RPO with alpha=0 == DPO, bit for bit:", torch.equal(rpo_zero, library["DPO"]))

# %% [markdown]
# ## The data: the same samples as pairs and as rankings
# The pairs are notebook 04's: every prompt's 4 samples from $\pi_{\rm SFT}$, scored by r*, all 6 pairs
# with a strict preference. Plackett–Luce needs a strict order of all 4, so a prompt with a tie or an empty
# sample is dropped whole (`pipeline.preference_rankings`). The budget is matched in completions per step:
# DPO's `batch_size` pairs × 2 completions = Plackett–Luce's `2 · batch_size / K` rankings × K, every one
# through the same forward and backward passes, for the same number of steps. Plackett–Luce therefore sees
# fewer prompts a step, and passes over its smaller data set more often.

# %%
pairs, pair_stats = pipeline.preference_data(config)
rankings, ranking_stats = pipeline.preference_rankings(config)
k = len(rankings["completions"][0])
print(f"pairs: {len(pairs)} from {pair_stats['n_prompts']} prompts ({pair_stats['n_ties']} tied pairs and "
      f"{pair_stats['n_empty']} with an empty sample dropped)")
print(f"rankings of K={k}: {ranking_stats['n_rankings']} of {ranking_stats['n_prompts']} prompts "
      f"({ranking_stats['n_tied']} with a tie and {ranking_stats['n_empty']} with an empty sample dropped)")
pl_batch, pl_micro = 2 * config.dpo.batch_size // k, 2 * config.dpo.micro_batch_size // k
assert pl_batch * k == 2 * config.dpo.batch_size and pl_micro * k == 2 * config.dpo.micro_batch_size
print(f"completions a step: DPO {config.dpo.batch_size} pairs x 2 = {2 * config.dpo.batch_size}; "
      f"Plackett-Luce {pl_batch} rankings x {k} = {pl_batch * k}")
print("best-ranked sample of the first ranking:", repr(rankings["completions"][0][0][:70]))


# %% [markdown]
# ## The runs
# Each variant is the preset with its overrides (and, for Plackett–Luce, the batch sizes above) trained by
# `pipeline.frontier` at its one β: a cached run like every other, its folder keyed by every setting that
# changes the trajectory, so a finished variant is loaded, not retrained. The DPO reference is the preset's
# β sweep.

# %%
def variant_preset(variant: dict) -> Preset:
    """The preset of one variant: its dpo.* overrides, its beta as a one-value sweep, PL's batch sizes."""
    settings = {key: value for key, value in variant.items() if key not in ("name", "beta")}
    if settings.get("dpo.loss_type") == "plackett_luce":
        settings.update({"dpo.batch_size": pl_batch, "dpo.micro_batch_size": pl_micro})
    return get_preset(preset, seed=seed, **{**overrides, **settings, "dpo.betas": [variant["beta"]]})


timings: dict[str, float] = {}
first_steps: dict[str, dict] = {}  # each variant's step-1 training metrics
frames = [pipeline.frontier(config, ("DPO",))]
for variant in variants:
    spent: dict[str, float] = {}
    run_points = pipeline.frontier(variant_preset(variant), ("DPO",), timings=spent)
    timings[variant["name"]] = spent["DPO"]
    frames.append(run_points.assign(method=variant["name"]))
    finished = pipeline.result(variant_preset(variant), "DPO", variant["beta"])  # loaded: it just finished
    first_steps[variant["name"]] = next(m for m in read_metrics(finished.metrics_path) if "loss" in m)
points = pd.concat(frames, ignore_index=True)
print(f"{points.method.nunique()} series, {len(points)} evaluation points; variants trained or loaded in "
      f"{sum(timings.values()):.0f} s")

# %% [markdown]
# ## The loss at step 1
# At step 1 the policy is the reference, so every $h$ is 0 and each loss starts at a value set by its
# formula alone: $\log 2$ for the sigmoid family (cDPO too), $1/(4\beta^2)$ for IPO, 1 for the hinge,
# $\log 2$ plus α times the chosen completions' NLL for RPO, and $\log K!$ for Plackett–Luce (every one of
# the $K!$ orders equally likely). A run that starts elsewhere is not comparing its policy with its reference.

# %% tags=["nbval-check-output"]
def start_value(variant: dict, first: dict) -> tuple[str, float]:
    """What the step-1 loss must be when pi_theta = pi_ref, as a formula and its value."""
    loss_type = variant.get("dpo.loss_type", "sigmoid")
    if loss_type == "ipo":
        return "1/(4 beta^2)", 1 / (4 * variant["beta"] ** 2)
    if loss_type == "hinge":
        return "1", 1.0
    if loss_type == "plackett_luce":
        return f"log {k}!", math.log(math.factorial(k))
    if variant.get("dpo.rpo_alpha", 0.0) > 0:
        return "log 2 + alpha NLL", math.log(2) + variant["dpo.rpo_alpha"] * first["nll/chosen_per_token"]
    return "log 2", math.log(2)


for variant in variants:
    first = first_steps[variant["name"]]
    formula, value = start_value(variant, first)
    ok = abs(first["loss"] - value) < 1e-3 * max(1.0, value)
    print(f"{variant['name']:22s} step-1 loss = {formula:18s}: {ok}")
    assert ok, (variant["name"], first["loss"], value)

# %% [markdown]
# ## One frontier
# Every evaluation point of every run: mean KL to $\pi_{\rm ref}$ on the x-axis, mean r* on held-out test
# prompts on the y-axis, each series' upper envelope, the SFT start as a star; DPO is the preset's β sweep.

# %%
palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
METHOD_COLORS.update({v["name"]: palette[i % len(palette)] for i, v in enumerate(variants)})  # plot_frontier's map
fig = plot_frontier(points, figures_dir() / "11_variants_frontier.png",
                    title=f"DPO variants on IMDb, {config.name} preset ({config.dpo.max_steps} steps)")
plt.show()

# %% [markdown]
# **What to notice.** Each variant is one run, so its dots trace one path from the star; DPO's β sweep gives
# five paths and the envelope over all of them. Find where each variant's last dot lies against DPO's
# envelope at the same KL: above it, on it, or below it. IPO (sum), cDPO and RPO, all at DPO's β = 0.1,
# end at a smaller KL than DPO β = 0.1 does: IPO's and cDPO's optimal margins are finite (notebook 09), and
# RPO's NLL term pulls towards $\pi_{\rm ref}$'s own samples.

# %% [markdown]
# ## Results
# Each run's final point and its best reward; `policy_backward_tokens` and `wall_s` are what the run spent.

# %%
table = frontier.summary_table(points)
betas = {v["name"]: v["beta"] for v in variants}
table.insert(1, "beta", [betas.get(m, float(str(hp).split("=")[1])) for m, hp in
                         zip(table.method, table.hyperparameter, strict=True)])
shown = ["method", "beta", "steps", "reward_final", "reward_final_se", "kl_final", "reward_best",
         "policy_backward_tokens", "wall_s"]
display(table[[c for c in shown if c in table.columns]].round(3))
print(f"notebook ran in {time.perf_counter() - started:.0f} s")

# %% [markdown]
# **What to notice.** `policy_backward_tokens` is (nearly) the same in every row: each variant had DPO's
# budget, so the rows differ in their loss alone. Compare `reward_final` and `kl_final` of a variant with
# DPO's row at the same β (0.1 for most variants): how much KL did the changed loss save, and how much
# reward did it cost?

# %% [markdown]
# ## Reading the frontier
# What to look for in the `cpu` run (seed 0; one β per variant, 250 steps each, the same policy backward
# tokens as every DPO run), with the numbers in the table above. Up and to the left is better.
#
# * **Plackett–Luce (K = 4)**: with the same completions a step it sees 16 prompts' full orders instead of
#   32 pairs, each ranking holding all six of a prompt's comparisons in one term. Does its final point beat
#   a DPO point on both axes?
# * **cDPO (ε = 0.1)** stops where $\beta h=\log 9$, so it ends at a smaller KL than DPO at the same β. Its
#   final point lies in a KL range that DPO's β = 0.1 run crosses on its way out (the checkpoints of that
#   path in the figure), so compare it with those checkpoints, not only with DPO's final points. r*'s labels
#   have no noise: any gain is a better-placed stopping point, not noise robustness.
# * **hinge (SLiC)** drops pairs already beyond the margin; compare its row with DPO β = 0.1's.
# * **IPO** regresses the margin onto a target ($1/(2\beta)$: 5 nats for the summed form at β = 0.1, 0.2
#   nats a token for the length-averaged one at β = 2.5), so it should move little from the start.
# * **RPO (α = 1)** adds the NLL of the chosen completions, which are samples of $\pi_{\rm ref}$ itself: an
#   extra pull towards the SFT distribution, like a strong KL term. Compare its `kl_final` with plain DPO's
#   at the same β.
#
# One seed and one β per variant: a variant "above the envelope" is one point, within a few SE of DPO's
# curve in most cases. A β sweep per variant and several seeds (as notebook 07's seed study does for DPO and
# PPO) would be needed to call any of them better than DPO.
