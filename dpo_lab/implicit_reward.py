"""The DPO policy read as a reward model: r̂(x, y) = β log π_θ(y|x) / π_ref(y|x) (Eq. 5 without β log Z(x),
the same for all completions of a prompt, so only same-prompt completions are compared). Held-out pairs are
the same-prompt pairs of K samples per test prompt whose r* differ, labelled by r*."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lab.evaluate import EvalFn
from dpo_lab.logprobs import completion_logprobs
from dpo_lab.preferences import score_samples
from dpo_lab.rewards import RewardModel
from dpo_lab.sampling import Samples, sample


@dataclass(frozen=True)
class HeldOut:
    """K samples of each held-out prompt, as exact token ids and text, with their r* ``(P, K)``."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]
    texts: list[list[str]]
    rstar: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.rstar.shape


def draw_heldout(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 reward: RewardModel, *, n_per_prompt: int, max_new_tokens: int, batch_size: int,
                 seed: int) -> HeldOut:
    """``n_per_prompt`` samples of each prompt from ``policy`` (π_SFT, as for training), scored by r*."""
    if n_per_prompt < 2:
        raise ValueError(f"n_per_prompt must be >= 2 to form pairs, got {n_per_prompt}")
    drawn = sample(policy, tokenizer, prompts, n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, seed=seed, progress=False)
    rstar = np.asarray(score_samples(reward, drawn.prompts, drawn.texts), dtype=np.float64)
    return HeldOut(list(drawn.prompts), drawn.prompt_ids, drawn.completion_ids, drawn.texts, rstar)


def _check_scores(scores: np.ndarray, rstar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, rstar = np.asarray(scores, dtype=np.float64), np.asarray(rstar, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != rstar.shape:
        raise ValueError(f"scores {scores.shape} and r* {rstar.shape} must both be (prompts, samples)")
    if not (np.isfinite(scores).all() and np.isfinite(rstar).all()):
        raise ValueError("scores and r* must be finite")
    return scores, rstar


def _labelled_pairs(rstar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prompt, y_w, y_l)`` indices of the same-prompt pairs whose r* differ (ties dropped, as for DPO)."""
    j, k = np.triu_indices(rstar.shape[1], k=1)
    gap = rstar[:, j] - rstar[:, k]
    keep = gap != 0
    return np.nonzero(keep)[0], np.where(gap > 0, j, k)[keep], np.where(gap > 0, k, j)[keep]


def pair_margins(scores: np.ndarray, rstar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every same-prompt pair whose r* differ: (score(y_w) - score(y_l), r*(y_w) - r*(y_l) > 0)."""
    scores, rstar = _check_scores(scores, rstar)
    rows, w, lose = _labelled_pairs(rstar)
    return scores[rows, w] - scores[rows, lose], rstar[rows, w] - rstar[rows, lose]


def ranking_accuracy(scores: np.ndarray, rstar: np.ndarray) -> float:
    """Share of held-out pairs whose scores rank y_w above y_l; a tie counts one half (so π_θ = π_ref,
    where every r̂ is 0, scores 0.5, not 0)."""
    margin, _ = pair_margins(scores, rstar)
    if margin.size == 0:
        raise ValueError("no held-out pair has distinct r*")
    return float(np.mean((margin > 0) + 0.5 * (margin == 0)))


def calibration(scores: np.ndarray, rstar: np.ndarray, *, n_bins: int = 10) -> pd.DataFrame:
    """Bradley–Terry calibration (Eq. 1 with r = ``scores``): each pair in both orders, predicted
    p = σ(score_a − score_b) binned, against the observed share of pairs in the bin where r* prefers a."""
    margin, _ = pair_margins(scores, rstar)
    predicted = 1 / (1 + np.exp(-np.concatenate([margin, -margin])))
    observed = np.concatenate([np.ones_like(margin), np.zeros_like(margin)])
    bins = np.minimum((predicted * n_bins).astype(int), n_bins - 1)
    frame = pd.DataFrame({"bin": bins, "predicted": predicted, "observed": observed})
    table = frame.groupby("bin").agg(predicted=("predicted", "mean"), observed=("observed", "mean"),
                                     n=("observed", "size"))
    table["se"] = np.sqrt(table.observed * (1 - table.observed) / table.n)
    return table.reset_index(drop=True)


def best_of_n(scores: np.ndarray, rstar: np.ndarray) -> tuple[float, float]:
    """Mean r* (and its SE over prompts) of each prompt's highest-scoring sample: reranking by ``scores``."""
    scores, rstar = _check_scores(scores, rstar)
    picked = rstar[np.arange(len(rstar)), scores.argmax(axis=1)]
    se = float(picked.std(ddof=1) / np.sqrt(len(picked))) if len(picked) > 1 else float("nan")
    return float(picked.mean()), se


def likelihood_fn(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, heldout: HeldOut, *, beta: float,
                  max_new_tokens: int, batch_size: int, seed: int) -> EvalFn:
    """``eval_fn(policy, step)``: held-out log π_θ and log-ratios of y_w and y_l, r̂'s ranking accuracy, and
    log π_θ, log π_ref of one fresh π_θ sample per prompt."""
    def logps(model: nn.Module, drawn: HeldOut | Samples) -> np.ndarray:  # (prompts, samples)
        return completion_logprobs(model, drawn.prompt_ids, drawn.completion_ids, batch_size=batch_size,
                                   pad_token_id=tokenizer.pad_token_id or 0)

    ref_logps = logps(reference, heldout)
    rows, w, lose = _labelled_pairs(heldout.rstar)

    def eval_fn(policy: nn.Module, step: int) -> dict[str, float]:
        policy_logps = logps(policy, heldout)
        ratio = policy_logps - ref_logps
        fresh = sample(policy, tokenizer, heldout.prompts, n_per_prompt=1, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, seed=seed + 1, progress=False)
        fresh_pol, fresh_ref = logps(policy, fresh), logps(reference, fresh)
        return {
            "heldout/logps/chosen": float(policy_logps[rows, w].mean()),
            "heldout/logps/rejected": float(policy_logps[rows, lose].mean()),
            "heldout/logratio/chosen": float(ratio[rows, w].mean()),
            "heldout/logratio/rejected": float(ratio[rows, lose].mean()),
            "heldout/accuracy": ranking_accuracy(beta * ratio, heldout.rstar),
            "heldout/logps/all": float(policy_logps.mean()),
            "fresh/logps": float(fresh_pol.mean()),
            "fresh/ref_logps": float(fresh_ref.mean()),
            "fresh/tokens": float(np.mean([len(c[0]) for c in fresh.completion_ids])),
        }
    return eval_fn
