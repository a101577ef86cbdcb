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
# # 01 · From RLHF to DPO, one equation at a time
#
# Rafailov et al. (2023), *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*
# (arXiv 2305.18290), §3–§5 and App. A.
#
# ## The problem: RLHF's three stages
# RLHF tunes a pretrained language model to human preferences in three stages (§3):
# 1. **SFT**: fine-tune on examples of the task. The result, $\pi_{\rm ref}$, is the starting point and the
#    reference to stay near.
# 2. **Reward model**: people compare two completions $y_1,y_2$ of a prompt $x$ sampled from $\pi_{\rm ref}$;
#    $r_\phi(x,y)$ is fitted to score the preferred one higher (Eqs. 1–2).
# 3. **KL-regularised RL**: sample from the policy $\pi_\theta$, score with $r_\phi$, and maximise reward minus
#    $\beta\,\mathrm{KL}(\pi_\theta\|\pi_{\rm ref})$ (Eq. 3), usually with PPO.
#
# **Why the KL term**: $r_\phi$ has only seen what $\pi_{\rm ref}$ writes, so it is trustworthy only near
# $\pi_{\rm ref}$; a policy free to roam finds completions $r_\phi$ overrates (reward hacking, notebook 12).
# DPO replaces stages 2–3 by one classification loss with the same optimum (Eq. 7). Each step below is a few
# lines of numpy/torch, checked against the library on an exact toy where every sum over responses is finite.
# *Exercise · tier N* functions (1: an equation's line, 2: a sum or mask, 3: a derivation) are graded by the
# cell after them; `make student` writes copies to fill in.
#
# **Words used below.**
# * *Contextual bandit*: see a context $x$, choose an action $y$, get $r(x,y)$, done (a whole completion is
#   one action).
# * *Nat*: the unit of KL with natural logs (1.44 bits). *Partition function*: the sum normalising
#   $\pi_{\rm ref}e^{r/\beta}$. *Gibbs' inequality*: $\mathrm{KL}(p\|q)\ge0$, $=0$ iff $p=q$.
# * *Thurstone model*: $p(y_1\succ y_2)=\Phi(r_1-r_2)$, Gaussian noise on rewards where Bradley–Terry has Gumbel.
# * *KL-constrained vs KL-penalised*: max $\mathbb E[r]$ s.t. $\mathrm{KL}\le\epsilon$, vs max $\mathbb E[r]-\beta\,\mathrm{KL}$;
#   each β's optimum solves the constrained problem at $\epsilon$ = its KL (β is the Lagrange multiplier), and
#   the paper says "constrained" for Eq. 3's penalised form.
# * *Score-function (REINFORCE) estimator*: $\nabla_\theta\mathbb E_{\pi_\theta}[G]=\mathbb E_{\pi_\theta}[G\,\nabla_\theta\log\pi_\theta]$
#   from samples; a *baseline* $b$ not depending on $y$, subtracted from $G$, keeps it unbiased and changes
#   its variance. *Actor–critic*: a policy (actor) trained with a learned value function (critic) as its
#   baseline; PPO is one.
# * *Soft value function*: $\beta\log\sum_y\pi_{\rm ref}e^{r/\beta}$, a smooth $\max_y r$ (equal to it as
#   $\beta\to0$), Eq. 3's best value.

# %% tags=["parameters"]
beta: float = 0.1  # KL coefficient β of Eq. 3 (the paper's IMDb sweep: 0.05, 0.1, 1, 5)
seed: int = 0  # seeds the toy bandit and the sampled preference data
n_prompts: int = 3  # number of prompts x
n_responses: int = 5  # number of responses y per prompt
n_pairs: int = 2000  # sampled preference pairs for the training-dynamics cell

# %%
import itertools
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from ipywidgets import FloatLogSlider, interact

from dpo_lab import bandit as bd
from dpo_lab.grading import bandit_cases, grade, plackett_luce_nll
from dpo_lab.losses import preference_loss
from dpo_lab.presets import figures_dir
from dpo_lab.seed import seed_everything

seed_everything(seed)
torch.set_num_threads(1)  # tables of ~15 numbers: thread hand-offs would cost more than the arithmetic
toy = bd.Bandit.random(n_x=n_prompts, n_y=n_responses, seed=seed)
pi_ref, r = toy.pi_ref.numpy(), toy.reward.numpy()  # the same tables as numpy arrays, for the formulas


def show(t: torch.Tensor, digits: int = 6) -> list:
    """Round for printing, so checked outputs do not depend on torch's print format."""
    return (np.asarray(t).round(digits) + 0.0).tolist()  # + 0.0 turns a rounded -0.0 into 0.0


# %% [markdown]
# ## The toy
# $\pi_{\rm ref}(y|x)$ plays the SFT model, $r^*(x,y)$ the (hidden) human reward. Rows are prompts, columns
# responses. Notice $x_0$: $\pi_{\rm ref}$ favours $y_0$ (0.6118), $r^*$ prefers $y_2$ (0.3731), which $\pi_{\rm ref}$
# rarely writes (0.0148).

# %% tags=["nbval-check-output"]
print("pi_ref =", show(pi_ref, 4))
print("r*     =", show(r, 4))

# %% [markdown]
# ## Eq. 1 — Bradley–Terry preferences
# Humans prefer $y_1$ to $y_2$ with probability
# $$p^*(y_1\succ y_2\mid x)=\frac{\exp r^*(x,y_1)}{\exp r^*(x,y_1)+\exp r^*(x,y_2)}=\sigma\big(r^*(x,y_1)-r^*(x,y_2)\big).$$
# Only reward **differences** matter: this is the fact that makes $Z(x)$ cancel later.

# %% [markdown]
# ### Exercise · tier 1 · Eq. 1 by hand
# All the BT probabilities of a reward table at once, as a `[x, y1, y2]` table, without a Python loop.
#
# <details><summary>Hint 1</summary>Give the reward table two new axes, one on each side, so that numpy
# broadcasts every (y1, y2) combination.</details>
# <details><summary>Hint 2</summary>reward[:, :, None] is r(x, y1) laid along y1; reward[:, None, :] is
# r(x, y2) laid along y2.</details>
# <details><summary>Solution</summary>
#
# ```python
# r1, r2 = reward[:, :, None], reward[:, None, :]
# return np.exp(r1) / (np.exp(r1) + np.exp(r2))
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def bt_by_hand(reward: np.ndarray) -> np.ndarray:
    """Eq. 1: p[x, y1, y2] = p*(y1 ≻ y2 | x) for every pair, from rewards (n_x, n_y)."""
    r1, r2 = reward[:, :, None], reward[:, None, :]  # broadcast to a [x, y1, y2] table
    return np.exp(r1) / (np.exp(r1) + np.exp(r2))


# %%
grade(bt_by_hand, bd.bt_probs, bandit_cases("reward", numpy=True), hint="p[x, y1, y2] is the chance y1 wins")

# %% tags=["nbval-check-output"]
p_eq1 = bt_by_hand(r)
np.testing.assert_allclose(p_eq1 + p_eq1.transpose(0, 2, 1), 1.0, rtol=1e-12)  # one of the two wins
log_odds_01 = math.log(p_eq1[0, 0, 1] / p_eq1[0, 1, 0])
assert math.isclose(log_odds_01, r[0, 0] - r[0, 1], rel_tol=1e-12)  # the σ form: log-odds = r1 − r2
p_bt = bd.bt_probs(toy.reward)
np.testing.assert_allclose(p_eq1, p_bt.numpy(), rtol=1e-12)
print("Eq. 1 by hand == bandit.bt_probs: True")
print("p*(y0 > y1 | x0) =", round(float(p_eq1[0, 0, 1]), 6))

# %% [markdown]
# BT is a real modelling assumption. Two checks, each also run on the Thurstone model:
# 1. The comparisons `sample_preferences` draws (every later cell uses them) win at rate $\sigma(r_1-r_2)$:
#    each pair seen $n\ge 100$ times lies within 5 binomial standard errors.
# 2. BT log-odds are reward differences, so they **add along a chain**:
#    $\log\frac{p(1\succ 3)}{p(3\succ 1)}=\log\frac{p(1\succ 2)}{p(2\succ 1)}+\log\frac{p(2\succ 3)}{p(3\succ 2)}$.

# %% tags=["nbval-check-output"]
cmp = bd.sample_preferences(toy, 200_000, seed=seed)
wins = torch.zeros(n_prompts, n_responses, n_responses, dtype=torch.float64)
wins.index_put_((cmp.x, cmp.y_w, cmp.y_l), torch.ones(len(cmp), dtype=torch.float64), accumulate=True)
n_seen = wins + wins.transpose(1, 2)  # times each pair was compared, either way round
seen = (n_seen >= 100) & torch.ones(n_responses, n_responses, dtype=torch.bool).triu(1)  # each pair once
thurstone = torch.special.ndtr(toy.reward[:, :, None] - toy.reward[:, None, :])
for name, p in (("BT sigma(r1-r2)", p_bt), ("Thurstone Phi(r1-r2)", thurstone)):
    z = (wins - n_seen * p) / (n_seen * p * (1 - p)).sqrt()
    print(f"{name:21s} max |z| over {int(seen.sum())} pairs: {float(z[seen].abs().max()):7.2f}  (<= 5: {bool(z[seen].abs().max() <= 5)})")

# %% tags=["nbval-check-output"]
def chain_gap(p: np.ndarray) -> float:
    """max over triples (a, b, c) of |logodds(a>c) − logodds(a>b) − logodds(b>c)|."""
    lo = np.log(p / (1 - p))
    return float(np.abs(lo[:, :, None, :] - lo[:, :, :, None] - lo[:, None, :, :]).max())


print("BT log-odds add up along chains (gap < 1e-12):", chain_gap(p_eq1) < 1e-12)
print(f"Thurstone log-odds do not, gap: {chain_gap(thurstone.numpy()):.4f}")

# %% [markdown]
# **What to notice.** The samples sit within 1.74 standard errors of BT but 60.31 of Thurstone, whose
# log-odds also miss additivity by 0.8535: the models make different data, so choosing BT is a claim about
# the labellers, on which everything below relies.

# %% [markdown]
# ## Eq. 2 — the reward-model loss
# Stage 2 fits $r_\phi$ by maximum likelihood on comparisons $(x, y_w, y_l)$:
# $$\mathcal L_R(r_\phi,\mathcal D)=-\mathbb E_{(x,y_w,y_l)\sim\mathcal D}\big[\log\sigma(r_\phi(x,y_w)-r_\phi(x,y_l))\big].$$
# Here $y_1,y_2\sim\pi_{\rm ref}(\cdot|x)$, labelled by Eq. 1 (§4). With infinite data
# (`population_preferences`, every triple weighted by its probability) the fitted $r_\phi$ equals $r^*$ only
# **up to a function of $x$**. Rewards with $r'(x,y)=r(x,y)+f(x)$ are **equivalent** (§5's Def. 1): Eq. 1
# sees only differences within a prompt, so no data tell them apart.

# %% tags=["nbval-check-output"]
population = bd.population_preferences(toy)
r_phi = bd.solve_rlhf(toy.pi_ref, population, beta).reward_model  # fitted by Eq. 2 from r_phi = 0
print("loss at r_phi = 0 (log 2):", round(bd.reward_model_loss(torch.zeros_like(r_phi), population)[0].item(), 6))
print("r_phi - r* per prompt:", show((r_phi - toy.reward).mean(-1), 4))
print("r_phi ~ r* (differ by f(x) only):", bd.are_equivalent(r_phi, toy.reward, atol=1e-5))

# %% [markdown]
# The offsets $r_\phi-r^*$ differ per prompt (0.4943, −0.7467, 0.3114) and are not 0, yet $r_\phi$ explains
# the data exactly as well as $r^*$.

# %% [markdown]
# ## Eq. 3 — the KL-constrained objective
# Stage 3 maximises, over policies $\pi$,
# $$\max_{\pi}\ \mathbb E_{x,\,y\sim\pi(y|x)}\big[r(x,y)\big]-\beta\,\mathbb D_{\rm KL}\big[\pi(y|x)\,\|\,\pi_{\rm ref}(y|x)\big].$$
# $\beta>0$ is the **KL coefficient**: how much reward one nat of KL from $\pi_{\rm ref}$ must buy. In the
# bandit both terms are exact sums over $y$.

# %% [markdown]
# ### Exercise · tier 2 · Eq. 3 by hand: the KL and the objective
# Mind the mask: a response with no mass adds $0\log 0=0$ to the KL, not `nan`. Both functions also take a
# stack of policies `(..., n_x, n_y)`.
#
# <details><summary>Hint 1</summary>Sum over the last axis, the responses. Where π(y|x) = 0, what can stand in
# for π inside the log so that the term adds exactly 0?</details>
# <details><summary>Hint 2</summary>
#
# $\mathrm{KL}(x)=\sum_y\pi(y|x)\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}$, with the log taken of a copy of
# $\pi$ that is 1 where $\pi=0$; then Eq. 3 is $\sum_y\pi(y|x)\,r(x,y)-\beta\,\mathrm{KL}(x)$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def kl_by_hand(policy, pi_ref):
#     safe = np.where(policy > 0, policy, 1.0)  # log 1 = 0 where π = 0, so 0·log 0 counts as 0, not nan
#     return (policy * np.log(safe / pi_ref)).sum(-1)
#
# def rlhf_objective_by_hand(policy, reward, pi_ref, beta):
#     return (policy * reward).sum(-1) - beta * kl_by_hand(policy, pi_ref)
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def kl_by_hand(policy: np.ndarray, pi_ref: np.ndarray) -> np.ndarray:
    """KL(π(·|x) ‖ π_ref(·|x)) = Σ_y π log(π/π_ref) per prompt, shape (..., n_x); π(y|x) = 0 adds 0."""
    safe = np.where(policy > 0, policy, 1.0)  # log 1 = 0 where π = 0, so 0·log 0 counts as 0, not nan
    return (policy * np.log(safe / pi_ref)).sum(-1)


def rlhf_objective_by_hand(policy: np.ndarray, reward: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 3 per prompt: E_{y~π}[r(x,y)] − β KL(π(·|x) ‖ π_ref(·|x)), shape (..., n_x)."""
    return (policy * reward).sum(-1) - beta * kl_by_hand(policy, pi_ref)


# %%
grade(kl_by_hand, bd.kl_divergence, bandit_cases("policy", "pi_ref", numpy=True)
      | bandit_cases("greedy_policy", "pi_ref", numpy=True), hint="a response with pi(y|x) = 0 adds 0 log 0 = 0")
grade(rlhf_objective_by_hand, bd.rlhf_objective, bandit_cases("policy", "reward", "pi_ref", "beta", numpy=True))

# %% [markdown]
# ## Eq. 4 — its maximiser in closed form
# $$\pi_r(y|x)=\frac{1}{Z(x)}\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big),\qquad Z(x)=\sum_y\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big).$$
# **Not an algorithm for a language model**: $Z(x)$ sums over every completion, $|V|^T$ of them for
# vocabulary $V$ and $T$ tokens, each a forward pass. RLHF never forms it: PPO climbs Eq. 3 with samples (its
# value function lowers the gradient's variance; it does not estimate $Z$). DPO finds a loss where $Z$ cancels.

# %% tags=["nbval-check-output"]
vocab, length = 50257, 64  # GPT-2's vocabulary, a 64-token completion
n_terms = vocab**length  # exact: Python integers do not overflow
print(f"terms in Z(x): bandit {n_responses}; GPT-2, T={length}: {n_terms:.3e} (a {len(str(n_terms))}-digit number)")

# %% [markdown]
# ### Exercise · tier 1 · Eq. 4 by hand: $Z(x)$ and $\pi_r$
#
# <details><summary>Hint 1</summary>Each is one line of numpy over the response axis; the second divides by
# the first, one Z per prompt.</details>
# <details><summary>Hint 2</summary>
#
# $Z(x)=\sum_y\pi_{\rm ref}(y|x)\,e^{r(x,y)/\beta}$ (`.sum(-1)`), and $\pi_r=\pi_{\rm ref}\,e^{r/\beta}/Z(x)$
# with $Z$ broadcast over the responses (`[:, None]`).
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# def partition_by_hand(reward, pi_ref, beta):
#     return (pi_ref * np.exp(reward / beta)).sum(-1)  # fine at these β; the library works in log space
#
# def optimal_policy_by_hand(reward, pi_ref, beta):
#     return pi_ref * np.exp(reward / beta) / partition_by_hand(reward, pi_ref, beta)[..., None]
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def partition_by_hand(reward: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Z(x) = Σ_y π_ref(y|x) exp(r(x,y)/β), one per prompt: shape (n_x,)."""
    return (pi_ref * np.exp(reward / beta)).sum(-1)  # fine at these β; the library works in log space


def optimal_policy_by_hand(reward: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 4: π_r(y|x) = π_ref(y|x) exp(r(x,y)/β) / Z(x), shape (n_x, n_y)."""
    return pi_ref * np.exp(reward / beta) / partition_by_hand(reward, pi_ref, beta)[..., None]


# %%
grade(partition_by_hand, bd.normaliser, bandit_cases("reward", "pi_ref", "beta", numpy=True))
grade(optimal_policy_by_hand, bd.optimal_policy, bandit_cases("reward", "pi_ref", "beta", numpy=True),
      hint="divide by Z(x), so that each prompt's row sums to 1")

# %% tags=["nbval-check-output"]
Z = partition_by_hand(r, pi_ref, beta)
pi_star_np = optimal_policy_by_hand(r, pi_ref, beta)  # Eq. 4
pi_star = toy.optimal_policy(beta)
log_z = bd.log_partition(toy.reward, toy.pi_ref, beta)
np.testing.assert_allclose(pi_star_np, pi_star.numpy(), rtol=1e-10)
np.testing.assert_allclose(np.log(Z), log_z.numpy(), rtol=1e-12)
print("Eq. 4 by hand == bandit.optimal_policy: True")
print("pi* =", show(pi_star_np, 4))

# %% [markdown]
# **What to notice.** Eq. 4 multiplies $\pi_{\rm ref}$ by $e^{r/\beta}$ ($1/\beta$ acts as an inverse temperature;
# the sampling temperature is 1 throughout). $\pi^*$ is nearly greedy for $x_1$ and $x_2$, but for $x_0$ it keeps
# 0.7712 on $y_0$ and gives $r^*$'s best, $y_2$, only 0.2287: what $\pi_{\rm ref}$ rarely writes needs a large reward.

# %% [markdown]
# ### Exercise · tier 3 · why $\pi_r$ is the maximiser (App. A.1)
# Show that Eq. 3 equals $-\beta\,\mathrm{KL}(\pi\|q)+c(x)$ for a policy $q$ and a term $c(x)$ that do not depend on
# $\pi$; Gibbs' inequality then gives the maximiser and the maximum. Implement that form with your
# `kl_by_hand` and Eq. 4 functions, no $\mathbb E_\pi[r]$ term: the grader compares it with Eq. 3.
#
# <details><summary>Hint 1</summary>Write both terms of Eq. 3 as one expectation over y ~ π and take −β
# out.</details>
# <details><summary>Hint 2</summary>Inside the log, multiply and divide by Z(x): q is Eq. 4's π_r and
# c(x) = β log Z(x).</details>
# <details><summary>Solution</summary>
#
# ```python
# pi_r = optimal_policy_by_hand(reward, pi_ref, beta)
# return -beta * kl_by_hand(policy, pi_r) + beta * np.log(partition_by_hand(reward, pi_ref, beta))
# ```
# </details>

# %% tags=["exercise", "tier-3"]
def objective_via_pi_r(policy: np.ndarray, reward: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 3 per prompt, shape (..., n_x), in your form −β KL(π(·|x) ‖ q(·|x)) + c(x): no E_π[r] term."""
    pi_r = optimal_policy_by_hand(reward, pi_ref, beta)
    return -beta * kl_by_hand(policy, pi_r) + beta * np.log(partition_by_hand(reward, pi_ref, beta))


# %%
grade(objective_via_pi_r, bd.rlhf_objective, bandit_cases("policy", "reward", "pi_ref", "beta", numpy=True)
      | bandit_cases("greedy_policy", "reward", "pi_ref", "beta", numpy=True))

# %% [markdown]
# **The derivation (App. A.1, the exercise's answer).** Write both terms of Eq. 3 as one expectation, pull
# out $-\beta$, and multiply and divide by $Z(x)$:
# $$\begin{aligned}
# \mathbb E_{y\sim\pi}[r]-\beta\,\mathbb D_{\rm KL}[\pi\|\pi_{\rm ref}]
# &=\mathbb E_{y\sim\pi}\Big[r(x,y)-\beta\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}\Big]
# =-\beta\,\mathbb E_{y\sim\pi}\Big[\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}-\frac1\beta r(x,y)\Big]\\
# &=-\beta\,\mathbb E_{y\sim\pi}\Big[\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)\,e^{r(x,y)/\beta}}\Big]
# =-\beta\,\mathbb E_{y\sim\pi}\Big[\log\frac{\pi(y|x)}{Z(x)\,\pi_r(y|x)}\Big]\\
# &=-\beta\,\mathbb D_{\rm KL}\big[\pi(y|x)\,\|\,\pi_r(y|x)\big]+\beta\log Z(x).
# \end{aligned}$$
# $Z(x)$ does not depend on $\pi$, and $\mathbb D_{\rm KL}\ge 0$ with equality iff $\pi=\pi_r$ (Gibbs'
# inequality), so $\pi_r$ is the unique maximiser and the maximum is $\beta\log Z(x)$, the soft value function.
# Check each line on 100 random policies:

# %% tags=["nbval-check-output"]
gen = torch.Generator().manual_seed(seed)
pis = torch.softmax(2 * torch.randn(100, n_prompts, n_responses, dtype=torch.float64, generator=gen), -1).numpy()
line_1 = rlhf_objective_by_hand(pis, r, pi_ref, beta)  # Eq. 3
line_3 = -beta * (pis * np.log(pis / (pi_ref * np.exp(r / beta)))).sum(-1)  # the third line
line_5 = objective_via_pi_r(pis, r, pi_ref, beta)  # −β KL(π‖π_r) + β log Z
library = np.stack([bd.rlhf_objective(torch.from_numpy(p), toy.reward, toy.pi_ref, beta).numpy() for p in pis])
for line in (line_3, line_5, library):
    np.testing.assert_allclose(line_1, line, rtol=0, atol=1e-10)
print("Eq. 3 = -beta E[log pi/(pi_ref e^(r/beta))] = -beta KL(pi||pi_r) + beta log Z, 100 policies: True")
print(f"smallest beta log Z - Eq. 3 (= beta KL >= 0): {(beta * np.log(Z) - line_1).min():.6f}")

# %% [markdown]
# So $\pi_r$ is normalised, reaches $\beta\log Z(x)$, and gradient ascent on Eq. 3, which never computes
# $Z(x)$, finds it too (natural-gradient steps on the logits, `bd.maximise_rlhf_objective`).

# %% tags=["nbval-check-output"]
best = bd.rlhf_objective(pi_star, toy.reward, toy.pi_ref, beta)
np.testing.assert_allclose(pi_star_np.sum(-1), 1.0, rtol=1e-12)
np.testing.assert_allclose(best.numpy(), beta * np.log(Z), rtol=1e-10)
pi_pg = bd.maximise_rlhf_objective(toy.reward, toy.pi_ref, beta)  # never computes Z(x)
print("max objective = beta log Z(x):", show(best, 6))
print("gradient ascent on Eq. 3 reaches the maximum:",
      bd.max_abs_error(bd.rlhf_objective(pi_pg, toy.reward, toy.pi_ref, beta), best) < 1e-6,
      "and pi*:", bd.max_abs_error(pi_pg, pi_star) < 1e-4)

# %% [markdown]
# ## Eq. 5 — the reward, rewritten through its optimal policy
# Take logs of Eq. 4 and solve for $r$:
# $$r(x,y)=\beta\log\frac{\pi_r(y|x)}{\pi_{\rm ref}(y|x)}+\beta\log Z(x).$$
# Any reward is determined by its optimal policy, up to the per-prompt term $\beta\log Z(x)$.

# %% [markdown]
# ### Exercise · tier 1 · Eq. 5 by hand
#
# <details><summary>Hint 1</summary>Take the log of Eq. 4 and solve it for r.</details>
# <details><summary>Hint 2</summary>
#
# $r(x,y)=\beta\log\frac{\pi_r(y|x)}{\pi_{\rm ref}(y|x)}+\beta\log Z(x)$; `log_z` holds one value per prompt,
# so broadcast it over the responses.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# return beta * np.log(policy / pi_ref) + beta * log_z[:, None]
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def reward_from_policy(policy: np.ndarray, pi_ref: np.ndarray, beta: float, log_z: np.ndarray) -> np.ndarray:
    """Eq. 5: r(x,y) = β log π(y|x)/π_ref(y|x) + β log Z(x), from π_r (n_x, n_y) and log Z(x) (n_x,)."""
    return beta * np.log(policy / pi_ref) + beta * log_z[:, None]


# %%
grade(reward_from_policy, bd.reparameterised_reward,
      bandit_cases("optimal_policy", "pi_ref", "beta", "log_z", numpy=True))

# %% tags=["nbval-check-output"]
r_eq5 = reward_from_policy(pi_star_np, pi_ref, beta, np.log(Z))  # Eq. 5
np.testing.assert_allclose(r_eq5, r, rtol=0, atol=1e-10)
np.testing.assert_allclose(r_eq5, bd.reparameterised_reward(pi_star, toy.pi_ref, beta, log_z).numpy(),
                           rtol=0, atol=1e-10)
print("Eq. 5 by hand recovers r* and == bandit.reparameterised_reward: True")
print("beta log Z(x) =", show(beta * np.log(Z), 6))

# %% [markdown]
# ## Eq. 6 — preferences in terms of the policy alone
# Substitute Eq. 5 into Eq. 1. The $\beta\log Z(x)$ terms are equal for $y_1$ and $y_2$, so they cancel:
# $$p^*(y_1\succ y_2|x)=\Big(1+\exp\Big(\beta\log\frac{\pi^*(y_2|x)}{\pi_{\rm ref}(y_2|x)}-\beta\log\frac{\pi^*(y_1|x)}{\pi_{\rm ref}(y_1|x)}\Big)\Big)^{-1}.$$

# %% [markdown]
# ### Exercise · tier 1 · Eq. 6 by hand
#
# <details><summary>Hint 1</summary>Put Eq. 5 into Eq. 1: which term is the same for both responses of a
# prompt, and so cancels?</details>
# <details><summary>Hint 2</summary>
#
# With $h(x,y)=\beta\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}$: $p(y_1\succ y_2\mid
# x)=\sigma(h_{y_1}-h_{y_2})=1/(1+e^{h_{y_2}-h_{y_1}})$, the `[x, y1, y2]` table by broadcasting `h[:, :,
# None]` against `h[:, None, :]`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# h = beta * np.log(policy / pi_ref)
# return 1 / (1 + np.exp(h[:, None, :] - h[:, :, None]))
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def bt_from_policy(policy: np.ndarray, pi_ref: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 6 as a [x, y1, y2] table: p(y1 ≻ y2 | x) from β log π/π_ref alone, no Z(x) anywhere."""
    h = beta * np.log(policy / pi_ref)
    return 1 / (1 + np.exp(h[:, None, :] - h[:, :, None]))


# %%
grade(bt_from_policy, bd.bt_probs_from_policy, bandit_cases("optimal_policy", "pi_ref", "beta", numpy=True))

# %% tags=["nbval-check-output"]
p_eq6 = bt_from_policy(pi_star_np, pi_ref, beta)  # Eq. 6, [x, y1, y2]
np.testing.assert_allclose(p_eq6, p_eq1, rtol=0, atol=1e-12)
np.testing.assert_allclose(p_eq6, bd.bt_probs_from_policy(pi_star, toy.pi_ref, beta).numpy(), rtol=0, atol=1e-12)
print("Eq. 6 by hand == Eq. 1 and == bandit.bt_probs_from_policy: True")
print("p*(y0 > y1 | x0) from pi* alone =", round(float(p_eq6[0, 0, 1]), 6))

# %% [markdown]
# ## Eq. 7 — the DPO loss
# Eq. 6 is a likelihood of the comparisons **as a function of a policy**. Maximise it over $\pi_\theta$, as
# Eq. 2 does over $r_\phi$:
# $$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref})=-\mathbb E_{(x,y_w,y_l)\sim\mathcal D}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\beta\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}\Big)\Big].$$
# **Every policy is optimal for its own reward.** Eq. 6 holds for $\pi^*$; why may Eq. 7 use any
# $\pi_\theta$? Put its **implicit reward** $\hat r_\theta=\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$ into Eq. 4:
# $\pi_{\rm ref}e^{\hat r_\theta/\beta}=\pi_\theta$ already sums to 1, so $Z(x)=1$ and $\pi_\theta$ *is* the optimal policy
# of $\hat r_\theta$. Eq. 7 is Eq. 2 with $r_\phi$ replaced by $\hat r_\theta$: it fits a reward model whose optimal
# policy needs no RL, being the model trained (the paper's title). Check on a random $\pi_\theta$:

# %% tags=["nbval-check-output"]
theta_any = torch.randn(n_prompts, n_responses, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
pi_theta_any = torch.softmax(theta_any, -1)
r_hat_theta = bd.implicit_reward(pi_theta_any, toy.pi_ref, beta)
torch.testing.assert_close(bd.log_partition(r_hat_theta, toy.pi_ref, beta), torch.zeros(n_prompts, dtype=torch.float64))
torch.testing.assert_close(bd.optimal_policy(r_hat_theta, toy.pi_ref, beta), pi_theta_any)
print("log Z(x) of the implicit reward = 0, and its Eq. 4 policy is pi_theta: True")

# %% [markdown]
# Eq. 7 needs four log-probabilities per pair. Written out below, on that policy and the population, and
# checked against `dpo_lab.losses.preference_loss`, which trains GPT-2 in notebook 05.

# %% [markdown]
# ### Exercise · tier 1 · Eq. 7 per pair
#
# <details><summary>Hint 1</summary>A response's implicit reward is β times its log-ratio to π_ref; the loss
# is small when the winner's is well above the loser's.</details>
# <details><summary>Hint 2</summary>
#
# $-\log\sigma\big(\beta(\log\pi_w-\log\pi_{{\rm ref},w})-\beta(\log\pi_l-\log\pi_{{\rm ref},l})\big)$;
# `torch.nn.functional.logsigmoid` stays finite where `log(sigmoid(...))` does not.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# return -torch.nn.functional.logsigmoid(beta * (logp_w - ref_w) - beta * (logp_l - ref_l))
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def eq7(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
        beta: float) -> torch.Tensor:
    """Eq. 7 per pair, shape (B,): −log σ(β log π(y_w|x)/π_ref(y_w|x) − β log π(y_l|x)/π_ref(y_l|x))."""
    return -torch.nn.functional.logsigmoid(beta * (logp_w - ref_w) - beta * (logp_l - ref_l))


# %%
grade(eq7, lambda logp_w, logp_l, ref_w, ref_l, beta: preference_loss(logp_w, logp_l, ref_w, ref_l, beta=beta)[0],
      bandit_cases("logp_w", "logp_l", "ref_w", "ref_l", "beta"))

# %% [markdown]
# ### Exercise · tier 2 · Eq. 7 on a table of comparisons
# `data` holds index tensors `x`, `y_w`, `y_l` and a `weight` per comparison (the population's are
# unequal): the expectation over $\mathcal D$ is a **weighted** mean.
#
# <details><summary>Hint 1</summary>Pick each comparison's four log-probabilities out of the tables with the
# index tensors, then reuse eq7.</details>
# <details><summary>Hint 2</summary>
#
# $\mathcal L=\sum_i w_i\,\ell_i\big/\sum_i w_i$, with $\ell_i$ = `eq7` at $(x_i, y_{w,i}, y_{l,i})$ and
# $\log\pi_\theta$ = `log_softmax(logits, -1)`.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# logp, ref = torch.log_softmax(logits, -1), pi_ref.log()
# x, y_w, y_l = data.x, data.y_w, data.y_l
# return (data.weight * eq7(logp[x, y_w], logp[x, y_l], ref[x, y_w], ref[x, y_l], beta)).sum() / data.weight.sum()
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def dpo_loss_table(logits: torch.Tensor, pi_ref: torch.Tensor, data: bd.PreferenceData, beta: float) -> torch.Tensor:
    """The Eq. 7 loss of π_θ = softmax(logits) on `data`: Σ_i w_i eq7_i / Σ_i w_i over its comparisons."""
    logp, ref = torch.log_softmax(logits, -1), pi_ref.log()
    x, y_w, y_l = data.x, data.y_w, data.y_l
    return (data.weight * eq7(logp[x, y_w], logp[x, y_l], ref[x, y_w], ref[x, y_l], beta)).sum() / data.weight.sum()


# %%
grade(dpo_loss_table, lambda logits, pi_ref, data, beta: bd.dpo_loss_on_table(logits, pi_ref, data, beta)[0],
      bandit_cases("logits", "pi_ref", "data", "beta"), hint="weight each comparison by data.weight")

# %% tags=["nbval-check-output"]
logp, ref = torch.log_softmax(theta_any, -1), toy.pi_ref.log()
x, y_w, y_l = population.x, population.y_w, population.y_l
four = (logp[x, y_w], logp[x, y_l], ref[x, y_w], ref[x, y_l])
torch.testing.assert_close(eq7(*four, beta), preference_loss(*four, beta=beta)[0], rtol=1e-12, atol=1e-12)
loss_any = dpo_loss_table(theta_any, toy.pi_ref, population, beta)
torch.testing.assert_close(loss_any, bd.dpo_loss_on_table(theta_any, toy.pi_ref, population, beta)[0])
print(f"Eq. 7 by hand == losses.preference_loss; population loss at a random policy: {loss_any:.6f}")

# %% [markdown]
# At $\pi_\theta=\pi_{\rm ref}$ every log-ratio is 0, so the loss is $\log 2$. On the population its
# minimiser (the library's L-BFGS solver) is $\pi^*$: no reward model, no sampling, no RL.

# %% tags=["nbval-check-output"]
loss0, _ = bd.dpo_loss_on_table(toy.pi_ref.log(), toy.pi_ref, population, beta)
dpo = bd.solve_dpo(toy.pi_ref, population, beta)
print("DPO loss at pi_ref:", round(loss0.item(), 6), "= log 2:", round(math.log(2), 6))
print("DPO minimiser:", show(dpo.policy, 4))
print("max |pi_DPO - pi*| < 1e-6:", bd.max_abs_error(dpo.policy, pi_star) < 1e-6)

# %% [markdown]
# ## Why Eq. 7's population minimiser is $\pi^*$ (and when it is not)
# Group the population loss by unordered pair $\{a,b\}$ of a prompt's responses, compared with
# probability $w_{ab}>0$; let $\Delta_\theta=\hat r_\theta(x,a)-\hat r_\theta(x,b)$:
# $$\mathcal L_{\rm DPO}=\sum_{x,\{a,b\}}w_{ab}\Big[-p^*(a\succ b|x)\log\sigma(\Delta_\theta)-p^*(b\succ a|x)\log\sigma(-\Delta_\theta)\Big].$$
# Each bracket is a binary cross-entropy, minimised iff $\sigma(\Delta_\theta)=p^*(a\succ b|x)=\sigma(r^*(x,a)-r^*(x,b))$,
# i.e. $\Delta_\theta=r^*(x,a)-r^*(x,b)$. This pins $\pi_\theta$ down only under three conditions:
# 1. **Full support**, $\pi_{\rm ref}(y|x)>0$ (and $p(x)>0$): otherwise $\log\frac{\pi_\theta}{\pi_{\rm ref}}$ is undefined,
#    and a response $\pi_{\rm ref}$ never samples is never compared.
# 2. **A connected comparison graph** per prompt (responses as nodes, compared pairs as edges). Summing
#    differences along paths gives $\hat r_\theta(x,y)=r^*(x,y)+c(x)$; a response in no comparison is left free.
# 3. **The offset $c(x)$**, invisible to comparisons (equivalent rewards, Eq. 2), is fixed because
#    $\pi_\theta=\pi_{\rm ref}e^{\hat r_\theta/\beta}$ must sum to 1: $c(x)=-\beta\log Z(x)$, as in Eq. 5. Then $\pi_\theta=\pi^*$.
#
# Check with your `dpo_loss_table`: L-BFGS on free logits from **uniform** (not $\pi_{\rm ref}$), all pairs
# compared; then without any comparison of the last response.

# %%
def population_eq7(theta: torch.Tensor, data: bd.PreferenceData) -> torch.Tensor:
    """The weighted Eq. 7 loss of softmax(theta) over the triples of `data`, at this notebook's π_ref and β."""
    return dpo_loss_table(theta, toy.pi_ref, data, beta)


def minimise(loss_fn, steps: int = 300) -> torch.Tensor:
    """L-BFGS on free logits from uniform: up to `steps` iterations, stops when the gradient is ~0."""
    theta = torch.zeros(n_prompts, n_responses, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=steps, tolerance_grad=1e-12, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


# %% tags=["nbval-check-output"]
theta_all = minimise(lambda t: population_eq7(t, population))
print("all pairs compared, the minimiser is pi* (max |pi_theta - pi*| < 1e-6):",
      bd.max_abs_error(theta_all.softmax(-1), pi_star) < 1e-6)

# %% tags=["nbval-check-output"]
k = n_responses - 1  # this response is in no comparison
keep = (population.y_w != k) & (population.y_l != k)
partial = bd.PreferenceData(x=population.x[keep], y_w=population.y_w[keep], y_l=population.y_l[keep],
                            weight=population.weight[keep])
theta_a = minimise(lambda t: population_eq7(t, partial))
theta_b = theta_a.clone()
theta_b[:, k] += 2.0  # a different value for the logit no comparison sees
loss_a, loss_b = population_eq7(theta_a, partial), population_eq7(theta_b, partial)
print(f"y{k} never compared: loss {loss_a:.6f} vs {loss_b:.6f} (equal: {abs(loss_a - loss_b) < 1e-12});"
      f" pi(y{k}|x0) = {theta_a.softmax(-1)[0, k]:.4f} vs {theta_b.softmax(-1)[0, k]:.4f}, pi* = {pi_star[0, k]:.4f}")
rest = theta_a[:, :k].softmax(-1)  # ratios among the compared responses are still pinned down
print("ratios among the others still match pi*:",
      bd.max_abs_error(rest, pi_star[:, :k] / pi_star[:, :k].sum(-1, keepdim=True)) < 1e-6)
print("with all pairs, the same change of theta raises the loss:",
      bool(population_eq7(theta_b, population) - population_eq7(theta_a, population) > 1e-6))

# %% [markdown]
# ## Plackett–Luce: rankings of $K$ responses (App. A.3)
# With a ranking $\tau$ of $K$ responses (best first), the Plackett–Luce model picks the best, then the best
# of the rest, and so on:
# $$p^*(\tau\mid y_1,\dots,y_K,x)=\prod_{k=1}^{K}\frac{\exp r^*(x,y_{\tau(k)})}{\sum_{j=k}^{K}\exp r^*(x,y_{\tau(j)})}.$$
# Substituting Eq. 5, $\beta\log Z(x)$ cancels from each factor as in Eq. 6, and the DPO loss for rankings is
# $$\mathcal L_{\rm DPO}^{\rm PL}=-\mathbb E_{\tau,y_1,\dots,y_K,x}\Big[\log\prod_{k=1}^{K}\frac{\exp\hat r_\theta(x,y_{\tau(k)})}{\sum_{j=k}^{K}\exp\hat r_\theta(x,y_{\tau(j)})}\Big],\qquad \hat r_\theta=\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}.$$
# With $K=2$ it is exactly Eq. 7 (BT is PL with two items).

# %% [markdown]
# ### Exercise · tier 3 · the Plackett–Luce likelihood
# Vectorise it over leading dimensions and work in log space; mind which responses each denominator sums
# over. The grader compares it with the product computed one position at a time.
#
# <details><summary>Hint 1</summary>Position k's denominator sums over the responses ranked k or lower: a
# suffix. Which torch function gives every suffix's log-sum-exp at once?</details>
# <details><summary>Hint 2</summary>
#
# $-\log p(\tau)=\sum_k\big(\log\sum_{j\ge k}e^{r_j}-r_k\big)$; the suffix terms are `torch.logcumsumexp` of
# the flipped last axis, flipped back.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# tail = torch.logcumsumexp(r_ranked.flip(-1), -1).flip(-1)  # log Σ_{j≥k} exp r_j, for each k
# return (tail - r_ranked).sum(-1)
# ```
# </details>

# %% tags=["exercise", "tier-3"]
def pl_nll(r_ranked: torch.Tensor) -> torch.Tensor:
    """−log PL probability of rankings, from the rewards of their responses listed best first: (..., K) -> (...)."""
    tail = torch.logcumsumexp(r_ranked.flip(-1), -1).flip(-1)  # log Σ_{j≥k} exp r_j, for each k
    return (tail - r_ranked).sum(-1)


# %%
grade(pl_nll, plackett_luce_nll, bandit_cases("ranked_rewards"))

# %% tags=["nbval-check-output"]
r_hat_any = beta * (logp - ref)  # implicit reward of the random policy of the Eq. 7 cell
k2 = pl_nll(torch.stack([r_hat_any[x, y_w], r_hat_any[x, y_l]], -1))
torch.testing.assert_close(k2, eq7(*four, beta), rtol=1e-12, atol=1e-12)
print("PL loss with K = 2 == Eq. 7 on every pair: True")

# %% [markdown]
# The population PL loss over all $K=$ `n_responses` responses weights each of the $K!$ rankings by its
# PL probability under $r^*$. Is $\pi^*$ its minimiser too?

# %% tags=["nbval-check-output"]
perms = torch.tensor(list(itertools.permutations(range(n_responses))))  # all K! rankings, best first
p_rank = torch.exp(-pl_nll(toy.reward[:, perms]))  # [x, ranking]: PL probabilities under r*
torch.testing.assert_close(p_rank.sum(-1), torch.ones(n_prompts, dtype=torch.float64))


def population_pl(theta: torch.Tensor) -> torch.Tensor:
    r_hat = beta * (torch.log_softmax(theta, -1) - toy.pi_ref.log())
    return (toy.prompt_probs[:, None] * p_rank * pl_nll(r_hat[:, perms])).sum()


for name, logits in (("pi*", pi_star.log()), ("pi_ref", toy.pi_ref.log())):
    theta = logits.clone().requires_grad_(True)
    grad = torch.autograd.grad(population_pl(theta), theta)[0]
    print(f"population PL loss at {name:6s}: {population_pl(theta):.6f}, max |gradient| = {grad.abs().max():.6f}"
          f" (< 1e-10: {bool(grad.abs().max() < 1e-10)})")
theta_pl = minimise(population_pl)
print("minimising it recovers pi*:", bd.max_abs_error(theta_pl.softmax(-1), pi_star) < 1e-6)

# %% [markdown]
# Yes: the gradient is 0 at $\pi^*$ (loss 4.186146), 0.021724 at $\pi_{\rm ref}$ (loss 4.787492), and
# minimising from uniform logits lands on $\pi^*$.

# %% [markdown]
# ## The DPO gradient and its weight $\sigma(\hat r_l-\hat r_w)$
# With the implicit reward $\hat r_\theta$ of Eq. 7, write $u=\hat r_\theta(x,y_w)-\hat r_\theta(x,y_l)$.
# Since $\frac{d}{du}[-\log\sigma(u)]=-(1-\sigma(u))=-\sigma(-u)$ and $\nabla_\theta u=\beta(\nabla_\theta\log\pi(y_w|x)-\nabla_\theta\log\pi(y_l|x))$,
# $$\nabla_\theta\mathcal L_{\rm DPO}=-\beta\,\mathbb E_{\mathcal D}\Big[\underbrace{\sigma\big(\hat r_\theta(x,y_l)-\hat r_\theta(x,y_w)\big)}_{\text{large when the implicit reward ranks the pair wrongly}}\big(\nabla_\theta\log\pi(y_w|x)-\nabla_\theta\log\pi(y_l|x)\big)\Big].$$
# For a softmax table $\nabla_\theta\log\pi(y|x)=e_y-\pi(\cdot|x)$, so the bracket is just $e_{y_w}-e_{y_l}$.
# (App. A.4 of the paper swaps the two rewards in Eq. 21; the §4 form above is the one autograd agrees with.)

# %% tags=["nbval-check-output"]
def dpo_gradient(logits: torch.Tensor, pi_ref: torch.Tensor, data: bd.PreferenceData, beta: float) -> torch.Tensor:
    """The formula above on a softmax table, each pair's weight in it σ(r̂_l − r̂_w), shape (n_x, n_y)."""
    r_hat = beta * (torch.log_softmax(logits, -1) - torch.log_softmax(pi_ref.log(), -1))
    coef = -beta * torch.sigmoid(r_hat[data.x, data.y_l] - r_hat[data.x, data.y_w]) * data.weight / data.weight.sum()
    grad = torch.zeros_like(logits)
    grad.index_put_((data.x, data.y_w), coef, accumulate=True)  # e_{y_w} ...
    grad.index_put_((data.x, data.y_l), -coef, accumulate=True)  # ... − e_{y_l}
    return grad


data = bd.sample_preferences(toy, n_pairs, seed=seed)
theta = torch.randn(toy.n_x, toy.n_y, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
theta.requires_grad_(True)
bd.dpo_loss_on_table(theta, toy.pi_ref, data, beta)[0].backward()
by_hand = dpo_gradient(theta.detach(), toy.pi_ref, data, beta)
print("max |formula - autograd| < 1e-12:", bd.max_abs_error(by_hand, theta.grad) < 1e-12)
print("dL/dtheta[x0] =", show(by_hand[0], 6))

# %%
margin = torch.linspace(-6, 6, 241, dtype=torch.float64)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(margin, torch.sigmoid(-margin), label=r"weight $\sigma(\hat r_l-\hat r_w)$")
ax.plot(margin, -torch.nn.functional.logsigmoid(margin), "--", label=r"loss $-\log\sigma(\hat r_w-\hat r_l)$")
ax.axvline(0, color="grey", lw=0.5)
ax.set_xlabel(r"implicit reward margin $\hat r_w-\hat r_l$")
ax.set_ylim(0, 3)
ax.legend()
ax.set_title("Wrongly ranked pairs get the large updates")
fig.tight_layout()
fig.savefig(figures_dir() / "01_dpo_gradient_weight.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** At margin 0, where every pair starts, the weight is ½ and the loss $\log 2$. The weight
# tends to 1 for pairs ranked wrongly and to 0 for pairs ranked rightly by a few units: DPO stops pushing on
# a pair it already ranks well.

# %% [markdown]
# ## What DPO's training logs show
# Adam on the 2,000 pairs above, logging TRL's metrics: mean log-probs of chosen and rejected responses, the
# mean margin $\hat r_w-\hat r_l$, and the share of pairs with $\hat r_w>\hat r_l$ (step 0's ties count ½, not 0).
#
# **Predict first.** The margin will grow. Will `logps/chosen`, the mean $\log\pi_\theta(y_w|x)$, rise or fall?
# Where will the accuracy stop? Write your answers down, then run the next two cells.

# %% tags=["nbval-check-output"]
fit = bd.solve_dpo(toy.pi_ref, data, beta, steps=200, adam_lr=0.05)
start, end = fit.history[0], fit.history[-1]
assert start["rewards/chosen"] == start["rewards/rejected"] == 0.0  # all ties at step 0
history = [{**start, "rewards/accuracies": 0.5}] + fit.history[1:]  # a tie counts as half right
for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
    print(f"{key:20s} {history[0][key]:8.3f} -> {end[key]:8.3f}")
log_ratio = torch.log_softmax(fit.table, -1) - toy.pi_ref.log()
print(f"pairs whose chosen response lost probability: {(log_ratio[data.x, data.y_w] < 0).double().mean():.3f}")
mode = pi_star.argmax(-1, keepdim=True)  # the response π* favours, per prompt
print("pi(y | x) at pi*'s mode:", show(toy.pi_ref.gather(1, mode)[:, 0], 3), "->", show(fit.policy.gather(1, mode)[:, 0], 3),
      "(pi*:", show(pi_star.gather(1, mode)[:, 0], 3), ")")
(kl0, er0), (kl1, er1) = [(bd.mean_over_prompts(bd.kl_divergence(p, pi_star), toy.prompt_probs),
                           bd.mean_over_prompts(bd.expected_reward(p, toy.reward), toy.prompt_probs))
                          for p in (toy.pi_ref, fit.policy)]
print(f"E[r*] {er0:.3f} -> {er1:.3f};  KL(pi_theta || pi*) {kl0:.3f} -> {kl1:.3f}")
agree = (toy.reward[data.x, data.y_w] > toy.reward[data.x, data.y_l]).double().mean()
print(f"labels that agree with r*'s order: {agree:.3f}")
assert end["logps/chosen"] < start["logps/chosen"] and er1 > er0 and kl1 < kl0

# %%
steps = [h["step"] for h in history]
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.plot(steps, [h["logps/chosen"] for h in history], label="logps/chosen")
left.plot(steps, [h["logps/rejected"] for h in history], label="logps/rejected")
left.set_xlabel("Adam step")
left.legend()
right.plot(steps, [h["rewards/margins"] for h in history], color="tab:green", label="rewards/margins")
right.plot(steps, [h["rewards/accuracies"] for h in history], color="tab:red",
           label="rewards/accuracies (tie = 1/2)")
right.set_xlabel("Adam step")
right.legend()
fig.suptitle(f"DPO on {n_pairs} sampled pairs of the toy bandit, beta={beta}")
fig.tight_layout()
fig.savefig(figures_dir() / "01_chosen_logps_fall.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** `logps/chosen` *falls* (−1.342 → −4.881) and 0.578 of the pairs' chosen responses lose
# probability, while the margin grows (0 → 0.321) and $\mathbb E[r^*]$ rises (0.144 → 0.944). Eq. 7 sees only
# margins, and a response wins some pairs and loses others: the mass flows to $\pi^*$'s favourite response
# (0.612, 0.287, 0.1 → 0.969, 0.993, 0.989). The accuracy stops at 0.695 within a few steps, exactly the share
# of labels that agree with $r^*$'s order; the rest is label noise. $\mathrm{KL}(\pi_\theta\|\pi^*)$ ends at 0.074,
# not 0: 2,000 pairs are not the population (notebook 02 measures this error).
#
# **In language models** this fall (*likelihood displacement*; official repo issues #8, #32, #36, #41) is
# common, but parameters are shared, so the freed mass may go elsewhere: to responses opposite in meaning
# (Razin et al. 2024, arXiv 2410.08847), or away from near-identical preferred responses (Pal et al. 2024,
# arXiv 2402.13228). A falling `logps/chosen` is a thing to inspect, not proof that training works.

# %% [markdown]
# ## Why parameterising the reward by a policy loses nothing (§5, App. A.5–A.6)
# **Def. 1** (at Eq. 2): $r\sim r'$ if $r'(x,y)=r(x,y)+f(x)$.
# **Lemma 1** (equivalent rewards give the same PL, hence BT, preferences). Each PL factor gains $e^{f(x)}$
# in its numerator and in every denominator term:
# $$p_{r+f}(\tau|x)=\prod_{k}\frac{e^{f(x)}\exp r(x,y_{\tau(k)})}{e^{f(x)}\sum_{j\ge k}\exp r(x,y_{\tau(j)})}=p_r(\tau|x).$$
# **Lemma 2** (equivalent rewards give the same optimal policy). In Eq. 4, $e^{f(x)/\beta}$ factors out of the
# numerator and of $Z(x)$:
# $$\pi_{r+f}(y|x)=\frac{\pi_{\rm ref}(y|x)\,e^{r(x,y)/\beta}\,e^{f(x)/\beta}}{e^{f(x)/\beta}\sum_{y'}\pi_{\rm ref}(y'|x)\,e^{r(x,y')/\beta}}=\pi_r(y|x).$$
# Both proofs need $f$ not to depend on $y$. Check with a random $f(x)$, and with a $g(y)$, which must
# change all three:

# %% tags=["nbval-check-output"]
gen = torch.Generator().manual_seed(seed)
f_x = 3.0 * torch.randn(n_prompts, 1, dtype=torch.float64, generator=gen)  # same class as r*
g_y = torch.randn(1, n_responses, dtype=torch.float64, generator=gen)  # a different class
for name, r_new in (("r* + f(x)", toy.reward + f_x), ("r* + g(y)", toy.reward + g_y)):
    d_bt = bd.max_abs_error(bd.bt_probs(r_new), p_bt)
    d_pl = bd.max_abs_error(torch.exp(-pl_nll(r_new[:, perms])), p_rank)
    d_pi = bd.max_abs_error(bd.optimal_policy(r_new, toy.pi_ref, beta), pi_star)
    print(f"{name}: max change of BT probs {d_bt:.6f}, PL ranking probs {d_pl:.6f}, pi* {d_pi:.6f}")

# %% [markdown]
# **Theorem 1** (§5.1). *Assume $\pi_{\rm ref}(y|x)>0$ for every $x,y$ and $\beta>0$. Then every equivalence class of
# rewards contains an implicit reward $r(x,y)=\beta\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}$ for some policy $\pi$.*
# Since PL and BT models see a reward only through its class (Lemma 1), fitting only implicit rewards (Eq. 7)
# loses nothing. Proof: take $\pi=\pi_r$ (Eq. 4); by Eq. 5, $r-\beta\log Z(x)=\beta\log\frac{\pi_r}{\pi_{\rm ref}}$,
# and $-\beta\log Z(x)$ is a function of $x$ only. That member is the projection
# $$f(r;\pi_{\rm ref},\beta)(x,y)=r(x,y)-\beta\log\sum_y\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big)\quad\text{(Eq. 8)},$$
# the member satisfying the normalisation $\sum_y\pi_{\rm ref}(y|x)\exp\big(\frac1\beta r(x,y)\big)=1$ (Eq. 9).
#
# **Proposition 1** (App. A.6: the member is unique). If $r=\beta\log\frac{\pi}{\pi_{\rm ref}}$ and
# $r+f(x)=\beta\log\frac{\pi'}{\pi_{\rm ref}}$ for policies $\pi,\pi'$, then $\pi'(y|x)=\pi(y|x)\,e^{f(x)/\beta}$; summing over
# $y$ gives $1=e^{f(x)/\beta}$, so $f=0$. Check both, and that the projection lands on $\beta\log\frac{\pi^*}{\pi_{\rm ref}}$:

# %% tags=["nbval-check-output"]
r_hat_star = bd.implicit_reward(pi_star, toy.pi_ref, beta)  # β log π*/π_ref
for name, shift in (("f = 0   ", torch.zeros_like(f_x)), ("f = f(x)", f_x)):
    candidate = toy.pi_ref * torch.exp((r_hat_star + shift) / beta)  # π' = π_ref e^{r'/β}
    torch.testing.assert_close(beta * candidate.sum(-1).log(), shift[:, 0])  # β log Σ_y π' = f(x)
    print(f"{name}: beta log sum_y pi' =", show(beta * candidate.sum(-1).log(), 4))
shifted = bd.shift_reward(toy.reward, f_x[:, 0])
projected = bd.project_reward(shifted, toy.pi_ref, beta)
# log of Eq. 9's left side: 0 exactly when the reward is normalised
print("log Eq. 9 before projection:", show(bd.log_partition(shifted, toy.pi_ref, beta), 4))
print("log Eq. 9 after projection: ", show(bd.log_partition(projected, toy.pi_ref, beta), 6))
print("Theorem 1, f(r) = beta log pi*/pi_ref:", bd.max_abs_error(projected, r_hat_star) < 1e-10)

# %% [markdown]
# Why $\pi_{\rm ref}>0$ is needed: if $\pi_{\rm ref}(y_0|x)=0$, then $\pi_r(y_0|x)=0$ whatever $r(x,y_0)$ is, so
# rewards of **different** classes (differing at $y_0$) share an optimal policy, which cannot carry them.

# %% tags=["nbval-check-output"]
pi_ref0 = pi_ref.copy()
pi_ref0[:, 0] = 0.0  # y0 is never sampled
pi_ref0 /= pi_ref0.sum(-1, keepdims=True)
r_bumped = r.copy()
r_bumped[:, 0] += 5.0  # a y-dependent change: a different class (Lemma 1's check above)
same_policy = np.allclose(optimal_policy_by_hand(r, pi_ref0, beta), optimal_policy_by_hand(r_bumped, pi_ref0, beta),
                          rtol=0, atol=1e-15)
print("pi_ref(y0) = 0: same Eq. 4 policy for r* and r* + 5 at y0:", same_policy)

# %% [markdown]
# ## β: how far $\pi^*$ moves from $\pi_{\rm ref}$
# **Predict first.** As β goes from 10 down to 0.01, where does $\pi^*(\cdot|x_0)$ put its mass, and what happens
# to the KL? The figure is drawn at the notebook's β; the slider after it redraws it in a live notebook.

# %%
def plot_policies(beta_value: float, prompt: int = 0) -> plt.Figure:
    """π_ref, π*_β and r* for one prompt."""
    pi = toy.optimal_policy(beta_value)
    kl = bd.kl_divergence(pi, toy.pi_ref)[prompt]
    ys = torch.arange(toy.n_y)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(ys - 0.2, toy.pi_ref[prompt], width=0.4, label=r"$\pi_{\rm ref}$")
    ax.bar(ys + 0.2, pi[prompt], width=0.4, label=rf"$\pi^*$, $\beta$={beta_value:.3g}")
    ax.plot(ys, torch.softmax(toy.reward[prompt], -1), "k.", label=r"softmax $r^*$ (for ranking)")
    ax.set_xticks(ys.tolist())
    ax.set_xlabel("response y")
    ax.set_ylim(0, 1)
    ax.set_title(f"prompt x{prompt}: KL(pi* || pi_ref) = {float(kl):.3f}")
    ax.legend()
    fig.tight_layout()
    return fig


fig = plot_policies(beta)
fig.savefig(figures_dir() / "01_beta_policy.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** At β = 0.1 (KL 0.803) this is the $x_0$ row of Eq. 4's table. With the slider: as β → 0,
# $e^{r/\beta}$ swamps $\pi_{\rm ref}$, $\pi^*$ moves to $y_2$ (the highest dot) and the KL grows; as β grows, $\pi^*$
# returns to $\pi_{\rm ref}$.

# %%
# Interactive: the redraws need a live kernel; headless runs (papermill, nbval) only record the widget.
def redraw(beta_value: float) -> None:
    plot_policies(beta_value)
    plt.show()


_ = interact(redraw, beta_value=FloatLogSlider(value=beta, base=10, min=-2, max=1, step=0.05, description="β"))
