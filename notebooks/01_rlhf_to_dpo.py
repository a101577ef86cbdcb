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
# # 01 · From RLHF to DPO, one equation at a time
#
# Rafailov et al. (2023), *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*
# (arXiv 2305.18290), §3–§5. We walk through Eqs. 1–7 and check every step **numerically** on an exact toy:
# a contextual bandit with a few prompts $x$ and a handful of responses $y$. Because the response set is
# finite, the partition function $Z(x)$, the optimal policy $\pi^*$ and every KL divergence are exact sums,
# so each claim can be checked to machine precision. All the computation lives in `dpo_lab.bandit`.
#
# Cells whose printed numbers are derivation checks start with `# NBVAL_CHECK_OUTPUT`: the notebook tests
# fail if one of those numbers changes.

# %% tags=["parameters"]
beta: float = 0.1  # KL strength β of Eq. 3 (the paper's IMDb sweep: 0.05, 0.1, 1, 5)
seed: int = 0  # seeds the toy bandit and the sampled preference data
n_prompts: int = 3  # number of prompts x
n_responses: int = 5  # number of responses y per prompt
n_pairs: int = 2000  # sampled preference pairs for the training-dynamics cell

# %%
import math

import matplotlib.pyplot as plt
import torch
from ipywidgets import FloatLogSlider, interact

from dpo_lab import bandit as bd
from dpo_lab.paths import figures_dir
from dpo_lab.seed import seed_everything

seed_everything(seed)
toy = bd.Bandit.random(n_x=n_prompts, n_y=n_responses, seed=seed)


def show(t: torch.Tensor, digits: int = 6) -> list:
    """Round for printing, so checked outputs do not depend on torch's print format."""
    return (t.numpy().round(digits) + 0.0).tolist()  # + 0.0 turns a rounded -0.0 into 0.0


# %% [markdown]
# ## The toy
# $\pi_{\rm ref}(y|x)$ plays the SFT model, $r^*(x,y)$ the (hidden) human reward. Rows are prompts, columns
# responses.

# %%
# NBVAL_CHECK_OUTPUT
print("pi_ref =", show(toy.pi_ref, 4))
print("r*     =", show(toy.reward, 4))

# %% [markdown]
# ## Eq. 1 — Bradley–Terry preferences
# Humans prefer $y_1$ to $y_2$ with probability
# $$p^*(y_1\succ y_2\mid x)=\frac{\exp r^*(x,y_1)}{\exp r^*(x,y_1)+\exp r^*(x,y_2)}=\sigma\big(r^*(x,y_1)-r^*(x,y_2)\big).$$
# Only reward **differences** matter: this is the fact that makes $Z(x)$ cancel later.

# %%
# NBVAL_CHECK_OUTPUT
p_bt = bd.bt_probs(toy.reward)  # [x, y1, y2]
assert torch.allclose(p_bt + p_bt.transpose(1, 2), torch.ones_like(p_bt))
print("p*(y0 > y1 | x0) =", round(float(p_bt[0, 0, 1]), 6))
print("p*(y1 > y0 | x0) =", round(float(p_bt[0, 1, 0]), 6))

# %% [markdown]
# ## Eq. 2 — the reward-model loss
# RLHF first fits $r_\phi$ by maximum likelihood on a dataset of comparisons $(x, y_w, y_l)$:
# $$\mathcal L_R(r_\phi,\mathcal D)=-\mathbb E_{(x,y_w,y_l)\sim\mathcal D}\big[\log\sigma(r_\phi(x,y_w)-r_\phi(x,y_l))\big].$$
# Data are made as in the paper's §4 outline: $y_1,y_2\sim\pi_{\rm ref}(\cdot|x)$, labelled by Eq. 1. With
# infinite data (`population_preferences`, every triple weighted by its probability) the fitted $r_\phi$
# equals $r^*$ **up to a function of $x$ only**: BT cannot see a per-prompt offset.

# %%
# NBVAL_CHECK_OUTPUT
population = bd.population_preferences(toy)
r_phi = bd.fit_reward_model(population, toy.n_x, toy.n_y).table
print("loss at r_phi = 0 (log 2):", round(bd.reward_model_loss(torch.zeros_like(r_phi), population)[0].item(), 6))
print("r_phi - r* per prompt:", show((r_phi - toy.reward).mean(-1), 4))
print("r_phi ~ r* (differ by f(x) only):", bd.are_equivalent(r_phi, toy.reward, atol=1e-5))

# %% [markdown]
# ## Eq. 3 — the KL-constrained objective
# RLHF then maximises
# $$\max_{\pi}\ \mathbb E_{x,\,y\sim\pi(y|x)}\big[r(x,y)\big]-\beta\,\mathbb D_{\rm KL}\big[\pi(y|x)\,\|\,\pi_{\rm ref}(y|x)\big].$$
# In the bandit both terms are exact sums over $y$.

# %% [markdown]
# ## Eq. 4 — its maximiser in closed form
# Completing the KL (App. A.1): the objective equals $\beta\log Z(x)-\beta\,\mathbb D_{\rm KL}[\pi\|\pi_r]$ with
# $$\pi_r(y|x)=\frac{1}{Z(x)}\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big),\qquad Z(x)=\sum_y\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big),$$
# so Gibbs' inequality gives the maximiser $\pi_r$ and the maximum $\beta\log Z(x)$. Check: $\pi_r$ is
# normalised, reaches $\beta\log Z(x)$, beats random policies, and plain gradient ascent on Eq. 3 finds it.

# %%
# NBVAL_CHECK_OUTPUT
pi_star = toy.optimal_policy(beta)
log_z = bd.log_partition(toy.reward, toy.pi_ref, beta)
best = bd.rlhf_objective(pi_star, toy.reward, toy.pi_ref, beta)
assert torch.allclose(pi_star.sum(-1), torch.ones(toy.n_x, dtype=torch.float64))
assert torch.allclose(best, beta * log_z)
others = [torch.softmax(torch.randn(toy.n_x, toy.n_y, dtype=torch.float64), -1) for _ in range(100)]
assert all((bd.rlhf_objective(p, toy.reward, toy.pi_ref, beta) < best).all() for p in others)
pi_pg = bd.maximise_rlhf_objective(toy.reward, toy.pi_ref, beta)  # never computes Z(x)
print("pi* =", show(pi_star, 4))
print("max objective = beta log Z(x):", show(best, 6))
print("gradient ascent on Eq. 3 reaches the maximum:",
      bd.max_abs_error(bd.rlhf_objective(pi_pg, toy.reward, toy.pi_ref, beta), best) < 1e-6,
      "and pi*:", bd.max_abs_error(pi_pg, pi_star) < 1e-4)

# %% [markdown]
# ## Eq. 5 — the reward, rewritten through its optimal policy
# Take logs of Eq. 4 and solve for $r$:
# $$r(x,y)=\beta\log\frac{\pi_r(y|x)}{\pi_{\rm ref}(y|x)}+\beta\log Z(x).$$
# Any reward is determined by its optimal policy, up to the per-prompt term $\beta\log Z(x)$.

# %%
# NBVAL_CHECK_OUTPUT
recovered = bd.reparameterised_reward(pi_star, toy.pi_ref, beta, log_z)
print("max |Eq. 5 - r*| < 1e-10:", bd.max_abs_error(recovered, toy.reward) < 1e-10)
print("beta log Z(x) =", show(beta * log_z, 6))

# %% [markdown]
# ## Eq. 6 — preferences in terms of the policy alone
# Substitute Eq. 5 into Eq. 1. The $\beta\log Z(x)$ terms are equal for $y_1$ and $y_2$, so they cancel:
# $$p^*(y_1\succ y_2|x)=\Big(1+\exp\Big(\beta\log\frac{\pi^*(y_2|x)}{\pi_{\rm ref}(y_2|x)}-\beta\log\frac{\pi^*(y_1|x)}{\pi_{\rm ref}(y_1|x)}\Big)\Big)^{-1}.$$

# %%
# NBVAL_CHECK_OUTPUT
p_eq6 = bd.bt_probs_from_policy(pi_star, toy.pi_ref, beta)
print("max |Eq. 6 - Eq. 1| < 1e-10:", bd.max_abs_error(p_eq6, p_bt) < 1e-10)
print("p*(y0 > y1 | x0) from pi* alone =", round(float(p_eq6[0, 0, 1]), 6))

# %% [markdown]
# ## Eq. 7 — the DPO loss
# Eq. 6 is a likelihood of the comparison data **as a function of a policy**. Parameterise $\pi_\theta$ and
# maximise it, exactly as Eq. 2 does for $r_\phi$:
# $$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref})=-\mathbb E_{(x,y_w,y_l)\sim\mathcal D}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\beta\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}\Big)\Big].$$
# At $\pi_\theta=\pi_{\rm ref}$ every log-ratio is 0, so the loss is $\log 2$. On the population of
# comparisons its minimiser is $\pi^*$ itself: no reward model, no sampling, no RL. We use the project's
# `dpo_lab.losses.preference_loss` on a tabular policy $\pi_\theta=\mathrm{softmax}(\theta)$.

# %%
# NBVAL_CHECK_OUTPUT
loss0, _ = bd.dpo_loss_on_table(toy.pi_ref.log(), toy.pi_ref, population, beta)
dpo = bd.solve_dpo(toy.pi_ref, population, beta)
print("DPO loss at pi_ref:", round(loss0.item(), 6), "= log 2:", round(math.log(2), 6))
print("DPO minimiser:", show(dpo.policy, 4))
print("max |pi_DPO - pi*| < 1e-6:", bd.max_abs_error(dpo.policy, pi_star) < 1e-6)

# %% [markdown]
# ## The DPO gradient and its weight $\sigma(\hat r_l-\hat r_w)$
# Write $\hat r_\theta(x,y)=\beta\log\frac{\pi_\theta(y|x)}{\pi_{\rm ref}(y|x)}$ and $u=\hat r_\theta(x,y_w)-\hat r_\theta(x,y_l)$.
# Since $\frac{d}{du}[-\log\sigma(u)]=-(1-\sigma(u))=-\sigma(-u)$ and $\nabla_\theta u=\beta(\nabla_\theta\log\pi(y_w|x)-\nabla_\theta\log\pi(y_l|x))$,
# $$\nabla_\theta\mathcal L_{\rm DPO}=-\beta\,\mathbb E_{\mathcal D}\Big[\underbrace{\sigma\big(\hat r_\theta(x,y_l)-\hat r_\theta(x,y_w)\big)}_{\text{large when the implicit reward ranks the pair wrongly}}\big(\nabla_\theta\log\pi(y_w|x)-\nabla_\theta\log\pi(y_l|x)\big)\Big].$$
# For a softmax table $\nabla_\theta\log\pi(y|x)=e_y-\pi(\cdot|x)$, so the bracket is just $e_{y_w}-e_{y_l}$.
# (App. A.4 of the paper swaps the two rewards in Eq. 21; the §4 form above is the one autograd agrees with.)

# %%
# NBVAL_CHECK_OUTPUT
data = bd.sample_preferences(toy, n_pairs, seed=seed)
theta = torch.randn(toy.n_x, toy.n_y, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
theta.requires_grad_(True)
bd.dpo_loss_on_table(theta, toy.pi_ref, data, beta)[0].backward()
by_hand = bd.dpo_gradient(theta.detach(), toy.pi_ref, data, beta)
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
# ## Chosen log-probs can fall while DPO is working
# A frequent question (official repo issues #8, #32, #36, #41): during DPO training `logps/chosen` often
# **decreases**. That is not degeneration. The loss only sees the *margin* between the two log-ratios, and
# the same response is the winner of some pairs and the loser of others. As $\pi_\theta$ moves towards
# $\pi^*$, mass concentrates on the few best responses, so the average $\log\pi_\theta(y_w|x)$ over the
# data falls, while the margin and the ranking accuracy rise. Here: Adam on the sampled pairs.

# %%
# NBVAL_CHECK_OUTPUT
history = bd.solve_dpo(toy.pi_ref, data, beta, optimizer="adam", steps=200, lr=0.05).history
start, end = history[0], history[-1]
for key in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"):
    print(f"{key:20s} {start[key]:8.3f} -> {end[key]:8.3f}")
assert end["logps/chosen"] < start["logps/chosen"] and end["rewards/margins"] > start["rewards/margins"]

# %%
steps = [h["step"] for h in history]
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
left.plot(steps, [h["logps/chosen"] for h in history], label="logps/chosen")
left.plot(steps, [h["logps/rejected"] for h in history], label="logps/rejected")
left.set_xlabel("Adam step")
left.legend()
right.plot(steps, [h["rewards/margins"] for h in history], color="tab:green", label="rewards/margins")
right.plot(steps, [h["rewards/accuracies"] for h in history], color="tab:red", label="rewards/accuracies")
right.set_xlabel("Adam step")
right.legend()
fig.suptitle(f"DPO on {n_pairs} sampled pairs, beta={beta}")
fig.tight_layout()
fig.savefig(figures_dir() / "01_chosen_logps_fall.png", dpi=120)
plt.show()

# %% [markdown]
# ## Why parameterising the reward by a policy loses nothing (§5)
# Rewards $r\sim r'$ are *equivalent* if $r-r'=f(x)$ (Def. 1). Equivalent rewards give the same
# preferences (Lemma 1) and the same optimal policy (Lemma 2). Theorem 1: every class contains exactly one
# reward of the form $\beta\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}$, obtained by the projection
# $$f(r;\pi_{\rm ref},\beta)(x,y)=r(x,y)-\beta\log\sum_y\pi_{\rm ref}(y|x)\exp\Big(\frac1\beta r(x,y)\Big)\quad\text{(Eq. 8)},$$
# the member that satisfies the normalisation $\sum_y\pi_{\rm ref}(y|x)\exp\big(\frac1\beta r(x,y)\big)=1$ (Eq. 9).

# %%
# NBVAL_CHECK_OUTPUT
f_x = 3.0 * torch.randn(toy.n_x, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
shifted = bd.shift_reward(toy.reward, f_x)
projected = bd.project_reward(shifted, toy.pi_ref, beta)
print("Lemma 1, same preferences:", bd.max_abs_error(bd.bt_probs(shifted), p_bt) < 1e-12)
print("Lemma 2, same optimal policy:", bd.max_abs_error(bd.optimal_policy(shifted, toy.pi_ref, beta), pi_star) < 1e-12)
# log of Eq. 9's left side: 0 exactly when the reward is normalised
print("log Eq. 9 before projection:", show(bd.log_partition(shifted, toy.pi_ref, beta), 4))
print("log Eq. 9 after projection: ", show(bd.log_partition(projected, toy.pi_ref, beta), 6))
print("Theorem 1, f(r) = beta log pi*/pi_ref:",
      bd.max_abs_error(projected, bd.implicit_reward(pi_star, toy.pi_ref, beta)) < 1e-10)

# %% [markdown]
# ## β: how far $\pi^*$ moves from $\pi_{\rm ref}$
# Small β trusts the reward (π* piles onto the best response, large KL); large β stays near π_ref. The
# static figure below is drawn for the parameter β; the slider after it redraws it interactively (in a
# live notebook only).

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

# %%
# Interactive: the redraws need a live kernel; headless runs (papermill, nbval) only record the widget.
def redraw(beta_value: float) -> None:
    plot_policies(beta_value)
    plt.show()


_ = interact(redraw, beta_value=FloatLogSlider(value=beta, base=10, min=-2, max=1, step=0.05, description="β"))
