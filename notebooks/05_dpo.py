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
# # 05 · DPO on IMDb: one step on screen, one run, the reward–KL frontier
#
# Notebook 03 trained $\pi^{\rm SFT}$, which is also $\pi_{\rm ref}$; notebook 04 sampled completions of
# review prefixes from it and let $r^*$ label pairs $(x, y_w, y_l)$. RLHF would now fit a reward model to
# those pairs and run PPO against it (notebook 06). DPO skips both: every policy $\pi_\theta$ is the
# optimal policy of its own implicit reward $\hat r=\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$ (Eq. 5), so
# fitting that reward to the pairs with the Bradley–Terry loss *is* training the policy. That is Eq. 7, a
# classification loss on fixed pairs, with no reward model and no sampling while training:
# $$\mathcal L_{\rm DPO}(\pi_\theta;\pi_{\rm ref})=-\mathbb E_{(x,y_w,y_l)}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{\rm ref}(y_w|x)}-\beta\log\frac{\pi_\theta(y_l|x)}{\pi_{\rm ref}(y_l|x)}\Big)\Big],$$
# with $\log\pi(y|x)$ **summed over the completion's tokens** (prompt and padding masked out).
#
# The plan: Eq. 7's pieces as exercises; one training step on screen, checked against the library's;
# a full run, evaluated on held-out prompts; a β sweep (the paper's Fig. 2, left); the policy read as a
# reward model. Outputs are the `cpu` preset's (at `smoke` the numbers differ from the prose).

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, DPO's batch order and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
beta: float = 0.1  # KL coefficient β of Eq. 7 for the run studied in detail
betas: list[float] = []  # β values of the frontier sweep; [] keeps the preset's (papermill -y "betas: [0.05, 1]")
n_show: int = 4  # test prompts whose completions are shown before and after DPO

# %%
import copy
import math
import random

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from dpo_lab import pipeline
from dpo_lab.grading import grade, lm_cases
from dpo_lab.implicit_reward import best_of_n, calibration, ranking_accuracy
from dpo_lab.logprobs import (
    completion_logprobs,
    completion_token_logprobs,
    sequence_kl,
    sequence_logprobs,
    token_logprobs,
)
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.presets import figures_dir, get_preset

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 60)
pd.set_option("display.width", 130)
config = get_preset(preset, seed=seed, **overrides, **({"dpo.betas": betas} if betas else {}))
random.seed(config.seed)  # the seed, set once (sampling and the batch order take it explicitly too)
np.random.seed(config.seed)  # noqa: NPY002
torch.manual_seed(config.seed)
print(f"preset {config.name!r}: {config.dpo}")


def read_metrics(path) -> pd.DataFrame:
    """A run's metrics.jsonl (one JSON line per step, TRL's names) as a table indexed by step."""
    return pd.read_json(path, lines=True, precise_float=True).set_index("step")


# %% [markdown]
# ## Eq. 7 in pieces
# Five short functions, each graded against the library on small random batches (no model is loaded
# yet). The training step, the evaluation and the reward-model test below are made of them. If one fails
# its check, the check says so and puts the library's function in its place, so the later cells still run.
#
# A batch row is a prompt $x$, a completion $y$ and padding, as token ids. `comp` marks the completion:
# 1 on completion tokens, 0 on prompt and padding. A causal LM's logits at position $t$ are its
# prediction for token $t+1$.

# %% [markdown]
# ### Exercise · tier 2 · $\log\pi(y|x)$ from the logits
# $\log\pi(y|x)=\sum_t\log\pi(y_t|x,y_{<t})$, over the completion's tokens only.
#
# <details><summary>Hint 1</summary>The prediction for token t + 1 sits at position t: which slices of the
# logits, the ids and the mask line up? Nothing predicts the first token, and the last position predicts
# nothing.</details>
# <details><summary>Hint 2</summary>
#
# With $\ell_{b,t}=\log\mathrm{softmax}(z_{b,t})$ over the vocabulary and $w_{b,t}$ the ids:
# $\log\pi(y_b|x_b)=\sum_{t}\mathrm{comp}_{b,t+1}\,\ell_{b,t,w_{b,t+1}}$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
# return (token_logps * comp[:, 1:]).sum(-1)
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def logp_sum(logits: torch.Tensor, ids: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each row, shape (B,), from logits (B, T, V), token ids (B, T) and the completion mask
    comp (B, T)."""
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1)  # completion tokens only: the mask shifted by one


# %%
def library_logp(logits: torch.Tensor, ids: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """The library's log pi(y|x): per-token log-probs, summed over the shifted completion mask."""
    return sequence_logprobs(token_logprobs(logits, ids), comp[:, 1:])


grade(logp_sum, library_logp, lm_cases("logits", "input_ids", "completion_mask"), rtol=1e-5, atol=1e-5,
      hint="logits at t predict token t + 1, so shift the ids and the mask by one")

# %% [markdown]
# ### Exercise · tier 1 · Eq. 7 from four log-probs
#
# <details><summary>Hint 1</summary>Eq. 7 is the Bradley–Terry loss of Eq. 2 with a reward difference
# built from the policy and the reference. Which difference?</details>
# <details><summary>Hint 2</summary>
#
# $h=(\log\pi_\theta(y_w|x)-\log\pi_{\rm ref}(y_w|x))-(\log\pi_\theta(y_l|x)-\log\pi_{\rm ref}(y_l|x))$,
# loss $=-\log\sigma(\beta h)$; `F.logsigmoid` is the stable $\log\sigma$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# h = (pi_w - ref_w) - (pi_l - ref_l)
# return -F.logsigmoid(beta * h)
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def dpo_losses(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Eq. 7 per pair, shape (B,), from log π_θ(y_w|x), log π_θ(y_l|x), log π_ref(y_w|x), log π_ref(y_l|x)."""
    h = (pi_w - ref_w) - (pi_l - ref_l)  # log pi/pi_ref (y_w) - log pi/pi_ref (y_l)
    return -F.logsigmoid(beta * h)


# %%
grade(dpo_losses, lambda pi_w, pi_l, ref_w, ref_l, beta: preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)[0],
      lm_cases("logp_w", "logp_l", "ref_w", "ref_l", "beta"))

# %% [markdown]
# ### Exercise · tier 1 · the implicit rewards and TRL's `rewards/*` metrics
# DPO's logs (TRL's names) report the implicit rewards $\hat r=\beta(\log\pi_\theta-\log\pi_{\rm ref})$ of
# $y_w$ and $y_l$ (Eq. 5 without $\beta\log Z(x)$, which cancels in a pair): `rewards/chosen` and
# `rewards/rejected` are their batch means, `rewards/margins` the mean of $\hat r_w-\hat r_l$, and
# `rewards/accuracies` the share of pairs with $\hat r_w>\hat r_l$ **strictly**: TRL counts a tie as wrong.
#
# <details><summary>Hint 1</summary>Both functions are one line each; watch the tie.</details>
# <details><summary>Solution</summary>
#
# ```python
# return beta * (pi_w - ref_w), beta * (pi_l - ref_l)                                   # implicit_rewards
# return r_w.mean(), r_l.mean(), (r_w - r_l).mean(), (r_w > r_l).float().mean()         # reward_metrics
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def implicit_rewards(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), each (B,): the implicit rewards of the chosen and the rejected completions, from the same
    four log-prob tensors as dpo_losses."""
    return beta * (pi_w - ref_w), beta * (pi_l - ref_l)


def reward_metrics(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """TRL's (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies) of a batch, four scalar
    tensors, the accuracy as a float."""
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

# %% [markdown]
# ### Exercise · tier 3 · footnote 3: the exact sequence KL, and the sampled log-ratio
# The paper's KL axis is the sequence-level $\mathrm{KL}(\pi_\theta\|\pi_{\rm ref})$ of completions
# $y\sim\pi_\theta$: at each completion step $t$, the exact KL between the two next-token distributions
# $p=\pi_\theta(\cdot|x,y_{<t})$ and $q=\pi_{\rm ref}(\cdot|x,y_{<t})$, summed over the steps. A cheaper,
# noisier estimate keeps only the token actually sampled: $\log\pi_\theta(y|x)-\log\pi_{\rm ref}(y|x)$.
# Both functions take the two models' logits over the same rows and the completion mask, as `logp_sum`
# does; `sampled_logratio` may call `logp_sum`.
#
# <details><summary>Hint 1</summary>The exact KL at one step is a sum over the vocabulary; the sequence KL
# is a sum of those over the steps that predict a completion token.</details>
# <details><summary>Hint 2</summary>
#
# $\mathrm{KL}_{\rm seq}=\sum_t\mathrm{comp}_{t+1}\sum_v p_{t,v}(\log p_{t,v}-\log q_{t,v})$, with $\log p_t$,
# $\log q_t$ the log-softmaxes of the logits at position $t$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# logp, logq = policy_logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
# return ((logp.exp() * (logp - logq)).sum(-1) * comp[:, 1:]).sum(-1)       # exact_kl
# return logp_sum(policy_logits, ids, comp) - logp_sum(ref_logits, ids, comp)  # sampled_logratio
# ```
# </details>

# %% tags=["exercise", "tier-3"]
def exact_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """Footnote 3's sequence KL of each row, shape (B,), from the unshifted logits (B, T, V) of π_θ and
    π_ref and the completion mask (B, T)."""
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

# %% [markdown]
# ### Exercise · tier 2 · how often a scorer ranks held-out pairs as $r^*$ does
# Used at the end, to test the trained policy as a reward model. `scores` and `rstar` are (P prompts,
# K samples). The pairs are every two samples of one prompt whose $r^*$ differ, as in the training data.
# A pair counts 1 if the scores order it as $r^*$ does, 0 if the other way, and ½ if the scores tie.
#
# <details><summary>Hint 1</summary>np.triu_indices gives every pair j &lt; k of K samples at once; then
# compare two tables of differences, one of r* and one of scores.</details>
# <details><summary>Hint 2</summary>
#
# With $g=r^*_j-r^*_k$ and $m=s_j-s_k$ over pairs with $g\ne0$: the mean of
# $\mathbb 1[\mathrm{sign}\,m=\mathrm{sign}\,g]+\tfrac12\mathbb 1[m=0]$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# j, k = np.triu_indices(scores.shape[1], k=1)
# gap, margin = rstar[:, j] - rstar[:, k], scores[:, j] - scores[:, k]
# keep = gap != 0
# return np.mean((np.sign(margin[keep]) == np.sign(gap[keep])) + 0.5 * (margin[keep] == 0))
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def pair_accuracy(scores: np.ndarray, rstar: np.ndarray) -> float:
    """Share of held-out pairs a scorer ranks as r* does, from scores and r* of shape (P, K); ties in r* are
    no pair, ties in the scores count one half."""
    j, k = np.triu_indices(scores.shape[1], k=1)  # every same-prompt pair j < k
    gap, margin = rstar[:, j] - rstar[:, k], scores[:, j] - scores[:, k]
    keep = gap != 0  # ties in r* are dropped, as in the training pairs
    return np.mean((np.sign(margin[keep]) == np.sign(gap[keep])) + 0.5 * (margin[keep] == 0))


# %%
grade(pair_accuracy, ranking_accuracy, lm_cases("heldout_scores", "heldout_rstar", numpy=True),
      hint="drop the pairs whose r* tie; a pair whose scores tie counts one half")


# %% [markdown]
# ## One DPO step, written out
# The library's trainer (`train_dpo`) repeats one step. Here it is in plain PyTorch, on the batch its
# first step sees:
# * **the batch**: one seeded permutation of the pairs per epoch, cut into consecutive slices, so step 1
#   takes its first `batch_size` pairs. Prompt and completion are tokenised separately and concatenated,
#   the completion cut to fit the context, rows padded on the right.
# * **one forward for chosen and rejected**: the $B$ chosen rows and the $B$ rejected rows stacked into
#   $2B$ rows. Rows never see each other, so this equals two forwards.
# * **the reference**: the frozen SFT model, without gradients.
# * **the update**: Eq. 7 averaged over the batch, backward, the gradient norm clipped to
#   `max_grad_norm`, one RMSprop step (App. B) at the warm-up's first learning rate,
#   `lr / (warmup_steps + 1)`.

# %%
sft_policy, tokenizer, _ = pipeline.sft_policy(config)
pairs, _ = pipeline.preference_data(config)
d = config.dpo
pad_id, context = tokenizer.pad_token_id, config.policy.n_positions


def encode(text: str) -> list[int]:
    """Token ids of a text, with no BOS or EOS added: exactly the prompt's or the completion's tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_batch(prompt_ids, completion_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows prompt + completion, right-padded: (input_ids, attention_mask, completion_mask), each (rows, T)."""
    rows = [(x + y, [0] * len(x) + [1] * len(y)) for x, y in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(ids) for ids, _ in rows)

    def pad(seqs, fill):
        return torch.tensor([s + [fill] * (width - len(s)) for s in seqs])
    return (pad([ids for ids, _ in rows], pad_id), pad([[1] * len(ids) for ids, _ in rows], 0),
            pad([mask for _, mask in rows], 0))


first = np.random.default_rng([config.seed, 0]).permutation(len(pairs))[:d.batch_size]  # epoch 0's order
batch = pairs.select(first)
xs = [encode(p) for p in batch["prompt"]]
ys = [encode(y)[:context - len(x)] for side in ("chosen", "rejected") for x, y in zip(xs, batch[side], strict=True)]
ids, attn, comp = pad_batch(xs + xs, ys)  # B chosen rows, then B rejected rows
print(f"{len(first)} pairs -> {ids.shape[0]} stacked rows of {ids.shape[1]} tokens; "
      f"{int(comp.sum())} completion tokens are scored")

# %% [markdown]
# **Predict first.** At step 1 the policy *is* the reference. What loss will the step print, what will
# `rewards/accuracies` be, and will the weights move at all? Write your answers down, then run the cell.

# %%
def completion_logps_of(model, ids, attn, comp):
    """log π(y|x) per row: next-token log-probs (logits at t predict token t + 1), completion tokens summed."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1)


policy = copy.deepcopy(sft_policy)  # pi_theta starts at pi_SFT = pi_ref; eval mode keeps dropout off
params = list(policy.parameters())
lr_1 = d.lr * min(1.0, 1 / (d.warmup_steps + 1))  # the warm-up's learning rate at update 1
optimizer = torch.optim.RMSprop(params, lr=lr_1)  # the paper's optimiser (App. B), torch's defaults

with torch.no_grad():
    ref = completion_logps_of(sft_policy, ids, attn, comp)  # pi_ref: frozen
logps = completion_logps_of(policy, ids, attn, comp)  # one forward over the 2B stacked rows
B = len(first)
pi_w, pi_l, ref_w, ref_l = logps[:B], logps[B:], ref[:B], ref[B:]
h = (pi_w - ref_w) - (pi_l - ref_l)
loss = -F.logsigmoid(beta * h).mean()  # Eq. 7, the mean over the batch
loss.backward()
grad_norm = torch.nn.utils.clip_grad_norm_(params, d.max_grad_norm)  # rescaled only above the cap
optimizer.step()
optimizer.zero_grad()

r_w, r_l = beta * (pi_w - ref_w).detach(), beta * (pi_l - ref_l).detach()  # implicit rewards, Eq. 5
mine = {"loss": loss.item(), "rewards/chosen": r_w.mean().item(), "rewards/rejected": r_l.mean().item(),
        "rewards/margins": (r_w - r_l).mean().item(), "rewards/accuracies": (r_w > r_l).float().mean().item(),
        "logps/chosen": pi_w.mean().item(), "logps/rejected": pi_l.mean().item(),
        "grad_norm": grad_norm.item(), "lr": lr_1}
print(", ".join(f"{k} {v:.6g}" for k, v in mine.items()))

# %% [markdown]
# **The library's first step**: `pipeline.dpo` (the call that trains the run below) with `max_steps = 1`.
# The trainer can accumulate gradients over micro-batches; at `cpu` one micro-batch is the whole batch of
# 32 pairs, so this is the full run's own first step (at `smoke`, which accumulates two, the library run
# is given one micro-batch of the whole batch).
#
# Tolerances: loss, `rewards/*`, `logps/*` and gradient norm to 1e-6 (accuracy exactly); weights to 5% of
# one step. RMSprop's first update is $\mathrm{lr}_1\,g/(0.1|g|+10^{-8})\approx10\,\mathrm{lr}_1\,
# \mathrm{sign}(g)$, whatever the size of $g$, so for a gradient near $10^{-8}$ rounding in its last digits
# (the library sums it in another order) is a visible share of a step.

# %%
one_step = get_preset(preset, seed=seed, **{**overrides, "dpo.max_steps": 1,
                                            "dpo.micro_batch_size": d.batch_size})
library = pipeline.dpo(one_step, beta)
logged = read_metrics(library.metrics_path).loc[1]
library_policy = AutoModelForCausalLM.from_pretrained(library.checkpoint_dir)
with torch.no_grad():
    gaps = torch.cat([(a - b).abs().flatten() for a, b in zip(params, library_policy.parameters(), strict=True)])
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(params, sft_policy.parameters(), strict=True)])
display(pd.DataFrame({"by hand": mine, "library": logged[list(mine)]}).T)
print(f"weights: each moved by at most {moved.max():.3g} (10 lr_1 = {10 * lr_1:.3g}); largest "
      f"|by hand - library| {gaps.max():.2g}; share of weights that differ by more than 1e-7: "
      f"{(gaps > 1e-7).float().mean():.1g}")

# %% tags=["nbval-check-output"]
for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm", "lr"):
    assert math.isclose(mine[key], logged[key], rel_tol=1e-6, abs_tol=1e-6), (key, mine[key], logged[key])
assert mine["rewards/accuracies"] == logged["rewards/accuracies"]
assert gaps.max() < 0.05 * 10 * lr_1, f"weights differ by {gaps.max():.2g}"
print("loss at step 1 = log 2:", math.isclose(mine["loss"], math.log(2), rel_tol=1e-6))
print("loss, rewards/*, logps/*, gradient norm and lr = the library's step 1: True")
print("updated weights = the library's, within 5% of one step: True")

# %% [markdown]
# **What to notice.** The loss is $\log 2$ and every implicit reward is 0: at step 1 $\pi_\theta=\pi_{\rm
# ref}$, so $h=0$ for every pair. `rewards/accuracies` is 0, not ½: every pair ties and TRL's strict $>$
# counts a tie as wrong. (The library's rewards may show float noise instead of an exact 0: it computed the
# reference log-probs once, before training, in batches of other widths.) Yet the gradient is not 0: at
# $h=0$ each pair pushes $\log\pi(y_w|x)$ up and $\log\pi(y_l|x)$ down with weight $\sigma(0)=\tfrac12$, and
# every weight moves by about $10\,\mathrm{lr}_1$. The library's training loop is this step, repeated, plus
# bookkeeping: the warm-up schedule, accumulation over micro-batches, metrics, evaluations, checkpoints
# and resuming.
#
# ## The run: 250 such steps
# `pipeline.dpo` trains (or, if this exact run finished before, loads) the policy at KL coefficient β. Its
# folder holds `metrics.jsonl` (one line per step, TRL's metric names), the checkpoints and the final
# policy.

# %%
result = pipeline.dpo(config, beta)
metrics = read_metrics(result.metrics_path)
train = metrics[metrics["loss"].notna()]
same = ["loss", "logps/chosen", "logps/rejected", "grad_norm"]
np.testing.assert_allclose(train.loc[1, same].to_numpy(float), logged[same].to_numpy(float), rtol=1e-6)
print(f"{result.steps} steps; its step 1 is the step above")

# %% [markdown]
# Single batches of 32 pairs are noisy, so the curves show running means over 25 steps beside the raw
# values, and step 1's ties count ½ (TRL counts them 0). `logps/*` are $\log\pi_\theta(y|x)$ themselves:
# the loss sees only the **margin**, so both may fall while the margin grows.

# %%
window = 25
smooth = train.copy()
assert abs(smooth.loc[1, "rewards/margins"]) < 1e-6  # step 1: pi_theta = pi_ref, every pair a tie
smooth.loc[1, "rewards/accuracies"] = 0.5  # ... counted as one half
running = smooth.rolling(window, min_periods=1).mean()


def plot_training(raw: pd.DataFrame, mean: pd.DataFrame, title: str) -> plt.Figure:
    """Four panels of one run's per-step metrics (TRL names): faint raw values, bold running means."""
    panels = [("loss",), ("rewards/accuracies",), ("rewards/margins", "rewards/chosen", "rewards/rejected"),
              ("logps/chosen", "logps/rejected")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, keys in zip(axes, panels, strict=True):
        for n, key in enumerate(keys):
            ax.plot(raw.index, raw[key], color=f"C{n}", alpha=0.25, lw=0.8)
            ax.plot(mean.index, mean[key], color=f"C{n}", label=key)
        ax.set_xlabel("DPO step")
        ax.legend(fontsize=8)
    axes[0].axhline(math.log(2), color="grey", ls="--", lw=0.8)
    axes[1].axhline(0.5, color="grey", ls="--", lw=0.8)
    axes[2].axhline(0, color="grey", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


fig = plot_training(smooth, running, f"DPO, beta={beta:g}: per step (faint) and running mean over {window} steps")
fig.savefig(figures_dir() / "05_training_curves.png", dpi=120)
plt.show()

# %%
keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
        "logps/chosen", "logps/rejected"]
n = min(window, len(smooth) // 2)  # running means over the first and the last n steps
summary = pd.DataFrame({f"first {n} steps": smooth[keys].iloc[:n].mean(),
                        f"last {n} steps": smooth[keys].iloc[-n:].mean()})
display(summary.round(4))

# %% [markdown]
# **What to notice.** Averaged over 25 steps, the loss falls below $\log 2$ (0.693, the grey line) and the
# accuracy rises above ½, while single batches still swing. Both implicit rewards turn negative:
# $\log\pi_\theta$ falls for the chosen completions too, only less than for the rejected ones, so the
# margin (their difference) still grows.
#
# ## Evaluation: reward up, KL up
# Every `eval_every` steps (and at step 0, the SFT policy itself) the trainer samples completions of the
# held-out test prompts from $\pi_\theta$, scores them with $r^*$, and measures their sequence KL to
# $\pi_{\rm ref}$ (footnote 3). Each evaluation is one point of the paper's Fig. 2 (left). Error bars: one
# standard error over prompts.

# %%
points = metrics[metrics["reward_mean"].notna()][["reward_mean", "reward_se", "kl_mean", "kl_se"]]
display(points.round(4))

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
left.errorbar(points.index, points.reward_mean, yerr=points.reward_se, marker="o", capsize=3)
left.set_ylabel(r"mean $r^*$ on test prompts")
right.errorbar(points.index, points.kl_mean, yerr=points.kl_se, marker="o", color="tab:orange", capsize=3)
right.set_ylabel(r"sequence KL$(\pi_\theta\,\|\,\pi_{\rm ref})$")
for ax in (left, right):
    ax.set_xlabel("DPO step")
fig.suptitle(f"Evaluation of DPO, beta={beta:g}")
fig.tight_layout()
fig.savefig(figures_dir() / "05_evaluation.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** The biggest jump in KL, and in reward, comes in the first 50 steps: that is where
# RMSprop's updates are largest (each weight moves by about $10\times$ the learning rate at first, as in
# the step on screen, before its running average of $g^2$ grows). After that the KL changes by about two nats
# or less per 50 steps, not always upward, while the reward keeps climbing. Read the reward gain against
# the KL it cost: that trade is what the frontier below compares across β.
#
# **The KL, by hand**, on 4 samples $y\sim\pi_\theta$ of 8 test prompts, with your `exact_kl` and
# `sampled_logratio`, checked against the library's `sequence_kl` on the same logits. Both estimate the
# same sequence KL; the exact one averages over the vocabulary at every step, so it varies much less.

# %%
dpo_policy = AutoModelForCausalLM.from_pretrained(result.checkpoint_dir).eval()
samples = pipeline.sample_test_prompts(config, dpo_policy, tokenizer, 8, n_per_prompt=4)  # as the evaluation samples
rows = [(x, y) for x, per in zip(samples.prompt_ids, samples.completion_ids, strict=True) for y in per]
ids, attn, comp = pad_batch([x for x, _ in rows], [y for _, y in rows])
with torch.no_grad():
    pol_logits, ref_logits = (m(input_ids=ids, attention_mask=attn).logits.float()
                              for m in (dpo_policy, sft_policy))
exact = exact_kl(pol_logits, ref_logits, comp)  # your exercises (the library's, if one failed its check)
logratio = sampled_logratio(pol_logits, ref_logits, ids, comp)
torch.testing.assert_close(exact, sequence_kl(pol_logits, ref_logits, comp), rtol=1e-4, atol=1e-4)
with torch.no_grad():
    library = [sequence_logprobs(*completion_token_logprobs(m, ids, attn, comp)) for m in (dpo_policy, sft_policy)]
    torch.testing.assert_close(logratio, library[0] - library[1], rtol=1e-4, atol=1e-4)
del pol_logits, ref_logits  # two (rows, T, vocabulary) tensors
print(f"{len(rows)} samples: exact KL {exact.mean():.4f} (sd {exact.std():.4f}), "
      f"sampled log-ratio {logratio.mean():.4f} (sd {logratio.std():.4f})")

# %% [markdown]
# ## Completions before and after DPO
# The same test prompts, sampled from $\pi^{\rm SFT}$ and from the final DPO policy with the same seed: both
# draws use the same random numbers, so where the two texts differ, the policy's change made the difference.

# %%
shown = pipeline.prompts(config, tokenizer, "test")[:n_show]
before, after = ([c[0] for c in pipeline.sample_test_prompts(config, m, tokenizer, n_show).texts]
                 for m in (sft_policy, dpo_policy))
reward, _ = pipeline.reward_model(config)
r_sft, r_dpo = (reward([p + c for p, c in zip(shown, texts, strict=True)]) for texts in (before, after))
comparison = pd.DataFrame({"prompt": shown, "SFT": before, "r* SFT": r_sft, "DPO": after, "r* DPO": r_dpo})
display(comparison.round(3))

# %% [markdown]
# **What to notice.** The DPO samples score higher under $r^*$, and they carry more of the words a
# sentiment classifier counts as positive. They are not better reviews: a 2.6 M-parameter model trained
# from scratch writes word salad before and after, and $r^*$ reads which words appear, not whether the
# text makes sense. What this task measures is reward numbers moving, at a KL cost.
#
# ## The β sweep and the reward–KL frontier
# β sets the price of KL (Eq. 3): small β lets the policy drift far from $\pi_{\rm ref}$ for reward, large
# β keeps it close. Each run's evaluation points trace a path from the SFT start; together, their upper
# envelope is DPO's **reward–KL frontier**. The comparison with PPO and the other baselines on the same
# axes is `python -m dpo_lab reproduce`'s figure (notebook 07).

# %%
sweep = pipeline.frontier(config, ("DPO",))
display(sweep[["hyperparameter", "step", "reward_mean", "reward_se", "kl_mean", "kl_se"]].round(4))
fig, ax = plt.subplots(figsize=(6.4, 4.4))
for name, run in sweep.groupby("hyperparameter", sort=False):
    run = run.sort_values("step")  # each run's path from the SFT start, in step order
    ax.errorbar(run.kl_mean, run.reward_mean, yerr=run.reward_se, marker="o", ms=4, capsize=2, label=name)
ax.set_xlabel(r"sequence KL$(\pi_\theta\,\|\,\pi_{\rm ref})$")
ax.set_ylabel(r"mean $r^*$ on test prompts")
ax.set_title(f"DPO beta sweep, {config.name} preset ({config.dpo.max_steps} steps)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figures_dir() / "05_frontier.png", dpi=120)
plt.show()

# %%
final = sweep.sort_values("step").groupby("hyperparameter").last()
for name, row in final.iterrows():
    print(f"{name:10s} final: reward {row.reward_mean:.3f} ± {row.reward_se:.3f}, KL {row.kl_mean:.3f}")
assert np.all(sweep[sweep.step == 0].kl_mean.abs() < 1e-6), "the starting policy must have KL 0 to itself"

# %% [markdown]
# **What to notice.** The smaller β, the further right a run ends (more KL) and the higher its final
# reward: the printed finals are in the same order on both axes. The runs' paths are not always monotone
# in KL: compare successive `kl_mean` of one β in the table (each point's KL is measured on fresh samples,
# with the standard error `kl_se`, and the policy can also move back toward $\pi_{\rm ref}$). The large-β
# runs bunch together at small KL: raising β from 1 to 5 shrinks the KL far less than fivefold in 250
# steps.

# %% [markdown]
# ## Your language model is secretly a reward model
# Eq. 5 read backwards: the policy DPO trained *defines* a reward,
# $$\hat r(x,y)=\beta\log\frac{\pi_\theta(y|x)}{\pi_{\rm ref}(y|x)}\;\big(+\,\beta\log Z(x)\big).$$
# $\beta\log Z(x)$ is unknown, but it is the same for every completion of one prompt, so $\hat r$ ranks a
# prompt's completions as the fitted reward does (and we never rank completions of two different prompts).
# Is it a good reward model? Test it on **held-out pairs**: 4 fresh $\pi^{\rm SFT}$ samples of each test
# prompt, labelled by $r^*$ exactly as the training pairs were (all same-prompt pairs, ties dropped). No run
# trained on them: the training pairs, and $r_\phi$'s validation pairs, come from train prompts.

# %%
held = pipeline.heldout(config)
pad, bs = tokenizer.pad_token_id, config.eval.batch_size


def held_logps(model: torch.nn.Module) -> np.ndarray:
    """log pi(y|x) of every held-out sample under model, (prompts, 4)."""
    return completion_logprobs(model, held.prompt_ids, held.completion_ids, batch_size=bs, pad_token_id=pad)


ref_logps = held_logps(sft_policy)
r_hat = beta * (held_logps(dpo_policy) - ref_logps)

accuracy = pair_accuracy(r_hat, held.rstar)  # your exercise (the library's, if it failed its check)
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
r_phi = learned([p + y for p, per in zip(held.prompts, held.texts, strict=True) for y in per]).reshape(held.shape)
first_pick = held.rstar[:, 0].mean(), held.rstar[:, 0].std(ddof=1) / np.sqrt(held.shape[0])
rows = [{"scorer": "none (first sample)", "pair accuracy": float("nan"), "best-of-4 r*": first_pick[0],
         "se": first_pick[1]},
        {"scorer": "r_phi", "pair accuracy": ranking_accuracy(r_phi, held.rstar),
         **dict(zip(("best-of-4 r*", "se"), best_of_n(r_phi, held.rstar), strict=True))},
        {"scorer": "r* (oracle)", "pair accuracy": ranking_accuracy(held.rstar, held.rstar),
         **dict(zip(("best-of-4 r*", "se"), best_of_n(held.rstar, held.rstar), strict=True))}]
implicit = {}
for b in config.dpo.betas:
    policy_b = AutoModelForCausalLM.from_pretrained(pipeline.dpo(config, b).checkpoint_dir).eval()
    implicit[b] = b * (held_logps(policy_b) - ref_logps)
    final_b = sweep[sweep.hyperparameter == f"beta={b:g}"].sort_values("step").iloc[-1]
    rows.append({"scorer": f"DPO implicit, beta={b:g}", "pair accuracy": ranking_accuracy(implicit[b], held.rstar),
                 **dict(zip(("best-of-4 r*", "se"), best_of_n(implicit[b], held.rstar), strict=True)),
                 "policy's own samples r*": final_b.reward_mean})
secret = pd.DataFrame(rows).set_index("scorer")
display(secret.round(3))

# %% [markdown]
# **What to notice.** The implicit reward is a reward model, but a weak one: on pairs it never saw it
# ranks more than half correctly, fewer than $r_\phi$, which was trained for the job on the same pairs,
# and reranking SFT samples by it gains less than reranking by $r_\phi$ (compare the `best-of-4 r*`
# column with the first row's). Yet the same policies reach a higher $r^*$ when they *sample*
# (last column). DPO fits $\hat r$ only through the policy it induces: it moved probability toward the
# completions it now generates, which shows in its samples more than in how it orders the SFT policy's
# typical completions, most of whose pairs differ little in $r^*$ (notebook 04's gap histogram).
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
# **What to notice.** Compare each curve's slope with the diagonal's. Points flatter than the diagonal
# (observed closer to ½ than predicted) mean a scorer is over-confident: its reward gaps are too large for
# how often it is right; steeper points mean under-confident. In the `cpu` run $r_\phi$'s points lie
# flatter than the diagonal at both ends, the implicit reward's closer to it. Its gaps scale with β: the
# same policy scored with another β would keep its pair accuracy (the order of $\hat r$ is unchanged) but
# move along the x axis, so its calibration says as much about β as about the policy.

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
np.testing.assert_allclose(traced["loss"].dropna(), train["loss"], rtol=1e-5)  # the run above, again
looks = traced[traced["heldout/accuracy"].notna()]

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
# **What to notice** (check each against the printed table below):
# * Held-out chosen and held-out rejected completions both **lose** likelihood (both log-ratios to
#   $\pi_{\rm ref}$ end negative). The margin that Eq. 7 rewards grows because the rejected ones fall
#   faster, and the held-out ranking rises above ½ all the same.
# * The mass goes to the policy's **own** completions: their $\log\pi_\theta$ ends well above what the
#   policy gives the SFT samples, while their $\log\pi_{\rm ref}$ ends only a few nats below that of SFT
#   samples under $\pi_{\rm ref}$ (`fresh/ref_logps` at step 250 against `heldout/logps/all` at step 0):
#   the policy concentrates on completions the reference finds nearly as plausible as its own samples.
#   The difference of the two fresh-sample curves is the sampled estimate of the KL.
#
# One run, one seed, one small model, and the fresh-sample curves are noisy (one sample per prompt, drawn
# anew at each look). Whether the displaced mass lands on better or worse completions in general is what
# the likelihood-displacement literature studies (e.g. Razin et al. 2024, Pal et al. 2024). Notebook 01
# shows the same fall on the exact bandit.

# %%
first, last = looks.iloc[0], looks.iloc[-1]
for key in ("heldout/logps/chosen", "heldout/logps/rejected", "heldout/logratio/chosen",
            "heldout/logratio/rejected", "heldout/logps/all", "fresh/logps", "fresh/ref_logps",
            "heldout/accuracy"):
    print(f"{key:26s} step {looks.index[0]:3d}: {first[key]:8.3f}   step {looks.index[-1]:3d}: {last[key]:8.3f}")
