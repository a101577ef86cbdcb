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
# # 07 · The reward–KL frontier: DPO against PPO and the baselines
#
# The paper's Fig. 2 (left) is one plot: for every run of every method, each evaluation checkpoint becomes a
# point (mean sequence-level KL to $\pi_{\rm ref}$, mean ground-truth reward $r^*$ on held-out test
# prompts). A method is better when its points sit **up and to the left**: more reward for the same
# departure from the reference. The claim is that DPO's frontier dominates PPO's, even PPO with the true
# reward (PPO-GT): counting the points on the paper's figure, DPO beats 26 of 27, 28 of 29 and 34 of 35
# points of its three PPO-family series, in both reward and KL at once (the paper states no count).
#
# This notebook first reads a frontier by hand on a few points, then draws the real one: every run of
# notebooks 05–06 (DPO β, Unlikelihood α, Preferred-FT seeds, PPO and PPO-GT target KLs), trained once by
# `pipeline.frontier` or `python -m dpo_lab reproduce` and read back from their `metrics.jsonl` files. The
# outputs are the `cpu` preset's, seed 0; what a run costs is in the README, "Running the notebooks".

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, every run and every evaluation
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
methods: list[str] = []  # methods on the plot, e.g. ["DPO", "PPO"]; [] plots all five (pipeline.METHODS)

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import frontier, pipeline
from dpo_lab.grading import grade
from dpo_lab.plots import plot_frontier, plot_reward_vs_cost, upper_envelope
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 120)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
shown_methods = tuple(methods) or pipeline.METHODS
print(f"preset {config.name!r}; methods {list(shown_methods)}")

# %% [markdown]
# ## Reading a frontier by hand
# Two questions turn a cloud of points into a verdict. First, a method's **upper envelope**: the points no
# other point of the same method beats on both axes, i.e. for which no other point has lower-or-equal KL and
# higher reward. Read as a step function, the envelope at KL $k$ is the best reward the method reached
# while staying within $k$. Second, **dominance**: how many of PPO's points does some DPO point beat on
# both axes at once, strictly lower KL *and* strictly higher reward? The paper's claim is that nearly all
# of them are beaten.
#
# **Predict first.** Five points: (KL, reward) = (3, 0.70), (1, 0.60), (2, 0.65), (1, 0.62), (4, 0.70).
# Which of them are on the envelope? Write your answer down; the check below prints it.

# %% [markdown]
# ### Exercise · tier 2 · the upper envelope
# Graded against `plots.upper_envelope`, which draws every envelope in this notebook; the table of who
# leads where, further down, is computed with your function.
#
# <details><summary>Hint 1</summary>Walk through the points in order of KL. When can a point at larger KL
# still be on the envelope?</details>
# <details><summary>Hint 2</summary>
#
# Sort by KL (and, among equal KLs, by reward from high to low). Keep a point when its reward is strictly
# higher than every reward kept so far: $r_i > \max_{j \text{ kept}} r_j$.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# order = np.lexsort((-np.asarray(reward), np.asarray(kl)))
# xs, ys = [], []
# for i in order:
#     if not ys or reward[i] > ys[-1]:
#         xs.append(float(kl[i]))
#         ys.append(float(reward[i]))
# return np.array(xs), np.array(ys)
# ```
# </details>

# %% tags=["exercise", "tier-2"]
def envelope(kl: list[float], reward: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The upper envelope of the points (kl[i], reward[i]): two float arrays, its KLs and its rewards,
    sorted by KL. A point is on it when no other point has a KL at most its own and a higher reward."""
    order = np.lexsort((-np.asarray(reward), np.asarray(kl)))  # by KL; at equal KL the best reward first
    xs: list[float] = []
    ys: list[float] = []
    for i in order:
        if not ys or reward[i] > ys[-1]:  # strictly: an equal reward at a larger KL buys nothing
            xs.append(float(kl[i]))
            ys.append(float(reward[i]))
    return np.array(xs), np.array(ys)


# %%
FEW_POINTS = {  # label -> (kl, reward): ties in KL and in reward, and points out of order
    "the five points above": ([3.0, 1.0, 2.0, 1.0, 4.0], [0.70, 0.60, 0.65, 0.62, 0.70]),
    "already sorted, one point beaten": ([0.5, 1.0, 2.0, 3.0], [0.55, 0.60, 0.58, 0.70]),
    "each point worse than the last": ([4.0, 3.0, 2.0, 1.0], [0.5, 0.6, 0.7, 0.8]),
}
grade(envelope, upper_envelope, FEW_POINTS, hint="keep a point only if its reward beats every reward at a smaller KL")
kl_env, r_env = envelope(*FEW_POINTS["the five points above"])
print("the five points' envelope, (KL, reward):", [(float(k), float(r)) for k, r in zip(kl_env, r_env, strict=True)])

# %% [markdown]
# ### Exercise · tier 1 · dominance
# Graded against `frontier.dominance`, which counts the table further down.
#
# <details><summary>Hint 1</summary>Take their points one at a time and ask whether any of ours beats
# it.</details>
# <details><summary>Hint 2</summary>
#
# Their point $j$ counts when $\exists i:\ \mathrm{KL}^{\rm ours}_i < \mathrm{KL}^{\rm theirs}_j$ and
# $r^{\rm ours}_i > r^{\rm theirs}_j$, both strict.
#
# </details>
# <details><summary>Solution</summary>
#
# ```python
# ok, orw = np.asarray(ours_kl), np.asarray(ours_reward)
# return sum(bool(np.any((ok < k) & (orw > r))) for k, r in zip(theirs_kl, theirs_reward))
# ```
# </details>

# %% tags=["exercise", "tier-1"]
def beaten(ours_kl: list[float], ours_reward: list[float], theirs_kl: list[float],
           theirs_reward: list[float]) -> int:
    """How many of their points (theirs_kl[j], theirs_reward[j]) are beaten on both axes at once by at
    least one of our points: strictly lower KL and strictly higher reward."""
    ok, orw = np.asarray(ours_kl), np.asarray(ours_reward)
    return sum(bool(np.any((ok < k) & (orw > r))) for k, r in zip(theirs_kl, theirs_reward, strict=True))


# %%
def library_beaten(ours_kl, ours_reward, theirs_kl, theirs_reward):
    """frontier.dominance on the same points, labelled DPO (ours) and PPO (theirs), all after step 0."""
    points = pd.DataFrame({"method": ["DPO"] * len(ours_kl) + ["PPO"] * len(theirs_kl), "step": 1,
                           "kl_mean": [*ours_kl, *theirs_kl], "reward_mean": [*ours_reward, *theirs_reward]})
    return frontier.dominance(points)[0]


FEW_PAIRS = {  # label -> (ours_kl, ours_reward, theirs_kl, theirs_reward)
    "one beaten, one tied in KL, one tied in reward": ([1.0, 3.0], [0.6, 0.8], [2.0, 3.0, 4.0], [0.5, 0.7, 0.8]),
    "ours all to the right": ([5.0, 6.0], [0.9, 0.95], [1.0, 2.0], [0.5, 0.6]),
    "one of theirs beaten by two of ours": ([1.0, 2.0, 3.0], [0.6, 0.7, 0.8], [1.5, 2.5, 3.5], [0.55, 0.65, 0.65]),
}
grade(beaten, library_beaten, FEW_PAIRS, hint="strict on both axes: a tie in KL or in reward beats nothing")

# %% [markdown]
# ## Every run of every method
# One row per evaluation point: the run (`method`, `hyperparameter`), its `step` (0 = the SFT policy every
# run starts from), the mean reward and mean KL with their standard errors over test prompts.

# %%
points = pipeline.frontier(config, shown_methods)
display(points[["method", "hyperparameter", "step", *frontier.EVAL_COLUMNS]].head(8).round(4))

# %% [markdown]
# The shape of the sweep (runs per method, evaluation points per method) follows from the preset alone:

# %%
shape = points.groupby("method", sort=False).agg(runs=("hyperparameter", "nunique"), points=("step", "size"))
print(shape.to_string())

# %% tags=["nbval-check-output"]
wanted = pd.Series([m for m, _ in pipeline.frontier_runs(config, shown_methods)]).value_counts(sort=False)
print("one run per value of each method's sweep:", shape.runs.to_dict() == wanted.to_dict())
print("every run evaluated at its start and at its last step:",
      all(run.step.min() == 0 and run.step.max() > 0 for _, run in points.groupby(["method", "hyperparameter"])))
start = points[points.step == 0]
assert np.allclose(start.kl_mean, 0.0, atol=1e-6), "every run starts at pi_ref: KL 0"
assert start.reward_mean.nunique() == 1, "every run starts from the same SFT policy and evaluation samples"
print(f"SFT start: every run's step-0 point is the same policy (KL {abs(start.kl_mean.max()):.1f})")

# %% [markdown]
# ## The frontier
# Each dot is one checkpoint; the star is the shared start $\pi^{\rm SFT}$; each method's step line is its
# **upper envelope** (the points no other point of the same method beats on both axes).

# %%
title = f"IMDb sentiment, preset '{config.name}': reward vs KL"
fig = plot_frontier(points, figures_dir() / "07_frontier.png", title=title)
plt.show()

# %% [markdown]
# **What to notice.** Unlikelihood and Preferred-FT stay in the bottom-left corner, near the star: their
# runs end at small KL (the per-run table below gives each final KL). DPO's, PPO's and PPO-GT's envelopes
# climb together and cross each other more than once; no colour lies above the others everywhere. So the
# question is not "which is higher" but "which is higher at which KL", which the next cell answers.
#
# ## Who leads where
# The envelope read as a step function (your `envelope` above) gives each method's best $r^*$ within a KL
# budget $k$. On a grid of budgets 0.25 apart, up to the largest KL that every method reached, the cell
# prints the stretches of KL over which each method's best is the highest, under $r^*$ and, where the runs
# were scored by it, under the audit classifier (README, "The audit": a judge that no run optimises).

# %%
def lead_stretches(points: pd.DataFrame, score: str, methods=("DPO", "PPO", "PPO-GT"), step=0.25) -> pd.DataFrame:
    """Stretches of KL budget over which one method's best ``score`` (its envelope's step function) is the highest."""
    trained = points[(points.step > 0) & points.method.isin(methods)]
    runs = {m: envelope(list(g.kl_mean), list(g[f"{score}_mean"])) for m, g in trained.groupby("method", sort=False)}
    budgets = np.arange(step, min(kl.max() for kl, _ in runs.values()) + step / 2, step)
    best = pd.DataFrame({m: [r[kl <= k].max(initial=-np.inf) for k in budgets] for m, (kl, r) in runs.items()},
                        index=budgets)
    leader = best[best.max(axis=1) > -np.inf].idxmax(axis=1)
    starts = leader[leader.ne(leader.shift())]
    ends = [*starts.index[1:], None]
    return pd.DataFrame({"KL from": starts.index, "to": [f"{e:g}" if e else f"{budgets[-1]:g} (end)" for e in ends],
                         "leader": starts.to_numpy()})


for score in ("reward", "audit_sentiment"):
    if f"{score}_mean" in points and {"DPO", "PPO", "PPO-GT"} <= set(points.method):
        print(f"under {score}:\n{lead_stretches(points, score).to_string(index=False)}\n")

# %% [markdown]
# **What to notice.** Check each stretch against the figure: where the printed leader changes, two step
# lines cross. Under $r^*$ the lead changes hands several times in the lower half of the KL range and one
# method keeps it over the last, longest stretch; under the audit PPO, with the learned reward, also leads
# stretches at larger KL. A stretch of a quarter nat or two often rests on one evaluation point: treat it
# as a tie, not a win.

# %% [markdown]
# ## What each run spent
# A frontier compares outcomes; a fair comparison also compares budgets. Every run logs running totals of
# what it cost (`frontier.COST_COLUMNS`): policy tokens through the forward and backward passes, samples
# drawn, reward-model queries, optimizer steps and wall seconds. The budget rule of the `cpu` preset is
# **equal policy backward tokens** for DPO and PPO (README, "The budget rule"): the policy-gradient work each
# method may do. PPO pays on top of it for sampling its rollouts and querying the reward, which DPO's fixed
# pairs already hold; the right panel shows what that costs in time.

# %%
fig = plot_reward_vs_cost(points[points.method.isin(shown_methods)], figures_dir() / "07_reward_vs_cost.png",
                          title=f"preset '{config.name}': reward against what each run spent")
plt.show()
display(frontier.summary_table(points)[["method", "hyperparameter", "steps", "reward_final", "kl_final",
                                        "policy_backward_tokens", "samples", "reward_queries", "wall_s"]]
        .groupby("method", sort=False).agg("mean", numeric_only=True).round(1))

# %% [markdown]
# **What to notice.** In the table, DPO's and PPO's `policy_backward_tokens` are close (the budget rule),
# but only the PPO rows have `samples` and `reward_queries`: DPO's pairs were sampled and scored once,
# before any run. Compare the two methods' `wall_s` in the table: that difference is what sampling
# rollouts and querying the reward cost at this scale.

# %% [markdown]
# ## Dominance: the paper's count, honestly counted
# For each PPO-family series: how many of its **distinct** evaluation points (starting checkpoints excluded;
# two runs that took the same path count once) have some DPO point with **both** strictly higher reward and
# strictly lower KL (`frontier.dominance`); and the noise-aware count, where the reward gap must exceed the
# two points' combined standard error $\sqrt{\mathrm{se}_{\rm DPO}^2 + \mathrm{se}_{\rm PPO}^2}$.

# %%
counts = frontier.dominance_counts(points[points.method.isin(shown_methods)])
display(pd.DataFrame([{"series": name, "dominated by DPO": f"{c['dominated']}/{c['total']}",
                       "share": c["share"], "beyond 1 SE": f"{c['dominated_noise_aware']}/{c['total']}"}
                      for name, c in counts.items()]).round(3))
print(f"paper: {frontier.PAPER_DOMINANCE}, about 0.97 overall")
print("(the paper's third series is TRL's PPO-GT; here the third row pools our PPO and PPO-GT points)")

# %% [markdown]
# **What to notice.** Compare the `share` column with the paper's ≈ 0.97: the count is far from "nearly
# all" for at least one series, and the noise-aware column is lower still, so part of the plain count is
# within one standard error. The count looks only one way: a series can also beat DPO points, which the
# per-run table and the stretches above show.

# %% [markdown]
# ## Per run: start, end, best
# `reward_final ± reward_final_se` and `kl_final` are the run's last checkpoint; `reward_best` its best
# evaluation. (`python -m dpo_lab reproduce` writes the same table to `figures/results_<preset>.md`.)

# %%
table = frontier.summary_table(points)
display(table.round(3))

# %% [markdown]
# **What to notice.** Each PPO-family run's `kl_final` lies near its target (the `hyperparameter`), while
# DPO's final KL is set by β: small β, large KL. Read PPO against PPO-GT at the same target: their
# `reward_final` differ by three or more `reward_final_se`, PPO-GT ahead at every target: it is the one
# optimising $r^*$, the score on this axis.

# %% [markdown]
# ## What the figure shows, and why
#
# **Read it at equal KL.** Reward alone is not the goal: Eq. 3 trades reward against
# $\mathbb D_{\rm KL}[\pi\,\|\,\pi_{\rm ref}]$, and a policy can always buy reward by drifting far from
# $\pi_{\rm ref}$ (toward repetitive, degenerate text that the classifier likes). So compare methods by
# their envelopes: at a given KL, which reaches more reward? The starting star is the same for every run.
#
# **Why DPO should sit on or above PPO's envelope.** DPO and PPO optimise the same objective, Eq. 3.
# DPO's loss (Eq. 7) fits the policy whose implied reward $\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$
# (Eq. 5) explains the preferences; its minimiser is Eq. 4's exact solution of Eq. 3 for that reward. It
# uses the data in a supervised way: exact log-probabilities of fixed pairs, a low-variance gradient, no
# sampling, no critic. PPO reaches for the same optimum through estimates: every step it samples one
# completion per prompt, scores it, and follows a policy gradient whose advantage comes from a value head
# that is still learning (notebook 06). §5.2 of the paper names the cause: the normaliser of Eq. 10, the
# soft value function of $\pi_{\rm ref}$, has to be estimated, and without a good estimate the gradient has
# high variance. The KL penalty, too, is estimated from the same few samples, and the adaptive β moves while
# the policy trains, so PPO's points scatter below the trade-off it could reach in principle. PPO with the
# learned reward adds one more error: $r_\phi$ ranks some pairs wrongly (its validation accuracy, notebook
# 06), and PPO optimises those mistakes too. PPO-GT removes that error with the oracle $r^*$; in the paper
# DPO still dominates it, which points at the optimisation, not the reward model, as PPO's handicap.
#
# **The baselines.** Preferred-FT only imitates the chosen completions, and a chosen completion is often
# barely better than its rejected twin: in the paper its points stay near the start, with little reward
# gained. Unlikelihood pushes the rejected tokens down with no anchor to $\pi_{\rm ref}$: it can gain
# reward, but no knob of its loss controls the KL it pays for it.
#
# **What the `cpu` figure above shows** (one seed, after DPO and both PPOs were tuned on validation
# prompts; README, "The CPU reproduction"). The paper's ordering does not appear: the stretches printed
# above give DPO the lead only in the lower half of the KL range and PPO-GT the high-KL end, and the
# dominance table counts far fewer beaten PPO-GT points than the paper's. What the evidence supports, and
# what it does not:
# * *Not a budget cut-off.* DPO was still climbing: four of its five runs end at their best reward
#   (`reward_best` in the per-run table), β = 5 within one standard error of it. Runs with twice the budget
#   (README, "Past the cut-off") move DPO *along* its frontier, to larger KL, not above it, while PPO-GT's
#   controller holds its KL near the target and spends the extra steps on reward: the high-KL gap grows.
# * *The judge matters.* PPO-GT optimises $r^*$, the score on the y axis; PPO optimises $r_\phi$, which
#   orders held-out pairs less well than $r^*$ (notebook 06). Under the audit classifier, which no run
#   optimises, PPO's points move up relative to DPO's (the audit rows of the stretches above).
# * *Not settled by one seed.* Which of the paper's causes (§5.2: PPO's estimated normaliser and
#   high-variance gradient) is weaker at this scale, this notebook cannot say.
#
# At `smoke` the points only check the plumbing.
#
# **Across seeds.** One seed is an anecdote. The seed study (`python -m dpo_lab sweep
# sweeps/imdb_cpu_seeds.yaml`: DPO, PPO and PPO-GT at seeds 0–4, each seed a whole new pipeline) averages
# each method's envelope over seeds, with an interval across seeds (README, "Seeds"). The figure below is
# drawn from the committed seed points (`figures/frontier_cpu_seed_points.csv`): its legend says how many
# seeds each envelope averages, and the dashed lines are the twice-the-budget runs of seed 0.
#
# ![seed envelopes](../figures/frontier_cpu_seeds.png)

# %% [markdown]
# **What to notice.** Follow the dashed red lines (DPO at twice the budget): they run to the right, past KL
# 15, and where one crosses KL 12 it lies below the green points there (PPO-GT at twice the budget, which
# climb almost straight up near KL 12); DPO reaches their height only further right. More budget moved DPO
# along its frontier, not above PPO-GT's. Check whether the audit panel on the right tells the same story.
