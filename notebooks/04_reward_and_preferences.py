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
# # 04 · The ground-truth reward $r^*$ and the preference data
#
# In the IMDb task (§6.1, App. C.1) there are no human labellers: a sentiment classifier plays the human.
# Its probability of "positive" for the prompt and completion read together is the **ground-truth reward**
# $$r^*(x, y) = p(\text{positive}\mid x\,y)\in[0,1].$$
# It labels the preference pairs and, later, scores every policy. The paper uses
# `siebert/sentiment-roberta-large-english`; the `smoke` and `cpu` presets use a TF-IDF + logistic regression
# classifier trained here on IMDb labels (`dpo_lab.rewards.TfidfSentimentReward`), which runs offline in
# seconds.
#
# Then the preference data, exactly as App. C.1: for each train prompt $x$, 4 completions sampled from
# $\pi^{\rm SFT}$ (notebook 03), all $\binom42=6$ pairs, $y_w$ the completion with the higher $r^*$.
#
# **What you see, and what it costs.** The outputs below are the `cpu` preset's (the default), executed on
# its cached stages. *Run all* on a 2-core laptop (measured on this project's 2-core machines, often while
# other runs shared them, so an idle laptop may be faster):
#
# | preset | first time (empty caches) | stages cached |
# |---|---|---|
# | `smoke` (`DPO_LAB_PRESET=smoke`: seconds-long toy runs, for checking) | 33 s after 03 | |
# | `cpu` (default) | about 1 min after notebook 03 (r\* 14–25 s, the pairs 14–23 s); add 03's SFT if it has not run | 17 s |
# | `gpu`, `paper` | need a GPU (not measured: none was available to this project) | |

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the data split, the classifier, the SFT policy and the sampled completions
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
n_features: int = 12  # most positive / most negative n-grams of the classifier shown
n_show: int = 6  # example preference pairs shown

# %%

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import pipeline
from dpo_lab.paths import figures_dir
from dpo_lab.presets import get_preset
from dpo_lab.rewards import TfidfSentimentReward
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 80)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
print(f"preset {config.name!r}: reward {config.reward}")

# %% [markdown]
# ## The classifier
# Held-out accuracy on **full test reviews**, and on the **first 40 words** of each (about the length of a
# prompt plus a completion): the policy's texts are short, and short texts carry less evidence, so $r^*$ is
# a noisier judge of them. (The hub classifier of the `paper` preset has no such report.)

# %%
reward, reward_report = pipeline.reward_model(config)
for key, value in reward_report.items():
    print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")

# %% tags=["nbval-check-output"]
if "accuracy_full_reviews" in reward_report:
    full, short = reward_report["accuracy_full_reviews"], reward_report["accuracy_first_40_words"]
    print("held-out reviews:", reward_report["n_test"])
    print("better than chance on full reviews and on 40-word prefixes:", full > 0.6 and short > 0.55)
    print("full reviews are easier than 40-word prefixes:", full > short)

# %% [markdown]
# A linear model is readable: its largest positive and negative coefficients are the n-grams that move
# $r^*$ most. Expect DPO (notebook 05) to learn to write the left column.

# %%
if isinstance(reward, TfidfSentimentReward):
    top = reward.most_informative_features(n_features)
    table = pd.DataFrame({
        "positive n-gram": [t for t, _ in top["positive"]], "coef +": [c for _, c in top["positive"]],
        "negative n-gram": [t for t, _ in top["negative"]], "coef -": [c for _, c in top["negative"]],
    })
    display(table.round(2))

# %% [markdown]
# $r^*$ of a few hand-written texts. A bag of n-grams weighs words, not syntax (compare the two "I expected
# to ... but" sentences), and a single strong word can decide a short text: exactly the kind of reward a
# policy can learn to please with a few words.

# %%
sentences = [
    "A wonderful film, one of the best I have seen. The acting is brilliant.",
    "Terrible. Boring plot, awful acting, a waste of time.",
    "The movie is two hours long and was filmed in Canada.",
    "I expected to hate it, but it was great.",
    "I expected to love it, but it was bad.",
    "great",
]
scores = reward(sentences)
display(pd.DataFrame({"text": sentences, "r*": scores.round(3)}))
assert scores[0] > 0.5 > scores[1], "r* should call the first text positive and the second negative"

# %% [markdown]
# ## The preference pairs
# `pipeline.preference_data` samples 4 completions per train prompt from $\pi^{\rm SFT}$ (temperature 1, no
# top-k/top-p), scores each as $r^*(x, y)$, and keeps every pair with a strict preference. The labels are
# the **argmax** of $r^*$, not Bradley–Terry draws (Eq. 1): the paper's IMDb preferences are noiseless.
# Pairs whose rewards tie carry no preference and are dropped (counted), as are pairs with an empty
# completion (the policy sampled `<|endoftext|>` first: no token whose probability DPO could move).

# %%
pairs, stats = pipeline.preference_data(config)
for key in ("n_prompts", "n_candidates", "n_pairs", "n_ties", "n_identical", "n_empty", "gap_mean"):
    print(f"{key:13s} {stats[key]:.4f}" if key == "gap_mean" else f"{key:13s} {stats[key]}")

# %% tags=["nbval-check-output"]
k = config.preferences.samples_per_prompt
print(f"every prompt x C({k},2) = {k * (k - 1) // 2} candidate pairs:",
      stats["n_candidates"] == stats["n_prompts"] * k * (k - 1) // 2)
print("every candidate kept or counted as dropped:",
      stats["n_pairs"] + stats["n_ties"] + stats["n_identical"] + stats["n_empty"] == stats["n_candidates"])
print("rows saved = pairs kept:", len(pairs) == stats["n_pairs"])
print("chosen never below rejected:", bool(np.all(np.array(pairs["chosen_reward"]) >= np.array(pairs["rejected_reward"]))))

# %% [markdown]
# How much does $y_w$ beat $y_l$ by? Many gaps are small: for those, the label says more about the
# classifier's noise on short texts than about sentiment. DPO weighs every pair the same a priori; its
# gradient weight $\sigma(\hat r_l-\hat r_w)$ (notebook 01) then focuses on pairs it still ranks wrongly.

# %%
gaps = np.array(pairs["chosen_reward"]) - np.array(pairs["rejected_reward"])
print("gap quantiles:", {q: round(v, 3) for q, v in stats["gap_quantiles"].items()})
judge = "project classifier" if config.reward.source == "offline" else config.reward.hub_name
fig, ax = plt.subplots(figsize=(6, 3.5))
sns.histplot(x=gaps, bins=40, binrange=(0, 1), color="tab:green", ax=ax)
ax.set(xlabel=r"reward gap $r^*(x, y_w) - r^*(x, y_l)$" + f"\n$r^*$ ({judge}, p(positive))", ylabel="pairs")
ax.set_title(f"{len(pairs)} preference pairs from {stats['n_prompts']} prompts")
fig.tight_layout()
fig.savefig(figures_dir() / "04_reward_gaps.png", dpi=120)
plt.show()

# %% [markdown]
# ### The 4 samples of each prompt
# Every sample is stored with its $r^*$ beside the pairs (ties included). Two things show. The spread
# **within** a prompt is what the pairs teach. And whole prompts sit high or low: $r^*$ reads the prompt
# too, so "This film is awful" drags all four samples down. Such a per-prompt offset $f(x)$ cancels in every
# comparison (Eq. 1, and $\beta\log Z(x)$ in Eq. 6): pairs carry no information about it, which is why DPO
# never needs $Z(x)$.

# %%
table = pairs.to_pandas()
candidates = pipeline.preference_candidates(config)
rewards_by_prompt = [np.sort(r) for r in candidates["rewards"]]
means = np.array([r.mean() for r in rewards_by_prompt])
within = np.mean([r.var() for r in rewards_by_prompt])
print(f"{len(rewards_by_prompt)} prompts; share of reward variance between prompts: "
      f"{means.var() / (means.var() + within):.0%}, within prompts: {within / (means.var() + within):.0%}")

# %%
samples = pd.DataFrame([{"rank": rank, "r*": r}  # one row per sample; prompts ranked by their mean reward
                        for rank, i in enumerate(np.argsort(means)) for r in rewards_by_prompt[i]])
fig, ax = plt.subplots(figsize=(7, 3.5))
sns.lineplot(samples, x="rank", y="r*", errorbar=("pi", 100), err_style="bars", lw=1, ax=ax,
             err_kws={"ecolor": "silver", "elinewidth": 0.8}, label="mean of its samples; bar: min to max")
sns.scatterplot(samples, x="rank", y="r*", s=8, linewidth=0, ax=ax)
ax.set(xlabel="prompt (sorted by its mean reward)",
       ylabel=f"$r^*(x, y)$ of its samples\n({judge}, p(positive))")
ax.legend(loc="upper left", fontsize=8)
ax.set_title(r"Rewards of the samples of each prompt, from $\pi^{\rm SFT}$")
fig.tight_layout()
fig.savefig(figures_dir() / "04_sample_rewards.png", dpi=120)
plt.show()

# %% [markdown]
# ### Example pairs
# From the smallest reward gap to the largest. Watch the texts: which words made $y_w$ win?

# %%
picks = np.argsort(gaps)[np.linspace(0, len(gaps) - 1, n_show).round().astype(int)]
examples = table.iloc[picks][["prompt", "chosen", "chosen_reward", "rejected", "rejected_reward"]]
display(examples.round(3).reset_index(drop=True))
