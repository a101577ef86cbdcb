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
# which DPO will later steer towards **positive** reviews. The paper fine-tunes gpt2-large on IMDb; here the
# `smoke` and `cpu` presets train a small GPT-2 from scratch on IMDb reviews (tokenizer included), which
# plays both parts: "pretrained model" and "SFT". The result is $\pi^{\rm SFT}$, which is
# * the **reference** $\pi_{\rm ref}$ of the KL term in Eq. 3 and of the DPO loss (Eq. 7),
# * the **sampler** of the preference data (notebook 04),
# * the **starting point** of every trained policy (notebook 05).
#
# Every stage lives in `dpo_lab.pipeline` and is cached under `artifacts/`: the first run trains, later runs
# load in seconds.
#
# **What you see, and what it costs.** The outputs below are the `cpu` preset's (the default), executed on
# its cached stages. *Run all* on a 2-core laptop (measured on this project's 2-core machines, often while
# other runs shared them, so an idle laptop may be faster):
#
# | preset | first time (empty caches) | stages cached |
# |---|---|---|
# | `smoke` (`DPO_LAB_PRESET=smoke`: seconds-long toy runs, for checking) | 51 s | |
# | `cpu` (default) | 5–9 min (the SFT stage: 295 s on an idle Intel Xeon, 529 s on a shared AMD EPYC) | 55 s |
# | `gpu`, `paper` | need a GPU (not measured: none was available to this project) | |

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the data split, the tokenizer/SFT training and every sample
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
n_show: int = 4  # prompts (and reviews) shown as examples

# %%
import math
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from transformers.utils import logging as hf_logging

from dpo_lab import pipeline
from dpo_lab.paths import figures_dir
from dpo_lab.presets import get_preset
from dpo_lab.sampling import sample
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
print(f"preset {config.name!r}: policy {config.policy}")

# %% [markdown]
# ## The data
# Reviews of Maas et al. (2011), labelled positive (1) or negative (0). The offline source ships the 25,000
# reviews of IMDb's train split; `dpo_lab.data.load_imdb` drops exact duplicates and holds out a stratified
# 10%. `pipeline.imdb` then makes the one split every seed shares (`data.split_seed`), four disjoint sets:
# **train** (SFT, r\*, the preference prompts; the preset may cap it), **audit** (only the audit's judges
# learn from these), **validation** (prompts for choosing settings) and **test** (the frontier's prompts,
# never used to choose anything); the held-out 10% is halved into the last two.

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
# ## The tokenizer
# A GPT-2 style **byte-level BPE** trained on the train reviews (`models.train_tokenizer`): every string
# encodes, and `<|endoftext|>` is end-of-sequence and padding at once. The SFT stage trains it, so we load
# the policy and tokenizer together (the first run trains both, then they come from the cache).

# %%
policy, tokenizer, report = pipeline.sft_policy(config)
print(f"vocabulary: {len(tokenizer)} tokens; policy: {report['parameters']:,} parameters, "
      f"context {policy.config.n_positions} tokens")

# %%
sentence = "This movie was surprisingly good, I loved it!"
ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
print(f"{len(ids)} tokens:", [tokenizer.decode([i]) for i in ids])

# %% [markdown]
# How long is a review in tokens? SFT cuts each review to the context length (`policy.n_positions`), so
# the share of longer reviews is the share SFT sees only in part.

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
# ## Supervised fine-tuning
# Next-token cross-entropy on whole reviews (`models.train_sft`: AdamW, warmup then cosine decay). The
# held-out loss is measured on test reviews; its exponential, the **perplexity**, starts near the vocabulary
# size (a random model guesses about uniformly) and falls as the model learns English and reviews.

# %%
losses = np.array(report["losses"])
print(f"{report['steps']} steps, {report['tokens']:,} training tokens, {report['seconds']:.0f} s")
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
# so they are draws from the policy itself. At `smoke` they are barely English; at `cpu` they have review
# words and the rhythm of review sentences, but little grammar and no sense (a 2.6 M-parameter model trained for
# five minutes from scratch). That is enough for what follows: sentiment is a property of which words appear,
# and these samples are **not** particularly positive. Sentiment is what DPO adds.

# %%
completions = sample(policy, tokenizer, test_prompts[:n_show], n_per_prompt=2,
                     max_new_tokens=config.preferences.max_new_tokens, batch_size=32, seed=config.seed,
                     progress=False).texts
for prompt, samples in zip(test_prompts[:n_show], completions, strict=True):
    for text in samples:
        print(f"[{prompt}]{text}")
    print()
