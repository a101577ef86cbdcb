"""The reference policy π_ref: a byte-level BPE and a small GPT-2 (`cpu`, `smoke`) or a hub checkpoint such as
gpt2-large (`paper`), then :func:`train_sft`, standing in for the paper's "SFT on IMDb train" (App. C.1)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from dpo_lab.data import validate_texts
from dpo_lab.logprobs import eval_mode, model_device
from dpo_lab.loop import optimizer_step, warmup_then_cosine
from dpo_lab.presets import PolicyConfig
from dpo_lab.sampling import sampling_config
from dpo_lab.seed import seed_everything

EOS = "<|endoftext|>"
MAX_HELD_OUT = 256  # held-out reviews train_sft reports its loss on


# --------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained on ``texts``: every byte in the alphabet (no unknown token), and
    ``<|endoftext|>`` as eos, bos and pad."""
    texts = validate_texts(texts, name="tokenizer training texts")
    min_size = 256 + 1  # the 256 byte symbols + <|endoftext|>
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size must be an int >= {min_size} (bytes + <|endoftext|>), "
                         f"got {vocab_size!r}")
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


# ------------------------------------------------------------------------------------------------ policy
def _prepare(model: PreTrainedModel, tokenizer: Any) -> PreTrainedModel:
    """Sampling defaults, pad = eos, eval mode, and every dropout p at 0 (as the official DPO code: train-mode
    log-probs equal eval-mode ones): the state every loader returns."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = sampling_config(tokenizer)
    model.config.pad_token_id = tokenizer.eos_token_id
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval()


def build_policy(tokenizer: Any, config: PolicyConfig, *, seed: int | None = None) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 sized by ``config``, with the tokenizer's vocabulary, and no dropout: it
    underfits (each review seen about once), and DPO compares its log-probs with a frozen copy's."""
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
    if seed is not None:
        seed_everything(seed)
    eos = tokenizer.eos_token_id
    gpt_config = GPT2Config(vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
                            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, activation_function=config.activation,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return _prepare(GPT2LMHeadModel(gpt_config), tokenizer)


def load_hub_policy(name: str, *, revision: str | None = None,
                    tokenizer_name: str | None = None) -> tuple[PreTrainedModel, Any]:
    """A causal LM and tokenizer from the hub or a folder: safetensors only, no remote code, pad = eos, no
    dropout. ``tokenizer_name``: another repository's tokenizer, for checkpoints that ship none."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or name,
                                              revision=None if tokenizer_name else revision,
                                              trust_remote_code=False)
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer of {tokenizer_name or name!r} has no eos token")
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, trust_remote_code=False,
                                                 use_safetensors=True)
    return _prepare(model, tokenizer), tokenizer


# ----------------------------------------------------------------------------------------------- SFT
def encode_reviews(tokenizer: Any, texts: Sequence[str],
                   max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each review as ``tokens + eos`` (cut ones end without eos), right-padded, unpacked so it starts at
    position 0 as a prompt does: ``(input_ids (N, max_length), lengths (N,))``."""
    texts = validate_texts(texts, name="reviews")
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(texts), max_length), eos, dtype=torch.long)
    lengths = torch.zeros(len(texts), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        tokens = (tokens + [eos])[:max_length]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths[row] = len(tokens)
    return ids, lengths


def _lm_batch(ids: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Trim padding to the longest row, mask it out of attention and of the loss (labels -100)."""
    width = int(lengths.max())
    ids = ids[:, :width]
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _summed_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the batch's real tokens (token t predicts t + 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             batch["labels"][:, 1:].flatten(), ignore_index=-100,
                                             reduction="sum")


@torch.no_grad()
def lm_loss(model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], *, max_length: int,
            batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per token) over ``texts`` encoded as in :func:`train_sft`."""
    ids, lengths = encode_reviews(tokenizer, texts, max_length)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(ids), batch_size):
            rows = slice(start, start + batch_size)
            batch = _lm_batch(ids[rows], lengths[rows], model_device(model))
            total += float(_summed_nll(model, batch))  # summed, so long reviews weigh by their tokens
            count += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)


def train_sft(model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], config: PolicyConfig, *,
              seed: int, held_out_texts: Sequence[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """SFT on reviews, which makes π_ref (and π_θ's start): ``config.sft_steps`` steps (0: one epoch, the
    paper's) of seeded shuffled batches, AdamW (decay on matrices), warm-up then cosine, norm clipped at 1.
    Returns per-step ``losses`` and ``lrs``, ``seconds``, ``tokens`` and,
    given ``held_out_texts`` (the first :data:`MAX_HELD_OUT`), ``held_out_loss_init``/``_loss``/``_ppl``."""
    texts = validate_texts(texts, name="SFT texts")
    batch_size = config.sft_batch_size
    if config.n_positions > model.config.n_positions:
        raise ValueError(f"config.n_positions={config.n_positions} exceeds the model's context "
                         f"({model.config.n_positions})")
    if len(texts) < batch_size:
        raise ValueError(f"need at least sft_batch_size={batch_size} texts, got {len(texts)}")
    steps = config.sft_steps if config.sft_steps > 0 else len(texts) // batch_size
    seed_everything(seed)
    device = next(model.parameters()).device
    ids, lengths = encode_reviews(tokenizer, texts, config.n_positions)
    held_out = None
    if held_out_texts is not None:
        held_out = validate_texts(held_out_texts, name="held-out texts")[:MAX_HELD_OUT]

    result: dict[str, Any] = {"steps": steps, "losses": [], "lrs": []}
    if held_out:
        result["held_out_loss_init"] = lm_loss(model, tokenizer, held_out, max_length=config.n_positions)

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.sft_lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    order, cursor, tokens = rng.permutation(len(texts)), 0, 0
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="SFT", disable=not progress):
        lr = warmup_then_cosine(step, lr=config.sft_lr, warmup=config.sft_warmup_steps, total=steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + batch_size > len(order):  # next epoch: a fresh shuffle (the incomplete batch is dropped)
            order, cursor = rng.permutation(len(texts)), 0
        rows = torch.as_tensor(order[cursor:cursor + batch_size])
        cursor += batch_size
        n_targets = int((lengths[rows] - 1).clamp(min=0).sum())
        loss = _summed_nll(model, _lm_batch(ids[rows], lengths[rows], device)) / max(n_targets, 1)
        optimizer_step(optimizer, model.parameters(), 1.0, loss=loss, where=f"at SFT step {step}")
        result["losses"].append(float(loss.detach()))
        result["lrs"].append(lr)
        tokens += n_targets
    model.eval()
    result["seconds"] = time.perf_counter() - start
    result["tokens"] = tokens
    if held_out:
        result["held_out_loss"] = lm_loss(model, tokenizer, held_out, max_length=config.n_positions)
        result["held_out_ppl"] = math.exp(result["held_out_loss"])
    return result
