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
# # 14 · The questions people ask
#
# Four questions come back again and again in the issue trackers of the official DPO code and of TRL. Each
# is answered here in a few lines: once on the exact bandit of notebooks 01–02 (every number exact), once
# on the logs of this kit's own DPO runs (notebook 05's β sweep), with a pointer to the place in the main
# sequence that shows it.
#
# The outputs are the `cpu` preset's, read from notebook 05's finished runs; a run not trained yet is trained
# first (at `smoke`, two 12-step runs).

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the bandit, its sampled pairs and the preset's runs
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
beta: float = 0.1  # KL coefficient β of the bandit and of the run read in question 1
window: int = 25  # steps in the running means of the logged metrics

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dpo_lab import bandit as bd
from dpo_lab import pipeline
from dpo_lab.losses import preference_loss
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.run import read_metrics
from dpo_lab.seed import seed_everything

config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
torch.set_num_threads(1)  # tables of 15 numbers: thread hand-offs would cost more than the arithmetic
toy = bd.Bandit.random(n_x=3, n_y=5, seed=seed)  # notebook 01's toy
pairs = bd.sample_preferences(toy, 2000, seed=seed)  # notebook 01's 2,000 sampled pairs


def eq7_by_hand(logits: torch.Tensor, data: bd.PreferenceData, beta: float) -> torch.Tensor:
    """Eq. 7 on the bandit: the weighted mean of −log σ(β h), h = log π/π_ref(y_w) − log π/π_ref(y_l)."""
    u = torch.log_softmax(logits, -1) - toy.pi_ref.log()
    h = u[data.x, data.y_w] - u[data.x, data.y_l]
    return (data.weight * -F.logsigmoid(beta * h)).sum() / data.weight.sum()


def logged_steps(beta_value: float) -> pd.DataFrame:
    """The per-step training metrics (TRL's names) of the preset's DPO run at ``beta_value``, loaded if it
    finished before."""
    run = pipeline.result(config, "DPO", beta_value)
    return pd.DataFrame([m for m in read_metrics(run.metrics_path) if "loss" in m]).set_index("step")


logs = {b: logged_steps(b) for b in sorted({*config.dpo.betas, beta})}
print(f"preset {config.name!r}: DPO runs at beta {list(logs)}, {len(logs[beta])} steps each")

# %% [markdown]
# ## 1. Why do the chosen log-probs fall while the margin rises?
# Eq. 7 sees one number per pair, the margin $h=\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}$.
# It rewards $h$ growing and says nothing about either term alone. Its gradient (§4) pushes
# $\log\pi_\theta(y_w|x)$ up and $\log\pi_\theta(y_l|x)$ down with the same weight, but the two completions
# share a prompt, come from the same model and share all of its parameters: pushing $y_l$ down drags $y_w$
# down with it, and the loss is content as long as $y_l$ falls faster. The freed probability goes to
# other completions.
#
# Read the logs with care: `logps/chosen` is the mean $\log\pi_\theta(y_w|x)$ of *that step's batch*, a
# different 32 pairs each step, so its curve mixes training with which pairs were drawn. The change on
# the same pairs is `rewards/chosen` / β $=\log\pi_\theta(y_w|x)-\log\pi_{\rm ref}(y_w|x)$ (Eq. 5's implicit
# reward over β). Below: running means over `window` steps of the run at `beta`.

# %%
run = logs[beta]
np.testing.assert_allclose(run["rewards/margins"], run["rewards/chosen"] - run["rewards/rejected"],
                           atol=1e-5)  # TRL's margin: the mean of r̂_w − r̂_l
shift = pd.DataFrame({"chosen": run["rewards/chosen"] / beta, "rejected": run["rewards/rejected"] / beta,
                      "margin h": run["rewards/margins"] / beta})  # log π_θ − log π_ref, nats
smooth_logps = run[["logps/chosen", "logps/rejected"]].rolling(window, min_periods=1).mean()
smooth_shift = shift.rolling(window, min_periods=1).mean()
span = min(window, len(run))
for name, frame in (("logps", smooth_logps), ("log pi/pi_ref", smooth_shift)):
    for key in frame:
        print(f"{name:14s} {key:15s} steps 1-{span}: {frame[key].iloc[span - 1]:9.3f}"
              f"   last {span} steps: {frame[key].iloc[-1]:9.3f}")

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
for key in smooth_logps:
    left.plot(smooth_logps.index, smooth_logps[key], label=key)
left.set_ylabel(r"mean $\log\pi_\theta(y|x)$ of the step's batch")
for key in smooth_shift:
    right.plot(smooth_shift.index, smooth_shift[key], label=key)
right.axhline(0, color="grey", lw=0.5)
right.set_ylabel(r"mean $\log\pi_\theta/\pi_{\rm ref}$ (rewards/* / β)")
for ax in (left, right):
    ax.set_xlabel("DPO step")
    ax.legend(fontsize=8)
fig.suptitle(f"DPO, beta={beta:g} ({config.name} preset): running means over {window} steps")
fig.tight_layout()
fig.savefig(figures_dir() / "14_chosen_falls.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** From the first 25 steps to the last 25, the chosen completions' log-ratio to
# $\pi_{\rm ref}$ falls from −2.068 to −8.153 nats and the rejected ones' from −2.617 to −13.882, so the margin
# $h$ grows from 0.548 to 5.729 (right). The raw `logps/chosen` (left) tells the same story less cleanly
# (−166.059 → −171.901, rejected −166.312 → −176.268): it also moves with the batches drawn.
#
# **Where the main sequence shows it.** Notebook 01, *What DPO's training logs show*: the same fall on the
# exact bandit, where every pair is known, and where the freed mass goes ($\pi^*$'s favourite response).
# Notebook 05, *What DPO does to likelihoods*: on held-out pairs, both chosen and rejected fall, and the
# mass goes to the policy's own samples. It is not a bug; it is a thing to inspect. If the chosen
# completions must keep their likelihood, add their NLL to the loss (RPO, notebook 11).

# %% [markdown]
# ## 2. Why does the loss sit at $\log 2$ with every reward at 0?
# Eq. 7 is $-\log\sigma(\beta h)$ and $-\log\sigma(0)=\log 2\approx 0.6931$. The product $\beta h$ is 0 for
# every pair when (i) $\pi_\theta=\pi_{\rm ref}$, as at step 1 of every run, whatever β; (ii) the reference
# *is* the policy (the same model passed twice, or a reference that is updated with it): then $h\equiv 0$,
# the gradient is exactly 0 and nothing ever trains; (iii) β = 0. A loss that stays at $\log 2$ with
# `rewards/chosen` and `rewards/rejected` stuck at 0 is (ii) or a learning rate of 0; a loss near
# $\log 2$ with rewards that move is a small β (question 3).

# %% tags=["nbval-check-output"]
at_ref = toy.pi_ref.log()  # logits of π_θ = π_ref
for b in (0.01, 0.1, 1.0, 10.0):
    ours, library = eq7_by_hand(at_ref, pairs, b), bd.dpo_loss_on_table(at_ref, toy.pi_ref, pairs, b)[0]
    assert abs(ours - math.log(2)) < 1e-12 and abs(library - math.log(2)) < 1e-12
print("pi = pi_ref: Eq. 7 = log 2 at beta 0.01, 0.1, 1, 10")

# (ii) the reference is the policy: its log-probs are the policy's own, so h = 0 and the gradient vanishes
theta = torch.randn(toy.n_x, toy.n_y, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                    requires_grad=True)
logp = torch.log_softmax(theta, -1)
chosen, rejected = logp[pairs.x, pairs.y_w], logp[pairs.x, pairs.y_l]
losses = preference_loss(chosen, rejected, chosen, rejected, beta=beta)[0]
losses.mean().backward()
print(f"reference = policy: loss {losses.mean().item():.4f}, largest |gradient| {theta.grad.abs().max().item():.1e}")
assert theta.grad.abs().max() == 0

# (iii) beta -> 0: a policy far from pi_ref (pi* at beta = 0.1) costs log 2 all the same
far = toy.optimal_policy(0.1).log()
for b in (1e-2, 1e-4, 1e-6):
    print(f"beta {b:g}: loss of pi*_0.1 minus log 2 = {eq7_by_hand(far, pairs, b).item() - math.log(2):+.2e}")
try:
    preference_loss(chosen, rejected, chosen, rejected, beta=0.0)
except ValueError as error:
    print("beta = 0:", error)

# %% [markdown]
# And in the kit's runs: step 1 of every run in the sweep, where $\pi_\theta=\pi_{\rm ref}$ (dropout off), so
# both rewards are 0 up to float32 round-off.

# %%
for b, frame in logs.items():
    first = frame.iloc[0]
    print(f"beta {b:<4g} step {frame.index[0]}: loss {first['loss']:.4f}, "
          f"|rewards/chosen| {abs(first['rewards/chosen']):.1e}, |rewards/rejected| {abs(first['rewards/rejected']):.1e}")
    assert abs(first["loss"] - math.log(2)) < 1e-3

# %% [markdown]
# **What to notice.** Every run starts at 0.6931, and as β → 0 a policy far from $\pi_{\rm ref}$ (KL 1.4331,
# question 3) costs $\log 2$ − 2.05e-06 at β = 10⁻⁶: near $\log 2$, the loss says little about the policy.
#
# **Where the main sequence shows it.** Notebook 05, *The loss at initialisation is $\log 2$* (the check a
# run should pass), and notebook 01, *The DPO gradient and its weight*: at margin 0 every pair's weight is
# ½, so the first step is not stuck; with a reference that moves with the policy it is.

# %% [markdown]
# ## 3. What does β actually do?
# β appears in Eq. 7 only inside the sigmoid, as the product $\beta h$: it sets how many nats of
# log-ratio margin $h$ buy a given loss. It is not a weight in front of the loss: every run starts at
# $\log 2$ whatever β (question 2), and a $c$ times larger β with a policy whose log-ratios to
# $\pi_{\rm ref}$ are $c$ times smaller gives exactly the same loss. The same policy, on the other hand,
# costs a different loss at another β, and not monotonically: a larger β rewards the pairs it ranks right
# more and punishes those it ranks wrong more. At the optimum, $\pi^*\propto\pi_{\rm ref}e^{r/\beta}$ (Eq. 4), so
# $\beta h=r(x,y_w)-r(x,y_l)$ (Eq. 5, with $Z(x)$ cancelling): the reward gap is fixed by the data, and the
# log-ratio margin the policy must build is that gap over β. A large β asks for small moves, a small one for
# large moves: the strength of Eq. 3's KL constraint. TRL's `rewards/margins` is $\beta h$, so it is not
# comparable across β; divide by β.

# %% tags=["nbval-check-output"]
start = toy.optimal_policy(beta).log()  # one fixed policy: π* at the notebook's β
print("the same policy, Eq. 7 at another beta:",
      {b: round(eq7_by_hand(start, pairs, b).item(), 4) for b in (0.01, 0.1, 1.0, 10.0)})
for c in (0.1, 10.0):
    tempered = toy.pi_ref.log() + (start - toy.pi_ref.log()) / c  # log-ratios c times smaller
    same = bd.dpo_loss_on_table(tempered, toy.pi_ref, pairs, beta * c)[0]
    assert torch.isclose(same, eq7_by_hand(start, pairs, beta), rtol=1e-12, atol=0)
print("log-ratios / c at beta * c (c = 0.1, 10): the same loss")

gap = toy.reward[pairs.x, pairs.y_w] - toy.reward[pairs.x, pairs.y_l]
for b in (0.1, 1.0, 10.0):
    u = toy.optimal_policy(b).log() - toy.pi_ref.log()
    h = u[pairs.x, pairs.y_w] - u[pairs.x, pairs.y_l]
    torch.testing.assert_close(b * h, gap, rtol=0, atol=1e-12)  # Eq. 5: beta h = the reward gap
    kl = bd.mean_over_prompts(bd.kl_divergence(toy.optimal_policy(b), toy.pi_ref), toy.prompt_probs)
    print(f"pi* at beta {b:<4g}: beta*h = r(y_w) - r(y_l); largest |h| {h.abs().max().item():7.4f}, KL {kl:.4f}")

# %% [markdown]
# In the kit's sweep, the logged `rewards/margins` ($\beta h$) and the margin itself ($h$, nats) over the
# last `window` steps, beside each run's final KL to $\pi_{\rm ref}$ on the test prompts:

# %%
table = pd.DataFrame({b: {"rewards/margins": frame["rewards/margins"].iloc[-window:].mean(),
                          "h = margins / beta": frame["rewards/margins"].iloc[-window:].mean() / b,
                          "final KL": pipeline.result(config, "DPO", b).last_metrics["kl_mean"]}
                      for b, frame in logs.items()}).T.rename_axis("beta")
print(table.round(3).to_string())

# %% [markdown]
# **What to notice.** On the bandit, $\pi^*_{0.1}$ costs 0.6739 at β = 0.01, 0.6037 at β = 0.1, 2.4234 at
# β = 1 and 24.097 at β = 10: the sampled pairs whose BT label went against $r^*$ cost about $\beta|h|$ each.
# $\pi^*$'s largest margin is 25.5423 nats at β = 0.1, 2.5542 at β = 1, 0.2554 at β = 10 (exactly $1/\beta$),
# and its KL 1.4331, 0.1530, 0.0016. In the sweep, `rewards/margins` grows with β (0.392 at β = 0.05 to
# 14.377 at β = 5) while the margin $h$ itself shrinks (7.844 to 2.875 nats) and so does the final KL
# (16.834 to 2.816): read the sweep's margins divided by β.
#
# **Where the main sequence shows it.** Notebook 01, *β: how far $\pi^*$ moves from $\pi_{\rm ref}$* (the
# slider), notebook 02, *1. The exact reward–KL curve*, and notebook 05, *The β sweep and the reward–KL
# frontier*.

# %% [markdown]
# ## 4. Why does the loss spike, or go to 0?
# Per pair, $-\log\sigma(\beta h)\approx\beta|h|$ for a pair ranked wrongly by a few units and
# $\approx e^{-\beta h}\to 0$ for one ranked rightly. **Spikes**: a step that flips the ranking of some
# pairs costs each about $\beta|h|$, without bound: a learning rate large enough to overshoot does it, and
# so does a large β, since the same nats of $h$ then cost more. β also multiplies the gradient (§4; at
# $h=0$ it is $\tfrac{\beta}{2}\nabla h$), but the kit's trainer uses RMSprop, which divides the gradient's
# scale out: $h$ moves by a few nats whatever β (question 3's table), and a large β magnifies the
# batch-to-batch noise in $h$ into the loss. **Going to 0**: if every training pair can be ranked right by
# any margin (deterministic labels, or a model large enough to memorise every pair), Eq. 7 has no minimiser:
# margins grow without end and every response that loses a comparison goes to probability 0, whatever β
# (Azar et al. 2023). A training loss near 0 then says the pairs were memorised, not that the policy is good.

# %% tags=["nbval-check-output"]
for lr in (0.05, 20.0):  # Adam on the 2,000 sampled pairs, from pi_ref
    history = [h["loss"] for h in bd.solve_dpo(toy.pi_ref, pairs, beta, steps=50, adam_lr=lr).history]
    print(f"Adam lr {lr:5g}: highest loss {max(history):.4f} (step {int(np.argmax(history))}), "
          f"after 50 steps {history[-1]:.4f}")

population = bd.population_preferences(toy)  # BT labels on every pair: both orders of each comparison
fit = bd.solve_dpo(toy.pi_ref, population, beta, steps=1000, adam_lr=0.05)
floor = bd.solve_dpo(toy.pi_ref, population, beta).history[-1]["loss"]  # L-BFGS: the exact minimum
print("BT labels:            loss at step 10, 100, 1000:", [round(fit.history[s]["loss"], 4) for s in (10, 100, 1000)],
      f" its minimum {floor:.4f}")
separable = bd.sample_annotated_preferences(toy, 2000, noise=0.0, seed=seed)  # the better response always wins
dominated = bd.dominated_responses(separable.aggregated(), toy.n_x, toy.n_y)  # the library's exact answer
fits = {steps: bd.solve_dpo(toy.pi_ref, separable, beta, steps=steps, adam_lr=0.05)
        for steps in (100, 1000)}
print("deterministic labels: loss at step 10, 100, 1000:",
      [round(fits[1000].history[s]["loss"], 4) for s in (10, 100, 1000)])
mass = [fits[s].policy[dominated].max().item() for s in (100, 1000)]
print(f"the {int(dominated.sum())} of {toy.n_x * toy.n_y} responses that lose a comparison: largest probability "
      f"{mass[0]:.1e} at step 100, {mass[1]:.1e} at step 1000")
assert floor > 0.5 and fits[1000].history[-1]["loss"] < 0.1 and mass[1] < mass[0] / 10

# %% [markdown]
# In the kit's sweep: the loss of every step (thin) and its running mean (thick), at each β.

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
for (b, frame), colour in zip(logs.items(), plt.cm.viridis(np.linspace(0, 0.9, len(logs))), strict=True):
    ax.plot(frame.index, frame["loss"], color=colour, lw=0.5, alpha=0.5)
    ax.plot(frame.index, frame["loss"].rolling(window, min_periods=1).mean(), color=colour, lw=2,
            label=f"beta {b:g}")
    print(f"beta {b:<4g}: highest loss {frame['loss'].max():.3f} (step {frame['loss'].idxmax()}), "
          f"last {window} steps: loss {frame['loss'].iloc[-window:].mean():.3f}, "
          f"accuracy {frame['rewards/accuracies'].iloc[-window:].mean():.3f}; "
          f"step 1's gradient norm / beta {frame['grad_norm'].iloc[0] / b:.2f}")
ax.axhline(math.log(2), color="grey", ls="--", lw=0.8, label="log 2")
ax.set_yscale("log")
ax.set_xlabel("DPO step")
ax.set_ylabel("DPO loss (Eq. 7) of the step's batch")
ax.legend(fontsize=8)
ax.set_title(f"The loss at each beta ({config.name} preset)")
fig.tight_layout()
fig.savefig(figures_dir() / "14_loss_by_beta.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** On the bandit, Adam at lr 20 lifts the loss from 0.6931 to 1.0222 in one step (at lr
# 0.05 it never rises above its start), yet ends lower after 50 steps (0.6024 against 0.6399): a spike is
# not divergence. With BT labels the loss stops at its minimum, 0.5903; with deterministic labels it keeps
# falling (0.4328 at step 100, 0.0762 at step 1000) while the 12 of 15 responses that lose a comparison,
# all but one per prompt, go to probability 1.5e-05 at most. In the sweep, single steps reach 0.746 at
# β = 0.05, 0.966 at β = 0.3, 1.992 at β = 1 and 9.345 at β = 5, whose last 25 steps average a loss of
# 3.020 while ranking 0.728 of the pairs right: at a large β, a loss above $\log 2$ does not mean worse than
# chance. Step 1's gradient norm is β × 26.24 in every run: β scales the gradient, RMSprop takes the scale
# out.
#
# **Where the main sequence shows it.** Notebook 09, *1. The failure, on three responses* (deterministic
# preferences, where the rejected responses' mass goes, and how IPO and cDPO keep the margins finite;
# notebook 11 trains both on the IMDb pairs), and notebook 05, *Your language model is secretly a reward
# model*: the check that matters when the training loss is low is the accuracy on pairs the run never saw.
