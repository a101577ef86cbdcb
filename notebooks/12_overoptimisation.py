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
# # 12 · Lab: optimising a proxy reward. When does the gold reward turn down?
#
# The outputs are the `cpu` preset's, seed 0; what a run costs is in the README, "Running the notebooks".
#
# In RLHF the policy never sees the reward people care about (here r*, the **gold** reward). It sees a
# **proxy**: a reward model $r_\phi$ fit to a finite set of preferences. Optimising a proxy hard enough makes
# the proxy go up while the gold reward stops following and, past some KL, falls: Goodhart's law, measured by
# Gao et al. (2022, "Scaling laws for reward model overoptimization") for RL and best-of-n, and by Rafailov
# et al. (2024, arXiv 2406.02900) for DPO and its relatives, both at GPU scale with synthetic gold rewards.
# This lab runs the same experiment on IMDb, where the gold reward is the classifier r* and the proxy is
# notebook 06's $r_\phi$ (the reward that the frontier's PPO optimises):
#
# * **DPO on $r_\phi$'s labels**: the preference stage's samples, each pair ordered by $r_\phi$ instead of
#   r*, over a β sweep that reaches large KL;
# * **DPO on r*'s labels** at the smallest β: does DPO's own gold reward turn down without any proxy?
# * **PPO against $r_\phi$** with a fixed, small KL coefficient, so that nothing stops it from climbing.
#
# Every evaluation scores the same samples with both rewards.

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the pairs, r_phi, every run and every evaluation
overrides: dict = {}  # dotted preset overrides for every run, e.g. {"dpo.max_steps": 100}
proxy_betas: list[float] = [0.01, 0.05, 0.1]  # DPO on r_phi's labels: one run per beta
gold_beta: float = 0.01  # DPO on r*'s labels at this beta, with r_phi read beside r* (0: skip)
dpo_eval_every: int = 0  # steps between evaluations of the DPO runs here; 0: a tenth of dpo.max_steps
ppo_kl_coefs: list[float] = [0.01, 0.05]  # PPO against r_phi with this fixed KL coefficient, one run each
ppo_steps: int = 0  # PPO steps of each run; 0: twice the frontier's ppo.max_steps
peak_margin_se: float = 2.0  # the gold reward "turned down" if its final point is this many SEs below its peak

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import labs, pipeline
from dpo_lab.frontier import evaluation_points
from dpo_lab.plots import METHOD_COLORS, plot_proxy_and_gold
from dpo_lab.preferences import score_samples
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.reward_model import split_by_prompt
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 140)
started = time.perf_counter()
config = get_preset(preset, seed=seed, **overrides)
dpo_eval_every = dpo_eval_every or max(1, config.dpo.max_steps // 10)
ppo_steps = ppo_steps or 2 * config.ppo.max_steps
dpo_config = get_preset(preset, seed=seed, **{**overrides, "dpo.eval_every": dpo_eval_every})
seed_everything(config.seed)
print(f"preset {config.name!r}: DPO {config.dpo.max_steps} steps (evaluated every {dpo_eval_every}), "
      f"PPO {ppo_steps} steps at KL coefficients {ppo_kl_coefs}")

# %% [markdown]
# ## The proxy and its labels
# $r_\phi$ is the SFT transformer with a scalar head, fit by the Bradley–Terry loss (Eq. 2) to the pairs of
# 80% of the train prompts; 10% are its validation prompts (its checkpoint is chosen there) and 10% its test
# prompts (notebook 06). Relabelling means: score each of a prompt's 4 samples with $r_\phi$ and order every
# pair by that score instead of by r*. The next cell writes out how often the two labellers agree,
# separately on the prompts $r_\phi$ was fit to and on its held-out (validation and test) prompts, and
# checks the total against the library's count.

# %%
r_phi = pipeline.learned_reward(config)  # trained here if notebook 06 has not (progress bars in this cell)
proxy_pairs, proxy_stats = labs.proxy_preference_data(config)
candidates = pipeline.preference_candidates(config)
gold_pairs, _ = pipeline.preference_data(config)

# %% tags=["nbval-check-output"]
proxy_scores = score_samples(r_phi, candidates["prompts"], candidates["completions"])  # r_phi(x + y)
_, val_idx, test_idx = split_by_prompt(gold_pairs["prompt"], config.reward_model.val_fraction, config.seed)
val_prompts = {gold_pairs["prompt"][i] for i in val_idx + test_idx}

agree = {"fit": [], "validation": []}
for prompt, texts, gold, proxy in zip(candidates["prompts"], candidates["completions"], candidates["rewards"],
                                      proxy_scores, strict=True):
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            if texts[a] and texts[b] and texts[a] != texts[b] and proxy[a] != proxy[b]:
                same = 0.5 if gold[a] == gold[b] else float((gold[a] > gold[b]) == (proxy[a] > proxy[b]))
                agree["validation" if prompt in val_prompts else "fit"].append(same)
overall = sum(map(sum, agree.values())) / sum(map(len, agree.values()))
print("written out == library:", abs(overall - proxy_stats["agreement_with_r_star"]) < 1e-12)
assert abs(overall - proxy_stats["agreement_with_r_star"]) < 1e-12

# %%
print(f"r_phi's relabelled pairs: {len(proxy_pairs)} (r*'s: {len(gold_pairs)})")
for split, values in agree.items():
    print(f"  r_phi agrees with r* on {np.mean(values):.3f} of the {len(values)} pairs of its {split} prompts")
print(f"  overall {overall:.3f}; r_phi's best validation accuracy in training: "
      f"{r_phi.report['best_val_accuracy']:.3f}")

# %% [markdown]
# The proxy labels are mostly right on the samples $r_\phi$ was fit to, and much less right on samples it
# has not seen. DPO trains on all 9,000 relabelled pairs, fixed before it starts: 7,122 from prompts $r_\phi$
# was fit to and 1,878 from its held-out prompts, so most of its labels are of the first kind. PPO asks
# $r_\phi$ about every new sample its policy draws, which drift away from anything $r_\phi$ was fit to as the
# KL grows.
#
# ## The runs
# Every run is cached like the frontier's (`dpo_lab/labs.py`: `lab_dpo`, `lab_ppo`), keyed by its pairs,
# its start and its settings, and evaluated on the frontier's held-out test prompts: mean r*, mean $r_\phi$
# on the same samples, and the exact sequence KL to $\pi_{\rm SFT}$.

# %%
ppo_config = {c: get_preset(preset, seed=seed, **{**overrides, "ppo.init_kl_coef": c, "ppo.max_steps": ppo_steps})
              for c in ppo_kl_coefs}
runs = {f"DPO, r_phi labels, beta={b:g}": labs.lab_dpo(dpo_config, proxy_pairs, b, proxy=True)
        for b in proxy_betas}
if gold_beta != 0:  # a negative beta is refused by the trainer, by name
    runs[f"DPO, r* labels, beta={gold_beta:g}"] = labs.lab_dpo(dpo_config, gold_pairs, gold_beta, proxy=True)
runs |= {f"PPO vs r_phi, kl_coef={c:g}": labs.lab_ppo(ppo_config[c], None) for c in ppo_kl_coefs}
points = pd.concat([evaluation_points(r.metrics_path, run=name) for name, r in runs.items()], ignore_index=True)
points.insert(0, "method", ["PPO" if n.startswith("PPO") else "DPO" for n in points.run])
reference = pipeline.frontier(config, ("DPO",))  # the frontier's DPO runs: r*'s labels, gold reward only
print(f"{len(runs)} runs, {len(points)} evaluation points; loaded or trained in "
      f"{time.perf_counter() - started:.0f} s since the start")

# %% [markdown]
# ## Proxy and gold against KL
# Left: the gold reward r* of every evaluation point, with the upper envelope of the frontier's DPO sweep
# (r*'s own labels) in grey for reference. Right: what the proxy $r_\phi$ says about the same samples (its
# scale is its own: a logit, shifted so the SFT samples score about 0). Error bars: one standard error over
# test prompts.

# %%
palette = plt.cm.Reds(np.linspace(0.45, 0.9, len(proxy_betas))).tolist() + ["tab:green"] * (gold_beta != 0) \
    + plt.cm.Blues(np.linspace(0.5, 0.9, len(ppo_kl_coefs))).tolist()
METHOD_COLORS.update(dict(zip(runs, palette, strict=True)))
fig = plot_proxy_and_gold(points, figures_dir() / "12_overoptimisation.png", reference=reference,
                          title=f"Optimising r_phi, {config.name} preset: proxy up, gold?")
plt.show()

# %% [markdown]
# **What to notice.** Follow one run's dots left to right in both panels at once: overoptimisation is the
# right panel still rising while the left one falls. Check whether any run shows that, and whether the
# runs that end lower in the left panel (gold) also fall in the right one (proxy): if both fall together,
# the policy is leaving the data, not exploiting the proxy. The grey DPO envelope marks what r*'s own
# labels reach at each KL.

# %% [markdown]
# ## Where is the gold reward highest?
# Per run: the gold reward's peak, where it was reached, and the final point; "turned down" means the final
# gold reward is more than `peak_margin_se` combined standard errors below the peak, so a dip inside the
# noise does not count. `proxy gain` is how much the proxy rose over the run.

# %%
def peak_row(run: pd.DataFrame) -> dict:
    run = run.sort_values("step")
    peak, last, first = run.loc[run.reward_mean.idxmax()], run.iloc[-1], run.iloc[0]
    drop = peak.reward_mean - last.reward_mean
    noise = float(np.hypot(peak.reward_se, last.reward_se))
    return {"gold_peak": peak.reward_mean, "kl_at_peak": peak.kl_mean, "step_at_peak": int(peak.step),
            "gold_final": last.reward_mean, "kl_final": last.kl_mean, "drop_in_se": drop / noise,
            "turned_down": bool(drop > peak_margin_se * noise),
            "proxy_gain": last.proxy_reward_mean - first.proxy_reward_mean}


table = pd.DataFrame({name: peak_row(run) for name, run in points.groupby("run", sort=False)}).T
display(table.round(3))

# %% [markdown]
# **What to notice.** `turned_down` is True only where `drop_in_se` exceeds `peak_margin_se`; a run whose
# `step_at_peak` is its last step was still climbing when it stopped. Compare `kl_at_peak` across the runs:
# the smaller β or KL coefficient, the further right the gold reward peaks.

# %% [markdown]
# ## What the policies write
# Numbers hide what happened to the text. The cell samples one completion of the same three test prompts
# from each run's final policy (temperature 1, as the evaluation samples) and scores it with both rewards.

# %%
_, tokenizer, _ = pipeline.sft_policy(config)
reward, _ = pipeline.reward_model(config)
shown = labs.final_samples(config, runs, tokenizer, 3, {"r*": reward, "r_phi": r_phi})
for i, row in enumerate(shown):
    if i == 0 or row["run"] != shown[i - 1]["run"]:
        print(f"--- {row['run']}")
    print(f"  r* {row['r*']:.2f}  r_phi {row['r_phi']:+5.2f}  {row['text'][:150]!r}")

# %% [markdown]
# ## How far past the peak? Gao et al.'s functional form
# Gao et al. found that for RL the gold reward, as a function of $d=\sqrt{\mathrm{KL}}$, follows
# $R(d)-R(0)=d\,(\alpha-\beta_{\rm G}\log d)$. Where $\beta_{\rm G}>0$ it has a single peak, at
# $\log d^*=\alpha/\beta_{\rm G}-1$, i.e. at $\mathrm{KL}^*=e^{2(\alpha/\beta_{\rm G}-1)}$. The cell fits
# $(\alpha,\beta_{\rm G})$ to each PPO run's points by least squares (two columns, $d$ and $-d\log d$), in
# a few lines of numpy.

# %%
def gao_fit(run: pd.DataFrame) -> dict:
    run = run[run.step > 0]
    d = np.sqrt(run.kl_mean.to_numpy())
    gain = run.reward_mean.to_numpy() - points[points.step == 0].reward_mean.mean()
    (alpha, beta_g), *_ = np.linalg.lstsq(np.stack([d, -d * np.log(d)], axis=1), gain, rcond=None)
    fitted = d * (alpha - beta_g * np.log(d))
    peak_kl = float(np.exp(2 * (alpha / beta_g - 1))) if beta_g > 0 else float("inf")
    return {"alpha": alpha, "beta_G": beta_g, "fitted_peak_kl": peak_kl, "kl_reached": run.kl_mean.max(),
            "rms_residual": float(np.sqrt(np.mean((gain - fitted) ** 2)))}


fits = pd.DataFrame({name: gao_fit(run) for name, run in points.groupby("run", sort=False)
                     if name.startswith("PPO") and (run.step > 0).sum() >= 3}).T
display(fits.round(3))

# %% [markdown]
# ## Reading the lab
# What the `cpu` run shows (seed 0; KL to $\pi_{\rm SFT}$, r* ± one SE over 256 test prompts):
#
# * **The proxy's labels are mostly right where DPO uses them** (0.858 of all 9,000 pairs): $r_\phi$ agrees
#   with r* on 0.893 of the pairs of its fit prompts and on 0.723 of its held-out prompts' pairs, and 7,122
#   of DPO's pairs are of the first kind. At β = 0.1 and 0.05 DPO on those labels is still near its gold
#   peak at step 250 (`step_at_peak` 250 and 225, `drop_in_se` 0.0 and 1.162026): no turn-down. At β = 0.1
#   its last point lies on or just above the grey envelope of DPO on r*'s labels (left panel), so at this
#   seed the wrong labels cost no visible gold reward at equal KL.
# * **At β = 0.01 the KL runs away, with either labeller, but the gold reward does not turn down** by the
#   table's rule. Both runs end past KL 50 (`kl_final`) below the gold that β = 0.05 and 0.1 reach at far
#   less KL. On r*'s labels the gold peaks at step 125 (KL 27.306043), falls in the left panel as the KL
#   grows, and is back near its peak at the last point (`drop_in_se` 0.285096); on $r_\phi$'s labels the
#   last point is the peak. The samples above repeat one word ("with with with", "the the the"): with a
#   small β, DPO's loss keeps rewarding a lower likelihood of the rejected completions, and the freed mass
#   goes to completions the pairs never covered (notebook 09's finding at scale).
# * **PPO against $r_\phi$ does not turn down within the KL it reaches.** With a fixed KL coefficient of
#   0.01 its gold peaks at step 90 and its last point is 1.973561 combined SE lower, inside the table's
#   margin, at a KL that stops near 20 (`kl_reached` 20.084); at 0.05 it peaks at step 110 and its last
#   point dips less (`drop_in_se`).
#   Gao et al.'s form fits both with $\beta_{\rm G}<0$, a curve with no peak. The samples show why: PPO
#   writes "great ... great" spam, which the proxy loves and so does r*, a bag-of-words classifier that
#   rewards the same words. Here the gold reward is as easy to game as the proxy, in the same direction, so
#   the gap Gao et al. measure (with a much larger gold model) cannot open. A gold reward that reads fluency
#   as well as sentiment (the `paper` preset's siebert RoBERTa, or people) is what this lab would need to
#   see it.
#
# One seed, and one run per setting: each curve is one trajectory, and the turning points are as noisy as
# the error bars say.

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
