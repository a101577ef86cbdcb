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
# # 06 · PPO and the other baselines on IMDb
#
# DPO (notebook 05) optimises the KL-regularised reward objective of Eq. 3 straight from preference pairs.
# The usual way to optimise it, the one DPO replaces, is reinforcement learning: sample completions from the
# policy, score them with a reward model, and raise the probability of the tokens that led to high scores,
# while a KL penalty holds the policy near $\pi_{\rm ref}$. This notebook builds PPO from its pieces, takes
# one of its steps by hand, and trains it beside the paper's other baselines (§6.1, Fig. 2 left):
#
# | method | learns from | what it optimises |
# |---|---|---|
# | **PPO** | a learned reward $r_\phi$ fit to the pairs (Eq. 2) | Eq. 3 by policy gradient on its samples |
# | **PPO-GT** | the ground-truth reward $r^*$ (an oracle no real pipeline has) | Eq. 3 by policy gradient |
# | **Unlikelihood** | the pairs | $-\log\pi(y_w|x)-\alpha\sum_t\log\big(1-\pi(y_{l,t}|x,y_{l,<t})\big)$ |
# | **Preferred-FT** | the chosen completions $y_w$ only | $-\log\pi(y_w\mid x)$ (supervised fine-tuning) |
#
# The PPO trainer is `dpo_lab.ppo` (Ziegler et al. 2019 / Stiennon et al. 2020); the pairwise baselines
# reuse DPO's trainer with another loss. Notebook 07 puts every run on the reward–KL frontier. PPO's pieces
# and the Unlikelihood loss are exercises (*tier* 1: one line of an equation, 2: a sum or a mask, 3: a
# loop); the cell after each grades yours against the library.
#
# The prose describes the `cpu` outputs below, run on cached stages; at `DPO_LAB_PRESET=smoke` the numbers
# differ.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, every run and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
target_kls: list[float] = []  # PPO target KLs, one run each; [] keeps the preset's (-y "target_kls: [3, 6]")
n_show: int = 3  # test prompts sampled from every method at matched KL
match_kl: float = -1.0  # common KL for the sample comparison; < 0 uses the median of the runs' final KLs

# %%
import copy
import dataclasses
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.batching import PreferenceCollator
from dpo_lab.grading import grade, lm_cases
from dpo_lab.logprobs import concatenated_forward
from dpo_lab.loop import batch_indices
from dpo_lab.losses import unlikelihood_loss
from dpo_lab.plots import METHOD_COLORS
from dpo_lab.ppo import (
    AdaptiveKLController,
    PolicyWithValueHead,
    PPOState,
    gae,
    kl_controller,
    kl_penalized_rewards,
    policy_loss,
    ppo_step,
)
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.rewards import score_completions
from dpo_lab.run import load_policy, read_metrics
from dpo_lab.sampling import sample
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 60)
config = get_preset(preset, seed=seed, **overrides,
                    **({"ppo.target_kls": target_kls} if target_kls else {}))
seed_everything(config.seed)
print(f"preset {config.name!r}: {config.ppo}")

# %% [markdown]
# ## The objective PPO maximises
# RLHF's last phase (Eq. 3) asks for
# $$\max_{\pi_\theta}\ \mathbb E_{x\sim\mathcal D,\,y\sim\pi_\theta(\cdot|x)}\big[r_\phi(x,y)\big]
#   -\beta\,\mathbb D_{\rm KL}\big[\pi_\theta(y|x)\,\|\,\pi_{\rm ref}(y|x)\big].$$
# The KL term is an expectation over the policy's own samples, so PPO folds it into the reward
# (Ziegler et al. 2019; the paper's §3): a completion $y=(y_1,\dots,y_T)$ is an episode of $T$ actions,
# with per-token reward
# $$r_t=-\beta\,\big(\log\pi_\theta(y_t|x,y_{<t})-\log\pi_{\rm ref}(y_t|x,y_{<t})\big)
#   \;+\;\underbrace{r_\phi(x,y)}_{\text{last token only}}\cdot\mathbb 1[t=T].$$
# The episode's return $\sum_t r_t=r_\phi(x,y)-\beta\log\frac{\pi_\theta(y|x)}{\pi_{\rm ref}(y|x)}$ is a
# one-sample estimate of Eq. 3's objective. `ppo.kl_penalized_rewards` builds these rewards.
#
# **Advantages.** A value head $V(x,y_{<t})$ on the policy's last hidden states predicts the return to
# come; generalised advantage estimation (GAE, Schulman et al. 2016) mixes its $n$-step estimates:
# $$\delta_t=r_t+\gamma V_{t+1}-V_t,\qquad A_t=\delta_t+\gamma\lambda A_{t+1},\qquad R_t=A_t+V_t,$$
# with $V_{T+1}=0$ (the episode is over). $\lambda=1$ gives the Monte-Carlo advantage
# $\sum_{k\ge t}r_k-V_t$ (unbiased, noisy), $\lambda=0$ the one-step TD error (biased by $V$, quiet).
# A worked example: one completion of 4 tokens, $\beta=0.2$, score 1.

# %% tags=["nbval-check-output"]
logp = torch.tensor([[-2.0, -1.5, -3.0, -0.5]])  # log pi_theta(y_t | x, y_<t)
ref_logp = torch.tensor([[-2.2, -1.5, -2.5, -1.0]])  # log pi_ref(y_t | x, y_<t)
values = torch.tensor([[0.3, 0.4, 0.5, 0.7]])  # V(x, y_<t) from the value head
mask, score, kl_coef = torch.ones(1, 4, dtype=torch.bool), torch.tensor([1.0]), 0.2

rewards = kl_penalized_rewards(score, logp, ref_logp, mask, kl_coef)
advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
for name, row in [("log-ratio", logp - ref_logp), ("r_t", rewards), ("V_t", values), ("A_t", advantages),
                  ("R_t", returns)]:
    print(f"{name:9s}", [round(float(v), 4) + 0.0 for v in row[0]])
print("sum_t r_t =", round(float(rewards.sum()), 4),
      "= score - beta * log pi/pi_ref =", round(float(score - kl_coef * (logp - ref_logp).sum()), 4))

# %% [markdown]
# The two ends of λ, checked against their closed forms:

# %% tags=["nbval-check-output"]
mc, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)  # sum_{k >= t} r_k
assert torch.allclose(mc, reward_to_go - values), "lambda = 1 must be the Monte-Carlo advantage"
td, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
next_values = torch.cat([values[:, 1:], torch.zeros(1, 1)], dim=-1)  # V_{T+1} = 0
assert torch.allclose(td, rewards + next_values - values), "lambda = 0 must be the one-step TD error"
print("lambda=1 (Monte Carlo):", [round(float(v), 4) + 0.0 for v in mc[0]])
print("lambda=0 (TD error):   ", [round(float(v), 4) + 0.0 for v in td[0]])

# %% [markdown]
# Next, both in plain torch (the two exercises below). In a rollout each row holds prompt, completion and
# padding, and step $t$ predicts token $t+1$; the mask, `completion_mask[:, 1:]`, is 1 only on the
# completion's steps, a contiguous run somewhere in the row. The graders use such masks.

# %% [markdown]
# ### Exercise · tier 2 · PPO's per-token rewards
#
# <details><summary>Hint 1</summary>Two parts: a KL penalty on every completion step, and the sequence's
# score added once per row. Which step of row i is its last completion step?</details>
# <details><summary>Hint 2</summary>
#
# With $c$ = `kl_coef` and $m$ the mask: $r_{i,t}=-c\,(\log\pi_\theta-\log\pi_{\rm ref})_{i,t}\,m_{i,t}$, plus
# $s_i$ at $t=\max\{t: m_{i,t}=1\}$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# r = -kl_coef * (logps - ref_logps) * mask
# for i in range(len(scores)):
#     r[i, int(mask[i].nonzero().max())] += scores[i]
# return r
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def ppo_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards (B, T): the KL penalty at kl_coef on the completion steps and each row's score
    (B,) at the end of its completion. logps, ref_logps: the two models' log-probs of the tokens taken
    (B, T); mask: 1 on a contiguous run of completion steps per row."""
    r = -kl_coef * (logps - ref_logps) * mask  # the KL penalty on every completion token
    for i in range(len(scores)):
        last = int(mask[i].nonzero().max())  # row i's last completion step
        r[i, last] += scores[i]  # + r(x, y) on it
    return r


# %%
grade(ppo_rewards, kl_penalized_rewards, lm_cases("scores", "logps", "ref_logps", "mask", "kl_coef", kl_coef=(0.2,)),
      hint="the score goes on the last step whose mask is 1, which is not always the last column")

# %% [markdown]
# ### Exercise · tier 3 · generalised advantage estimation
#
# <details><summary>Hint 1</summary>Work backwards over each row's completion steps. After its last one the
# episode is over: there is no next value and no next advantage.</details>
# <details><summary>Hint 2</summary>
#
# $\delta_t=r_t+\gamma V_{t+1}-V_t$, $A_t=\delta_t+\gamma\lambda A_{t+1}$, $R_t=A_t+V_t$, with $V$ and $A$
# taken as 0 after the last completion step.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# adv = torch.zeros_like(rewards)
# for i in range(rewards.shape[0]):
#     a, next_v = 0.0, 0.0
#     for t in reversed(mask[i].nonzero().flatten().tolist()):
#         a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * lam * a
#         adv[i, t], next_v = a, values[i, t]
# return adv, (adv + values) * mask
# ```
# </details>

# %% tags=["exercise", "tier-3"]
def gae_by_hand(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T) and 0 where mask is 0: generalised advantage estimation with
    discount gamma and trace parameter lam over each row's completion steps (mask 1, contiguous), the
    episode ending after its last step."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        steps = mask[i].nonzero().flatten().tolist()  # row i's completion steps, in order
        a, next_v = 0.0, 0.0  # A_{n+1} = V_{n+1} = 0: the episode is over
        for t in reversed(steps):
            a = (rewards[i, t] + gamma * next_v - values[i, t]) + gamma * lam * a  # delta_t + gamma lambda A_{t+1}
            adv[i, t], next_v = a, values[i, t]
    return adv, (adv + values) * mask


# %%
grade(gae_by_hand, gae, lm_cases("rewards", "values", "mask", "gamma", "lam", gamma=(1.0, 0.9), lam=(0.95, 0.5)),
      hint="run t backwards, and start each row's episode fresh: nothing after its last completion step counts")

# %% tags=["nbval-check-output"]
# Row 1 is the example above; row 2 a shorter completion, its last column padding (mask 0).
logps = torch.tensor([[-2.0, -1.5, -3.0, -0.5], [-1.0, -0.7, -2.0, 0.0]])
ref_logps = torch.tensor([[-2.2, -1.5, -2.5, -1.0], [-1.3, -0.4, -2.0, 0.0]])
vals = torch.tensor([[0.3, 0.4, 0.5, 0.7], [0.1, -0.2, 0.6, 0.0]])
masks, scores, gamma, lam = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([1.0, -0.5]), 1.0, 0.95
r = ppo_rewards(scores, logps, ref_logps, masks, kl_coef)  # the KL penalty, and the score on the last token
adv, ret = gae_by_hand(r, vals, masks, gamma, lam)
torch.testing.assert_close(r, kl_penalized_rewards(scores, logps, ref_logps, masks, kl_coef))
torch.testing.assert_close((adv, ret), gae(r, vals, masks, gamma=gamma, lam=lam))
for name, row in [("r_t", r[1]), ("A_t", adv[1])]:
    print(f"row 2 {name}", [round(float(v), 4) + 0.0 for v in row], "= library")

# %% [markdown]
# **The update.** PPO then takes a few epochs of minibatch steps on the clipped surrogate
# $\mathbb E_t\big[\max\big(-A_t\rho_t,\,-A_t\,\mathrm{clip}(\rho_t,1\pm\epsilon)\big)\big]$ with
# $\rho_t=\pi_\theta(y_t|\cdot)/\pi_{\rm old}(y_t|\cdot)$ (`ppo.policy_loss`), and a clipped squared error
# for the value head (`ppo.value_loss`). `policy/clipfrac` in the logs is the share of tokens where the clip
# is active: the update has already moved that token's probability as far as allowed.

# %% [markdown]
# Below it is run on made-up numbers ($\epsilon=0.2$); the padded step, with its large advantage, must
# count for nothing.

# %% [markdown]
# ### Exercise · tier 2 · the clipped surrogate
#
# <details><summary>Hint 1</summary>The ratio ρ comes from the two log-probs. Of the clipped and the
# unclipped term, PPO keeps the pessimistic one: as a loss, the larger.</details>
# <details><summary>Hint 2</summary>
#
# Each step's term is $\max(-A_t\rho_t,\,-A_t\,\mathrm{clip}(\rho_t,1-\epsilon,1+\epsilon))$; the loss is its
# mean over the steps where the mask is 1, clipfrac the share of those steps where the clipped term is
# strictly larger.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# ratio = (logps - old_logps).exp()
# unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
# loss = (torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()
# clipfrac = ((clipped > unclipped).float() * mask).sum() / mask.sum()
# return loss, clipfrac
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac), two scalars: PPO's clipped policy loss at clip range eps, averaged over the
    completion steps (mask 1), and the share of those steps where the clip is active."""
    ratio = (logps - old_logps).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()  # masked mean
    clipfrac = ((clipped > unclipped).float() * mask).sum() / mask.sum()  # where the clip binds
    return loss, clipfrac


# %%
grade(clipped_surrogate, policy_loss, lm_cases("logps", "old_logps", "advantages", "mask", "eps", eps=(0.2, 0.1)),
      hint="average over the completion steps only: divide by mask.sum()")

# %% tags=["nbval-check-output"]
old_logps = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, 0.0]])  # log pi_old: the rollout's
new_logps = old_logps + torch.tensor([[0.5, -0.5, 0.05, 0.3], [-0.4, 0.1, 0.0, 0.0]])  # after some updates
advs, eps = torch.tensor([[1.0, 1.0, -1.0, -2.0], [-0.5, 2.0, 1.0, 9.0]]), 0.2
ratio = (new_logps - old_logps).exp()
loss, clipfrac = clipped_surrogate(new_logps, old_logps, advs, masks, eps)
torch.testing.assert_close((loss, clipfrac), policy_loss(new_logps, old_logps, advs, masks, cliprange=eps))
print("ratio", [round(float(v), 4) for v in ratio[masks.bool()]])
print(f"loss {round(float(loss), 4)}  clipfrac {round(float(clipfrac), 4)}  = policy_loss")

# %% [markdown]
# ### Exercise · tier 2 · the two terms of the Unlikelihood loss
# Unlikelihood, one of the paper's baselines (trained and discussed below), raises the chosen completion's
# likelihood and pushes down each token of the rejected one: loss $=-\log\pi(y_w|x)-\alpha\sum_t
# \log\big(1-\pi(y_{l,t}|x,y_{l,<t})\big)$.
# Its inputs are per-token, as `logprobs.concatenated_forward` gives them: $\log\pi$ of each token
# taken (0 off the completion) and the completion masks. The loss is `pull_up + alpha * push_down`.
#
# <details><summary>Hint 1</summary>Off the completion log p is 0, so log(1 − p) is −inf there, and
# 0 · (−inf) is nan: select the completion steps rather than multiplying by the mask.</details>
# <details><summary>Hint 2</summary>
#
# pull_up $=-\sum_t m_{w,t}\log p(y_{w,t})$ and push_down $=-\sum_{t: m_{l,t}=1}\log(1-p(y_{l,t}))$;
# `torch.log1p(-p)` is $\log(1-p)$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# pull_up = -(logp_w * mask_w).sum(-1)
# push_down = -torch.where(mask_l.bool(), torch.log1p(-logp_l.exp()), 0.0).sum(-1)
# return pull_up, push_down
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def unlikelihood_terms(logp_w: torch.Tensor, mask_w: torch.Tensor, logp_l: torch.Tensor,
                       mask_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pull_up, push_down), each (B,): the Unlikelihood loss's two terms, from per-token log-probs and 0/1
    masks (B, T) of the chosen (w) and rejected (l) completions, each over its completion steps only."""
    pull_up = -(logp_w * mask_w).sum(-1)  # -log pi(y_w|x): the Preferred-FT term
    push_down = -torch.where(mask_l.bool(), torch.log1p(-logp_l.exp()), 0.0).sum(-1)  # -sum_t log(1 - p(y_l,t))
    return pull_up, push_down


# %%
def library_terms(logp_w, mask_w, logp_l, mask_l):
    """The two terms from the library's loss: its value at alpha = 0, and how much alpha = 1 adds."""
    at_0 = unlikelihood_loss(logp_w, mask_w, logp_l, mask_l, alpha=0.0)
    return at_0, unlikelihood_loss(logp_w, mask_w, logp_l, mask_l, alpha=1.0) - at_0


grade(unlikelihood_terms, library_terms, lm_cases("token_logps_w", "mask_w", "token_logps_l", "mask_l"),
      rtol=1e-5, atol=1e-5, hint="sum only over each completion's steps; torch.log1p(-p) is log(1 - p)")

# %% [markdown]
# ## The adaptive KL controller
# The paper sweeps a **target KL** rather than β (its PPO runs: target KL ∈ {3, 6, 9, 12}). The controller
# of Ziegler et al. (2019, eq. 2) moves β after every step toward the β that gives that KL:
# $$e_t=\mathrm{clip}\Big(\frac{\mathrm{KL}_t}{\mathrm{KL}_{\rm target}}-1,\,-0.2,\,0.2\Big),\qquad
#   \beta_{t+1}=\beta_t\Big(1+e_t\,\frac{n_t}{H}\Big),$$
# with $n_t$ the samples the KL was measured on and $H$ a horizon. Too much KL raises β (a stronger pull back
# to $\pi_{\rm ref}$), too little lowers it; the clip bounds the change per step. On made-up KL values
# (target 6, $H=300$, 64 samples a step):

# %% tags=["nbval-check-output"]
controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=300)
print(" step   KL    error   beta")
for step, kl in enumerate([12.0, 9.0, 6.0, 5.0, 2.0, 1.0], start=1):
    error = float(np.clip(kl / controller.target - 1.0, -0.2, 0.2))
    beta = controller.update(kl, n_steps=64)
    print(f"{step:5d} {kl:5.1f} {error:+7.3f} {beta:7.4f}")

# %% [markdown]
# **What to notice.** β rises while the KL is above its target and falls while below, by at most
# $0.2\cdot 64/300\approx 4\%$ a step however far off the KL is (steps 1 and 5). So a run far below its
# target takes many steps to lower β enough, as the training curves below show.

# %% [markdown]
# ## The learned reward $r_\phi$ (for PPO)
# PPO (not PPO-GT) never sees $r^*$: its reward is a scalar head on the SFT transformer, fit to the same
# preference pairs as DPO by the Bradley–Terry loss (Eq. 2),
# $\mathcal L_R=-\mathbb E\big[\log\sigma\big(r_\phi(x,y_w)-r_\phi(x,y_l)\big)\big]$. The weights with
# the best accuracy on validation pairs are kept (App. B) and scored once on test pairs, whose prompts are
# held out of both (the best of many validation scores would flatter them).

# %%
r_phi = pipeline.learned_reward(config)
report = r_phi.report
print(f"{report['n_train_pairs']} train pairs, {report['n_val_pairs']} validation pairs, "
      f"{report['n_test_pairs']} test pairs; kept step {report['best_step']} (validation accuracy "
      f"{report['best_val_accuracy']:.3f}); test accuracy {report['test_accuracy']:.3f} (chance: 0.5)")
display(pd.DataFrame(report["val_history"]).set_index("step").round(4))

# %% [markdown]
# **What to notice.** Validation accuracy starts at chance (0.5, $r_\phi$ ties every pair) and levels off
# well below 1; the test accuracy printed above is close to the kept step's validation accuracy. So
# $r_\phi$ ranks roughly one pair in four the wrong way, and PPO will climb those mistakes as eagerly as
# the right rankings. PPO-GT, with $r^*$, has no such errors.

# %% [markdown]
# ## One PPO iteration on screen
# `ppo.train_ppo` calls `ppo.ppo_step` once per iteration: sample a rollout, score it, build the per-token
# rewards, run GAE, then update the policy and its value head on the clipped losses. Below, the library takes
# step 1 of a PPO run from $\pi_{\rm SFT}$ with $r_\phi$ and hands over the rollout it sampled (its
# `on_rollout` argument); then the same step is done by hand, from the same starting weights, on that rollout.
# To compare a single update, this step makes one pass (`ppo_epochs = 1`) over one minibatch holding the
# whole rollout; the runs make 4 passes over minibatches of 32.

# %%
reference, tokenizer, _ = pipeline.sft_policy(config)
step_config = dataclasses.replace(config.ppo, ppo_epochs=1, minibatch_size=config.ppo.rollout_batch_size)
model = PolicyWithValueHead(copy.deepcopy(reference)).eval()  # pi_theta = pi_SFT; value head V = 0 (zeros)
start = copy.deepcopy(model)  # the same starting weights, for the step by hand
train_prompts = pipeline.prompts(config, tokenizer, "train")
step_prompts = [train_prompts[i] for i in batch_indices(len(train_prompts), step_config.rollout_batch_size,
                                                        step=1, seed=config.seed)]
library = {}  # what ppo_step hands over: its rollout, rewards, advantages and returns


def keep(rollout, rewards, advantages, returns):
    library.update(rollout=rollout, rewards=rewards, advantages=advantages, returns=returns)


state = PPOState(model, reference, torch.optim.Adam(model.parameters(), lr=step_config.lr),
                 kl_controller(step_config))  # what the step updates: weights, Adam, beta, score moments
record = ppo_step(state, tokenizer, step_prompts, r_phi, step_config, step=1, seed=config.seed,
                  on_rollout=keep)
ro = library["rollout"]
print(f"rollout: {len(ro.texts)} completions, {int(ro.mask.sum())} completion tokens; mean r_phi "
      f"{record['objective/scores']:.3f}, sampled KL {record['objective/kl']:.2e} (pi_theta = pi_ref)")
print(f"e.g. {ro.texts[0]!r}")

# %% [markdown]
# The step by hand. Scores are standardised by the mean and standard deviation of every score so far (at
# step 1, this batch's); rewards, GAE and the policy loss are your three exercises (one that failed its check
# was replaced by the library's function there, as the check said); advantages are whitened over the batch's completion tokens; the value
# loss stops rewarding a move of $V$ beyond `cliprange_value` from its old value.
#
# **Predict first.** Before the update $\rho_t=\pi_\theta/\pi_{\rm old}=1$ for every token, and the
# whitened advantages average 0. What policy loss and clip fraction will the step print? The value head
# starts at $V=0$: what, then, is the value loss?


# %%
mine = start  # a copy of the weights the library started from
optimizer = torch.optim.Adam(mine.parameters(), lr=step_config.lr)  # PPO's optimiser: Adam, no warmup
raw = ro.scores.double().cpu().numpy()  # r_phi(x, y) of each completion
scores = torch.as_tensor((raw - raw.mean()) / raw.std(), dtype=torch.float32)  # standardised
rewards = ppo_rewards(
    scores, ro.logprobs, ro.ref_logprobs, ro.mask, step_config.init_kl_coef)  # beta at step 1
advantages, returns = gae_by_hand(rewards, ro.values, ro.mask, step_config.gamma, step_config.lam)
m = ro.mask.float()
mean = (advantages * m).sum() / m.sum()
var = ((advantages - mean) ** 2 * m).sum() / m.sum()
whitened = torch.where(ro.mask, (advantages - mean) * torch.rsqrt(var + 1e-8), 0.0)

# One minibatch: the whole rollout, in the order the library draws (seeded by seed, step, epoch).
idx = torch.as_tensor(np.random.default_rng([config.seed, 1, 0]).permutation(len(ro.texts)))
ids, att, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.mask[idx]
_, logps, values = mine(ids, att)  # log pi_theta(y_t | .) of the tokens taken, and V_t, with gradients
pg_loss, clipfrac = clipped_surrogate(
    logps, ro.logprobs[idx], whitened[idx], mask, step_config.cliprange)
old_values, target = ro.values[idx], returns[idx]
eps_v = step_config.cliprange_value
kept_near = old_values + (values - old_values).clamp(-eps_v, eps_v)  # V_old + clip(V - V_old, +-eps_v)
vf_loss = 0.5 * (torch.maximum((values - target) ** 2, (kept_near - target) ** 2) * mask).sum() / mask.sum()
loss = pg_loss + step_config.vf_coef * vf_loss
loss.backward()
torch.nn.utils.clip_grad_norm_(mine.parameters(), step_config.max_grad_norm)
optimizer.step()
optimizer.zero_grad()
print(f"policy loss {pg_loss.item():+.2e}, clip fraction {clipfrac.item():.3f}, value loss {vf_loss.item():.4f} "
      f"(0.5 x mean squared return {float(0.5 * (returns ** 2 * m).sum() / m.sum()):.4f})")

# %% [markdown]
# Against the library. Both sides run the same operations in the same order, so we allow only float32
# rounding: rewards, advantages and returns to 1e-6, losses to a relative 1e-6, every weight to 1% of one
# Adam step (`lr`). On a CPU the measured differences are exactly 0.

# %%
gaps = {name: float((mine_t - library[name]).abs().max())
        for name, mine_t in [("rewards", rewards), ("advantages", advantages), ("returns", returns)]}
with torch.no_grad():
    gaps["weights"] = max(float((a - b).abs().max())
                          for a, b in zip(mine.parameters(), model.parameters(), strict=True))
losses = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item()}
for name, gap in gaps.items():
    print(f"{name:10s} largest difference, by hand vs ppo_step: {gap:.1e}")
for key, value in losses.items():
    print(f"{key:11s} by hand {value:+.6e}, ppo_step {record[key]:+.6e}")

# %% tags=["nbval-check-output"]
print("rewards, advantages, returns = ppo_step's (to 1e-6):",
      all(gaps[k] <= 1e-6 for k in ("rewards", "advantages", "returns")))
print("losses = ppo_step's (relative 1e-6):",
      all(math.isclose(v, record[k], rel_tol=1e-6, abs_tol=1e-9) for k, v in losses.items()))
print("weights = ppo_step's (within 1% of lr):", gaps["weights"] <= 0.01 * step_config.lr)

# %% [markdown]
# **What to notice.** The policy loss is 0 up to rounding and nothing is clipped: with $\rho_t=1$ the loss
# is minus the mean whitened advantage. Its gradient is not 0: it raises the log-probability of tokens with
# positive advantage and lowers the others. The value loss is half the mean squared return, because $V=0$.
# The library's loop, `train_ppo`, is this step repeated `max_steps` times, plus bookkeeping: `ppo_epochs`
# passes of shuffled minibatches per rollout, the KL controller's new β after each step, logging,
# checkpoints and evaluation.

# %% [markdown]
# ## PPO training curves
# One run per target KL, with the learned reward (PPO) and with the ground truth (PPO-GT), 60 steps each.
# Per step, from `metrics.jsonl`:
# * `objective/kl`: the batch mean of $\sum_t\log\frac{\pi_\theta}{\pi_{\rm ref}}$, a one-sample estimate of
#   the sequence KL (notebook 07's evaluation sums over the vocabulary instead); dashed: the target.
# * `kl_coef`: β, as the controller moves it.
# * `objective/scores`: the rollout's mean raw reward ($r_\phi$ for PPO, $r^*$ for PPO-GT: different scales).
# * `policy/clipfrac`, and `policy/entropy`: the policy's mean next-token entropy on its own samples, in
#   nats (it would fall if the policy collapsed onto a few favoured phrasings).

# %%
ppo_results = {(method, kl): pipeline.ppo(config, method, kl)
               for method in pipeline.PPO_METHODS for kl in config.ppo.target_kls}
def step_rows(metrics_path: Path, key: str) -> pd.DataFrame:
    """The training-step lines of a run's metrics.jsonl (those holding ``key``), indexed by step."""
    return pd.DataFrame([m for m in read_metrics(metrics_path) if key in m]).set_index("step")


ppo_curves = {key: step_rows(r.metrics_path, "objective/kl") for key, r in ppo_results.items()}
print({f"{m} target {kl:g}": r.steps for (m, kl), r in ppo_results.items()})

# %%
PPO_PANELS = ["objective/kl", "kl_coef", "objective/scores", "policy/clipfrac", "policy/entropy"]
fig, axes = plt.subplots(len(pipeline.PPO_METHODS), len(PPO_PANELS), figsize=(16, 6), squeeze=False)
colors = plt.cm.viridis(np.linspace(0.1, 0.85, len(config.ppo.target_kls)))
for row, method in zip(axes, pipeline.PPO_METHODS, strict=True):
    for color, kl in zip(colors, config.ppo.target_kls, strict=True):
        frame = ppo_curves[(method, kl)]
        for ax, key in zip(row, PPO_PANELS, strict=True):
            ax.plot(frame.index, frame[key], color=color, label=f"target {kl:g}")
        row[0].axhline(kl, color=color, ls="--", lw=0.8)
    for ax, key in zip(row, PPO_PANELS, strict=True):
        ax.set_title(f"{method}: {key}", fontsize=9)
        ax.set_xlabel("PPO step")
    row[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(figures_dir() / "06_ppo_training.png", dpi=120)
plt.show()

# %%
window = 10  # steps: each step's values come from one rollout batch, so the summary averages a few
print(f"means over the first {window} and the last {window} steps")
for (method, kl), frame in ppo_curves.items():
    first, last = frame.head(window).mean(), frame.tail(window).mean()
    print(f"{method:6s} target {kl:4g}: KL {first['objective/kl']:6.3f} -> {last['objective/kl']:6.3f}   "
          f"beta {first['kl_coef']:.3f} -> {last['kl_coef']:.3f}   "
          f"score {first['objective/scores']:6.3f} -> {last['objective/scores']:6.3f}   "
          f"entropy {first['policy/entropy']:.2f} -> {last['policy/entropy']:.2f}")

# %% [markdown]
# **What to notice.** Every KL starts at 0 (π_θ = π_ref) and climbs, and every β falls from 0.2 while its
# run is below target, by the same clipped 4% a step. So the four runs of a method are one run (same seed,
# same β) until the KL nears the lowest target, and the curves split one by one as each nears its own;
# the higher the target, the lower β ends and the further the run drifts from $\pi_{\rm ref}$. Over the last
# 10 steps targets 3, 6 and 9 are about met, while
# target 12's KL is still climbing: β can fall only about 4% a step. Scores rise with the target, noisily,
# since each step sees one sample per prompt and a value head that is still learning ($r_\phi$ is centred
# on the training completions, so PPO's scores start near 0; PPO-GT's are probabilities). The clip fraction
# is a few percent at most and under 1% on average: the learning rate, not the clip, limits most updates.
# The printed entropy means move by less than half a nat of about 5, so no run collapses onto a few
# phrasings. DPO needs neither the samples nor the critic.
#
# ## Unlikelihood and Preferred-FT
# The two baselines train on the fixed pairs with DPO's optimiser settings and no reference model in the
# loss: **Preferred-FT** is supervised fine-tuning on $y_w$; **Unlikelihood** (Welleck et al. 2019) also
# pushes every token of $y_l$ toward probability 0, with weight α. Their logs use DPO's names:
# `logps/chosen` $=\log\pi_\theta(y_w|x)$ and `logps/rejected` $=\log\pi_\theta(y_l|x)$, summed over
# completion tokens and averaged over **that step's batch** of 32 pairs. No pair is seen twice, so each value
# is measured on pairs the model has not trained on yet. Batches differ in length and likelihood, which
# swings `logps/*` by several nats from step to step. `rewards/chosen` and `rewards/rejected`,
# $\log\frac{\pi_\theta(y|x)}{\pi_{\rm ref}(y|x)}$ in nats (Eq. 5's implicit reward with β = 1, a readout,
# not optimised), subtract π_ref's log-probability of the same completions and cancel most of that swing, not
# all of it (printed below): read their trend, or the means over the last 25 steps.

# %%
baseline_runs = pipeline.frontier_runs(config, ("Unlikelihood", "Preferred-FT"))
baseline_results = {(m, v): pipeline.pairwise(config, m, v) for m, v in baseline_runs}
baseline_curves = {key: step_rows(r.metrics_path, "loss") for key, r in baseline_results.items()}

BASELINE_PANELS = ["loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"]
fig, axes = plt.subplots(1, len(BASELINE_PANELS), figsize=(17, 3.4))
styles = ["-", "--", ":", "-."]  # one colour per method, one line style per run of that method
for (method, value), frame in baseline_curves.items():
    label = f"{method}, {pipeline.hyperparameter_name(method)}={value:g}"
    style = dict(color=METHOD_COLORS.get(method), ls=styles[[v for m, v in baseline_runs if m == method]
                                                            .index(value) % len(styles)])
    for ax, key in zip(axes, BASELINE_PANELS, strict=True):
        ax.plot(frame.index, frame[key], label=label, **style)
for ax, title in zip(axes, ["loss", r"logps/chosen  $\log\pi_\theta(y_w|x)$",
                            r"logps/rejected  $\log\pi_\theta(y_l|x)$",
                            r"rewards/chosen  $\log\pi_\theta/\pi_{\rm ref}\,(y_w)$",
                            r"rewards/rejected  $\log\pi_\theta/\pi_{\rm ref}\,(y_l)$"], strict=True):
    if title.startswith("rewards"):
        ax.axhline(0, color="grey", lw=0.5)  # pi_ref's level: where every run starts
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(figures_dir() / "06_baselines_training.png", dpi=120)
plt.show()

# %%
window = 25
print(f"log pi/pi_ref (nats) of each batch's chosen and rejected completions, mean over the last {window} steps;")
print("then the median step-to-step change of logps/chosen and of rewards/chosen over the run")
for (method, value), frame in baseline_curves.items():
    last = frame.tail(window).mean()
    swing = frame[["logps/chosen", "rewards/chosen"]].diff().abs().median()
    print(f"{method:12s} {pipeline.hyperparameter_name(method)}={value:<4g}  chosen "
          f"{last['rewards/chosen']:+6.3f}  rejected {last['rewards/rejected']:+6.3f}  "
          f"margin {last['rewards/margins']:+6.3f}   step-to-step: logps {swing['logps/chosen']:.2f}, "
          f"rewards {swing['rewards/chosen']:.2f}")

# %% [markdown]
# **What to notice.** Every run raises the chosen completions (about +1 nat) and leaves the rejected near
# or below where π_ref had them, so every margin ends clearly positive, +1.066 to +1.324 nats.
# Preferred-FT never sees a rejected completion, yet separates them: this data's chosen completions are the
# more positive ones, and a model trained to write them gives positive text in general more probability.
# The four Unlikelihood runs end with about Preferred-FT seed 0's margin (seed 1's is smaller); a larger α
# lowers chosen and rejected together.
#
# Why does α do so little? Unlikelihood's extra term, $-\alpha\sum_t\log(1-\pi(y_{l,t}|x,y_{l,<t}))$, is
# small from the start: a sampled token's probability $p$ is mostly small, and $-\log(1-p)\approx p$, while
# the chosen completion's NLL is $-\log p$ per token. At $\pi_{\rm SFT}$ the cell below measures it 76
# times smaller than the pull-up term (the printed ratio), even at $\alpha = 1$. It is also **bounded**: it
# and its
# gradient go to 0 as a token's probability does. With high-probability tokens in $y_l$ (a larger model,
# repetitive text) it matters more; the paper reports Unlikelihood degenerating into meaningless text on
# complex tasks. Neither loss knows $\pi_{\rm ref}$, so neither controls KL; DPO's log-ratio does.

# %%
# The Unlikelihood loss written out on 64 training pairs at pi_SFT, checked against the library's.
pairs, _ = pipeline.preference_data(config)
policy_sft, tokenizer, _ = pipeline.sft_policy(config)
batch = PreferenceCollator(tokenizer, config.policy.n_positions)([pairs[i] for i in range(64)])
with torch.no_grad():
    _, token_logps, masks = concatenated_forward(policy_sft, batch)  # (pairs, 2: chosen and rejected, T-1)
(logp_w, logp_l), (mask_w, mask_l) = token_logps.unbind(1), masks.unbind(1)
pull_up, push_down = unlikelihood_terms(logp_w, mask_w, logp_l, mask_l)  # -log pi(y_w|x), -sum_t log(1 - p(y_l,t))
for alpha in (0.1, 1.0):
    torch.testing.assert_close(pull_up + alpha * push_down,
                               unlikelihood_loss(logp_w, mask_w, logp_l, mask_l, alpha=alpha))
print(f"per completion token at pi_SFT: pull-up -log p = {float(pull_up.sum() / mask_w.sum()):.3f}, "
      f"push-down -log(1 - p) = {float(push_down.sum() / mask_l.sum()):.4f} "
      f"(ratio {float(pull_up.sum() / push_down.sum()):.0f}); mean p of a rejected token "
      f"{float((logp_l.exp() * mask_l).sum() / mask_l.sum()):.4f}")

# %% [markdown]
# ## Samples at (roughly) matched KL
# Rewards are only comparable at equal KL (a policy far from $\pi_{\rm ref}$ can buy reward with
# degenerate text). Each run's **final** evaluation point gives its KL; per method we take the run whose
# final KL is closest to a common value (by default the median of all runs' final KLs), load its final
# policy, and sample the same test prompts with the same seed.

# %%
all_results = {(m, v): pipeline.result(config, m, v) for m, v in pipeline.frontier_runs(config)}
finals = pd.DataFrame([{"method": m, "hyperparameter": f"{pipeline.hyperparameter_name(m)}={v:g}", "value": v,
                        **frontier.evaluation_points(r.metrics_path).iloc[-1][frontier.EVAL_COLUMNS]}
                       for (m, v), r in all_results.items()])
common_kl = match_kl if match_kl >= 0 else float(finals.kl_mean.median())
finals["distance"] = (finals.kl_mean - common_kl).abs()
chosen = finals.loc[finals.groupby("method", sort=False).distance.idxmin()]
print(f"common KL: {common_kl:.3f}")
display(chosen.drop(columns=["value"]).round(3))

# %% [markdown]
# **What to notice.** `distance` is each run's gap to the common KL. Only DPO, PPO and PPO-GT have a run
# near it. Unlikelihood and Preferred-FT have no knob that moves them far from $\pi_{\rm ref}$: their
# closest runs sit at a much smaller KL, so their rewards are not matched here (notebook 07 compares every
# method along the whole KL range).

# %%
policy_sft, tokenizer, _ = pipeline.sft_policy(config)
reward, _ = pipeline.reward_model(config)
shown = pipeline.prompts(config, tokenizer, "test")[:n_show]
settings = dict(n_per_prompt=1, max_new_tokens=config.eval.max_new_tokens, batch_size=32, seed=config.seed,
                progress=False)
policies = {"SFT": policy_sft}
for row in chosen.itertuples():
    policies[f"{row.method} ({row.hyperparameter})"], _ = load_policy(
        all_results[(row.method, row.value)].checkpoint_dir)
completions = {name: [c[0] for c in sample(policy, tokenizer, shown, **settings).texts]
               for name, policy in policies.items()}
scores = {name: score_completions(reward, shown, texts) for name, texts in completions.items()}
samples = pd.DataFrame([{"prompt": prompt, "policy": name, "completion": completions[name][i],
                         "r*": scores[name][i]} for i, prompt in enumerate(shown) for name in policies])
display(samples.set_index(["prompt", "policy"]).round(3))

# %% [markdown]
# **What to notice.** Every row of a prompt used the same random numbers, so differences come from the
# policies. None of these completions reads like a review: a 2.6 M-parameter model trained from scratch
# writes word salad, and training moves its reward numbers, not its prose. In the `r*` column, count how
# many trained policies beat the SFT model on each prompt. Three prompts are anecdotes; notebook 07 is the
# real comparison.
