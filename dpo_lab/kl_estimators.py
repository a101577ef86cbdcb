"""Sampled estimators of the sequence KL(π ‖ π_ref) beside the exact one, and samplers that break them.

Schulman (2020, http://joschu.net/blog/kl-approx.html), with log r_t = log π_ref(y_t|·) − log π(y_t|·) summed
over y ~ π: k1 = Σ −log r_t (unbiased), k2 = Σ ½ (log r_t)² (biased, ≥ 0), k3 = Σ (r_t − 1) − log r_t
(unbiased, ≥ 0); ``exact`` sums each step's KL over the vocabulary (footnote 3). Valid on samples of π only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dpo_lab.logprobs import batch_logits, sequence_kl, token_logprobs
from dpo_lab.sampling import Samples, _check_args, sample, sampling_config

ESTIMATORS = ("k1", "k2", "k3", "exact")


@dataclass(frozen=True)
class KLEstimates:
    """Per completion, each ``(N,)`` float64: the three sampled estimators, the exact sum, the length."""

    k1: np.ndarray
    k2: np.ndarray
    k3: np.ndarray
    exact: np.ndarray
    n_tokens: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in (*ESTIMATORS, "n_tokens")}


def token_estimators(policy_logps: Tensor, ref_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(k1, k2, k3)`` of the sampled tokens, float64: k3 subtracts nearly equal terms where
    π ≈ π_ref, and ``expm1`` keeps ``e^u − 1 − u ≥ 0`` in rounding too."""
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)} and ref_logps "
                         f"{tuple(ref_logps.shape)} must have the same shape")
    log_r = ref_logps.double() - policy_logps.double()  # log π_ref/π at the sampled token
    return -log_r, 0.5 * log_r.square(), torch.expm1(log_r) - log_r


@torch.no_grad()
def kl_estimates(policy: nn.Module, reference: nn.Module, prompt_ids: Sequence[Sequence[int]],
                 completion_ids: Sequence[Sequence[int]], *, batch_size: int,
                 pad_token_id: int = 0) -> KLEstimates:
    """k1, k2, k3 and the exact KL of each completion (exact ids, EOS included where sampled; an empty one
    scores 0), one forward per model per batch. ``exact`` and ``k1`` equal ``sample(reference=...)``'s
    ``kl`` and ``logratio`` to float rounding (tested)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    columns: dict[str, list[Tensor]] = {name: [] for name in (*ESTIMATORS, "n_tokens")}
    for (pol, ref), ids, comp in batch_logits([policy, reference], prompt_ids, completion_ids,
                                              batch_size=batch_size, pad_token_id=pad_token_id):
        mask = comp[:, 1:].bool()  # logits at t predict token t + 1
        per_token = token_estimators(token_logprobs(pol, ids), token_logprobs(ref, ids))
        for name, values in zip(("k1", "k2", "k3"), per_token, strict=True):
            # where, not multiply: a padded position's value must not reach the sum even if not finite
            columns[name].append(torch.where(mask, values, 0.0).sum(-1).cpu())
        columns["exact"].append(sequence_kl(pol, ref, comp).double().cpu())
        columns["n_tokens"].append(mask.sum(-1).cpu())
    return KLEstimates(**{name: torch.cat(parts).numpy() for name, parts in columns.items()})


def drop_eos(completion_ids: Sequence[Sequence[int]], eos_token_id: int) -> list[list[int]]:
    """Each completion without a final EOS: what decoding with ``skip_special_tokens`` and re-tokenising
    the text gives back. The step that chose to stop, and its term of every estimator, is gone."""
    return [list(c[:-1]) if c and c[-1] == eos_token_id else list(c) for c in completion_ids]


@torch.no_grad()
def sample_with_settings(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                         top_k: int = 0, top_p: float = 1.0, min_new_tokens: int = 0, strip_eos: bool = False,
                         **kwargs: int) -> Samples:
    """``sample(..., backend="generate")`` (``kwargs``: n_per_prompt, max_new_tokens, batch_size, seed) with
    warpers: top-k or top-p truncate π, ``min_new_tokens`` masks EOS that long, ``strip_eos`` applies
    :func:`drop_eos`. The defaults give ``sample``'s tokens (tested)."""
    _check_args(**kwargs)
    max_new_tokens = kwargs["max_new_tokens"]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
            or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be an integer in [0, max_new_tokens={max_new_tokens}], "
                         f"got {min_new_tokens!r}")
    config = sampling_config(tokenizer, max_new_tokens)
    config.top_k, config.top_p, config.min_new_tokens = top_k, top_p, min_new_tokens
    drawn = sample(model, tokenizer, prompts, **kwargs, progress=False, backend="generate",
                   generation_config=config)
    if not strip_eos:
        return drawn
    # The texts stay: decoding skips special tokens, so a dropped EOS was never in them.
    return dataclasses.replace(drawn, completion_ids=[drop_eos(per, tokenizer.eos_token_id)
                                                      for per in drawn.completion_ids])
