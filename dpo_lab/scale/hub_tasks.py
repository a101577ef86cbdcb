"""One DPO run on the paper's TL;DR or Anthropic-HH task: what notebooks/templates/preference_dpo calls."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lab.batching import pair_columns
from dpo_lab.dpo_trainer import pair_logprobs
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.models import build_policy, load_hub_policy, train_tokenizer
from dpo_lab.presets import PolicyConfig, project_root
from dpo_lab.run import EvalFn, quiet_hf_progress, reference_logprobs
from dpo_lab.scale.hub_preferences import load_hh_preferences, load_tldr_preferences

TASKS: tuple[str, ...] = ("tldr", "hh")
# The paper's settings per task (§6.2, §6.3, App. B): SFT policy, beta, and the held-out split.
PAPER: dict[str, dict[str, Any]] = {
    "tldr": {"model": "CarperAI/openai_summarize_tldr_sft", "beta": 0.5, "eval_split": "validation"},
    "hh": {"model": "EleutherAI/pythia-2.8b", "beta": 0.1, "eval_split": "test"},
}
FIXTURES = {"tldr": "data/fixtures/summarize_from_feedback/comparisons", "hh": "data/fixtures/hh_rlhf"}
LONG_PROMPTS: tuple[str, ...] = ("drop", "keep_end")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task


def resolve_data_dir(task: str, data_dir: str) -> Path | None:
    """``""``: the hub (None); ``"fixtures"``: the project's hub-format fixtures; else local data."""
    check_task(task)
    if not isinstance(data_dir, str):
        raise TypeError(f"data_dir must be a string, got {type(data_dir).__name__}")
    if data_dir in ("", "fixtures"):
        return project_root() / FIXTURES[task] if data_dir else None
    path = next((p.resolve() for p in (Path(data_dir).expanduser(), project_root() / data_dir) if p.exists()),
                None)
    if path is None:
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist (nor under {project_root()})")
    return path


def load_task_pairs(task: str, split: str, *, data_dir: str = "", max_pairs: int = 0, seed: int = 0,
                    hh_single_turn: bool = False, progress: bool = True) -> tuple[datasets.Dataset, dict]:
    """``(pairs, stats)`` of one split; ``max_pairs > 0`` keeps a seeded random subset of that size."""
    path = resolve_data_dir(task, data_dir)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be an int >= 0 (0 = all), got {max_pairs!r}")
    if task == "tldr":
        pairs, stats = load_tldr_preferences(split, path=path, progress=progress)
    else:
        pairs, stats = load_hh_preferences(split, path=path, single_turn_only=hh_single_turn,
                                           progress=progress)
    if 0 < max_pairs < len(pairs):
        keep = np.random.default_rng([seed, len(pairs)]).choice(len(pairs), max_pairs, replace=False)
        pairs = pairs.select(np.sort(keep).tolist())
    return pairs, {**stats, "used": len(pairs)}


def fit_prompts(pairs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_prompt_length: int,
                max_length: int, how: str = "drop") -> tuple[datasets.Dataset, int]:
    """(pairs whose prompt fits ``max_prompt_length`` tokens, how many did not): ``how="drop"`` drops the
    others, ``"keep_end"`` keeps their last tokens (the official code's rule for HH)."""
    if how not in LONG_PROMPTS:
        raise ValueError(f"how must be one of {list(LONG_PROMPTS)}, got {how!r}")
    for name, value in (("max_prompt_length", max_prompt_length), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) so "
                         "every completion keeps at least one token")
    prompts = pair_columns(pairs)["prompt"]
    unique = sorted(set(prompts))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    long = {p for p, toks in ids.items() if len(toks) > max_prompt_length}
    n_changed = sum(p in long for p in prompts)
    if how == "keep_end":
        cut = {p: tokenizer.decode(ids[p][-max_prompt_length:]) for p in long}
        return pairs.map(lambda row: {"prompt": cut.get(row["prompt"], row["prompt"])}), n_changed
    if not (keep := [i for i, p in enumerate(prompts) if p not in long]):
        raise ValueError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    return pairs.select(keep), n_changed


def load_models(model: str, *, tokenizer: str = "", revision: str = "", tiny_texts: Sequence[str] = (),
                max_length: int = 512, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """``(policy, reference, tokenizer)``: the SFT model (hub name or folder) and a frozen copy as π_ref;
    ``model=""``: a tiny random GPT-2 with a BPE trained on ``tiny_texts``, a dry run of the code path."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, got {type(model).__name__}")
    if model == "":
        if not tiny_texts:
            raise ValueError("model='' builds a tiny GPT-2 and needs tiny_texts to train its tokenizer on")
        tok = train_tokenizer(list(tiny_texts), vocab_size=512)
        shape = PolicyConfig(n_layer=2, n_head=2, n_embd=64, n_positions=max_length)
        policy = build_policy(tok, shape, seed=seed)
    else:
        found = next((p for p in (Path(model).expanduser(), project_root() / model)
                      if (p / "config.json").is_file()), None)
        if found is None and (model.count("/") > 1 or model.startswith((".", "/", "~"))):  # no hub id
            raise FileNotFoundError(f"model {model!r} is not a folder holding config.json (as given or under "
                                    f"{project_root()}), nor a hub name")
        with quiet_hf_progress():  # pad = eos: GPT-J and Pythia ship none; padding is masked out
            policy, tok = load_hub_policy(str(found.resolve()) if found else model, revision=revision or None,
                                          tokenizer_name=tokenizer or None)
    config = policy.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context ({context} tokens)")
    return policy, copy.deepcopy(policy).eval().requires_grad_(False), tok


def heldout_eval_fn(reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    pairs: datasets.Dataset | Mapping[str, Sequence[str]], *, beta: float, max_length: int,
                    cache_dir: str | Path, batch_size: int, device: torch.device | str | None = None,
                    ) -> EvalFn:
    """``eval_fn(policy, step)`` for ``train_dpo``: Eq. 7's loss and the implicit-reward metrics on held-out
    pairs, under TRL's names (``eval_loss``, ...); the reference's log-probs are computed (and cached) now."""
    cols = pair_columns(pairs)
    ref_chosen, ref_rejected = reference_logprobs(reference, tokenizer, cols, max_length=max_length,
                                                  cache_dir=cache_dir, batch_size=batch_size, device=device,
                                                  progress=False).unbind(1)

    def eval_fn(policy: nn.Module, step: int) -> dict[str, float]:
        pc, pr = pair_logprobs(policy, tokenizer, cols, max_length=max_length, batch_size=batch_size,
                               device=next(policy.parameters()).device).unbind(1)
        losses, cr, rr = preference_loss(pc, pr, ref_chosen, ref_rejected, beta=beta)  # Eq. 7
        return {f"eval_{k}": v for k, v in preference_metrics(losses, cr, rr, pc, pr).items()}

    return eval_fn


def run_summary(metrics: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """Scalars for ``result.json``: ``fields``, the first loss, the last 10% of steps' means, and the
    held-out metrics at the start and the end (NaN if never logged)."""
    if bad := {k: type(v).__name__ for k, v in fields.items()
               if not (v is None or isinstance(v, (bool, int, float, str)))}:
        raise TypeError(f"run_summary fields must be scalars; got {bad}")
    if not (train := [m for m in metrics if "loss" in m]):
        raise ValueError("no training steps in the metrics")
    out = {**fields, "steps": int(train[-1]["step"]), "loss_step1": float(train[0]["loss"])}
    tail = train[-max(1, len(train) // 10):]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        out["final_" + key.replace("/", "_")] = float(np.mean([m[key] for m in tail]))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        values = [float(m[key]) for m in metrics if key in m] or [math.nan]
        out[key.replace("/", "_") + "_start"], out[key.replace("/", "_") + "_end"] = values[0], values[-1]
    return out


def plot_training_curves(metrics: Sequence[Mapping[str, Any]], path: str | Path | None = None, *,
                         title: str = "") -> Figure:
    """Loss, reward margin and reward accuracy per step (train) with the held-out values as points."""
    train, evals = [m for m in metrics if "loss" in m], [m for m in metrics if "eval_loss" in m]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies"), strict=True):
        ax.plot([m["step"] for m in train], [m[key] for m in train], lw=1, label="train (batch)")
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_" + key] for m in evals], "o-", ms=4,
                    label="held-out pairs")
        if key == "loss":
            ax.axhline(math.log(2), color="grey", ls=":", lw=1, label="log 2 (step 0)")
        ax.set(xlabel="step", title=key)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
