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
# # 05 · DPO on IMDb: training, evaluation, and the reward–KL frontier
#
# With $\pi_{\rm ref}=\pi^{\rm SFT}$ (notebook 03) and the preference pairs $(x, y_w, y_l)$ (notebook 04), DPO
# minimises Eq. 7 directly, with no reward model and no sampling during training:
# $$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref})=-\mathbb E_{(x,y_w,y_l)}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\beta\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}\Big)\Big],$$
# where $\log\pi(y|x)$ is **summed over the completion's tokens** (prompt and padding masked out).
# `dpo_lab.dpo_trainer.train_dpo` writes it out: chosen and rejected share one forward pass, the reference
# log-probs are computed once and cached, RMSprop with linear warmup (App. B), and every `eval_every`
# steps the policy is **evaluated** on held-out test prompts: its mean reward $r^*$ and its mean
# sequence-level KL to $\pi_{\rm ref}$ (footnote 3: the sum over steps of the exact per-token KL over the
# vocabulary). Each evaluation is one point of the paper's Fig. 2 (left).
#
# **The numbers shown are from the tiny `smoke` preset** (12 DPO steps on a toy policy: the curves are
# noisy and short). For the laptop reproduction run
# `papermill notebooks/05_dpo.ipynb out.ipynb -p preset cpu` (or set `DPO_LAB_PRESET=cpu`); it reuses the
# SFT policy and pairs of notebooks 03–04 if they ran at the same preset.
#
# Cells starting with `# NBVAL_CHECK_OUTPUT` print numbers the notebook tests compare.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, DPO's batch order and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
beta: float = 0.1  # DPO temperature β of Eq. 7 for the run studied in detail
betas: list[float] = []  # β values of the frontier sweep; [] keeps the preset's (papermill -y "betas: [0.05, 1]")
n_show: int = 4  # test prompts whose completions are shown before and after DPO

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.models import load_policy
from dpo_lab.paths import artifacts_dir, figures_dir
from dpo_lab.plots import plot_frontier
from dpo_lab.presets import get_preset
from dpo_lab.rewards import score_completions
from dpo_lab.run import read_metrics
from dpo_lab.sampling import sample_completions
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 60)
config = get_preset(preset, seed=seed, **overrides, **({"dpo.betas": betas} if betas else {}))
seed_everything(config.seed)
print(f"preset {config.name!r}: {config.dpo}")

# %% [markdown]
# ## One DPO run
# `pipeline.dpo` trains (or, if this exact run finished before, loads) one policy at KL coefficient
# β. Its folder holds `metrics.jsonl` (one line per step, TRL's metric names), the checkpoints, and the
# final policy.

# %%
result = pipeline.dpo(config, beta)
metrics = read_metrics(result.metrics_path)
train = pd.DataFrame([m for m in metrics if "loss" in m]).set_index("step")
print(f"{result.steps} steps; final policy in artifacts/{result.checkpoint_dir.relative_to(artifacts_dir())}")

# %% [markdown]
# ## The loss at initialisation is $\log 2$
# At step 1, $\pi_\theta=\pi_{\rm ref}$ (the policy starts from the SFT weights, and dropout is off), so
# both log-ratios are 0, every implicit reward $\hat r=\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$ is 0, and
# the loss is $-\log\sigma(0)=\log 2$, whatever β. A run that does not start there compares its policy with
# a different reference than it thinks, or leaves dropout on.

# %%
# NBVAL_CHECK_OUTPUT
first = train.iloc[0]
print(f"step {train.index[0]}: loss {round(first['loss'], 4)}  log 2 = {round(math.log(2), 4)}")
print(f"implicit rewards at step 1: chosen {abs(first['rewards/chosen']):.4f}, "
      f"rejected {abs(first['rewards/rejected']):.4f}")
assert abs(first["loss"] - math.log(2)) < 1e-3, "DPO's first loss is not log 2: policy != reference?"

# %% [markdown]
# ## Training curves
# * `loss` falls from $\log 2$; `rewards/accuracies` is the share of the batch's pairs whose implicit
#   reward ranks $y_w$ above $y_l$; `rewards/margins` is the mean of $\hat r(x,y_w)-\hat r(x,y_l)$.
# * `logps/chosen` and `logps/rejected` are $\log\pi_\theta(y|x)$ themselves. The loss only sees the
#   **margin**, so both may fall, the chosen ones included, while the margin grows: mass moves to a few
#   completions better than either. Notebook 01 shows this on the exact bandit; it is not a bug.

# %%
def plot_training(frame: pd.DataFrame, title: str) -> plt.Figure:
    """Four panels of one run's per-step metrics (TRL names)."""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    axes[0].plot(frame.index, frame["loss"], label="loss")
    axes[0].axhline(math.log(2), color="grey", ls="--", lw=0.8, label="log 2")
    axes[1].plot(frame.index, frame["rewards/accuracies"], color="tab:red", label="rewards/accuracies")
    axes[1].axhline(0.5, color="grey", ls="--", lw=0.8)
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
        axes[2].plot(frame.index, frame[key], label=key)
    axes[2].axhline(0, color="grey", lw=0.5)
    for key in ("logps/chosen", "logps/rejected"):
        axes[3].plot(frame.index, frame[key], label=key)
    for ax in axes:
        ax.set_xlabel("DPO step")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


fig = plot_training(train, f"DPO, beta={beta:g} ({config.name} preset)")
fig.savefig(figures_dir() / "05_training_curves.png", dpi=120)
plt.show()

# %%
start, end = train.iloc[0], train.iloc[-1]
for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
    print(f"{key:20s} {start[key]:9.4f} -> {end[key]:9.4f}")

# %% [markdown]
# ## Evaluation: reward up, KL up
# Every `eval_every` steps (and at step 0, the SFT policy itself) the trainer samples completions of the
# held-out test prompts from $\pi_\theta$, scores them with $r^*$, and measures their sequence KL to
# $\pi_{\rm ref}$. Error bars: one standard error over prompts.

# %%
points = frontier.evaluation_points(result.metrics_path)
display(points.round(4))

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
left.errorbar(points.step, points.reward_mean, yerr=points.reward_se, marker="o", capsize=3)
left.set_ylabel(r"mean $r^*$ on test prompts")
right.errorbar(points.step, points.kl_mean, yerr=points.kl_se, marker="o", color="tab:orange", capsize=3)
right.set_ylabel(r"sequence KL$(\pi_\theta\,\|\,\pi_{\rm ref})$")
for ax in (left, right):
    ax.set_xlabel("DPO step")
fig.suptitle(f"Evaluation of DPO, beta={beta:g}")
fig.tight_layout()
fig.savefig(figures_dir() / "05_evaluation.png", dpi=120)
plt.show()

# %% [markdown]
# ## Completions before and after DPO
# The same test prompts, sampled from $\pi^{\rm SFT}$ and from the final DPO policy with the same seed: both
# draws use the same random numbers, so where the two texts differ, the policy's change made the difference.

# %%
sft_policy, tokenizer, _ = pipeline.sft_policy(config)
dpo_policy, _ = load_policy(result.checkpoint_dir)
shown = pipeline.prompts(config, tokenizer, "test")[:n_show]
settings = dict(n_per_prompt=1, max_new_tokens=config.eval.max_new_tokens, batch_size=32, seed=config.seed,
                progress=False)
before = [c[0] for c in sample_completions(sft_policy, tokenizer, shown, **settings)]
after = [c[0] for c in sample_completions(dpo_policy, tokenizer, shown, **settings)]
reward, _ = pipeline.reward_model(config)
comparison = pd.DataFrame({"prompt": shown, "SFT": before, "r* SFT": score_completions(reward, shown, before),
                           "DPO": after, "r* DPO": score_completions(reward, shown, after)})
display(comparison.round(3))

# %% [markdown]
# ## The β sweep and the reward–KL frontier
# β sets the price of KL (Eq. 3): small β lets the policy drift far from $\pi_{\rm ref}$ for reward, large
# β keeps it close. Each run's evaluation points trace a curve; together, their upper envelope is DPO's
# **reward–KL frontier**, the paper's Fig. 2 (left). The comparison with PPO and the other baselines on the
# same axes is `python -m dpo_lab reproduce`'s figure.

# %%
sweep = pipeline.dpo_sweep(config)
display(sweep.round(4))
# Each run's path from the SFT start, in step order, labelled at its final checkpoint.
fig = plot_frontier(sweep, figures_dir() / "05_frontier.png", label_runs=True,
                    title=f"DPO beta sweep, {config.name} preset ({config.dpo.max_steps} steps)")
plt.show()

# %%
final = sweep.sort_values("step").groupby("hyperparameter").last()
for name, row in final.iterrows():
    print(f"{name:10s} final: reward {row.reward_mean:.3f} ± {row.reward_se:.3f}, KL {row.kl_mean:.3f}")
assert np.all(sweep[sweep.step == 0].kl_mean.abs() < 1e-6), "the starting policy must have KL 0 to itself"
