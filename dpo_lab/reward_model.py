"""The learned reward r_phi(x, y) = w · h_last(x, y) + b that PPO maximises (paper §3), trained by Eq. 2:

    L_R(r_phi) = -E[ log sigma( r_phi(x, y_w) - r_phi(x, y_l) ) ]                 (Eq. 2, Bradley-Terry)

h_last: the hidden state of a copy of the SFT policy's transformer at the last real token.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import GPT2Model, PreTrainedTokenizerBase

from dpo_lab.batching import Pairs, PreferenceCollator, pad_rows, pair_columns, pair_examples
from dpo_lab.data import validate_texts
from dpo_lab.logprobs import eval_mode, model_device, position_ids_from_mask
from dpo_lab.loop import optimizer_step, resolve_device, warmup_then_flat
from dpo_lab.losses import bradley_terry_loss
from dpo_lab.presets import RewardModelConfig
from dpo_lab.seed import seed_everything


# ------------------------------------------------------------------------------------------------ model
class ScalarRewardModel(nn.Module):
    """A GPT-2 backbone and a linear head read at each row's last real token: ``(B, T) -> (B,)``."""

    def __init__(self, backbone: GPT2Model) -> None:
        super().__init__()
        if not isinstance(backbone, GPT2Model):
            raise TypeError(f"backbone must be a transformers GPT2Model, got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        # Zero head: r_phi = 0 for every input at the start, so the first BT loss is exactly log 2.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ScalarRewardModel:
        """A reward model whose backbone is a COPY of ``policy.transformer`` (the policy is untouched)."""
        backbone = getattr(policy, "transformer", None)
        if not isinstance(backbone, GPT2Model):
            raise TypeError(f"policy must be a GPT2LMHeadModel (with a .transformer GPT2Model), "
                            f"got {type(policy).__name__}")
        return cls(copy.deepcopy(backbone))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (B, T); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        lengths = attention_mask.long().sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row with no real tokens")
        # Positions counted over real tokens: left- and right-padded rows give the same reward.
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask.long(),
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        hidden = hidden.last_hidden_state  # (B, T, d)
        # Index of the last real token = the last column where attention_mask is 1 (either padding side).
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(attention_mask.bool(), columns, -1).max(-1).values  # (B,)
        pooled = hidden[torch.arange(input_ids.shape[0], device=input_ids.device), last]  # (B, d)
        return self.head(pooled.float()).squeeze(-1)  # (B,)


def pair_rewards(model: ScalarRewardModel, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(r(x, y_w), r(x, y_l)) of a ``PreferenceCollator`` batch in ONE forward pass over both halves."""
    rewards = model(batch["input_ids"], batch["attention_mask"])[batch["rows"]]
    return rewards[:, 0], rewards[:, 1]


# ---------------------------------------------------------------------------------------------- splitting
def split_by_prompt(prompts: Sequence[str], val_fraction: float, seed: int,
                    ) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices, each prompt's pairs on one side: a seeded ``ceil(val_fraction *
    n_prompts)`` prompts each for validation (choosing the kept weights) and test (a best-of-many score on
    the pairs it was chosen on would flatter it)."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    unique = sorted(set(prompts))
    if len(unique) < 3:
        raise ValueError(f"need at least 3 distinct prompts to split by prompt, got {len(unique)}")
    n_held = min((len(unique) - 1) // 2, max(1, math.ceil(val_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    side = {unique[i]: 1 + (k >= n_held) for k, i in enumerate(order[:2 * n_held])}  # 1 val, 2 test
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, prompt in enumerate(prompts):
        parts[side.get(prompt, 0)].append(i)
    return parts


# ------------------------------------------------------------------------------------------ the callable
class LearnedReward:
    """``r_phi(texts) -> np.ndarray``: ``r_phi(x, y) - offset`` of each text, r*'s interface."""

    def __init__(self, model: ScalarRewardModel, tokenizer: PreTrainedTokenizerBase, *, offset: float = 0.0,
                 max_length: int = 128, batch_size: int = 64,
                 report: Mapping[str, Any] | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad_token_id; set one (pad = eos) before scoring")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.offset = float(offset)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.report: dict[str, Any] = dict(report or {})

    def raw(self, texts: Sequence[str]) -> np.ndarray:
        """Unnormalised ``r_phi`` (no offset) of each text, float64 ``(len(texts),)``."""
        texts = validate_texts(texts, allow_empty=True)
        if not texts:
            return np.zeros(0)
        device = next(self.model.parameters()).device
        pad = int(self.tokenizer.pad_token_id)
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start:start + self.batch_size]
                # An empty text would have no last token to read: score the pad/EOS token alone instead.
                rows = [list(r[: self.max_length]) or [pad]
                        for r in self.tokenizer(chunk, add_special_tokens=False)["input_ids"]]
                batch = pad_rows([{"input_ids": r, "completion_mask": [0] * len(r)} for r in rows], pad)
                out.append(self.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                           .double().cpu())
        return torch.cat(out).numpy()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """``r_phi(x, y) - offset``: E = 0 over the training completions (paper §3; one global offset, as a
        per-prompt one cannot reach unseen prompts)."""
        return self.raw(texts) - self.offset


# ---------------------------------------------------------------------------------------------- training
@dataclass
class RewardModelReport:
    """What training saw: per-step BT loss, validation history, the kept step and the offset."""

    train_losses: list[float] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss", "val_accuracy"}
    best_step: int = 0
    best_val_accuracy: float = float("nan")
    offset: float = 0.0
    n_train_pairs: int = 0
    n_val_pairs: int = 0
    test_accuracy: float = float("nan")  # the kept weights on the test pairs, looked at once
    n_test_pairs: int = 0
    # Where the pairs carry r*'s scores: r*'s own test accuracy (the ceiling) and r_phi's by r*-gap bin.
    rstar_test_accuracy: float | None = None
    test_accuracy_by_gap: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate_pairs(model: ScalarRewardModel, collator: PreferenceCollator,
                   examples: Sequence[Mapping[str, str]], *, batch_size: int) -> dict[str, float]:
    """Mean BT loss and accuracy (share of pairs with r(y_w) > r(y_l), ties half) over ``examples``."""
    if not examples:
        raise ValueError("no pairs to evaluate")
    losses, correct = [], []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start:start + batch_size])
            chosen, rejected = pair_rewards(model, {k: v.to(model_device(model)) for k, v in batch.items()})
            losses.append(bradley_terry_loss(chosen, rejected).cpu())
            # An exact tie (e.g. the zero head at step 0) is a coin flip: it counts one half.
            correct.append(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).cpu())
    return {"val_loss": float(torch.cat(losses).mean()),
            "val_accuracy": float(torch.cat(correct).float().mean()), "correct": torch.cat(correct).tolist()}


def _true_gaps(pairs: Pairs) -> np.ndarray | None:
    """r*(y_w) - r*(y_l) per pair, where the pairs carry the scores that labelled them; else None."""
    columns = isinstance(pairs, Mapping) or hasattr(pairs, "column_names")  # a dict of columns or a Dataset
    try:
        chosen, rejected = (pairs[name] if columns else [row[name] for row in pairs]
                            for name in ("chosen_reward", "rejected_reward"))
    except (KeyError, ValueError):  # a row or dict without them raises KeyError, a Dataset ValueError
        return None
    return np.asarray(chosen, dtype=float) - np.asarray(rejected, dtype=float)


def accuracy_by_gap(correct: Sequence[float], gaps: Sequence[float], n_bins: int = 4
                    ) -> list[dict[str, float]]:
    """Accuracy within quantile bins of the true gap r*(y_w) - r*(y_l): is r_phi wrong where r* barely
    separates the pair?"""
    correct, gaps = np.asarray(correct, dtype=float), np.asarray(gaps, dtype=float)
    edges = np.quantile(gaps, np.linspace(0.0, 1.0, n_bins + 1))
    bins = np.clip(np.searchsorted(edges, gaps, side="right") - 1, 0, n_bins - 1)
    return [{"gap_from": float(edges[b]), "gap_to": float(edges[b + 1]), "pairs": int((bins == b).sum()),
             "accuracy": float(correct[bins == b].mean())} for b in range(n_bins) if (bins == b).any()]


@torch.no_grad()
def completion_offset(model: ScalarRewardModel, collator: PreferenceCollator,
                      examples: Sequence[Mapping[str, str]], *, batch_size: int) -> float:
    """Mean ``r_phi`` over the distinct (prompt, completion) pairs of the training pairs (paper §3)."""
    seen = sorted({(e["prompt"], e[side]) for e in examples for side in ("chosen", "rejected")})
    # Score each distinct completion once: each is a "ranking" of one completion to the collator.
    rows = [{"prompt": p, "completions": [c]} for p, c in seen]
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collator(rows[start:start + batch_size]).items()}
        total += float(model(batch["input_ids"], batch["attention_mask"]).double().sum())
    return total / len(rows)


def _split(pairs: Pairs, config: RewardModelConfig, seed: int) -> tuple[list, list, list, list]:
    """(train, validation, test) examples split by prompt (at most ``max_val_pairs`` validation pairs) and
    the test pairs' indices."""
    cols = pair_columns(pairs)
    examples = pair_examples(cols)
    train_idx, val_idx, test_idx = split_by_prompt(cols["prompt"], config.val_fraction, seed)
    if config.max_val_pairs is not None and len(val_idx) > config.max_val_pairs:
        keep = np.random.default_rng([seed, 1]).choice(len(val_idx), config.max_val_pairs, replace=False)
        val_idx = [val_idx[i] for i in sorted(keep)]
    train, val, test = ([examples[i] for i in idx] for idx in (train_idx, val_idx, test_idx))
    return train, val, test, test_idx


def train_reward_model(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    *,
    config: RewardModelConfig,
    seed: int,
    progress: bool = True,
    device: torch.device | str | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> LearnedReward:
    """Train r_phi by Eq. 2 from ``policy``'s transformer (head at zero: first loss exactly log 2) on
    ``pairs`` split by prompt, keep the best-validation weights (the paper), test them once; ``.report``
    holds the :class:`RewardModelReport`. ``on_step(step, total)`` follows every optimizer step."""
    seed_everything(seed)
    device = resolve_device(device)
    train, val, test, test_idx = _split(pairs, config, seed)
    collator = PreferenceCollator(tokenizer, config.max_length)
    model = ScalarRewardModel.from_policy(policy).to(device).train()
    report = RewardModelReport(n_train_pairs=len(train), n_val_pairs=len(val), n_test_pairs=len(test))
    kept: dict[str, Any] = {"key": (-1.0, -math.inf)}

    def validate(step: int) -> None:
        """Keep the best validation accuracy's weights, ties to the lower loss; step 0 (the zero head ties
        every pair) is logged, never kept."""
        result = evaluate_pairs(model, collator, val, batch_size=2 * config.batch_size)
        result = {"step": step, "val_loss": result["val_loss"], "val_accuracy": result["val_accuracy"]}
        report.val_history.append(result)
        if step > 0 and (result["val_accuracy"], -result["val_loss"]) > kept["key"]:
            kept["key"] = (result["val_accuracy"], -result["val_loss"])
            kept["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            report.best_step, report.best_val_accuracy = step, result["val_accuracy"]

    validate(0)
    report.train_losses = _fit(model, collator, train, config, seed, validate, on_step, progress)
    model.load_state_dict(kept["state"])
    model.eval()
    tested = evaluate_pairs(model, collator, test, batch_size=2 * config.batch_size)
    report.test_accuracy = tested["val_accuracy"]
    gaps = _true_gaps(pairs)
    if gaps is not None:
        gaps = gaps[test_idx]
        report.test_accuracy_by_gap = accuracy_by_gap(tested["correct"], gaps)
        report.rstar_test_accuracy = float(np.mean((gaps > 0) + 0.5 * (gaps == 0)))
    report.offset = completion_offset(model, collator, train, batch_size=2 * config.batch_size)
    return LearnedReward(model, tokenizer, offset=report.offset, max_length=config.max_length,
                         report={**asdict(report), "config": asdict(config)})


def _fit(model: ScalarRewardModel, collator: PreferenceCollator, train: list[dict], config: RewardModelConfig,
         seed: int, validate: Callable[[int], None], on_step: Callable[[int, int], None] | None,
         progress: bool) -> list[float]:
    """AdamW on Eq. 2, warm-up then flat lr: ``config.epochs`` seeded shuffles (last partial batch dropped),
    at most ``max_steps`` steps, validated every ``eval_every`` steps and at each epoch's end; the losses."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_flat(config.warmup_steps))
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = min(config.epochs * steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch)
    step = 0
    losses: list[float] = []
    bar = tqdm(total=total, desc="reward model", disable=not progress)
    for epoch in range(config.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        for b in range(min(steps_per_epoch, total - step)):
            step += 1
            batch = collator([train[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]])
            chosen, rejected = pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
            loss = bradley_terry_loss(chosen, rejected).mean()  # Eq. 2
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite reward-model loss at step {step}; lower the lr")
            optimizer_step(optimizer, model.parameters(), config.max_grad_norm, loss=loss,
                           scheduler=scheduler, where=f"at step {step}")
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, total)
            if step % config.eval_every == 0 or b == steps_per_epoch - 1 or step == total:
                validate(step)
    bar.close()
    return losses
