"""Preference pairs from scored samples (paper §6.1, App. C.1): 4 completions per prompt -> all 6 pairs, y_w
the one with the higher r*(x, y) (argmax labels, not Bradley-Terry draws, as the paper's IMDb task). Ties and
empty completions (EOS sampled first: no token DPO could move) are dropped, and counted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, TypedDict

import datasets
import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lab.presets import PreferenceConfig
from dpo_lab.rewards import RewardModel, score_completions
from dpo_lab.sampling import sample


class Candidates(TypedDict):  # every sample of every prompt with its r*: what the pairs were built from
    prompts: list[str]
    completions: list[list[str]]
    rewards: list[list[float]]


COLUMNS = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")
FEATURES = datasets.Features({c: datasets.Value("float64" if c.endswith("_reward") else "string")
                              for c in COLUMNS})
GAP_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass(frozen=True)
class PairStats:
    """What pairing kept and dropped; gaps are r*(y_w) - r*(y_l) over the kept pairs."""
    n_prompts: int
    n_candidates: int  # C(k, 2) summed over prompts
    n_pairs: int
    n_ties: int  # equal rewards: no preference, dropped
    n_identical: int  # same text, different reward (a stochastic r*): dropped, chosen == rejected is invalid
    n_empty: int  # a completion that was only EOS decodes to "": no tokens to score, dropped
    gap_mean: float
    gap_quantiles: dict[str, float] = field(default_factory=dict)  # "q0.5" -> median gap, ...


def check_nested(name: str, outer: Sequence[Any], n_prompts: int) -> None:
    if len(outer) != n_prompts:
        raise ValueError(f"{name} has {len(outer)} entries but there are {n_prompts} prompts")


def build_preference_pairs(prompts: Sequence[str], completions: Sequence[Sequence[str]],
                           rewards: Sequence[Sequence[float]]) -> tuple[datasets.Dataset, PairStats]:
    """All C(k, 2) pairs of each prompt's k completions, chosen = higher r*; ties dropped and counted."""
    check_nested("completions", completions, len(prompts))
    check_nested("rewards", rewards, len(prompts))
    pairs: list[tuple[str, str, str, float, float]] = []
    n_candidates = n_ties = n_identical = n_empty = 0
    for i, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards, strict=True)):
        if len(texts) != len(scores):
            raise ValueError(f"prompt {i} has {len(texts)} completions but {len(scores)} rewards")
        scores = [float(s) for s in scores]
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"prompt {i} has a non-finite reward: {scores}")
        for a, b in combinations(range(len(texts)), 2):
            n_candidates += 1
            if not texts[a] or not texts[b]:
                n_empty += 1
            elif scores[a] == scores[b]:
                n_ties += 1
            elif texts[a] == texts[b]:
                n_identical += 1
            else:
                w, l = (a, b) if scores[a] > scores[b] else (b, a)
                pairs.append((prompt, texts[w], texts[l], scores[w], scores[l]))
    rows = {c: [pair[i] for pair in pairs] for i, c in enumerate(COLUMNS)}
    gaps = np.asarray(rows["chosen_reward"]) - np.asarray(rows["rejected_reward"])
    quantiles = ({f"q{q:g}": float(v) for q, v in zip(GAP_QUANTILES, np.quantile(gaps, GAP_QUANTILES),
                                                       strict=True)} if gaps.size else {})
    stats = PairStats(n_prompts=len(prompts), n_candidates=n_candidates, n_pairs=int(gaps.size),
                      n_ties=n_ties, n_identical=n_identical, n_empty=n_empty,
                      gap_mean=float(gaps.mean()) if gaps.size else float("nan"), gap_quantiles=quantiles)
    return datasets.Dataset.from_dict(rows, features=FEATURES), stats


def validate_preferences(ds: datasets.Dataset, *, tokenizer: PreTrainedTokenizerBase | None = None,
                         max_length: int | None = None, require_rewards: bool = True) -> None:
    """Raise ValueError naming the first unusable row (and, given a tokenizer, any prompt of ``max_length``
    tokens or more). ``require_rewards=False``: pairs labelled by people (TL;DR, Anthropic-HH), no r*."""
    columns = COLUMNS if require_rewards else COLUMNS[:3]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"preference data is missing column(s) {missing}; it has {ds.column_names}")
    if (tokenizer is None) != (max_length is None):
        raise TypeError("pass both tokenizer and max_length to check prompt lengths, or neither")
    cols = ds.select_columns(list(columns)).to_dict()  # plain lists: fast row access
    for row in range(len(ds)):
        for c in ("prompt", "chosen", "rejected"):
            text = cols[c][row]
            if text is None:
                raise ValueError(f"row {row}: {c} is missing (None)")
            if not isinstance(text, str):
                raise ValueError(f"row {row}: {c} must be a string, got {type(text).__name__} ({text!r})")
            if not text:
                raise ValueError(f"row {row}: empty {c} text ({text!r})")
        if cols["chosen"][row] == cols["rejected"][row]:
            raise ValueError(f"row {row}: chosen is identical to rejected ({cols['chosen'][row][:40]!r})")
        if not require_rewards:
            continue
        rw, rl = cols["chosen_reward"][row], cols["rejected_reward"][row]
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in (rw, rl)):
            raise ValueError(f"row {row}: rewards must be numbers, got chosen {rw!r}, rejected {rl!r}")
        if not (math.isfinite(rw) and math.isfinite(rl)):
            raise ValueError(f"row {row}: non-finite reward (chosen {rw}, rejected {rl})")
        if rw < rl:
            raise ValueError(f"row {row}: chosen_reward {rw:.6g} < rejected_reward {rl:.6g}; "
                             "chosen must be the preferred completion")
    if tokenizer is not None and max_length is not None:
        unique = sorted(set(cols["prompt"]))
        lengths = dict(zip(unique, (len(ids) for ids in
                                    tokenizer(unique, add_special_tokens=False)["input_ids"]), strict=True))
        for row, prompt in enumerate(cols["prompt"]):
            if lengths[prompt] >= max_length:  # leaving no room for a completion token
                raise ValueError(f"row {row}: prompt longer than the context ({lengths[prompt]} tokens, "
                                 f"max_length {max_length}): {prompt[:40]!r}")


def score_samples(reward_model: RewardModel, prompts: Sequence[str],
                  completions: Sequence[Sequence[str]]) -> list[list[float]]:
    """r*(x, y) of every completion ``[prompt][sample]``, scored on the text prompt + completion."""
    check_nested("completions", completions, len(prompts))
    flat_prompts = [p for p, per in zip(prompts, completions, strict=True) for _ in per]
    flat = [c for per in completions for c in per]
    scores = np.asarray(score_completions(reward_model, flat_prompts, flat), dtype=np.float64).reshape(-1)
    if scores.shape != (len(flat),):
        raise ValueError(f"reward model returned {scores.shape[0]} scores for {len(flat)} texts")
    if not np.isfinite(scores).all():
        raise ValueError("reward model returned non-finite scores")
    flat_scores = iter(scores.tolist())
    return [[next(flat_scores) for _ in per] for per in completions]


def generate_preference_data(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                             reward_model: RewardModel, config: PreferenceConfig, *, seed: int,
                             progress: bool = True) -> tuple[datasets.Dataset, PairStats, Candidates]:
    """Sample ``config.samples_per_prompt`` completions of each prompt, score and pair them: (pairs, their
    statistics, candidates: every sample with its r*)."""
    samples = sample(policy, tokenizer, prompts, n_per_prompt=config.samples_per_prompt,
                     max_new_tokens=config.max_new_tokens, batch_size=config.sample_batch_size, seed=seed,
                     progress=progress)
    rewards = score_samples(reward_model, samples.prompts, samples.texts)
    pairs, stats = build_preference_pairs(samples.prompts, samples.texts, rewards)
    candidates: Candidates = {"prompts": list(samples.prompts), "completions": samples.texts,
                              "rewards": rewards}
    return pairs, stats, candidates
