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
# # 10 · Lab: estimating KL(π ‖ π_ref) from samples
#
# Every frontier point of notebooks 05–07 has a KL coordinate, and every PPO step pays a KL penalty. Neither
# can be computed exactly: $\mathrm{KL}(\pi(\cdot|x)\,\|\,\pi_{\rm ref}(\cdot|x))$ is a sum over all
# completions. It is *estimated* from completions $y\sim\pi(\cdot|x)$, and there are several estimators:
# the three of Schulman (2020, "Approximating KL divergence"), called $k_1$, $k_2$, $k_3$, and the one this
# project reports (paper footnote 3, `docs/design.md`): the sum over the completion's steps of the **exact**
# per-step KL over the vocabulary. This lab puts them side by side on policies of the frontier (DPO runs
# and a PPO-GT run, trained by notebooks 05–07 or loaded if they finished before): their bias and their
# variance as the number of samples grows, and how common sampling settings (top-k, top-p, a minimum
# length, dropping EOS) make the *reported* KL wrong, even negative.
#
# The outputs are the `cpu` preset's, seed 0; what a run costs is in the README, "Running the notebooks".

# %% tags=["parameters"]
from dpo_lab.presets import default_preset_name

preset: str = default_preset_name()  # smoke | cpu | paper ($DPO_LAB_PRESET overrides the default)
seed: int = 0  # seeds the SFT policy, the runs and every sample drawn here
overrides: dict = {}  # dotted preset overrides, e.g. {"dpo.lr": 1e-5}; an unknown key or wrong type is an error
runs: list[str] = []  # frontier runs as "METHOD VALUE", e.g. ["DPO 0.1", "PPO-GT 6"]; [] picks DPO at the smallest and largest beta and PPO-GT at the middle target KL
n_prompts: int = 40  # held-out test prompts (at most the preset's eval.n_prompts)
samples_per_prompt: int = 8  # completions drawn from each policy for each prompt
max_new_tokens: int = 0  # longest completion; 0 keeps the preset's eval.max_new_tokens
n_bootstrap: int = 300  # bootstrap draws per sample size in the bias and variance figure
settings_run: str = ""  # the run sampled with the altered settings, as in runs; "" takes the first run
top_k: int = 50  # top-k of the altered settings (HF generate's default when nobody turns it off)
top_p: float = 0.9  # top-p (nucleus) of the altered settings
min_new_tokens: int = 0  # minimum length of the altered settings; 0 means max_new_tokens (EOS never allowed)

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab import pipeline
from dpo_lab.batching import pad_rows
from dpo_lab.kl_estimators import ESTIMATORS, drop_eos, kl_estimates, sample_with_settings, token_estimators
from dpo_lab.logprobs import forward_logits, token_logprobs
from dpo_lab.presets import figures_dir, get_preset
from dpo_lab.run import load_policy
from dpo_lab.sampling import sample
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()  # transformers' weight-loading bars would bury the outputs
pd.set_option("display.width", 130)
config = get_preset(preset, seed=seed, **overrides)
seed_everything(config.seed)
length = max_new_tokens or config.eval.max_new_tokens
min_length = min_new_tokens or length
if not runs:
    betas, targets = sorted(config.dpo.betas), config.ppo.target_kls
    runs = [f"DPO {betas[0]:g}", f"DPO {betas[-1]:g}", f"PPO-GT {targets[len(targets) // 2]:g}"]


def parse_run(text: str) -> tuple[str, float]:
    """Parse "DPO 0.1" into ("DPO", 0.1); an unknown method is an error naming the known ones."""
    method, value = text.split()
    pipeline.hyperparameter_name(method)
    return method, float(value)


studied = [parse_run(r) for r in runs]
chosen = parse_run(settings_run) if settings_run else studied[0]
assert chosen in studied, f"settings_run {settings_run!r} is not one of the runs {runs}"
label = {(m, v): f"{m} {pipeline.hyperparameter_name(m)}={v:g}" for m, v in studied}
print(f"preset {config.name!r}: runs {list(label.values())}; {length} new tokens at most")

# %% [markdown]
# ## Four estimators of one KL
# Write $y=(y_1,\dots,y_T)$ for a completion of prompt $x$, $p_t=\pi(y_t|x,y_{<t})$ and
# $q_t=\pi_{\rm ref}(y_t|x,y_{<t})$ for the probabilities of the token that was sampled, and
# $\log r_t=\log q_t-\log p_t$. By the chain rule, $\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}=-\sum_t\log r_t$,
# and the quantity we want is
# $$\mathrm{KL}\big(\pi(\cdot|x)\,\|\,\pi_{\rm ref}(\cdot|x)\big)=\mathbb E_{y\sim\pi}\Big[\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}\Big].$$
#
# * **$k_1=\sum_t -\log r_t=\log\pi(y|x)-\log\pi_{\rm ref}(y|x)$**, the log-ratio. Its expectation is the KL
#   by definition, so it is unbiased. One sample is negative whenever $\pi_{\rm ref}$ likes that $y$ more
#   than $\pi$ does. That happens, but those are exactly the $y$ that $\pi$ under-weights, so they are drawn
#   rarely, and in expectation the positive terms win: $\mathbb E_\pi[\log\frac{\pi}{\pi_{\rm ref}}]\ge0$
#   (Gibbs' inequality; equivalently $\mathbb E_\pi[\frac{\pi_{\rm ref}}{\pi}]=1$ and Jensen). A
#   *mean* $k_1$ below zero over many samples of $\pi$ is a bug, not noise.
# * **$k_2=\sum_t\tfrac12(\log r_t)^2$**: never negative, and with low variance, but **biased**: it is the
#   KL only to second order in $\log r$ (both are $f$-divergences with $f''(1)=1$). It is close when
#   $\pi\approx\pi_{\rm ref}$ and drifts away as they separate.
# * **$k_3=\sum_t (r_t-1)-\log r_t$**: $k_1$ plus $r_t-1$, a term of mean zero at every step,
#   $\mathbb E_{y_t\sim\pi}[r_t-1]=\sum_v\pi_{\rm ref}(v|\cdot)-1=0$ (a control variate), so it stays
#   **unbiased**; and since $\log r\le r-1$, **every token's term is $\ge0$**: no sample is negative.
# * **exact $=\sum_t\mathrm{KL}\big(\pi(\cdot|x,y_{<t})\,\|\,\pi_{\rm ref}(\cdot|x,y_{<t})\big)$**, each step's
#   KL summed over the whole vocabulary (footnote 3; what the evaluator reports). Each term is
#   the conditional expectation of $k_1$'s term given the prefix,
#   $\mathbb E[-\log r_t\,|\,x,y_{<t}]$: the token that happened to be drawn at step $t$ is averaged out.
#   Per step that is **Rao–Blackwellisation**: $\mathrm{Var}(\mathbb E[X|\mathcal F])\le\mathrm{Var}(X)$,
#   so each term keeps its mean and loses the variance of the token drawn; what remains comes from which
#   prefixes were drawn. For the whole sum the inequality is not a theorem (the token drawn at step $s$ also
#   moves the later steps' KLs, and the two can covary), but on every run of the `cpu` output below the
#   sum's variance is the smallest of the four by a wide margin. It costs nothing extra here (the logits
#   over the vocabulary are computed anyway) but needs both models' full distributions, which an API that
#   returns only sampled log-probs does not give.
#
# Summing per-token terms keeps $k_1$, $k_3$ and the exact sum unbiased for the *sequence* KL (each
# step's term has the right conditional mean given its prefix; the tower rule adds them up). All of this
# assumes $y\sim\pi$: sampled from the policy itself, at temperature 1, untruncated.
#
# The four, written out once on one batch of completions, against the library (`dpo_lab.kl_estimators`):

# %%
def estimators_by_hand(pol_logits: torch.Tensor, ref_logits: torch.Tensor, ids: torch.Tensor,
                       comp: torch.Tensor) -> dict[str, torch.Tensor]:
    """k1, k2, k3 and the exact per-step sum of each row, (B,), from both models' logits (B, T, V)."""
    logp = pol_logits[:, :-1].float().log_softmax(-1)  # log pi(v | x, y_<t) for every v: logits at t predict t + 1
    logq = ref_logits[:, :-1].float().log_softmax(-1)
    at = ids[:, 1:, None]
    log_r = (logq.gather(-1, at) - logp.gather(-1, at)).squeeze(-1).double()  # log pi_ref/pi, sampled token
    per_token = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": log_r.exp() - 1 - log_r,
                 "exact": (logp.exp() * (logp - logq)).sum(-1).double()}  # the whole vocabulary, every step
    mask = comp[:, 1:].bool()  # completion tokens only
    return {name: torch.where(mask, values, 0.0).sum(-1) for name, values in per_token.items()}


# %%
reference, tokenizer, _ = pipeline.sft_policy(config)
prompts = pipeline.prompts(config, tokenizer, "test")[:n_prompts]
pad = tokenizer.pad_token_id
policies = {run: load_policy(pipeline.result(config, *run).checkpoint_dir)[0] for run in studied}
policy = policies[studied[0]]
demo = sample(policy, tokenizer, prompts[:8], n_per_prompt=4, max_new_tokens=length, batch_size=32,
              seed=config.seed, progress=False, reference=reference)  # + the evaluator's KL and log-ratio
xs = [x for x, per in zip(demo.prompt_ids, demo.completion_ids, strict=True) for _ in per]
ys = [y for per in demo.completion_ids for y in per]
rows = pad_rows([{"input_ids": x + y, "completion_mask": [0] * len(x) + [1] * len(y)}
                 for x, y in zip(xs, ys, strict=True)], pad)
with torch.no_grad():
    pol_logits, ref_logits = (forward_logits(m, rows["input_ids"], rows["attention_mask"])
                              for m in (policy, reference))
by_hand = estimators_by_hand(pol_logits, ref_logits, rows["input_ids"], rows["completion_mask"])
lib = kl_estimates(policy, reference, xs, ys, batch_size=32, pad_token_id=pad)
for name in ESTIMATORS:
    torch.testing.assert_close(by_hand[name], torch.from_numpy(getattr(lib, name)), rtol=1e-5, atol=1e-4)
display(pd.DataFrame(lib.as_dict()).head(6).round(3))

# %% [markdown]
# The table shows the first completions of one prompt under the first run: four numbers for one KL.
# Below, the facts that hold at every preset: $k_1$ is the log-ratio the evaluator reports beside the exact
# KL (both summed by the sampler, stepping $\pi_{\rm ref}$ alongside), and the exact column is that KL; at
# $\pi=\pi_{\rm ref}$ every estimator is 0 on every sample (every $\log r_t$ is 0); $k_2$ and $k_3$ are
# non-negative on every token.

# %% tags=["nbval-check-output"]
exact_kl, logratio = np.ravel(demo.kl), np.ravel(demo.logratio)  # summed step by step while sampling
print("by hand == dpo_lab.kl_estimators, all four:",
      all(np.allclose(by_hand[name].numpy(), getattr(lib, name), rtol=1e-5, atol=1e-4) for name in ESTIMATORS))
print("k1 == the evaluator's log-ratio:", np.allclose(lib.k1, logratio, rtol=1e-4, atol=1e-4))
print("exact == the evaluator's KL:", np.allclose(lib.exact, exact_kl, rtol=1e-4, atol=1e-4))
at_ref = kl_estimates(reference, reference, xs, ys, batch_size=32, pad_token_id=pad)
print("at pi = pi_ref:", ", ".join(f"{name} {np.abs(getattr(at_ref, name)).max():.1f}" for name in ESTIMATORS))
ids, mask = rows["input_ids"], rows["completion_mask"][:, 1:].bool()
_, k2_tok, k3_tok = token_estimators(token_logprobs(pol_logits, ids), token_logprobs(ref_logits, ids))
print("k2 >= 0 and k3 >= 0 on every completion token:", bool((k2_tok[mask] >= 0).all() & (k3_tok[mask] >= 0).all()))
del pol_logits, ref_logits  # two (rows, T, vocabulary) tensors

# %% [markdown]
# ## Many samples from each policy
# For each run, `samples_per_prompt` completions of each of the `n_prompts` test prompts, drawn from the
# policy itself (`sampling.sample`: temperature 1, no top-k, no top-p), scored by all four. Per run: the
# mean of each estimator with its standard error over prompts (a prompt's samples averaged first), the
# standard deviation of one sample, how often $k_1$ is negative, and $\mathrm{Var}(k)/\mathrm{Var}(\text{exact})$:
# how many times more samples an estimator needs for the exact sum's standard error.

# %%
estimates, samples_of = {}, {}
for run, pol in policies.items():
    samples_of[run] = sample(pol, tokenizer, prompts, n_per_prompt=samples_per_prompt, max_new_tokens=length,
                             batch_size=config.eval.batch_size, seed=config.seed, progress=False)
    s = samples_of[run]
    flat_x = [x for x, per in zip(s.prompt_ids, s.completion_ids, strict=True) for _ in per]
    flat_y = [y for per in s.completion_ids for y in per]
    est = kl_estimates(pol, reference, flat_x, flat_y, batch_size=config.eval.batch_size, pad_token_id=pad)
    estimates[run] = {name: getattr(est, name).reshape(len(prompts), samples_per_prompt) for name in ESTIMATORS}


def summary(values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Mean, SE over prompts, one-sample SD and variance ratio to the exact sum, per estimator."""
    var_exact = values["exact"].var(ddof=1)
    return pd.DataFrame({name: {"mean": v.mean(), "se": v.mean(1).std(ddof=1) / np.sqrt(v.shape[0]),
                                "sd of one sample": v.std(ddof=1), "share < 0": (v < 0).mean(),
                                "var / var(exact)": v.var(ddof=1) / var_exact}
                         for name, v in values.items()}).T


table = pd.concat({label[run]: summary(values) for run, values in estimates.items()}, names=["run", "estimator"])
display(table.round(3))

# %% [markdown]
# ## Bias and variance against the number of samples
# A KL reported from $n$ samples per prompt (over the same prompts) is a random number. Resampling each
# prompt's completions (a bootstrap: $n$ of them with replacement, `n_bootstrap` times) shows how it is
# spread: the line is the mean over draws, the band ± one standard deviation. The grey line is the exact
# estimator on all samples, the best estimate of the true KL we have. Unbiased estimators centre on it
# (within its own noise); $k_2$ sits off it by its bias, which more samples do not remove; the band of each
# shrinks as $1/\sqrt n$, at a rate set by the estimator's variance.

# %%
sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= samples_per_prompt]
rng = np.random.default_rng(config.seed)
boot_rows = []
for run, values in estimates.items():
    for n in sizes:
        pick = rng.integers(0, samples_per_prompt, size=(n_bootstrap, len(prompts), n))  # one draw for all four
        for name, v in values.items():
            draws = v[np.arange(len(prompts))[None, :, None], pick].mean(axis=(1, 2))
            boot_rows.append({"run": label[run], "n": n, "estimator": name, "mean": draws.mean(),
                              "sd": draws.std(ddof=1)})
boot = pd.DataFrame(boot_rows)

colours = {"k1": "tab:blue", "k2": "tab:orange", "k3": "tab:green", "exact": "black"}
fig, axes = plt.subplots(2, len(estimates), figsize=(4.6 * len(estimates), 6.6), squeeze=False)
for col, (run, values) in enumerate(estimates.items()):
    top, bottom = axes[0][col], axes[1][col]
    top.axhline(values["exact"].mean(), color="grey", lw=3, alpha=0.4, label="exact, all samples")
    for name in ESTIMATORS:
        b = boot[(boot.run == label[run]) & (boot.estimator == name)]
        top.plot(b.n, b["mean"], marker="o", color=colours[name], label=name)
        top.fill_between(b.n, b["mean"] - b.sd, b["mean"] + b.sd, color=colours[name], alpha=0.15)
        bottom.plot(b.n, b.sd, marker="o", color=colours[name], label=name)
    first = boot[(boot.run == label[run]) & (boot.n == 1)].sd.max()
    bottom.plot(sizes, [first / np.sqrt(n) for n in sizes], color="grey", ls="--", lw=0.8, label="1/sqrt(n)")
    top.set_title(label[run])
    top.set_ylabel("estimated mean KL (nats)")
    bottom.set_ylabel("SD of the estimate (nats)")
    bottom.set_yscale("log")
    for ax in (top, bottom):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"samples per prompt (x {len(prompts)} prompts)")
axes[0][0].legend(fontsize=8)
axes[1][0].legend(fontsize=8)
fig.suptitle(f"Four estimators of KL(pi || pi_ref) over {n_bootstrap} bootstrap draws ({config.name}): "
             "mean ± 1 SD (top), SD (bottom)")
fig.tight_layout()
fig.savefig(figures_dir() / "10_bias_variance.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** In the bottom row every line falls as the samples per prompt grow, and the black exact
# sum is the lowest in every panel: summing the exact per-step KL removes the vocabulary's sampling noise. In
# the top row, some estimators' means sit above or below the grey line at every sample size (k2 for DPO
# β = 0.05, far above): bias, unlike spread, does not shrink with more samples.
#
# The same in numbers: the spread of a mean KL from one sample per prompt, and each estimator's mean minus
# the exact sum's over all samples, ± its standard error over prompts (the difference is taken per prompt
# first, so the two estimators' shared noise, which prompts were drawn, cancels).

# %%
spread = boot[boot.n == 1].pivot(index="run", columns="estimator", values="sd")[list(ESTIMATORS)]
print(f"SD of the mean KL from 1 sample per prompt ({len(prompts)} prompts):\n{spread.round(3).to_string()}")
bias = pd.DataFrame({label[run]: {name: f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(d.size):.3f}"
                                  for name in ("k1", "k2", "k3")
                                  for d in [(values[name] - values["exact"]).mean(1)]}
                     for run, values in estimates.items()}).T
print(f"\nmean of each estimator minus the exact sum's, all samples:\n{bias.to_string()}")

# %% [markdown]
# ## Settings that break the estimate
# Every estimator above assumes $y\sim\pi$. Pipelines often sample otherwise, then score
# $\log\frac{\pi(y|x)}{\pi_{\rm ref}(y|x)}$ with the full policy anyway (TRL's Training FAQ, "What is the
# concern with negative KL divergence?", lists the first two):
#
# * **top-k** (keep the $k$ most likely tokens, renormalise; HF `generate`'s default is $k=50$) and
#   **top-p** (keep the smallest set with mass $\ge p$): the samples come from a truncated $p'\ne\pi$, so
#   the mean $k_1$ is $\mathbb E_{p'}[\log\frac{\pi}{\pi_{\rm ref}}]$, which is no KL at all: it can sit
#   above or below $\mathrm{KL}(\pi\|\pi_{\rm ref})$, and below zero where $p'$ favours tokens $\pi$ likes
#   less than $\pi_{\rm ref}$ does. $k_3$ loses its unbiasedness too ($\mathbb E_{p'}[r_t-1]\ne0$), though it
#   stays $\ge0$; the exact sum stays $\ge0$ but averages over prefixes $\pi$ would not have produced.
# * **a minimum length** (`min_new_tokens`: EOS masked until then): wherever $\pi$ would have stopped, a
#   token it would not have emitted is forced; the sampled distribution is again not $\pi$. In PPO this is
#   worse than a wrong number: the policy can learn to put its mass on EOS and little on the tokens it is
#   forced to emit, which makes $k_1$ *negative* and the KL penalty a bonus.
# * **dropping EOS** (decoding with `skip_special_tokens`, then re-tokenising the text to score it): the
#   completions were sampled from $\pi$, but the term of the step that chose to stop,
#   $\log\frac{\pi(\mathrm{EOS}|\cdot)}{\pi_{\rm ref}(\mathrm{EOS}|\cdot)}$ (and that step's whole KL, for
#   the exact sum), is gone. It is applied to the very samples above (`kl_estimators.drop_eos`): only the
#   completions that sampled EOS change, so the comparison has no sampling noise.
# * **another policy's samples**, e.g. $\pi_{\rm ref}$'s, as DPO's preference pairs are (a "KL" logged on a
#   DPO batch does this): the mean $k_1$ is $\mathbb E_{\pi_{\rm ref}}[\log\frac{\pi}{\pi_{\rm ref}}]
#   =-\mathrm{KL}(\pi_{\rm ref}\|\pi)\le0$, a *negative* number whose size is the other KL.
#
# The altered samples come from HF `generate` with those settings (`kl_estimators.sample_with_settings`,
# which with no settings gives `sampling.sample(backend="generate")`'s tokens), on the same prompts, as many
# per prompt; all are scored by the policy of `settings_run` against $\pi_{\rm ref}$. The true KL is the
# exact sum over the policy's own samples.

# %%
pol = policies[chosen]
kw = dict(n_per_prompt=samples_per_prompt, max_new_tokens=length, batch_size=config.eval.batch_size,
          seed=config.seed)
altered = {f"top-k {top_k}": sample_with_settings(pol, tokenizer, prompts, **kw, top_k=top_k),
           f"top-p {top_p:g}": sample_with_settings(pol, tokenizer, prompts, **kw, top_p=top_p),
           f"min length {min_length}": sample_with_settings(pol, tokenizer, prompts, **kw,
                                                             min_new_tokens=min_length),
           "pi_ref's samples": sample(reference, tokenizer, prompts, **kw, progress=False)}
flat_x = [x for x in samples_of[chosen].prompt_ids for _ in range(samples_per_prompt)]
scored = {"pi itself (correct)": {name: v.reshape(-1) for name, v in estimates[chosen].items()}}
for name, s in altered.items():
    est = kl_estimates(pol, reference, flat_x, [y for per in s.completion_ids for y in per],
                       batch_size=config.eval.batch_size, pad_token_id=pad)
    scored[name] = {e: getattr(est, e) for e in ESTIMATORS}

# %% [markdown]
# Dropping EOS, on every studied run's own samples: only the completions that sampled EOS change, so only
# they are scored again. How much the mean moves is how often $\pi$ stops within the length cap times
# what one EOS term is worth.

# %%
eos = tokenizer.eos_token_id
eos_rows = []
for run, s in samples_of.items():
    ys = [y for per in s.completion_ids for y in per]
    dropped = drop_eos(ys, eos)
    changed = [i for i, (a, b) in enumerate(zip(ys, dropped, strict=True)) if a != b]
    no_eos = {e: v.reshape(-1).copy() for e, v in estimates[run].items()}
    if changed:
        again = kl_estimates(policies[run], reference, [flat_x[i] for i in changed],
                             [dropped[i] for i in changed], batch_size=config.eval.batch_size, pad_token_id=pad)
        for e in ESTIMATORS:
            no_eos[e][changed] = getattr(again, e)
    moved = no_eos["k1"] - estimates[run]["k1"].reshape(-1)
    eos_rows.append({"run": label[run], "completions ending in EOS": len(changed), "of": len(ys),
                     "k1 change per such completion": moved[changed].mean() if changed else float("nan"),
                     "change of mean k1": moved.mean(),
                     "change of mean exact": (no_eos["exact"] - estimates[run]["exact"].reshape(-1)).mean()})
    if run == chosen:
        scored["EOS dropped"], changed_chosen, no_eos_chosen = no_eos, changed, no_eos
display(pd.DataFrame(eos_rows).set_index("run").round(3))

# %%
scored["pi_ref's samples"] = scored.pop("pi_ref's samples")  # last in the table and the figure
true_kl = scored["pi itself (correct)"]["exact"].mean()
wrong = pd.DataFrame({setting: {**{f"mean {e}": v.mean() for e, v in values.items()},
                                "se of mean k1": values["k1"].std(ddof=1) / np.sqrt(values["k1"].size),
                                "share k1 < 0": (values["k1"] < 0).mean(),
                                "mean k1 - true KL": values["k1"].mean() - true_kl}
                      for setting, values in scored.items()}).T
print(f"{label[chosen]}: true KL(pi || pi_ref) {true_kl:.3f} (exact sum over its own samples)")
display(wrong.round(3))

# %%
fig, ax = plt.subplots(figsize=(8, 3.8))
names, width = list(scored), 0.2
for j, e in enumerate(("k1", "k3", "exact")):
    means = [scored[s][e].mean() for s in names]
    ses = [scored[s][e].std(ddof=1) / np.sqrt(scored[s][e].size) for s in names]
    bars = ax.bar(np.arange(len(names)) + (j - 1) * width, means, width, yerr=ses, capsize=2,
                  color=colours[e], label=f"mean {e}")
    for bar, m in zip(bars, means, strict=True):  # a few bars leave the axis: their value is written on
        if abs(m) > 2.5 * true_kl:
            ax.annotate(f"{m:.0f}", (bar.get_x() + width / 2, np.sign(m) * 2.4 * true_kl), ha="center",
                        va="top" if m > 0 else "bottom", fontsize=7, color="white")
ax.axhline(true_kl, color="grey", lw=3, alpha=0.4, label="true KL (exact, pi's own samples)")
low = min(0.0, *(scored[n][e].mean() for n in names for e in ("k1", "k3", "exact")))
ax.set_ylim(max(1.15 * low, -2.5 * true_kl), 2.5 * true_kl)
ax.axhline(0, color="black", lw=0.6)
ax.set_xticks(np.arange(len(names)), names)
ax.set_ylabel("reported KL (nats)")
ax.set_title(f"{label[chosen]}: the KL a pipeline reports under each sampling setting ({config.name})")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figures_dir() / "10_wrong_settings.png", dpi=120)
plt.show()

# %% [markdown]
# **What to notice.** Only the first bar samples from $\pi$ itself; every other bar is the same run's KL
# reported under a changed sampler. None of the changes alters the policy, so every bar off the grey line
# is an error of the report: top-k lifts k1 by over a third, and with $\pi_{\rm ref}$'s samples k1 turns
# negative while k3 runs off the top of the axis.

# %% tags=["nbval-check-output"]
forced = [y for per in altered[f"min length {min_length}"].completion_ids for y in per]
print("min length: no completion stops early:", all(len(y) >= min_length for y in forced))
ys_chosen = [y for per in samples_of[chosen].completion_ids for y in per]
kept = np.delete(np.arange(len(ys_chosen)), changed_chosen)
print("EOS dropped: only the completions that sampled EOS change:",
      all(ys_chosen[i][-1] == eos for i in changed_chosen)
      and np.array_equal(no_eos_chosen["k1"][kept], scored["pi itself (correct)"]["k1"][kept]))
print("k3 >= 0 on every sample of every setting:", all((v["k3"] >= 0).all() for v in scored.values()))

# %% [markdown]
# **What the `cpu` run shows** (seed 0; 40 test prompts × 8 samples of at most 32 tokens per policy; DPO
# β = 0.05 and β = 5, PPO-GT with target KL 9).
#
# * **Bias.** Against the exact sum (16.899, 2.813 and 10.531 nats in the table of means), $k_2$ is high by
#   +5.044 ± 0.364 at β = 0.05 and +3.328 ± 0.207 for PPO-GT (about a third of the KL), and by only
#   +0.209 ± 0.056 at β = 5, where $\pi$ is close to $\pi_{\rm ref}$: its bias grows with the distance, as
#   its second-order derivation says. $k_1$ and $k_3$ are within one SE of the exact sum on all three runs (the
#   table of differences above); both are unbiased (the brute-force test in `tests/test_kl_estimators.py`).
# * **Variance.** The exact sum varies least everywhere: the `var / var(exact)` column is how many times
#   more samples each estimator needs for the same standard error. Near $\pi_{\rm ref}$ (β = 5) $k_1$ is the
#   worst by far (42.683) and negative on a share 0.128 of samples (0.000 and 0.022 on the two far runs),
#   and $k_3$ cuts the SD of one sample from 2.418 to 1.008, Schulman's case for it. Far from
#   $\pi_{\rm ref}$ (β = 0.05) $k_3$ is no better than $k_1$ (SD of the 40-prompt mean from one sample per
#   prompt 0.946 against 0.797), while the exact sum's is 0.313. Every SD falls as $1/\sqrt n$ (the lower
#   panels): more samples shrink the spread and leave $k_2$'s bias where it is.
# * **Settings** (DPO β = 0.05; true KL 16.899). **top-k 50** reports a mean $k_1$ of 23.082, +6.183 (over a
#   third of the KL): the tokens top-k cuts are $\pi$'s tail, whose log-ratios are lower than the head's
#   ($\pi$ moved mass off them), so averaging over the kept head alone leaves the larger terms. **top-p 0.9**
#   reports 19.629, +2.730 (standard error 0.327). The exact sum along those samples stays within a nat
#   (16.094 and 16.781): it is the sampled log-ratio scored on truncated draws that is wrong. **Min length
#   32** and **EOS dropped** change nothing beyond noise here (`mean k1 - true KL` 0.484 and 0.166, against
#   0.165 for $\pi$ itself), because this policy almost never stops within 32 tokens: 1 of its 320 samples
#   did, and none of the other two runs' samples. Dropping that one EOS raised the completion's $k_1$ by
#   0.576 (the policy gave EOS less probability than $\pi_{\rm ref}$ did, so its term was negative), and the
#   mean by 0.002. Both effects grow with how often $\pi$ stops: longer caps, or models that end their
#   answers. **$\pi_{\rm ref}$'s samples** scored by $\log\frac{\pi}{\pi_{\rm ref}}$ give **−22.357**: negative
#   on every sample (share 1.0), the negative of $\mathrm{KL}(\pi_{\rm ref}\|\pi)$, not the KL that was asked
#   for. Their $k_3$ (141.657) is huge: it is $\ge0$, but on tokens $\pi_{\rm ref}$ likes and $\pi$ has
#   nearly ruled out, $r_t$ is enormous.
#
# **What is not established**: one seed, 40 prompts, one small model and 32-token completions. The negative
# KL that TRL's FAQ warns of under a minimum length appears when PPO *learns* to exploit it; these policies
# were not trained under that setting, and here the minimum length did nothing beyond noise. The sizes of the
# top-k and top-p biases depend on how far $\pi$ is from $\pi_{\rm ref}$ and on the entropy of its tail.
