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
from dpo_lab.batching import PreferenceCollator, pad_rows, stack_pairs
from dpo_lab.evaluate import completion_kls
from dpo_lab.logprobs import completion_logprobs, concatenated_logprobs, position_ids_from_mask
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.models import load_policy
from dpo_lab.paths import artifacts_dir, figures_dir
from dpo_lab.plots import plot_frontier
from dpo_lab.presets import get_preset
from dpo_lab.rewards import score_completions
from dpo_lab.run import read_metrics
from dpo_lab.sampling import sample, sample_completions
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
# ## Eq. 7 on screen
# `train_dpo` does all of this in one call. The next cells write each piece out in plain torch on 8 of the
# preset's preference pairs, with $\pi_{\rm ref}=\pi^{\rm SFT}$ and this run's final policy as $\pi_\theta$,
# and check it against the library function the trainer calls (their numbers depend on the preset).
#
# **$\log\pi(y|x)$.** Logits at position $t$ predict token $t+1$: `logits[:, :-1]` through `log_softmax`,
# `gather`ed at `ids[:, 1:]`, is $\log\pi(y_t|x,y_{<t})$. The completion mask shifted the same way,
# `comp[:, 1:]`, keeps completion tokens (an EOS too, when there is one) and drops prompt and padding; the
# row sum is $\log\pi(y|x)=\sum_t\log\pi(y_t|x,y_{<t})$.

# %%
sft_policy, tokenizer, _ = pipeline.sft_policy(config)
dpo_policy, _ = load_policy(result.checkpoint_dir)
pairs, _ = pipeline.preference_data(config)
batch = PreferenceCollator(tokenizer, config.policy.n_positions)([pairs[i] for i in range(8)])
yw, yl = ([batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "completion_mask")]
          for side in ("chosen", "rejected"))


@torch.no_grad()
def logp_sum(model, ids, attn, comp):
    """log pi(y|x) per row; a plain forward, whose position ids are arange(T)."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    # logits at t predict token t + 1: log pi(y_t | x, y_<t) at every position
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * comp[:, 1:]).sum(-1)  # completion tokens only: the mask shifted by one


pi_w, pi_l = logp_sum(dpo_policy, *yw), logp_sum(dpo_policy, *yl)
with torch.no_grad():
    torch.testing.assert_close(pi_w, completion_logprobs(dpo_policy, *yw))
attn = yw[1]  # the library passes position ids counted over real tokens: with right padding, arange(T)
assert torch.equal(position_ids_from_mask(attn) * attn, torch.arange(attn.shape[1]) * attn)
print("log pi(y_w|x), by hand = completion_logprobs:", pi_w.numpy().round(2))

# %% [markdown]
# **One forward for chosen and rejected.** The trainer stacks the $B$ chosen rows on the $B$ rejected rows
# (`batching.stack_pairs` pads both to one length) and runs the model once on $2B$ rows. Rows never see each
# other, so the first $B$ sums are $\log\pi(y_w|x)$ and the last $B$ are $\log\pi(y_l|x)$, as from two
# forwards.

# %%
stacked = stack_pairs(batch)
both = logp_sum(dpo_policy, stacked["input_ids"], stacked["attention_mask"], stacked["completion_mask"])
torch.testing.assert_close(both, torch.cat([pi_w, pi_l]))  # one forward on 2B rows == two forwards on B
with torch.no_grad():
    torch.testing.assert_close(concatenated_logprobs(dpo_policy, batch), (pi_w, pi_l))
print(f"one forward on {len(both)} stacked rows = two separate forwards = concatenated_logprobs")

# %% [markdown]
# **Eq. 7: four tensors in, a loss out.** `ref_w`, `ref_l` are $\log\pi_{\rm ref}$ of the same completions
# (the trainer computes them once and caches them); `h` is the difference of the two log-ratios and
# `-logsigmoid(beta * h)` the loss of each pair. At $\pi_\theta=\pi_{\rm ref}$, `h` is 0 and every loss is
# $\log 2$.

# %%
ref_w, ref_l = logp_sum(sft_policy, *yw), logp_sum(sft_policy, *yl)
h = (pi_w - ref_w) - (pi_l - ref_l)  # log pi/pi_ref (y_w) - log pi/pi_ref (y_l)
losses = -F.logsigmoid(beta * h)  # Eq. 7, one term per pair
lib_losses, lib_r_w, lib_r_l = preference_loss(pi_w, pi_l, ref_w, ref_l, beta=beta)
torch.testing.assert_close(losses, lib_losses)
at_ref, _, _ = preference_loss(ref_w, ref_l, ref_w, ref_l, beta=beta)  # policy == reference
torch.testing.assert_close(at_ref, torch.full_like(at_ref, math.log(2)))
print(f"Eq. 7 on 8 pairs = preference_loss: mean {losses.mean():.4f}; "
      f"at pi = pi_ref {at_ref.mean():.4f} = log 2")

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
# The `rewards/*` metrics by hand, on the 8 pairs above at the final policy: `r_w`, `r_l` are the implicit
# rewards $\hat r=\beta\,(\log\pi_\theta-\log\pi_{\rm ref})$ of $y_w$ and $y_l$ (Eq. 5 without
# $\beta\log Z(x)$, which cancels in a pair); the logs hold their batch means, the mean margin, and the share
# of pairs with $\hat r_w>\hat r_l$ (`losses.preference_metrics`).

# %%
r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)  # implicit rewards of chosen and rejected
torch.testing.assert_close((r_w, r_l), (lib_r_w, lib_r_l))  # what preference_loss returns beside the loss
ours = {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(), "rewards/margins": (r_w - r_l).mean(),
        "rewards/accuracies": (r_w > r_l).float().mean()}
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
# **The KL, by hand** (vs `evaluate.completion_kls`, i.e. `logprobs.sequence_kl`). On 4 samples
# $y\sim\pi_\theta$ of 8 test prompts (EOS included when sampled), `exact` sums $\sum_v p\,(\log p-\log q)$,
# $p=\pi_\theta(\cdot|x,y_{<t})$, $q=\pi_{\rm ref}(\cdot|x,y_{<t})$, over completion steps (footnote 3);
# `logratio` keeps only the token taken: $\log\pi_\theta(y|x)-\log\pi_{\rm ref}(y|x)$. Both estimate the
# sequence KL; the exact one averages over the vocabulary at each step, so it usually varies much less.

# %%
samples = sample(dpo_policy, tokenizer, pipeline.prompts(config, tokenizer, "test")[:8], n_per_prompt=4,
                 max_new_tokens=config.eval.max_new_tokens, batch_size=32, seed=config.seed, progress=False)
xs = [x for x, per in zip(samples.prompt_ids, samples.completion_ids, strict=True) for _ in per]
ys = [y for per in samples.completion_ids for y in per]
rows = pad_rows([{"input_ids": x + y, "completion_mask": [0] * len(x) + [1] * len(y)}
                 for x, y in zip(xs, ys, strict=True)], tokenizer.pad_token_id)
ids, mask = rows["input_ids"], rows["completion_mask"][:, 1:]  # the mask over next-token predictions
with torch.no_grad():
    logp, logq = (m(input_ids=ids, attention_mask=rows["attention_mask"]).logits[:, :-1].float()
                  .log_softmax(-1) for m in (dpo_policy, sft_policy))
exact = ((logp.exp() * (logp - logq)).sum(-1) * mask).sum(-1)  # sum_t KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t))
logratio = ((logp - logq).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(-1)  # log pi/pi_ref (y|x)
lib = completion_kls(dpo_policy, sft_policy, xs, ys, batch_size=32, pad_token_id=tokenizer.pad_token_id)
torch.testing.assert_close((exact, logratio), tuple(torch.tensor(a, dtype=torch.float32) for a in lib),
                           rtol=1e-4, atol=1e-4)  # fp32 sums of differences, summed in another order
print(f"{len(ys)} samples, = completion_kls: exact KL {exact.mean():.4f} (sd {exact.std():.4f}), "
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
