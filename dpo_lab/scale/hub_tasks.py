"""One DPO run on the paper's TL;DR or Anthropic-HH task: what ``notebooks/templates/preference_dpo`` calls.

* :func:`load_task_pairs` reads the pairs (``hub_preferences``) from the hub, the project's hub-format
  fixtures, or a local folder, optionally a seeded subset.
* :func:`fit_prompts` makes every pair fit the context: prompts longer than ``max_prompt_length`` tokens
  are dropped (counted) or cut to their last tokens, as the official code does for HH ("keep_end").
* :func:`load_models` loads the SFT policy and a frozen copy as π_ref (safetensors, no remote code), or
  builds a tiny random GPT-2 for a dry run.
* :func:`heldout_eval_fn` scores held-out pairs with Eq. 7 at every evaluation of ``train_dpo``;
  :func:`run_summary` flattens a run into the scalar ``result.json`` a sweep collects.
"""

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
from dpo_lab.dpo_trainer import pair_logprobs, reference_logprobs
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.models import build_policy, load_hub_policy, train_tokenizer
from dpo_lab.paths import project_root
from dpo_lab.presets import PolicyConfig
from dpo_lab.run import EvalFn, quiet_hf_progress
from dpo_lab.scale.hub_preferences import load_hh_preferences, load_tldr_preferences

TASKS: tuple[str, ...] = ("tldr", "hh")
# The paper's settings per task (§6.2, §6.3, App. B): SFT policy, beta, and the held-out split.
PAPER: dict[str, dict[str, Any]] = {
    "tldr": {"model": "CarperAI/openai_summarize_tldr_sft", "beta": 0.5, "eval_split": "validation"},
    "hh": {"model": "EleutherAI/pythia-2.8b", "beta": 0.1, "eval_split": "test"},
}
FIXTURES: dict[str, str] = {"tldr": "data/fixtures/summarize_from_feedback/comparisons",
                            "hh": "data/fixtures/hh_rlhf"}
LONG_PROMPTS: tuple[str, ...] = ("drop", "keep_end")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task


def resolve_data_dir(task: str, data_dir: str) -> Path | None:
    """``""`` = the hub (None); ``"fixtures"`` = the project's hub-format fixture files of ``task``; else a
    folder or file of local data in the hub's format (relative paths are tried from the project root)."""
    check_task(task)
    if not isinstance(data_dir, str):
        raise TypeError(f"data_dir must be a string, got {type(data_dir).__name__}")
    if data_dir == "":
        return None
    if data_dir == "fixtures":
        return project_root() / FIXTURES[task]
    path = Path(data_dir).expanduser()
    for candidate in (path, project_root() / path):
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(f"data_dir {data_dir!r} does not exist (nor under {project_root()})")


def load_task_pairs(
    task: str,
    split: str,
    *,
    data_dir: str = "",
    max_pairs: int = 0,
    seed: int = 0,
    hh_single_turn: bool = False,
    progress: bool = True,
) -> tuple[datasets.Dataset, dict[str, Any]]:
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
        keep = np.sort(np.random.default_rng([seed, len(pairs)]).choice(len(pairs), max_pairs, replace=False))
        pairs = pairs.select(keep.tolist())
    stats["used"] = len(pairs)
    return pairs, stats


def fit_prompts(
    pairs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    how: str = "drop",
) -> tuple[datasets.Dataset, int]:
    """Pairs whose prompt fits ``max_prompt_length`` tokens (and leaves room in ``max_length``).

    ``how="drop"`` removes longer ones; ``"keep_end"`` keeps their last ``max_prompt_length`` tokens (the
    official code's rule for HH: the latest turns matter most). Returns ``(pairs, n_changed)``, the
    number dropped or cut. Completions are cut later, by the collator, to fit ``max_length``.
    """
    if how not in LONG_PROMPTS:
        raise ValueError(f"how must be one of {list(LONG_PROMPTS)}, got {how!r}")
    for name, value in (("max_prompt_length", max_prompt_length), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) so "
                         "every completion keeps at least one token")
    cols = pair_columns(pairs)
    unique = sorted(set(cols["prompt"]))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    long = {p for p, toks in ids.items() if len(toks) > max_prompt_length}
    n_changed = sum(p in long for p in cols["prompt"])
    if how == "drop":
        keep = [i for i, p in enumerate(cols["prompt"]) if p not in long]
        if not keep:
            raise ValueError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens")
        return pairs.select(keep), n_changed
    cut = {p: tokenizer.decode(ids[p][-max_prompt_length:]) for p in long}
    return pairs.map(lambda row: {"prompt": cut.get(row["prompt"], row["prompt"])}), n_changed


def _resolve_model(model: str) -> str:
    """A local folder (as given, or under the project root) if one exists, else the hub name unchanged."""
    for candidate in (Path(model).expanduser(), project_root() / model):
        if (candidate / "config.json").is_file():
            return str(candidate.resolve())
    # A hub id is "name" or "owner/name": anything else is a folder that is not there (yet), e.g. the HH
    # sweep's DPO run started before the run that exports its reference has finished.
    if model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {model!r} is not a folder holding config.json (looked as given and "
                                f"under {project_root()}), nor a hub name")
    return model


def load_models(
    model: str,
    *,
    tokenizer: str = "",
    revision: str = "",
    tiny_texts: Sequence[str] = (),
    max_length: int = 512,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """``(policy, reference, tokenizer)``: the SFT model and a frozen deep copy of it as π_ref.

    ``model`` is a hub name or a local folder (safetensors weights only, ``trust_remote_code=False``);
    ``tokenizer`` names another repository for the tokenizer ("" = the model's own), ``revision`` a hub
    revision ("" = main). ``model=""`` builds a tiny random GPT-2 with a byte-level BPE trained on
    ``tiny_texts``: a dry run of the code path, not a model of anything. Dropout is off in both models
    (the implicit reward is then exactly 0 at step 0 and the first loss is log 2).
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, got {type(model).__name__}")
    if model == "":
        if not tiny_texts:
            raise ValueError("model='' builds a tiny GPT-2 and needs tiny_texts to train its tokenizer on")
        tok = train_tokenizer(list(tiny_texts), vocab_size=512)
        config = PolicyConfig(n_layer=2, n_head=2, n_embd=64, n_positions=max_length)
        policy: PreTrainedModel = build_policy(tok, config, seed=seed)
    else:
        with quiet_hf_progress():  # pad = eos there: GPT-J and Pythia ship none; padding is masked out
            policy, tok = load_hub_policy(_resolve_model(model), revision=revision or None,
                                          tokenizer_name=tokenizer or None)
    context = getattr(policy.config, "n_positions", None) or getattr(policy.config, "max_position_embeddings",
                                                                       None)
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context ({context} tokens)")
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return policy, reference, tok


def heldout_eval_fn(
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: datasets.Dataset | Mapping[str, Sequence[str]],
    *,
    beta: float,
    max_length: int,
    cache_dir: str | Path,
    batch_size: int,
    device: torch.device | str | None = None,
) -> EvalFn:
    """``eval_fn(policy, step)`` for ``train_dpo``: Eq. 7's loss and the implicit-reward metrics on
    held-out pairs, under TRL's eval names (``eval_loss``, ``eval_rewards/accuracies``, ...).

    The reference log-probs are computed once, now (and cached on disk like the training pairs')."""
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


def _logged(metrics: Sequence[Mapping[str, Any]], key: str, index: int) -> float:
    """The ``index``-th logged value of ``key`` (0: first, -1: last), NaN if it was never logged."""
    values = [m[key] for m in metrics if key in m]
    return float(values[index]) if values else math.nan


def run_summary(metrics: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """A FLAT dict of scalars for ``result.json``: ``fields`` (settings, counts) plus the training curve's
    first and last values and the held-out metrics at the start and the end. Keys use ``_`` for ``/``."""
    bad = {k: type(v).__name__ for k, v in fields.items()
           if not (v is None or isinstance(v, (bool, int, float, str)))}
    if bad:
        raise TypeError(f"run_summary fields must be scalars; got {bad}")
    train = [m for m in metrics if "loss" in m]
    if not train:
        raise ValueError("no training steps in the metrics")
    out: dict[str, Any] = dict(fields)
    out["steps"] = int(train[-1]["step"])
    out["loss_step1"] = float(train[0]["loss"])
    tail = train[-max(1, len(train) // 10):]  # mean over the last 10% of steps: less noisy than one batch
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        out["final_" + key.replace("/", "_")] = float(np.mean([m[key] for m in tail]))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        name = key.replace("/", "_")
        out[name + "_start"] = _logged(metrics, key, 0)
        out[name + "_end"] = _logged(metrics, key, -1)
    return out


def plot_training_curves(metrics: Sequence[Mapping[str, Any]], path: str | Path | None = None, *,
                         title: str = "") -> Figure:
    """Loss, reward margin and reward accuracy per step (train) with the held-out values as points."""
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies"), strict=True):
        ax.plot([m["step"] for m in train], [m[key] for m in train], lw=1, label="train (batch)")
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_" + key] for m in evals], "o-", ms=4,
                    label="held-out pairs")
        if key == "loss":
            ax.axhline(math.log(2), color="grey", ls=":", lw=1, label="log 2 (step 0)")
        ax.set_xlabel("step")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = ["FIXTURES", "LONG_PROMPTS", "PAPER", "TASKS", "check_task", "fit_prompts", "heldout_eval_fn",
           "load_models", "load_task_pairs", "plot_training_curves", "resolve_data_dir", "run_summary"]
