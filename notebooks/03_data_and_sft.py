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
# # 03 · IMDb, the tokenizer and the SFT policy $\pi_{\rm ref}$
#
# First stage of the paper's controlled-sentiment task (§6.1, App. C.1): a language model of movie reviews,
# which DPO will later steer towards **positive** reviews. The paper fine-tunes gpt2-large on IMDb; here a
# small GPT-2 is trained from scratch on IMDb reviews (tokenizer included) and plays both "pretrained model"
# and "SFT". The result, $\pi^{\rm SFT}$, is
# * the **reference** $\pi_{\rm ref}$ of the KL term in Eq. 3 and of the DPO loss (Eq. 7),
# * the **sampler** of the preference data (notebook 04),
# * the **starting point** of every trained policy (notebook 05).
#
# The prose describes the `cpu` outputs below (each `dpo_lab.pipeline` stage trains once, then loads from
# `artifacts/`); at `DPO_LAB_PRESET=smoke` it runs in about a minute and the numbers differ.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the data split, the tokenizer/SFT training and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
n_show: int = 4  # prompts (and reviews) shown as examples
n_step: int = 8  # reviews in the written-out SFT step

# %%
import copy
import dataclasses
import math
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils import logging as hf_logging

from dpo_lab import pipeline
from dpo_lab.grading import grade, lm_cases
from dpo_lab.models import build_policy, train_sft
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.sampling import sample
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
print(f"preset {config.name!r}: policy {config.policy}")

# %% [markdown]
# ## The data
# IMDb reviews (Maas et al. 2011) labelled positive (1) or negative (0): the 25,000 of IMDb's train split,
# exact duplicates dropped, split once for every seed (`pipeline.imdb`) into four disjoint sets: **train**
# (SFT, r\*, the preference prompts; the preset may cap it), **audit** (only the audit's judges learn from
# it), **validation** (prompts for choosing settings) and **test** (the frontier's prompts, never used to
# choose anything).

# %%
data = pipeline.imdb(config)
names = data["train"].features["label"].names
for split in pipeline.SPLITS:  # the train split's size depends on the preset (smoke caps it)
    counts = Counter(data[split]["label"])
    print(f"{split:10s} {len(data[split]):6d} reviews:", {names[k]: counts[k] for k in sorted(counts)})

# %% tags=["nbval-check-output"]
# Facts that hold at every preset: the held-out splits are the same, both labels are in the training split,
# and no review is in two splits.
for split in ("validation", "test"):
    counts = Counter(data[split]["label"])
    print(f"held-out {split} reviews:", len(data[split]), {names[k]: counts[k] for k in sorted(counts)})
print("both labels in the train split:", set(data["train"]["label"]) == {0, 1})
texts = [set(data[split]["text"]) for split in pipeline.SPLITS]
print("reviews in two splits:", sum(len(a & b) for i, a in enumerate(texts) for b in texts[i + 1:]))

# %%
for text, label in zip(data["train"]["text"][:2], data["train"]["label"][:2], strict=True):
    print(f"[{names[label]}] {text[:300]}...\n")

# %% [markdown]
# **What to notice.** Both labels are about equally common in every split, and no review is in two splits:
# no test prompt was an SFT example. SFT ignores the labels; only r\* (notebook 04) learns from them.
#
# ## The SFT loss
# SFT is next-token prediction: at each position $t$ of a review (which ends in `<|endoftext|>`) the logits
# are a guess at token $t+1$, and the loss is the mean of $-\log p_\theta(w_{t+1}\mid w_{\le t})$ over the
# batch's real next tokens (nats per token). Short reviews are padded on the right; `attention_mask` is 0
# on padding, which is never a target.

# %% [markdown]
# ### Exercise · tier 2 · the masked next-token loss
# Graded against transformers' causal-LM loss (what `GPT2LMHeadModel` computes given labels); the SFT step
# below uses your function.
#
# <details><summary>Hint 1</summary>Line predictions up with their targets first: which slices of the
# logits, the ids and the mask belong together?</details>
# <details><summary>Hint 2</summary>
#
# With log-probabilities $\ell_{b,t,v}$ (log_softmax over the vocabulary):
# $L=-\frac{1}{N}\sum_{b,t}m_{b,t+1}\,\ell_{b,t,w_{b,t+1}}$, $N=\sum_{b,t}m_{b,t+1}$: one mean over all real
# target tokens of the batch, not a mean per review.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
# target = attention_mask[:, 1:].bool()
# return -token_logps[target].mean()
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """SFT's loss, a scalar: the mean next-token cross-entropy (nats per token) of a batch of reviews, from
    logits (B, T, V), token ids (B, T) and attention_mask (B, T; 1 on real tokens, 0 on right padding)."""
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    target = attention_mask[:, 1:].bool()  # position t predicts token t + 1: the mask shifts with the ids
    return -token_logps[target].mean()  # one mean over the batch's targets: long reviews weigh more


# %%
grade(next_token_loss,
      lambda logits, ids, mask: ForCausalLMLoss(logits, ids.masked_fill(mask == 0, -100), logits.shape[-1]),
      lm_cases("logits", "input_ids", "attention_mask"), rtol=1e-5, atol=1e-6,
      hint="score the logits at t against token t + 1, and only where token t + 1 is real")

# %% [markdown]
# ## The tokenizer
# A GPT-2 style **byte-level BPE** trained on the train reviews (`models.train_tokenizer`): every string
# encodes, and `<|endoftext|>` is end-of-sequence and padding at once. The SFT stage trains it, so the next
# cell loads the policy and tokenizer together.

# %%
policy, tokenizer, report = pipeline.sft_policy(config)
print(f"vocabulary: {len(tokenizer)} tokens; policy: {report['parameters']:,} parameters, "
      f"context {policy.config.n_positions} tokens")

# %%
sentence = "This movie was surprisingly good, I loved it!"
ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
print(f"{len(ids)} tokens:", [tokenizer.decode([i]) for i in ids])

# %% [markdown]
# How long is a review in tokens? SFT cuts each review to the context length.

# %%
lengths = np.array([len(ids) for ids in tokenizer(list(data["train"]["text"]), add_special_tokens=False)["input_ids"]])
context = config.policy.n_positions
print(f"tokens per review: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
      f"max {lengths.max()}; longer than the context ({context}): {np.mean(lengths > context):.0%}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(lengths, bins=60, range=(0, np.percentile(lengths, 99)), color="tab:blue", alpha=0.8)
ax.axvline(context, color="tab:red", ls="--", label=f"context = {context} tokens")
ax.set_xlabel("review length (tokens)")
ax.set_ylabel("reviews")
ax.set_title(f"IMDb train reviews, {len(tokenizer)}-token BPE")
ax.legend()
fig.tight_layout()
fig.savefig(figures_dir() / "03_review_lengths.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** Most of the histogram lies right of the red line (the share is printed above): SFT
# sees only each review's first `context` tokens, and `<|endoftext|>` only after the few short reviews. The
# prompts (2–8 tokens) and the completions DPO trains on live in that window anyway.
#
# ## Supervised fine-tuning, one step on screen
# `models.train_sft` repeats one step: forward, the loss above, backward, optimiser step. Here it is on the
# first `n_step` train reviews, from freshly initialised weights, with the library's settings: AdamW
# (β = (0.9, 0.99), weight decay 0.1 on weight matrices only), gradient norm clipped at 1, and the learning
# rate of warmup step 1, `sft_lr / sft_warmup_steps`.
#
# **Predict first.** The model knows nothing yet and the vocabulary has 4,096 tokens. What loss will the
# step print? Write it down, then run the cell.

# %%
texts = data["train"]["text"][:n_step]
eos = tokenizer.eos_token_id
rows = [(ids + [eos])[:context] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
width = max(map(len, rows))  # pad on the right to the longest review of the batch
input_ids = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

model = build_policy(tokenizer, config.policy, seed=config.seed)  # random weights, seeded
start = copy.deepcopy(model)  # kept twice: the weights before the step, and the library's copy
params = list(model.parameters())
lr = config.policy.sft_lr / max(1, config.policy.sft_warmup_steps)
optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.99))
logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # forward: (B, T, V)
try:
    loss = next_token_loss(logits, input_ids, attention_mask)
except NotImplementedError:  # the exercise above is still a stub: fall back to transformers' loss
    print("next_token_loss is not written yet: this step uses transformers' ForCausalLMLoss")
    loss = ForCausalLMLoss(logits, input_ids.masked_fill(attention_mask == 0, -100), logits.shape[-1])
loss.backward()  # gradients of the loss for every weight
torch.nn.utils.clip_grad_norm_(params, 1.0)  # rescale them if their norm exceeds 1
optimizer.step()  # the update
optimizer.zero_grad()
print(f"{n_step} reviews, {int(attention_mask[:, 1:].sum())} target tokens: loss {loss.item():.4f} "
      f"(log {len(tokenizer)} = {math.log(len(tokenizer)):.4f})")

# %% [markdown]
# The library's step: `train_sft` on the same reviews for `sft_steps = 1`, from the same initial weights.
# It shuffles the batch's reviews, so its sums run in another order: the loss agrees to float32 rounding
# (tolerance 1e-6, relative), the weights to within 5% of `lr` (Adam divides by $\sqrt{v}$, which for a
# gradient near its $\epsilon$ turns rounding into a visible share of one step).

# %%
library = copy.deepcopy(start)
one_step = dataclasses.replace(config.policy, sft_steps=1, sft_batch_size=n_step)
library_report = train_sft(library, tokenizer, texts, one_step, seed=config.seed, progress=False)
with torch.no_grad():
    weight_gap = max(float((a - b).abs().max()) for a, b in zip(params, library.parameters(), strict=True))
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(params, start.parameters(), strict=True)])
print(f"loss: by hand {loss.item():.6f}, train_sft {library_report['losses'][0]:.6f}")
print(f"largest weight difference, by hand vs train_sft: {weight_gap:.2e} (lr = {lr:.1e})")
print(f"each weight moved by at most {float(moved.max()):.2e}; "
      f"share that moved by lr to within 1%: {float(((moved - lr).abs() < 0.01 * lr).float().mean()):.3f}")

# %% tags=["nbval-check-output"]
print("same learning rate as train_sft's step 1:", math.isclose(lr, library_report["lrs"][0], rel_tol=1e-12))
print("loss = train_sft's (relative tolerance 1e-6):",
      math.isclose(loss.item(), library_report["losses"][0], rel_tol=1e-6))
print("weights = train_sft's (within 5% of lr):", weight_gap < 0.05 * lr)

# %% [markdown]
# **What to notice.** The first loss is close to $\log 4096$: a random model spreads its probability almost
# evenly over the vocabulary. Almost every weight moved by `lr`, whatever its gradient: Adam's first update
# is $\text{lr}\cdot g/(|g|+\epsilon)$, about $\text{lr}\cdot\mathrm{sign}(g)$. `train_sft` is this step
# repeated `sft_steps` times on fresh batches, the learning rate following warmup then cosine decay, plus
# bookkeeping (gradient accumulation, the held-out loss, timing).
#
# ## The SFT run
# The held-out loss is measured on test reviews; its exponential, the **perplexity**, is the size of a
# vocabulary a uniform guesser would need to do as badly.

# %%
losses = np.array(report["losses"])
print(f"{report['steps']} steps, {report['tokens']:,} training tokens, {report['seconds']:.0f} s of training")
print(f"held-out perplexity: {math.exp(report['held_out_loss_init']):.0f} at initialisation "
      f"-> {report['held_out_ppl']:.1f} after SFT")
assert report["held_out_loss"] < report["held_out_loss_init"], "SFT did not lower the held-out loss"

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, len(losses) + 1), losses, alpha=0.4, label="train loss (per step)")
window = max(1, len(losses) // 20)
smooth = pd.Series(losses).rolling(window, min_periods=1).mean()
ax.plot(np.arange(1, len(losses) + 1), smooth, color="tab:blue", label=f"running mean ({window} steps)")
ax.axhline(report["held_out_loss"], color="tab:red", ls="--", label="held-out loss after SFT")
ax.set_xlabel("optimizer step")
ax.set_ylabel("cross-entropy (nats / token)")
ax.set_title("SFT of the reference policy")
ax.legend()
fig.tight_layout()
fig.savefig(figures_dir() / "03_sft_loss.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** The curve starts near the loss of the step above, falls fastest early, then slowly,
# and ends on the held-out line: the model underfits rather than overfits (it sees each review about once).
# The perplexity falls from about the vocabulary size to the printed value: on average the model is as
# unsure of the next token as a uniform guess among that many.
#
# ## Prompts: review prefixes of 2–8 tokens
# The task (App. C.1): given the first 2–8 tokens $x$ of a review, write a continuation $y$. Train prompts
# come from train reviews (they seed the preference data), test prompts from test reviews (they measure
# reward and KL). Each prefix length is drawn uniformly in $[2, 8]$ (`data.make_prompts`).

# %%
train_prompts = pipeline.prompts(config, tokenizer, "train")
test_prompts = pipeline.prompts(config, tokenizer, "test")
prompt_tokens = Counter(len(ids) for ids in tokenizer(train_prompts, add_special_tokens=False)["input_ids"])
print(f"{len(train_prompts)} train prompts, {len(test_prompts)} test prompts")
print("train prompt lengths (tokens: count):", dict(sorted(prompt_tokens.items())))
print("examples:", train_prompts[:8])

# %% [markdown]
# ## What $\pi^{\rm SFT}$ writes
# Samples as DPO's data will be drawn: temperature 1, no top-k, no top-p (`sampling.sample`),
# so they are draws from the policy itself.

# %%
completions = sample(policy, tokenizer, test_prompts[:n_show], n_per_prompt=2,
                     max_new_tokens=config.preferences.max_new_tokens, batch_size=32, seed=config.seed,
                     progress=False).texts
for prompt, samples in zip(test_prompts[:n_show], completions, strict=True):
    for text in samples:
        print(f"[{prompt}]{text}")
    print()

# %% [markdown]
# **What to notice.** No one would write these: a 2.6 M-parameter model trained from scratch strings review
# words in review rhythm ("awful movie", "I first saw this movie") into half-grammatical phrases with
# invented words and no sense. Enough for what follows: r\* (notebook 04) reads which words appear, and
# these samples are **not** particularly positive. Later notebooks show reward numbers moving, not better
# reviews.
