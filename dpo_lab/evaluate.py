"""One frontier point: mean ground-truth reward r* and mean sequence-level KL(pi || pi_ref) on test prompts,

    KL_seq(x, y) = sum_t KL( pi(.|x, y_<t) || pi_ref(.|x, y_<t) )     (paper footnote 3, docs/design.md)

each step's KL exact over the vocabulary (less variance than the sampled log-ratio, reported beside it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from dpo_lab.loop import EvalFn
from dpo_lab.preferences import score_samples
from dpo_lab.presets import EvalConfig
from dpo_lab.rewards import RewardModel
from dpo_lab.sampling import sample

# A score read beside r* on the same samples: (flat prompts, flat completions) -> one number per sample
# (NaN where it is undefined, e.g. the fluency of an empty completion; such samples are left out).
Scorer = Callable[[list[str], list[str]], np.ndarray]


def _mean_se(per_sample: np.ndarray, n_prompts: int) -> tuple[float, float]:
    """Mean over all samples, and its standard error over per-prompt means (samples of a prompt correlate)."""
    rows = np.asarray(per_sample, dtype=np.float64).reshape(n_prompts, -1)
    counts = np.isfinite(rows).sum(axis=1)
    per_prompt = np.where(np.isfinite(rows), rows, 0.0).sum(axis=1)[counts > 0] / counts[counts > 0]
    n = len(per_prompt)
    se = float(per_prompt.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(np.nanmean(rows)) if n else float("nan"), se


def evaluate_policy(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], reward_model: RewardModel, config: EvalConfig, *, seed: int,
                    scorers: Mapping[str, Scorer] | None = None) -> dict[str, float]:
    """Sample from ``policy``, score r* and the exact KL to ``reference``: reward_, kl_, logratio_kl_ and
    each of ``scorers``' ``_mean``/``_se``, completion_tokens_mean, n, n_prompts. The same ``seed`` at every
    checkpoint gives common random numbers, so differences between checkpoints are less noisy."""
    if len(prompts) == 0:
        raise ValueError("evaluate_policy needs at least one prompt")
    samples = sample(policy, tokenizer, prompts, n_per_prompt=config.samples_per_prompt,
                     max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=seed,
                     progress=False, reference=reference)
    rewards = np.asarray(score_samples(reward_model, samples.prompts, samples.texts), dtype=np.float64)
    kl = np.asarray(samples.kl, dtype=np.float64).reshape(-1)
    logratio = np.asarray(samples.logratio, dtype=np.float64).reshape(-1)
    n_prompts = len(prompts)
    reward_mean, reward_se = _mean_se(rewards.reshape(-1), n_prompts)
    kl_mean, kl_se = _mean_se(kl, n_prompts)
    lr_mean, lr_se = _mean_se(logratio, n_prompts)
    extra = {}
    flat_texts = [t for per in samples.texts for t in per]
    flat_prompt_texts = [p for p, per in zip(samples.prompts, samples.texts, strict=True) for _ in per]
    for name, scorer in (scorers or {}).items():
        scores = np.asarray(scorer(flat_prompt_texts, flat_texts), dtype=np.float64)
        extra.update(zip((f"{name}_mean", f"{name}_se"), _mean_se(scores, n_prompts), strict=True))
    return {
        "reward_mean": reward_mean, "reward_se": reward_se,
        "kl_mean": kl_mean, "kl_se": kl_se,
        "logratio_kl_mean": lr_mean, "logratio_kl_se": lr_se,
        "completion_tokens_mean": float(np.mean([len(c) for per in samples.completion_ids for c in per])),
        "n": int(kl.size), "n_prompts": n_prompts, **extra,
    }


def make_eval_fn(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 reward_model: RewardModel, config: EvalConfig, *, seed: int,
                 scorers: Mapping[str, Scorer] | None = None) -> EvalFn:
    """``eval_fn(policy, step)`` for ``dpo_trainer.train_dpo``: one frontier point per call."""
    def eval_fn(policy: nn.Module, step: int) -> dict[str, float]:
        return evaluate_policy(policy, reference, tokenizer, prompts, reward_model, config, seed=seed,
                               scorers=scorers)
    return eval_fn
