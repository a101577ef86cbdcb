"""Untruncated samples y ~ pi(.|x) (temperature 1, no top-k/top-p; docs/design.md, "Sampling") from
left-padded prompts. EOS ends a row; it is kept in ``completion_ids`` (the KL counts that step), not in text.
Backends (docs/performance.md): ``"generate"`` (HF, the reference), ``"loop"`` (our loop: ``generate``'s
tokens exactly) and ``"loop_icdf"`` (default: the same loop drawing by inverse CDF, ~1.9x ``generate``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpo_lab.batching import pad_rows
from dpo_lab.data import validate_texts
from dpo_lab.logprobs import eval_mode, has_hooks, model_device

Backend = Literal["loop", "loop_icdf", "generate"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass(frozen=True)
class Samples:
    """Completions of each prompt, as token ids (exact) and as decoded text (for rewards and pairs)."""

    prompts: list[str]
    prompt_ids: list[list[int]]  # [prompt] -> token ids, unpadded
    completion_ids: list[list[list[int]]]  # [prompt][sample] -> sampled ids, EOS included if sampled
    texts: list[list[str]]  # [prompt][sample] -> decoded completion (special tokens dropped)
    # With ``sample(reference=...)``, [prompt][sample]: exact sequence KL and log pi(y|x) - log pi_ref(y|x).
    kl: list[list[float]] | None = None
    logratio: list[list[float]] | None = None


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, no special tokens (as batching.tokenize_completion)."""
    ids = []
    for i, prompt in enumerate(validate_texts(prompts, name="prompts", allow_empty=True)):
        row = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not row:
            raise ValueError(f"prompt {i} is empty ({prompt!r}): a completion needs a prompt token before it")
        ids.append(list(row))
    return ids


def sampling_config(tokenizer: PreTrainedTokenizerBase,
                    max_new_tokens: int | None = None) -> GenerationConfig:
    """Pure ancestral sampling, every warper at its no-op value: the frontier's rewards and KLs must be those
    of pi itself, not of the truncated distribution ``generate``'s default top_k=50 samples."""
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


def _check_args(n_per_prompt: int, max_new_tokens: int, batch_size: int, seed: int,
                backend: str = "loop") -> None:
    for name, value in (("n_per_prompt", n_per_prompt), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ------------------------------------------ backend="loop": one forward per new token, fed as `generate` does

Stepper = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (B, q), positions (B, q)) -> logits


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _hf_stepper(model: nn.Module, attention_mask: torch.Tensor) -> Stepper:
    """Any HF causal LM: its forward and a DynamicCache, fed as ``generate`` feeds it (which drops an all-ones
    mask, letting sdpa use its causal flag: keeping it could change the logits' last bits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    extra: dict[str, object] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    use_positions = _accepts(model, "position_ids")
    state = {"mask": None if bool(attention_mask.all()) else attention_mask}

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if mask is not None and mask.shape[1] < positions.shape[1] + cache.get_seq_length():
            mask = state["mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], tokens.shape[1]))], dim=1)
        out = model(input_ids=tokens, attention_mask=mask, cache=cache, use_cache=True, return_dict=True,
                    **({"position_ids": positions} if use_positions else {}), **extra)
        return out.logits[:, -1]

    return step


def _fast_gpt2_supported(model: nn.Module) -> bool:
    """Our block loop reproduces ``GPT2LMHeadModel`` with sdpa attention and nothing else."""
    from transformers import GPT2LMHeadModel

    config = model.config
    return (type(model) is GPT2LMHeadModel and config._attn_implementation == "sdpa"
            and not config.add_cross_attention and not model.training and not has_hooks(model))


def _conv1d(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """HF's GPT-2 ``Conv1D`` (x @ W + b) with the same addmm call, so results match bit for bit."""
    return torch.addmm(layer.bias, x.view(-1, x.size(-1)), layer.weight).view(*x.shape[:-1], layer.nf)


def _gpt2_stepper(model: nn.Module, attention_mask: torch.Tensor, max_new_tokens: int) -> Stepper:
    """GPT-2's blocks with ``modeling_gpt2``'s ops in its order (same addmm, sdpa mask or causal flag, GELU)
    on a preallocated cache: at 4 layers x 192, HF's per-step bookkeeping cost as much as the matmuls."""
    transformer = model.transformer
    blocks = list(transformer.h)
    config = model.config
    width, n_head = config.n_embd, config.n_head
    head_dim = width // n_head
    batch, prompt_len = attention_mask.shape
    total = prompt_len + max_new_tokens
    device, dtype = attention_mask.device, transformer.wte.weight.dtype
    keys = [torch.empty((batch, n_head, total, head_dim), dtype=dtype, device=device) for _ in blocks]
    values = [torch.empty_like(k) for k in keys]
    padded = not bool(attention_mask.all())
    keep = torch.ones((batch, total), dtype=torch.bool, device=device)  # generated tokens are never masked
    keep[:, :prompt_len] = attention_mask.bool()
    state = {"length": 0}

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start, q_len = state["length"], tokens.shape[1]
        end = start + q_len
        state["length"] = end
        if not padded:
            mask = None
        elif q_len == 1:
            mask = keep[:, None, None, :end]
        else:  # prefill from an empty cache
            causal = torch.ones((q_len, q_len), dtype=torch.bool, device=device).tril()
            mask = causal[None, None] & keep[:, None, None, :end]
        hidden = transformer.wte(tokens) + transformer.wpe(positions)
        for i, block in enumerate(blocks):
            attn = block.attn
            x = F.layer_norm(hidden, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
            q, k, v = _conv1d(x, attn.c_attn).split(width, dim=2)
            q = q.view(batch, q_len, n_head, head_dim).transpose(1, 2)
            keys[i][:, :, start:end] = k.view(batch, q_len, n_head, head_dim).transpose(1, 2)
            values[i][:, :, start:end] = v.view(batch, q_len, n_head, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys[i][:, :, :end], values[i][:, :, :end],
                                                 attn_mask=mask, scale=attn.scaling,
                                                 is_causal=mask is None and q_len > 1)
            out = out.transpose(1, 2).contiguous().reshape(batch, q_len, width)
            hidden = _conv1d(out, attn.c_proj) + hidden
            x = F.layer_norm(hidden, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
            hidden = hidden + _conv1d(block.mlp.act(_conv1d(x, block.mlp.c_fc)), block.mlp.c_proj)
        ln_f = transformer.ln_f
        hidden = F.layer_norm(hidden, (width,), ln_f.weight, ln_f.bias, ln_f.eps)
        return model.lm_head(hidden[:, -1:, :])[:, -1]

    return step


def _draw_multinomial(probs: torch.Tensor) -> torch.Tensor:
    """``generate``'s draw: one ``torch.multinomial`` over the whole batch (B x V Exp(1) variates)."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def _draw_inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """Token j w.p. probs[j]: the first j with CDF(j) > u * total, u ~ U[0, 1), one variate per row. The
    float32 CDF (float64 doubled the B x V scan's traffic) moves a token's probability by <= ~6e-8; a
    zero-probability token has an empty interval (``right=True``) and the cap handles u * total == total."""
    cdf = probs.float().cumsum(dim=-1)
    # float64 uniforms (B of them, cheap), rounded: the same u as the float64 CDF drew, so a token moves
    # only where u falls within rounding of an interval's end.
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device).float() * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(1)
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last_with_mass)


@torch.no_grad()
def _loop_batch(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                draw: Callable[[torch.Tensor], torch.Tensor] = _draw_multinomial,
                reference: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens (B, <= max_new_tokens) of a left-padded batch (pad after EOS) and ``(2, B)`` float64 sums
    of [exact KL to ``reference``, log-ratio] (zeros without one). Stops when the last row samples EOS, as
    ``generate`` does, so the RNG ends where it would; the reference steps alongside and draws nothing."""
    batch, _ = input_ids.shape
    device = input_ids.device
    steps = [_gpt2_stepper(m, attention_mask, max_new_tokens) if _fast_gpt2_supported(m)
             else _hf_stepper(m, attention_mask) for m in (model, reference) if m is not None]
    new = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    sums = torch.zeros((2, batch), dtype=torch.float64, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate
    logits = [step(input_ids, positions) for step in steps]
    positions = positions[:, -1:]
    for t in range(max_new_tokens):
        probs = F.softmax(logits[0].float(), dim=-1)  # generate: fp32 copy of the last logits, then softmax
        tokens = torch.where(unfinished, draw(probs), pad_token_id)  # finished rows: padding, as generate
        if reference is not None:  # paper footnote 3: exact per-step KL over the vocab, fp32 (sequence_kl)
            logp, logq = (F.log_softmax(x.float(), dim=-1) for x in logits)
            ratio = logp - logq
            kl = (logp.exp() * ratio).sum(-1).clamp(min=0.0)
            step_sums = torch.stack([kl, ratio.gather(-1, tokens[:, None]).squeeze(-1)])
            sums += torch.where(unfinished, step_sums, 0.0)  # the EOS step counts, steps after it do not
        new[:, t] = tokens
        unfinished &= tokens != eos_token_id
        if t == max_new_tokens - 1 or not bool(unfinished.any()):
            return new[:, :t + 1], sums
        positions = positions + 1
        logits = [step(tokens[:, None], positions) for step in steps]
    return new, sums


@torch.no_grad()
def sample(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, n_per_prompt: int,
           max_new_tokens: int, batch_size: int, seed: int, progress: bool = True,
           backend: Backend = "loop_icdf", generation_config: GenerationConfig | None = None,
           reference: nn.Module | None = None) -> Samples:
    """``n_per_prompt`` completions of every prompt, ``batch_size`` rows at a time. With ``reference`` (loop
    backends), ``Samples.kl``/``.logratio`` hold each completion's exact KL to it and sampled log-ratio; the
    tokens do not change. ``generation_config`` (``"generate"`` only) replaces :func:`sampling_config`.
    Draws from a fork of torch's RNG seeded with ``seed``: the caller's RNG stream is left untouched."""
    _check_args(n_per_prompt, max_new_tokens, batch_size, seed, backend)
    if generation_config is not None and backend != "generate":
        raise ValueError(f"generation_config needs backend='generate', not {backend!r}")
    if reference is not None and backend == "generate":
        raise ValueError("reference needs a loop backend, not 'generate'")
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
    config = generation_config or sampling_config(tokenizer, max_new_tokens)
    device = model_device(model)
    flat: list[list[int]] = []
    flat_sums: list[torch.Tensor] = []
    fork_devices = [device] if device.type == "cuda" else []
    draw = _draw_inverse_cdf if backend == "loop_icdf" else _draw_multinomial
    ref_mode = eval_mode(reference) if reference is not None else nullcontext()
    with torch.random.fork_rng(devices=fork_devices), eval_mode(model), ref_mode:
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress,
                          leave=False):
            rows = [prompt_ids[i] for i in jobs[start:start + batch_size]]
            padded = pad_rows([{"input_ids": r, "completion_mask": [0] * len(r)} for r in rows],
                              tokenizer.pad_token_id, side="left")  # new tokens append at one column
            input_ids, attention_mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
            if backend == "generate":
                new = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=config)[:, input_ids.shape[1]:]
            else:
                new, sums = _loop_batch(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                        draw=draw, reference=reference)
                flat_sums.append(sums.cpu())
            flat.extend(_cut_at_eos(row, tokenizer.eos_token_id) for row in new.tolist())
    def per_prompt(rows: list) -> list[list]:
        return [rows[i * n_per_prompt:(i + 1) * n_per_prompt] for i in range(len(prompt_ids))]

    completion_ids = per_prompt(flat)
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in per] for per in completion_ids]
    kl = logratio = None
    if reference is not None:
        kl, logratio = (per_prompt(row) for row in torch.cat(flat_sums, 1).tolist())
    return Samples(prompts=list(prompts), prompt_ids=prompt_ids, completion_ids=completion_ids, texts=texts,
                   kl=kl, logratio=logratio)

