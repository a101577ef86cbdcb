"""Sample completions from a causal LM exactly as the paper's IMDb pipeline needs them.

Every sample is an *untruncated* draw from the policy: temperature 1, top_k 0 (off: HF's default of 50
would silently sample from a different distribution), top_p 1 (DESIGN.md "Sampling"). Prompts are
LEFT-padded so that every row's next token sits at the last column; ``generate`` derives position ids
from the attention mask, so a padded row sees the same positions as the prompt sampled alone (tested).

Length rule: ``max_new_tokens`` tokens are sampled per completion; a row stops early only when the policy
itself samples EOS (that EOS is kept in ``completion_ids``: it is part of the sampled sequence, and the
evaluator's sequence KL includes the step that chose it). Nothing forces or forbids EOS, so the samples
are draws from pi(y | x) over sequences of at most ``max_new_tokens`` tokens. The decoded text drops EOS.

Randomness: ``generate`` draws from torch's global RNG. We fork it (``torch.random.fork_rng``) and seed
the fork, so the same seed gives the same samples on the same machine and batch size, and the caller's
RNG stream (e.g. a training loop's) is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Samples:
    """Completions of each prompt, as token ids (exact) and as decoded text (for rewards and pairs)."""

    prompts: list[str]
    prompt_ids: list[list[int]]  # [prompt] -> token ids, unpadded
    completion_ids: list[list[list[int]]]  # [prompt][sample] -> sampled ids, EOS included if sampled
    texts: list[list[str]]  # [prompt][sample] -> decoded completion (special tokens dropped)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch dropout off for the block and restore the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, without special tokens (the same rule batching.tokenize_completion uses)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string")
    ids = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str")
        row = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not row:
            raise ValueError(f"prompt {i} is empty ({prompt!r}): a completion needs a prompt token before it")
        ids.append(list(row))
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned, so new tokens append at one column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def sampling_config(tokenizer: PreTrainedTokenizerBase,
                    max_new_tokens: int | None = None) -> GenerationConfig:
    """Pure ancestral sampling: every warper that could truncate or reshape pi is set to its no-op value.

    Why: the paper's frontier plots E[r*] against KL(pi || pi_ref) of the policy itself, and preference pairs
    are samples of pi_ref. transformers' ``generate`` applies top_k=50 unless told otherwise, which samples a
    truncated distribution, not pi: rewards and KLs measured on such samples describe another policy.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; set one (GPT-2 uses '<|endoftext|>')")
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, use_cache=True,
        max_new_tokens=max_new_tokens, min_new_tokens=0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _cut_at_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; later columns are padding."""
    if eos_token_id is not None and eos_token_id in row:
        return row[: row.index(eos_token_id) + 1]
    return row


def _check_args(n_per_prompt: int, max_new_tokens: int, batch_size: int, seed: int) -> None:
    for name, value in (("n_per_prompt", n_per_prompt), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> Samples:
    """Draw ``n_per_prompt`` completions of every prompt; ``batch_size`` rows per ``generate`` call."""
    _check_args(n_per_prompt, max_new_tokens, batch_size, seed)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad_token_id; set one (e.g. pad = eos) before sampling")
    prompt_ids = encode_prompts(tokenizer, prompts)
    n_positions = getattr(model.config, "n_positions", None)
    longest = max((len(p) for p in prompt_ids), default=0)
    if n_positions is not None and longest + max_new_tokens > n_positions:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {n_positions} positions")
    # Row r of the flat job list is sample r % n of prompt r // n: a prompt's samples stay together.
    jobs = [i for i in range(len(prompt_ids)) for _ in range(n_per_prompt)]
    config = sampling_config(tokenizer, max_new_tokens)
    device = model_device(model)
    flat: list[list[int]] = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), eval_mode(model):
        torch.manual_seed(seed)
        starts = range(0, len(jobs), batch_size)
        for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
            rows = [prompt_ids[i] for i in jobs[start:start + batch_size]]
            input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            new = out[:, input_ids.shape[1]:].tolist()
            flat.extend(_cut_at_eos(row, tokenizer.eos_token_id) for row in new)
    completion_ids = [flat[i * n_per_prompt:(i + 1) * n_per_prompt] for i in range(len(prompt_ids))]
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in per] for per in completion_ids]
    return Samples(prompts=list(prompts), prompt_ids=prompt_ids, completion_ids=completion_ids, texts=texts)


def sample_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    n_per_prompt: int,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[list[str]]:
    """Decoded completions, ``[prompt][sample]``; see :func:`sample` for the token ids."""
    return sample(model, tokenizer, prompts, n_per_prompt=n_per_prompt, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, seed=seed, progress=progress).texts
