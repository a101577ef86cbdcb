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
# # 04 · The ground-truth reward $r^*$ and the preference data
#
# In the IMDb task (§6.1, App. C.1) there are no human labellers: a sentiment classifier plays the human.
# Its probability of "positive" for the prompt and completion read together is the **ground-truth reward**
# $$r^*(x, y) = p(\text{positive}\mid x\,y)\in[0,1].$$
# It labels the preference pairs and, later, scores every policy. The paper uses
# `siebert/sentiment-roberta-large-english`; the `smoke` and `cpu` presets use a TF-IDF + logistic regression
# classifier trained here on IMDb labels (`dpo_lab.rewards.TfidfSentimentReward`).
#
# Then the preference data, exactly as App. C.1: for each train prompt $x$, 4 completions sampled from
# $\pi^{\rm SFT}$ (notebook 03), all $\binom42=6$ pairs, $y_w$ the completion with the higher $r^*$.
#
# The prose describes the `cpu` outputs below (run on cached stages); at `DPO_LAB_PRESET=smoke` the numbers
# differ.

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
from dpo_lab.grading import grade, lm_cases
from dpo_lab.implicit_reward import pair_margins
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.rewards import TfidfSentimentReward
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.max_colwidth", 80)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
print(f"preset {config.name!r}: reward {config.reward}")

# %% [markdown]
# ## From scored samples to pairs
# Each prompt gets $K$ samples scored by $r^*$. Two samples of one prompt make a pair when their $r^*$
# differ (a tie carries no preference), $y_w$ the higher. A reward model $r_\phi$ is fitted to the pairs by
# Eq. 2, each pair costing $-\log\sigma(r_\phi(x,y_w)-r_\phi(x,y_l))$.

# %% [markdown]
# ### Exercise · tier 2 · Eq. 2 on the pairs of $K$ scored samples
# Graded against the library on random score tables with ties in $r^*$ and in the scores.
#
# <details><summary>Hint 1</summary>Two tables of shape (P, C(K, 2)), one of r* differences and one of score
# differences, one column per pair j &lt; k of the same prompt, hold everything you need.</details>
# <details><summary>Hint 2</summary>
#
# For samples $j<k$ of prompt $p$ with $r^*_{pj}\ne r^*_{pk}$:
# $u=\mathrm{sign}(r^*_{pj}-r^*_{pk})\,(s_{pj}-s_{pk})$ is $s(y_w)-s(y_l)$, and the loss is the mean of
# $\log(1+e^{-u})$ over those pairs. `np.triu_indices(K, k=1)` lists every $j<k$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# j, k = np.triu_indices(rstar.shape[1], k=1)
# gap = rstar[:, j] - rstar[:, k]
# margin = np.sign(gap) * (scores[:, j] - scores[:, k])
# return np.logaddexp(0.0, -margin[gap != 0]).mean()
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def bt_loss_on_samples(scores: np.ndarray, rstar: np.ndarray) -> float:
    """Eq. 2's loss of a scorer on the preference pairs of P prompts with K samples each, from the scorer's
    scores and the judge's r*, both (P, K): the mean over the pairs of −log σ(score(y_w) − score(y_l))."""
    j, k = np.triu_indices(rstar.shape[1], k=1)  # every same-prompt pair j < k
    gap = rstar[:, j] - rstar[:, k]
    margin = np.sign(gap) * (scores[:, j] - scores[:, k])  # score(y_w) - score(y_l): r* says which is y_w
    return np.logaddexp(0.0, -margin[gap != 0]).mean()  # ties in r* make no pair; log(1 + e^-u) = -log σ(u)


# %%
grade(bt_loss_on_samples, lambda scores, rstar: np.logaddexp(0.0, -pair_margins(scores, rstar)[0]).mean(),
      lm_cases("heldout_scores", "heldout_rstar", numpy=True),
      hint="pair only samples of the same prompt, let r* pick y_w, and drop the pairs whose r* tie")

# %% [markdown]
# ## The classifier
# Held-out accuracy on **full test reviews** and on their **first 40 words**, about the length of a prompt
# plus a completion. (The `paper` preset's hub classifier has no such report.)

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
# **What to notice.** $r^*$ is right about 9 times in 10 on full reviews, about 3 in 4 on 40-word prefixes:
# short texts carry less evidence, and every preference label below is made on such texts.
#
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
# **What to notice.** Nearly every row is a sentiment word, but not all: "today", a word with no sentiment
# of its own, is among the strongest positive n-grams, and it pays a policy just as well.
#
# $r^*$ of a few hand-written texts: a bag of n-grams weighs words, not syntax.

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
# **What to notice.** The single word "great" scores higher than the whole glowing review, and "I expected
# to love it, but it was bad" lands near the neutral fact about Canada: it reads "love" and "bad", not the
# "but". A short text is decided by a few strong words, exactly the kind of reward a policy can please
# with a few words.

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
# **What to notice.** $r^*$ is a continuous probability, so ties (and with them dropped pairs) are rare:
# the counts above say how many of the candidate pairs were kept.
#
# How much does $y_w$ beat $y_l$ by?

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
# **What to notice.** The histogram is tallest at 0 and falls steadily: a tenth of the pairs differ by less
# than the `q0.1` quantile printed above, where the label says more about the classifier's noise on short
# texts than about sentiment. DPO weighs every pair the same a priori; its gradient weight
# $\sigma(\hat r_l-\hat r_w)$ (notebook 01) then focuses on the pairs it still ranks wrongly.

# %% [markdown]
# ### The 4 samples of each prompt
# Every sample is stored with its $r^*$ beside the pairs (ties included). $r^*$ reads the prompt too, so a
# prompt like "This film is awful" drags all its samples down. Such a per-prompt offset $f(x)$ cancels in
# every comparison (Eq. 1, and $\beta\log Z(x)$ in Eq. 6): pairs carry no information about it, which is why
# DPO never needs $Z(x)$.

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
# **What to notice.** The prompts' means (the rising line) cover almost all of $[0, 1]$, and the printed
# split says over a third of the reward's variance lies between prompts: pairs never see it. The rest, the
# spread of the grey bars within one prompt, is all that the pairs, and DPO, can learn from.
#
# ### Eq. 2 with $r^*$ itself as the reward model
# $r^*$ wrote every label, so it ranks all its pairs right. **Predict first:** what is Eq. 2's loss of
# $r^*$ used as $r_\phi$, and of $10\,r^*$, $100\,r^*$, $1000\,r^*$? Does it approach a floor? Write your
# answers down, then run the cell.

# %%
rstar_table = np.array(candidates["rewards"])  # (prompts, samples): the r* of every stored sample
for scale in (1, 10, 100, 1000):
    print(f"Eq. 2 loss of {scale:4d} r*: {bt_loss_on_samples(scale * rstar_table, rstar_table):.4f}")

# %% [markdown]
# **What to notice.** $r^*$ itself pays a loss not far below $\log 2 = 0.6931$: its gaps are fractions of
# a unit, and Eq. 2 wants margins of several units. Scaling it up only lowers the loss, towards 0: the
# labels are argmax labels, never noisy, so Bradley–Terry's likelihood has no finite maximum and says nothing
# about the reward's scale. Fitted to such data, $r_\phi$ (and DPO's implicit reward, notebook 09) keeps
# growing its margins for as long as it trains.

# %% [markdown]
# ### Example pairs
# From the smallest reward gap to the largest. Watch the texts: which words made $y_w$ win?

# %%
picks = np.argsort(gaps)[np.linspace(0, len(gaps) - 1, n_show).round().astype(int)]
examples = table.iloc[picks][["prompt", "chosen", "chosen_reward", "rejected", "rejected_reward"]]
display(examples.round(3).reset_index(drop=True))

# %% [markdown]
# **What to notice.** Both sides of every pair are word salad from notebook 03's model: a pair compares
# which words appear, never quality. The first pair's gap is too small to show at three decimals, and its
# label is noise. In the last row the rejected sample contains "the worst", one of the strongest negative
# n-grams of the table above.
