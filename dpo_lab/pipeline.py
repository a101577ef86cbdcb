"""The IMDb controlled-sentiment reproduction as cached stages (DESIGN.md's data flow).

    IMDb -> tokenizer + SFT policy (pi_ref) -> train prompts -> 4 samples each -> r* -> 6 pairs each
         -> DPO (beta sweep), evaluated every N steps on held-out test prompts: (mean KL_seq, mean r*)

Each stage writes to ``artifacts/<stage>-<key>/`` where the key hashes every setting that produced it
(and the keys of the stages it reads), so a notebook or a papermill run can start from any stage, a changed
parameter never reuses a stale artefact, and an interrupted run redoes only the unfinished stage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lab.cache import cached_directory, content_hash
from dpo_lab.data import load_imdb, make_prompts
from dpo_lab.dpo_trainer import DPOResult, read_metrics, train_dpo
from dpo_lab.evaluate import make_eval_fn
from dpo_lab.models import build_policy, load_hub_policy, load_policy, save_policy, train_sft, train_tokenizer
from dpo_lab.paths import artifacts_dir
from dpo_lab.preferences import generate_preference_data, load_preferences, save_preferences
from dpo_lab.presets import Preset
from dpo_lab.rewards import HubSentimentReward, RewardModel, TfidfSentimentReward, accuracy, first_words
from dpo_lab.seed import seed_everything

# Completion-length texts for the classifier's short-text accuracy (about what 32 new tokens decode to).
SHORT_TEXT_WORDS = 40


# ------------------------------------------------------------------------------------------------ keys
def sft_key(preset: Preset) -> str:
    return content_hash("sft", preset.seed, preset.data, preset.tokenizer, preset.policy)


def reward_key(preset: Preset) -> str:
    return content_hash("reward", preset.seed, preset.data, preset.reward)


def preferences_key(preset: Preset) -> str:
    return content_hash("preferences", sft_key(preset), reward_key(preset), preset.preferences)


def stage_dir(stage: str, key: str) -> Path:
    return artifacts_dir() / f"{stage}-{key}"


# ---------------------------------------------------------------------------------------------- stages
def imdb(preset: Preset) -> datasets.DatasetDict:
    """IMDb train/test, the train split capped at ``data.max_train_reviews`` (a seeded choice)."""
    dataset = load_imdb(preset.data.source, test_fraction=preset.data.test_fraction, seed=preset.seed)
    cap = preset.data.max_train_reviews
    if cap is not None and cap < len(dataset["train"]):
        dataset["train"] = dataset["train"].shuffle(seed=preset.seed).select(range(cap))
    return dataset


def sft_policy(preset: Preset, *, progress: bool = True,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """pi_SFT (= pi_ref, and the start of every trained policy) with its tokenizer and training report."""

    def build(folder: Path) -> None:
        seed_everything(preset.seed)
        data = imdb(preset)
        train_texts = data["train"]["text"]
        if preset.policy.source == "scratch":
            tokenizer = train_tokenizer(train_texts, preset.tokenizer.vocab_size)
            model = build_policy(tokenizer, preset.policy, seed=preset.seed)
        else:
            model, tokenizer = load_hub_policy(preset.policy.hub_name)
        report = train_sft(model, tokenizer, train_texts, preset.policy, seed=preset.seed,
                           held_out_texts=data["test"]["text"], progress=progress)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        report["vocab_size"] = len(tokenizer)
        save_policy(model, tokenizer, folder / "policy")
        (folder / "report.json").write_text(json.dumps(report))

    folder = cached_directory(stage_dir("sft", sft_key(preset)), build)
    model, tokenizer = load_policy(folder / "policy")
    return model, tokenizer, json.loads((folder / "report.json").read_text())


def reward_model(preset: Preset) -> tuple[RewardModel, dict]:
    """The ground-truth reward r*(x, y) = p(positive | x + y) and its held-out accuracy report."""
    if preset.reward.source == "hub":
        return HubSentimentReward(preset.reward.hub_name), {"source": preset.reward.hub_name}

    def build(folder: Path) -> None:
        data = imdb(preset)
        reward = TfidfSentimentReward.from_config(preset.reward).fit(data["train"]["text"],
                                                                      data["train"]["label"])
        test = data["test"]
        short = [first_words(t, SHORT_TEXT_WORDS) for t in test["text"]]
        report = {"accuracy_full_reviews": accuracy(reward, test["text"], test["label"]),
                  f"accuracy_first_{SHORT_TEXT_WORDS}_words": accuracy(reward, short, test["label"]),
                  "n_test": len(test), "n_features": len(reward.terms or [])}
        reward.save(folder / "reward")
        (folder / "report.json").write_text(json.dumps(report))

    folder = cached_directory(stage_dir("reward", reward_key(preset)), build)
    return TfidfSentimentReward.load(folder / "reward"), json.loads((folder / "report.json").read_text())


def prompts(preset: Preset, tokenizer: PreTrainedTokenizerBase, split: str) -> list[str]:
    """Prefixes of 2-8 tokens: train prompts for preference data, test prompts for evaluation."""
    cfg = preset.preferences
    n = cfg.n_prompts if split == "train" else preset.eval.n_prompts
    texts = imdb(preset)[split]["text"]
    return make_prompts(texts, tokenizer, n, min_tokens=cfg.prompt_min_tokens,
                        max_tokens=cfg.prompt_max_tokens, seed=preset.seed)


def preference_data(preset: Preset, *, progress: bool = True) -> tuple[datasets.Dataset, dict]:
    """All 6 pairs per train prompt from 4 pi_SFT samples, labelled by r* (ties dropped and counted)."""

    def build(folder: Path) -> None:
        policy, tokenizer, _ = sft_policy(preset, progress=progress)
        reward, _ = reward_model(preset)
        train_prompts = prompts(preset, tokenizer, "train")
        pairs, stats = generate_preference_data(policy, tokenizer, train_prompts, reward, preset.preferences,
                                                seed=preset.seed, progress=progress)
        save_preferences(pairs, folder / "pairs", stats=stats)

    folder = cached_directory(stage_dir("preferences", preferences_key(preset)), build)
    stats = json.loads((folder / "pairs" / "stats.json").read_text())
    return load_preferences(folder / "pairs"), stats


def dpo_run_dir(preset: Preset, beta: float) -> Path:
    dpo = dataclasses.replace(preset.dpo, betas=())
    key = content_hash("dpo", preferences_key(preset), dpo, preset.eval, beta)
    return artifacts_dir() / "runs" / f"dpo-beta{beta:g}-{key}"


def dpo(preset: Preset, beta: float, *, progress: bool = True) -> DPOResult:
    """One DPO run from pi_SFT at inverse temperature ``beta``, evaluated every ``eval_every`` steps."""
    reference, tokenizer, _ = sft_policy(preset, progress=progress)
    policy, _, _ = sft_policy(preset, progress=False)
    pairs, _ = preference_data(preset, progress=progress)
    reward, _ = reward_model(preset)
    eval_fn = make_eval_fn(reference, tokenizer, prompts(preset, tokenizer, "test"), reward, preset.eval,
                           seed=preset.seed)
    return train_dpo(policy, reference, tokenizer, pairs, beta=beta, config=preset.dpo,
                     out_dir=dpo_run_dir(preset, beta), seed=preset.seed,
                     max_length=preset.policy.n_positions, ref_cache_dir=artifacts_dir() / "reference-logps",
                     eval_fn=eval_fn, progress=progress)


# ---------------------------------------------------------------------------------------------- results
EVAL_COLUMNS = ["reward_mean", "reward_se", "kl_mean", "kl_se"]


def evaluation_points(metrics_path: Path, **labels: Any) -> pd.DataFrame:
    """The evaluation rows of one run's metrics.jsonl (one frontier point each), labelled by ``labels``."""
    rows = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    frame = pd.DataFrame(rows, columns=["step", *EVAL_COLUMNS, "logratio_kl_mean"])
    for name, value in labels.items():
        frame.insert(0, name, value)
    return frame


def dpo_sweep(preset: Preset, *, progress: bool = True) -> pd.DataFrame:
    """Every beta of the preset's sweep; one row per evaluation point, the SFT start (step 0) included."""
    frames = []
    for beta in preset.dpo.betas:
        result = dpo(preset, beta, progress=progress)
        frames.append(evaluation_points(result.metrics_path, method="DPO", hyperparameter=f"beta={beta:g}"))
    return pd.concat(frames, ignore_index=True)


__all__ = ["dpo", "dpo_run_dir", "dpo_sweep", "evaluation_points", "imdb", "preference_data",
           "prompts", "reward_model", "sft_policy"]
