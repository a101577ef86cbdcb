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
# # One DPO run on TL;DR summarisation or Anthropic-HH dialogue (a papermill run notebook)
#
# The paper's other two experiments, beside IMDb, train DPO (Eq. 7) on **human** preference labels:
#
# | task | data | SFT policy = π_ref | β | what the paper measured |
# |---|---|---|---|---|
# | TL;DR (§6.2) | `openai/summarize_from_feedback`, ~92k comparisons of two summaries of a Reddit post (Stiennon et al. 2020) | GPT-J 6B fine-tuned on TL;DR by TRLX (`CarperAI/openai_summarize_tldr_sft`; the paper does not name the repository) | 0.5 | GPT-4 win rate against the test set's reference summaries over sampling temperatures: DPO ≈ 61% at T = 0, PPO 57% |
# | Anthropic-HH (§6.3) | `Anthropic/hh-rlhf`, ~160k dialogues with a chosen and a rejected final response | Pythia-2.8B after **Preferred-FT** on the chosen responses (there is no SFT model for HH) | 0.1 | GPT-4 win rate against the chosen response on single-turn prompts: DPO the only efficient method above 50% |
#
# Both use App. B's settings: RMSprop, lr 1e-6, 64 pairs per step, lr warmed up linearly over 150 steps.
#
# **What this notebook does not reproduce**: the win rates. They need samples judged by GPT-4 (prompts in
# App. C), which is outside this project. What it does measure is what DPO optimises: the loss and the
# implicit-reward accuracy $\hat r(x,y_w)>\hat r(x,y_l)$ with $\hat r=\beta\log\frac{\pi_\theta}{\pi_{\rm ref}}$,
# on the training batches and on held-out pairs (TL;DR validation, HH test).
#
# **Where it runs**: the paper's models need a GPU and the Hugging Face hub (`sweeps/tldr_paper.yaml`,
# `sweeps/hh_paper.yaml`; estimated GPU hours in `dpo_lab.scale.estimate`). This process trains on one device;
# GPT-J 6B with a full RMSprop state does not fit one 80 GB GPU, and for several GPUs the project's
# `accelerate launch -m dpo_lab.scale.launch` runs the same trainer data-parallel.
# With the defaults below, the notebook is a **dry run**: the project's hub-format fixture files (a few
# synthetic pairs) and a tiny random GPT-2, so that every code path runs offline in seconds.

# %% tags=["parameters"]
task: str = "tldr"  # "tldr" (Reddit TL;DR summarisation, §6.2) or "hh" (Anthropic-HH dialogue, §6.3)
model: str = ""  # SFT policy, also π_ref: hub name or local folder; empty: a tiny random GPT-2 (dry run)
tokenizer: str = ""  # repository of the tokenizer when the model's has none; empty: the model's own
model_revision: str = ""  # hub revision of the model, e.g. "refs/pr/2"; empty: main
data_dir: str = "fixtures"  # empty: the hub; "fixtures": the project's hub-format fixtures; or a local folder
objective: str = "dpo"  # "dpo" (Eq. 7), or "preferred_ft" (SFT on the chosen responses: HH's π_ref)
beta: float = 0.0  # DPO temperature β of Eq. 7; 0: the paper's for the task (TL;DR 0.5, HH 0.1)
lr: float = 1e-6  # RMSprop learning rate (App. B)
warmup_steps: int = 150  # linear warmup of the lr from 0 (App. B)
batch_size: int = 64  # pairs per optimizer step (App. B)
micro_batch_size: int = 8  # pairs per forward pass; gradients accumulate to batch_size (memory only)
max_steps: int = 0  # optimizer steps; 0: one epoch over the training pairs
max_length: int = 512  # tokens of prompt + completion; longer completions are cut (official code: 512)
max_prompt_length: int = 256  # prompts longer than this are dropped or cut, see long_prompts (official: 256)
long_prompts: str = "drop"  # "drop" long prompts, or "keep_end": their last tokens (official code, HH)
max_pairs: int = 0  # 0: every training pair; N > 0: a seeded random N of them (quick runs)
eval_pairs: int = 256  # held-out pairs (TL;DR validation, HH test) scored at every evaluation; 0: none
eval_every: int = 100  # optimizer steps between held-out evaluations (and one at step 0 and at the end)
checkpoint_every: int = 500  # optimizer steps between resumable checkpoints
hh_single_turn: bool = False  # HH only: train on single-turn dialogues only (the paper evaluates on those)
export_policy: bool = False  # also save the final policy to run_dir/policy (HH: the π_ref of the DPO run)
seed: int = 0  # data order, the max_pairs subset and the tiny model's weights
run_dir: str = ""  # output folder (metrics.jsonl, result.json); empty: artifacts/runs/preference_dpo/<run>

# %%
import math
import shutil
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from transformers.utils import logging as hf_logging

from dpo_lab.cache import atomic_write_json
from dpo_lab.dpo_trainer import OBJECTIVES
from dpo_lab.presets import DPOConfig, artifacts_dir
from dpo_lab.run import dpo_run, read_metrics, resolve_device, save_policy
from dpo_lab.scale import hub_tasks
from dpo_lab.seed import seed_everything

hf_logging.disable_progress_bar()
hub_tasks.check_task(task)
if objective not in OBJECTIVES or objective == "unlikelihood":
    raise ValueError(f"objective must be 'dpo' or 'preferred_ft', got {objective!r}")
beta = beta or hub_tasks.PAPER[task]["beta"]
out = Path(run_dir) if run_dir else (artifacts_dir() / "training" / "preference_dpo"
                                     / f"{task}-{objective}-beta{beta:g}-seed{seed}")
out.mkdir(parents=True, exist_ok=True)
device = resolve_device()
seed_everything(seed)
print(f"task {task}, objective {objective}, beta {beta:g}, model {model or '(tiny random GPT-2)'}, "
      f"data {data_dir or '(hub)'}, device {device.type}\nrun_dir {out}")

# %% [markdown]
# ## The preference pairs
# `dpo_lab.scale.hub_tasks` turns each hub row into a (prompt, chosen, rejected) triple: TL;DR's prompt is
# the subreddit, title and post followed by `TL;DR:`; HH's is the dialogue up to its last
# `Assistant:` turn. Rows that cannot form a pair are skipped and counted by reason.

# %%
train_pairs, train_stats = hub_tasks.load_task_pairs(task, "train", data_dir=data_dir, max_pairs=max_pairs,
                                                     seed=seed, hh_single_turn=hh_single_turn)
eval_split = hub_tasks.PAPER[task]["eval_split"]
eval_set, eval_stats = (hub_tasks.load_task_pairs(task, eval_split, data_dir=data_dir, max_pairs=eval_pairs,
                                                  seed=seed, hh_single_turn=hh_single_turn)
                        if eval_pairs else (None, {"used": 0}))
print("train:", train_stats)
print(f"{eval_split}:", eval_stats)
example = train_pairs[0]
print(f"\n--- prompt ---\n{example['prompt'][-400:]}\n--- chosen ---\n{example['chosen'][:300]}"
      f"\n--- rejected ---\n{example['rejected'][:300]}")

# %% [markdown]
# ## Policy and reference
# π_θ starts as the SFT model and π_ref is a frozen copy of it, so at step 1 every implicit reward is 0 and
# the loss is $-\log\sigma(0)=\log 2$. Prompts longer than `max_prompt_length` tokens are dropped (or cut to
# their end); completions are cut to fit `max_length`.

# %%
policy, reference, tok = hub_tasks.load_models(
    model, tokenizer=tokenizer, revision=model_revision, max_length=max_length, seed=seed,
    tiny_texts=[t for c in ("prompt", "chosen", "rejected") for t in train_pairs[c]])
train_pairs, n_long = hub_tasks.fit_prompts(train_pairs, tok, max_prompt_length=max_prompt_length,
                                            max_length=max_length, how=long_prompts)
if eval_set is not None:
    eval_set, _ = hub_tasks.fit_prompts(eval_set, tok, max_prompt_length=max_prompt_length,
                                        max_length=max_length, how=long_prompts)
n_params = sum(p.numel() for p in policy.parameters())
print(f"{n_params / 1e6:.1f}M parameters; {len(train_pairs)} training pairs "
      f"({n_long} with prompts over {max_prompt_length} tokens: {long_prompts})")

# %% [markdown]
# ## Training
# `dpo_lab.dpo_trainer.train_dpo` minimises Eq. 7 (or, with `objective="preferred_ft"`, the negative
# log-likelihood of the chosen responses). It caches π_ref's log-probs on disk once, so the reference
# model is not needed during training, logs TRL's metric names to `metrics.jsonl`, and resumes from its
# last checkpoint if the run is interrupted.

# %%
steps = max_steps or math.ceil(len(train_pairs) / batch_size)
config = DPOConfig(lr=lr, warmup_steps=warmup_steps, batch_size=batch_size,
                   micro_batch_size=min(micro_batch_size, batch_size), max_steps=steps,
                   checkpoint_every=min(checkpoint_every, steps), eval_every=min(eval_every, steps))
ref_cache = artifacts_dir() / "ref-logps"
eval_fn = None
if eval_set is not None and len(eval_set):
    eval_fn = hub_tasks.heldout_eval_fn(reference, tok, eval_set, beta=beta, max_length=max_length,
                                        cache_dir=ref_cache, batch_size=config.micro_batch_size, device=device)
started = time.perf_counter()
result = dpo_run(policy, reference, tok, train_pairs, beta=beta if objective == "dpo" else None,
                 config=config, out_dir=out / "train", seed=seed, max_length=max_length,
                 ref_cache_dir=ref_cache, eval_fn=eval_fn, device=device, objective=objective)
train_seconds = time.perf_counter() - started
metrics = read_metrics(result.metrics_path)
print(f"{result.steps} steps in {train_seconds:.0f} s")

# %% [markdown]
# ## Training curves
# The loss starts at $\log 2$ (DPO); `rewards/margins` is the mean of $\hat r(x,y_w)-\hat r(x,y_l)$ and
# `rewards/accuracies` the share of pairs it ranks correctly, on each training batch (line) and on the
# held-out pairs (points). Falling `logps/chosen` with a growing margin is expected, not a bug (notebook 01).

# %%
fig = hub_tasks.plot_training_curves(metrics, out / "curves.png",
                                     title=f"{task}: {objective}, beta={beta:g}")
plt.show()

# %% [markdown]
# ## Results
# `result.json` is one flat record of scalars (the sweep runner gathers these from every run into one
# table); `metrics.jsonl` holds every step.

# %%
shutil.copyfile(result.metrics_path, out / "metrics.jsonl")
if export_policy:
    save_policy(policy, tok, out / "policy")
summary = hub_tasks.run_summary(
    metrics, task=task, objective=objective, model=model or "tiny-random-gpt2", data=data_dir or "hub",
    beta=float(beta), lr=float(lr), batch_size=batch_size, max_length=max_length, seed=seed,
    n_train_pairs=len(train_pairs), n_long_prompts=n_long, n_eval_pairs=0 if eval_set is None else len(eval_set),
    n_params=n_params, device=device.type, train_seconds=round(train_seconds, 1),
    policy_dir=str(out / "policy") if export_policy else "")
atomic_write_json(out / "result.json", summary)
display(pd.Series(summary, name="result").to_frame())
