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
# **What you see, and what it costs.** The outputs below are the `cpu` preset's (the default), executed on
# its cached stages. *Run all* on a 2-core laptop (measured on this project's 2-core machines, often while
# other runs shared them, so an idle laptop may be faster):
#
# | preset | first time (empty caches) | stages cached |
# |---|---|---|
# | `smoke` (`DPO_LAB_PRESET=smoke`: seconds-long toy runs, for checking) | about 1 min | |
# | `cpu` (default) | about 30 min: five DPO runs of 200–220 s each (one thread) and the likelihood trace's run (588 s on one thread, machine shared) | 4 min (235 s; loading six policies for the held-out pairs dominates) |
# | `gpu`, `paper` | need a GPU (not measured: none was available to this project) | |
#
# **Exercises.** Each computation the notebook writes out ($\log\pi(y|x)$ from logits, Eq. 7, the implicit
# rewards and their metrics, the sequence KL, the held-out pair accuracy) is a short function under a heading
# *Exercise · tier N* (tier 1: one line of an equation; tier 2: a sum or a mask to get right; tier 3: a loop
# or a derivation). The cell after each grades it against the library (`dpo_lab.logprobs`,
# `dpo_lab.losses`, `dpo_lab.implicit_reward`) on small random batches, with no model;
# the cells after that run it on the real models. `make student` writes `notebooks/student/` copies of this
# notebook with those function bodies removed, for you to fill in.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, DPO's batch order and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
beta: float = 0.1  # KL coefficient β of Eq. 7 for the run studied in detail
betas: list[float] = []  # β values of the frontier sweep; [] keeps the preset's (papermill -y "betas: [0.05, 1]")
n_show: int = 4  # test prompts whose completions are shown before and after DPO

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.batching import PreferenceCollator, pad_rows
from dpo_lab.grading import grade, lm_cases
from dpo_lab.implicit_reward import best_of_n, calibration, ranking_accuracy
from dpo_lab.logprobs import (
    completion_logprobs,
    completion_token_logprobs,
    concatenated_forward,
    position_ids_from_mask,
    sequence_kl,
    sequence_logprobs,
    token_logprobs,
)
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.models import load_policy
from dpo_lab.paths import artifacts_dir, figures_dir
from dpo_lab.plots import plot_frontier
from dpo_lab.preferences import score_samples
from dpo_lab.presets import get_preset
from dpo_lab.rewards import score_completions
from dpo_lab.run import read_metrics
from dpo_lab.sampling import sample
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 60)
pd.set_option("display.width", 130)
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

# %% tags=["nbval-check-output"]
first = train.iloc[0]
print(f"step {train.index[0]}: loss {round(first['loss'], 4)}  log 2 = {round(math.log(2), 4)}")
print(f"implicit rewards at step 1: chosen {abs(first['rewards/chosen']):.4f}, "
      f"rejected {abs(first['rewards/rejected']):.4f}")
assert abs(first["loss"] - math.log(2)) < 1e-3, "DPO's first loss is not log 2: policy != reference?"

# %% [markdown]
# ## Eq. 7 on screen
# `train_dpo` does all of this in one call. The next cells write each piece out in plain torch on 8 of the
# preset's preference pairs, with $\pi_{\rm ref}=\pi^{\rm SFT}$ and this run's final policy as $\pi_\theta$,
# and check it against the library function the trainer calls (their numbers depend on the preset).
#
# **$\log\pi(y|x)$.** Logits at position $t$ predict token $t+1$: `logits[:, :-1]` through `log_softmax`,
# `gather`ed at `ids[:, 1:]`, is $\log\pi(y_t|x,y_{<t})$. The completion mask shifted the same way,
# `comp[:, 1:]`, keeps completion tokens (an EOS too, when there is one) and drops prompt and padding; the
# row sum is $\log\pi(y|x)=\sum_t\log\pi(y_t|x,y_{<t})$.

# %% [markdown]
# ### Exercise · tier 2 · $\log\pi(y|x)$ from the logits
# The check cell compares it with the library's two steps, `logprobs.token_logprobs` and
# `logprobs.sequence_logprobs` (the one routine that sums, the one the trainer calls), on small random batches
# (prompts of different lengths, padding); the cell after that runs it on the models' logits.

# %% tags=["exercise", "tier-2"]
def logp_sum(logits: torch.Tensor, ids: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each row, shape (B,), from logits (B, T, V), token ids (B, T) and the completion mask
    comp (B, T): 1 on completion tokens, 0 on prompt and padding. The logits at position t predict token
    t + 1: take log_softmax of logits[:, :-1], pick the log-prob of ids[:, 1:], and sum over the positions
    whose predicted token is a completion token."""
    # logits at t predict token t + 1: log pi(y_t | x, y_<t) at every position
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1)  # completion tokens only: the mask shifted by one


# %%
def library_logp(logits: torch.Tensor, ids: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """The library's log pi(y|x): per-token log-probs, summed over the shifted completion mask."""
    return sequence_logprobs(token_logprobs(logits, ids), comp[:, 1:])


grade(logp_sum, library_logp, lm_cases("logits", "input_ids", "completion_mask"), rtol=1e-5, atol=1e-5,
      hint="logits at t predict token t + 1, so shift the ids and the mask by one")

# %%
sft_policy, tokenizer, _ = pipeline.sft_policy(config)
dpo_policy, _ = load_policy(result.checkpoint_dir)
pairs, _ = pipeline.preference_data(config)
batch = PreferenceCollator(tokenizer, config.policy.n_positions)([pairs[i] for i in range(8)])
ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # 8 chosen, 8 rejected
yw, yl = ((ids[rows], attn[rows], comp[rows]) for rows in batch["rows"].T)  # each side's 8 rows


@torch.no_grad()
def model_logps(model, ids, attn, comp):
    """log pi(y|x) per row: logp_sum on the logits of a plain forward, whose position ids are arange(T)."""
    return logp_sum(model(input_ids=ids, attention_mask=attn).logits.float(), ids, comp)


pi_w, pi_l = model_logps(dpo_policy, *yw), model_logps(dpo_policy, *yl)
with torch.no_grad():
    torch.testing.assert_close(pi_w, sequence_logprobs(*completion_token_logprobs(dpo_policy, *yw)))
# the library passes position ids counted over real tokens: with right padding, arange(T)
assert torch.equal(position_ids_from_mask(attn) * attn, torch.arange(attn.shape[1]) * attn)
print("log pi(y_w|x), by hand = the library's:", pi_w.numpy().round(2))

# %% [markdown]
# **One forward for chosen and rejected.** The collator's batch already stacks the $B$ chosen rows on the $B$
# rejected rows, padded to one length (`batch["rows"][b]` says where pair $b$'s two are), and the trainer runs
# the model once on the $2B$ rows. Rows never see each
# other, so the first $B$ sums are $\log\pi(y_w|x)$ and the last $B$ are $\log\pi(y_l|x)$, as from two
# forwards.

# %%
both = model_logps(dpo_policy, ids, attn, comp)
torch.testing.assert_close(both, torch.cat([pi_w, pi_l]))  # one forward on 2B rows == two forwards on B
with torch.no_grad():
    torch.testing.assert_close(concatenated_forward(dpo_policy, batch)[0], torch.stack([pi_w, pi_l], 1))
print(f"one forward on {len(both)} stacked rows = two separate forwards = concatenated_forward")

# %% [markdown]
# **Eq. 7: four tensors in, a loss out.** `ref_w`, `ref_l` are $\log\pi_{\rm ref}$ of the same completions
# (the trainer computes them once and caches them); `h` is the difference of the two log-ratios and
# `-logsigmoid(beta * h)` the loss of each pair. At $\pi_\theta=\pi_{\rm ref}$, `h` is 0 and every loss is
# $\log 2$.

# %% [markdown]
# ### Exercise · tier 1 · Eq. 7 from four log-probs

# %% tags=["exercise", "tier-1"]
def dpo_losses(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Eq. 7 per pair, shape (B,), from log π_θ(y_w|x), log π_θ(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x):
    with h = log π_θ/π_ref (y_w) − log π_θ/π_ref (y_l), the loss −log σ(β h) (use F.logsigmoid)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)  # log pi/pi_ref (y_w) - log pi/pi_ref (y_l)
    return -F.logsigmoid(beta * h)


# %%
grade(dpo_losses, lambda pi_w, pi_l, ref_w, ref_l, beta: preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)[0],
      lm_cases("logp_w", "logp_l", "ref_w", "ref_l", "beta"))

# %%
ref_w, ref_l = model_logps(sft_policy, *yw), model_logps(sft_policy, *yl)
losses = dpo_losses(pi_w, pi_l, ref_w, ref_l, beta)  # Eq. 7, one term per pair
lib_losses, lib_r_w, lib_r_l = preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
torch.testing.assert_close(losses, lib_losses)
at_ref, _, _ = preference_loss(ref_w, ref_l, ref_w, ref_l, beta=beta)  # policy == reference
torch.testing.assert_close(at_ref, torch.full_like(at_ref, math.log(2)))
print(f"Eq. 7 on 8 pairs = preference_loss: mean {losses.mean():.4f}; "
      f"at pi = pi_ref {at_ref.mean():.4f} = log 2")

# %% [markdown]
# ## Training curves
# * `loss` falls from $\log 2$; `rewards/accuracies` is the share of the batch's pairs whose implicit
#   reward ranks $y_w$ above $y_l$ (plotted from step 2: at step 1 every $\hat r$ is 0, and the strict
#   $\hat r_w>\hat r_l$ of TRL's metric counts those ties as wrong); `rewards/margins` is the mean of
#   $\hat r(x,y_w)-\hat r(x,y_l)$.
# * `logps/chosen` and `logps/rejected` are $\log\pi_\theta(y|x)$ themselves. The loss only sees the
#   **margin**, so both may fall, the chosen ones included, while the margin grows. Where the mass goes
#   instead is measured at the end of this notebook, on held-out pairs.

# %%
def plot_training(frame: pd.DataFrame, title: str) -> plt.Figure:
    """Four panels of one run's per-step metrics (TRL names)."""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    axes[0].plot(frame.index, frame["loss"], label="loss")
    axes[0].axhline(math.log(2), color="grey", ls="--", lw=0.8, label="log 2")
    # Step 1 is left out: there pi = pi_ref, every implicit reward is 0, and TRL's strict r_w > r_l counts
    # each tie as wrong, so the curve would "rise" from 0 for no reason.
    later = frame.iloc[1:]
    axes[1].plot(later.index, later["rewards/accuracies"], color="tab:red", label="rewards/accuracies")
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
# The `rewards/*` metrics by hand, on the 8 pairs above at the final policy: `r_w`, `r_l` are the implicit
# rewards $\hat r=\beta\,(\log\pi_\theta-\log\pi_{\rm ref})$ of $y_w$ and $y_l$ (Eq. 5 without
# $\beta\log Z(x)$, which cancels in a pair); the logs hold their batch means, the mean margin, and the share
# of pairs with $\hat r_w>\hat r_l$ (`losses.preference_metrics`).

# %% [markdown]
# ### Exercise · tier 1 · the implicit rewards and TRL's `rewards/*` metrics

# %% tags=["exercise", "tier-1"]
def implicit_rewards(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), each (B,): the implicit rewards β (log π_θ − log π_ref) of the chosen and the rejected
    completions, from the same four log-prob tensors as dpo_losses."""
    return beta * (pi_w - ref_w), beta * (pi_l - ref_l)


def reward_metrics(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """TRL's (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies) of a batch, four scalar
    tensors: the mean r_w, the mean r_l, the mean of r_w − r_l, and the share of pairs with r_w > r_l
    strictly (a tie counts as wrong), as a float."""
    return r_w.mean(), r_l.mean(), (r_w - r_l).mean(), (r_w > r_l).float().mean()


# %%
def trl_rewards(r_w, r_l):
    """The four rewards/* entries of the library's metrics (its loss and logps arguments are not needed)."""
    logged = preference_metrics(r_w, r_w, r_l, r_w, r_l)
    return tuple(logged[f"rewards/{key}"] for key in ("chosen", "rejected", "margins", "accuracies"))


grade(implicit_rewards, lambda pi_w, pi_l, ref_w, ref_l, beta: preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)[1:],
      lm_cases("logp_w", "logp_l", "ref_w", "ref_l", "beta"))
grade(reward_metrics, trl_rewards, lm_cases("chosen_rewards", "rejected_rewards"), rtol=1e-6, atol=1e-6,
      hint="the first pair is a tie, r_w == r_l: TRL's accuracy counts it as wrong")

# %%
r_w, r_l = implicit_rewards(pi_w, pi_l, ref_w, ref_l, beta)  # implicit rewards of chosen and rejected
torch.testing.assert_close((r_w, r_l), (lib_r_w, lib_r_l))  # what preference_loss returns beside the loss
ours = dict(zip(("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
                reward_metrics(r_w, r_l), strict=True))
logged = preference_metrics(lib_losses, lib_r_w, lib_r_l, pi_w, pi_l)
torch.testing.assert_close(torch.stack(list(ours.values())), torch.tensor([logged[k] for k in ours]))
print(", ".join(f"{k} {float(v):+.4f}" for k, v in ours.items()), "= preference_metrics")

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
# **The KL, by hand** (vs what the evaluator computes while it samples: `sample(..., reference=...)` returns
# each sample's exact KL and log-ratio, `logprobs.sequence_kl`'s sum taken step by step). On 4 samples
# $y\sim\pi_\theta$ of 8 test prompts (EOS included when sampled), `exact` sums $\sum_v p\,(\log p-\log q)$,
# $p=\pi_\theta(\cdot|x,y_{<t})$, $q=\pi_{\rm ref}(\cdot|x,y_{<t})$, over completion steps (footnote 3);
# `logratio` keeps only the token taken: $\log\pi_\theta(y|x)-\log\pi_{\rm ref}(y|x)$. Both estimate the
# sequence KL; the exact one averages over the vocabulary at each step, so it usually varies much less.

# %% [markdown]
# ### Exercise · tier 3 · footnote 3: the exact sequence KL, and the sampled log-ratio
# Both take the two models' logits over the same rows (a prompt, a sampled completion, padding), unshifted,
# and the completion mask, as `logp_sum` does; `sampled_logratio` may call `logp_sum`.

# %% tags=["exercise", "tier-3"]
def exact_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """Footnote 3's sequence KL of each row, shape (B,): Σ_t Σ_v p (log p − log q), p = π_θ(·|x, y_<t) and
    q = π_ref(·|x, y_<t) the softmaxes of the logits at step t, summed over the steps that predict a
    completion token (logits at position t predict token t + 1)."""
    logp, logq = policy_logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    per_step = (logp.exp() * (logp - logq)).sum(-1)  # KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)) at every step
    return (per_step * comp[:, 1:]).sum(-1)


def sampled_logratio(policy_logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor,
                     comp: torch.Tensor) -> torch.Tensor:
    """The one-sample estimate of the same KL, shape (B,): log π_θ(y|x) − log π_ref(y|x) of the completion
    actually taken (the tokens ids)."""
    return logp_sum(policy_logits, ids, comp) - logp_sum(ref_logits, ids, comp)


# %%
grade(exact_kl, sequence_kl, lm_cases("logits", "ref_logits", "completion_mask"), rtol=1e-5, atol=1e-5,
      hint="sum p (log p - log q) over the vocabulary first, then over the completion steps")
grade(sampled_logratio, lambda pol, ref, ids, comp: sequence_logprobs(token_logprobs(pol, ids) - token_logprobs(ref, ids), comp[:, 1:]),
      lm_cases("logits", "ref_logits", "input_ids", "completion_mask"), rtol=1e-5, atol=1e-5)

# %%
samples = sample(dpo_policy, tokenizer, pipeline.prompts(config, tokenizer, "test")[:8], n_per_prompt=4,
                 max_new_tokens=config.eval.max_new_tokens, batch_size=32, seed=config.seed, progress=False,
                 reference=sft_policy)  # the evaluator's exact KL and log-ratio, stepped alongside
xs = [x for x, per in zip(samples.prompt_ids, samples.completion_ids, strict=True) for _ in per]
ys = [y for per in samples.completion_ids for y in per]
rows = pad_rows([{"input_ids": x + y, "completion_mask": [0] * len(x) + [1] * len(y)}
                 for x, y in zip(xs, ys, strict=True)], tokenizer.pad_token_id)
ids, comp = rows["input_ids"], rows["completion_mask"]
with torch.no_grad():
    pol_logits, ref_logits = (m(input_ids=ids, attention_mask=rows["attention_mask"]).logits.float()
                              for m in (dpo_policy, sft_policy))
exact = exact_kl(pol_logits, ref_logits, comp)  # sum_t KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t))
logratio = sampled_logratio(pol_logits, ref_logits, ids, comp)  # log pi/pi_ref (y|x)
del pol_logits, ref_logits  # two (rows, T, vocabulary) tensors
lib = (np.ravel(samples.kl), np.ravel(samples.logratio))  # computed beside the sampler
torch.testing.assert_close((exact, logratio), tuple(torch.tensor(a, dtype=torch.float32) for a in lib),
                           rtol=1e-4, atol=1e-4)  # fp32 sums of differences, summed in another order
print(f"{len(ys)} samples, = the sampler's: exact KL {exact.mean():.4f} (sd {exact.std():.4f}), "
      f"sampled log-ratio {logratio.mean():.4f} (sd {logratio.std():.4f})")

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
before = [c[0] for c in sample(sft_policy, tokenizer, shown, **settings).texts]
after = [c[0] for c in sample(dpo_policy, tokenizer, shown, **settings).texts]
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

# %% [markdown]
# ## Your language model is secretly a reward model
# Eq. 5 read backwards: the policy DPO trained *defines* a reward,
# $$\hat r(x,y)=\beta\log\frac{\pi_\theta(y|x)}{\pi_{\rm ref}(y|x)}\;\big(+\,\beta\log Z(x)\big).$$
# $\beta\log Z(x)$ is unknown, but it is the same for every completion of one prompt, so $\hat r$ ranks a
# prompt's completions as the fitted reward does (and we never rank completions of two different prompts).
# Is it a good reward model? Test it on **held-out pairs**: 4 fresh $\pi^{\rm SFT}$ samples of each test
# prompt, labelled by $r^*$ exactly as the training pairs were (all same-prompt pairs, ties dropped). No run
# trained on them: the training pairs, and $r_\phi$'s validation pairs, come from train prompts.

# %% [markdown]
# ### Exercise · tier 2 · held-out pair accuracy by hand

# %% tags=["exercise", "tier-2"]
def pair_accuracy(scores: np.ndarray, rstar: np.ndarray) -> float:
    """Share of held-out pairs a scorer ranks as r* does, from scores and r* of shape (P prompts, K samples):
    the pairs are every two samples (j < k) of one prompt whose r* differ (ties in r* are no pair); a pair
    counts 1 if the scores order it as r* does, 0 if the other way, and 1/2 if the scores tie."""
    j, k = np.triu_indices(scores.shape[1], k=1)  # every same-prompt pair j < k
    gap, margin = rstar[:, j] - rstar[:, k], scores[:, j] - scores[:, k]
    keep = gap != 0  # ties in r* are dropped, as in the training pairs
    return np.mean((np.sign(margin[keep]) == np.sign(gap[keep])) + 0.5 * (margin[keep] == 0))


# %%
grade(pair_accuracy, ranking_accuracy, lm_cases("heldout_scores", "heldout_rstar", numpy=True),
      hint="drop the pairs whose r* tie; a pair whose scores tie counts one half")

# %%
held = pipeline.heldout(config)
pad, bs = tokenizer.pad_token_id, config.eval.batch_size


def held_logps(model: torch.nn.Module) -> np.ndarray:
    """log pi(y|x) of every held-out sample under model, (prompts, 4)."""
    return completion_logprobs(model, held.prompt_ids, held.completion_ids, batch_size=bs, pad_token_id=pad)


ref_logps = held_logps(sft_policy)
r_hat = beta * (held_logps(dpo_policy) - ref_logps)

# Pair accuracy by hand: every same-prompt pair (j, k) whose r* differ; a tie in r-hat counts one half.
accuracy = pair_accuracy(r_hat, held.rstar)
assert np.isclose(accuracy, ranking_accuracy(r_hat, held.rstar), rtol=0, atol=1e-12)
j, k = np.triu_indices(held.shape[1], k=1)
n_pairs = int((held.rstar[:, j] != held.rstar[:, k]).sum())  # same-prompt pairs whose r* differ
print(f"{held.shape[0]} test prompts x {held.shape[1]} samples -> {n_pairs} held-out pairs; "
      f"implicit reward (beta={beta:g}) ranks {accuracy:.3f} of them correctly")

# %% [markdown]
# Beside it, on the same pairs: the learned reward model $r_\phi$ that PPO uses (trained by the
# Bradley–Terry loss, Eq. 2, on the same training pairs), and $r^*$ itself, whose accuracy is 1 by
# construction (it wrote the labels). Then **best-of-4**: from each prompt's 4 SFT samples keep the one a
# scorer ranks highest, and score the kept sample with $r^*$. Reranking by $\hat r$ needs no reward model at
# all: only $\pi_\theta$ and $\pi_{\rm ref}$. Every β of the sweep is shown; the last column is the mean
# $r^*$ of the DPO policy's own samples (its final frontier point).

# %%
learned = pipeline.learned_reward(config)
r_phi = np.asarray(score_samples(learned, held.prompts, held.texts))
first_pick = held.rstar[:, 0].mean(), held.rstar[:, 0].std(ddof=1) / np.sqrt(held.shape[0])
rows = [{"scorer": "none (first sample)", "pair accuracy": float("nan"), "best-of-4 r*": first_pick[0],
         "se": first_pick[1]},
        {"scorer": "r_phi", "pair accuracy": ranking_accuracy(r_phi, held.rstar),
         **dict(zip(("best-of-4 r*", "se"), best_of_n(r_phi, held.rstar), strict=True))},
        {"scorer": "r* (oracle)", "pair accuracy": ranking_accuracy(held.rstar, held.rstar),
         **dict(zip(("best-of-4 r*", "se"), best_of_n(held.rstar, held.rstar), strict=True))}]
implicit = {}
for b in config.dpo.betas:
    policy_b, _ = load_policy(pipeline.dpo(config, b).checkpoint_dir)
    implicit[b] = b * (held_logps(policy_b) - ref_logps)
    final_b = sweep[sweep.hyperparameter == f"beta={b:g}"].sort_values("step").iloc[-1]
    rows.append({"scorer": f"DPO implicit, beta={b:g}", "pair accuracy": ranking_accuracy(implicit[b], held.rstar),
                 **dict(zip(("best-of-4 r*", "se"), best_of_n(implicit[b], held.rstar), strict=True)),
                 "policy's own samples r*": final_b.reward_mean})
secret = pd.DataFrame(rows).set_index("scorer")
display(secret.round(3))

# %% [markdown]
# **What the `cpu` run shows** (seed 0; 256 test prompts, 1,536 held-out pairs). The implicit reward is a
# reward model, but a weak one: it ranks 0.60–0.65 of the held-out pairs correctly across the β sweep,
# where $r_\phi$, trained for the job on the same training pairs, ranks 0.730. Reranking SFT samples by it
# gains little (best-of-4 $r^*$ 0.54–0.58, against 0.486 for no reranking, 0.624 by $r_\phi$ and 0.718 for
# the oracle). Yet the same policies, *sampling*, reach $r^*$ 0.66–0.83. DPO fits $\hat r$ only through the
# policy it induces: what it learned is to move probability toward positive completions, which shows in
# what it generates far more than in how it orders the SFT policy's typical completions, most of whose
# pairs differ little in $r^*$ (notebook 04's gap histogram). The claim of the title holds in the sense of
# Eq. 5 (the policy *defines* a reward that explains the preferences it was trained on, accuracy > 0.5 on
# pairs it never saw); as a stand-alone reward model at this scale it is worse than a dedicated one.
#
# **Calibration.** A reward model under Bradley–Terry (Eq. 1) also says *how sure* it is:
# $P(a\succ b)=\sigma(\hat r_a-\hat r_b)$. Each held-out pair, in both orders, is binned by that predicted
# probability; the y axis is the share of pairs in the bin that $r^*$ actually prefers. A calibrated
# model lies on the diagonal. The labels here are deterministic ($y_w$ always has the higher $r^*$), so
# "observed" is how often the scorer's favourite is $r^*$'s favourite. Error bars: binomial SE.

# %%
fig, ax = plt.subplots(figsize=(4.6, 4.2))
ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="calibrated")
for name, scores in {f"DPO implicit, beta={beta:g}": r_hat, "r_phi": r_phi}.items():
    table = calibration(scores, held.rstar, n_bins=10)
    ax.errorbar(table.predicted, table.observed, yerr=table.se, marker="o", capsize=2, label=name)
ax.set_xlabel(r"predicted $\sigma(\hat r_a-\hat r_b)$")
ax.set_ylabel(r"observed share with $r^*(a)>r^*(b)$")
ax.set_title("Held-out pairs: Bradley-Terry calibration")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figures_dir() / "05_implicit_reward_calibration.png", dpi=120)
plt.show()

# %% [markdown]
# ## What DPO does to likelihoods
# Eq. 7 sees only the *difference* of two log-ratios, so nothing in it says whether
# $\log\pi_\theta(y_w|x)$ rises or falls. To see where the probability goes, the β run above is trained
# again (same seed, same pairs, same settings: the same trajectory, checked below) and looked at 10 times
# on the held-out samples: the mean $\log\pi_\theta$ of held-out chosen and rejected completions, their
# log-ratios to $\pi_{\rm ref}$, the implicit reward's held-out accuracy (ties counted half, so step 0 is
# exactly 0.5), and the mean $\log\pi_\theta$ of **fresh samples of $\pi_\theta$ itself** beside their
# $\log\pi_{\rm ref}$.

# %%
trace = pipeline.likelihood_trace(config, beta)
traced = read_metrics(trace.metrics_path)
same = pd.DataFrame([m for m in traced if "loss" in m]).set_index("step")
np.testing.assert_allclose(same["loss"], train["loss"], rtol=1e-5)  # the same trajectory as the run above
looks = pd.DataFrame([m for m in traced if "heldout/accuracy" in m]).set_index("step")

fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
axes[0].plot(looks.index, looks["heldout/logps/chosen"], marker="o", label="held-out chosen")
axes[0].plot(looks.index, looks["heldout/logps/rejected"], marker="o", label="held-out rejected")
axes[0].set_ylabel(r"mean $\log\pi_\theta(y|x)$")
axes[1].plot(looks.index, looks["heldout/logratio/chosen"], marker="o", label="chosen")
axes[1].plot(looks.index, looks["heldout/logratio/rejected"], marker="o", label="rejected")
axes[1].axhline(0, color="grey", lw=0.5)
axes[1].set_ylabel(r"mean $\log\pi_\theta/\pi_{\rm ref}$")
axes[2].plot(looks.index, looks["heldout/logps/all"], marker="o", label=r"SFT samples, under $\pi_\theta$")
axes[2].plot(looks.index, looks["fresh/logps"], marker="o", label=r"$\pi_\theta$'s samples, under $\pi_\theta$")
axes[2].plot(looks.index, looks["fresh/ref_logps"], marker="o", label=r"$\pi_\theta$'s samples, under $\pi_{\rm ref}$")
axes[2].set_ylabel(r"mean $\log\pi(y|x)$")
axes[3].plot(looks.index, looks["heldout/accuracy"], marker="o", color="tab:red", label="implicit reward")
axes[3].axhline(0.5, color="grey", ls="--", lw=0.8)
axes[3].set_ylabel("held-out pair accuracy")
for ax in axes:
    ax.set_xlabel("DPO step")
    ax.legend(fontsize=7)
fig.suptitle(f"DPO, beta={beta:g}: likelihoods on held-out pairs and on the policy's own samples")
fig.tight_layout()
fig.savefig(figures_dir() / "05_likelihoods.png", dpi=120)
plt.show()

# %% [markdown]
# **What is established here** (the `cpu` run, β = 0.1, seed 0, 256 held-out prompts):
# * Both held-out chosen and held-out rejected completions **lose** likelihood: about 7 and 9 nats by step
#   250 (a log-ratio to $\pi_{\rm ref}$ of −7.1 and −9.0). The margin that Eq. 7 rewards grows because the
#   rejected ones fall faster, not because the chosen ones rise, and the held-out ranking improves from
#   0.5 to 0.625 all the same.
# * The mass goes to the policy's **own** completions: its samples have $\log\pi_\theta$ about 19 nats
#   above what it gives the SFT samples (−158.8 against −177.9 at step 250). Their $\log\pi_{\rm ref}$ is
#   not low (−166.7, against −169.8 for SFT samples under $\pi_{\rm ref}$): the policy concentrates on
#   completions the reference already found plausible, rather than on strange ones. Their difference,
#   ≈ 8 nats, is the sampled estimate of the KL, close to this run's exact KL of 8.0.
# * The dip at step 25 (every log-prob about 10 nats down, then partly back) is the optimiser's start:
#   RMSprop's early steps are large while its second-moment estimate is still small.
#
# **What is not established**: one run, one seed, one small model. The fresh-sample curves are noisy (one
# sample per prompt, drawn anew at each step: an SE of a few nats). Whether the displaced mass lands on
# better or worse completions in general, and how this scales, is what the likelihood-displacement
# literature studies (e.g. Razin et al. 2024, Pal et al. 2024); this notebook shows only that it happens
# here and where the mass went in this run. Notebook 01 shows the same fall on the exact bandit.

# %%
first, last = looks.iloc[0], looks.iloc[-1]
for key in ("heldout/logps/chosen", "heldout/logps/rejected", "heldout/logratio/chosen",
            "heldout/logratio/rejected", "heldout/logps/all", "fresh/logps", "fresh/ref_logps",
            "heldout/accuracy"):
    print(f"{key:26s} step {looks.index[0]:3d}: {first[key]:8.3f}   step {looks.index[-1]:3d}: {last[key]:8.3f}")
