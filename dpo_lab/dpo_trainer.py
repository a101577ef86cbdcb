"""The DPO trainer, written out: minimise paper Eq. 7 over a fixed set of preference pairs.

    L_DPO = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]

The same loop trains the paper's two non-RL baselines of the IMDb frontier (§6), chosen by ``objective``:

    "unlikelihood" (Welleck et al. 2019):  -log pi(y_w|x) - alpha sum_t log(1 - pi(y_l,t | x, y_l,<t))
    "preferred_ft" (SFT on the chosen completions):  -log pi(y_w|x)

They need per-token log-probs, computed for chosen and rejected in one forward pass
(``concatenated_token_logprobs``), and no reference for the loss; the reference log-probs are still loaded
(from the same cache as DPO) so that every objective logs the same TRL metrics, with the implicit reward
beta (log pi - log pi_ref) at ``beta`` (1.0 unless given) as a readout of how far the policy moved.

One optimizer step (App. B): ``batch_size`` pairs, accumulated over micro-batches of ``micro_batch_size``;
chosen and rejected share one forward pass (logprobs.concatenated_logprobs); gradient clipped to
``max_grad_norm``; RMSprop (the paper) or AdamW; lr warmed up linearly over ``warmup_steps``, then constant.

* pi_ref's log-probs never change, so they are computed once, before training, and cached on disk keyed by
  what produced them (reference weights, pairs, tokenizer, max_length, precision): every beta of a sweep
  shares them, and the reference model is not needed during training.
* Dropout stays off in the policy (as TRL's ``disable_dropout``): the implicit reward
  beta (log pi - log pi_ref) is then exactly 0 at step 0, and the first loss is log 2.
* ``out_dir`` is one run. ``metrics.jsonl`` gets one JSON line per step (TRL names; eval_fn's keys merged
  in on evaluation steps; step 0 holds the evaluation of the starting policy). Checkpoints are written
  atomically; a run resumes from its last one and ends with bit-identical weights (CPU) to an uninterrupted
  run; a finished run returns at once, with its final weights loaded into ``policy``.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_lab.batching import PreferenceCollator
from dpo_lab.cache import atomic_directory, content_hash
from dpo_lab.logprobs import concatenated_logprobs, forward_logits, token_logprobs
from dpo_lab.losses import preference_loss, preference_metrics, preferred_ft_loss, unlikelihood_loss
from dpo_lab.presets import DPOConfig

# Run bookkeeping lives in runs.py. batch_indices, load_weights, read_metrics, the fingerprints, Pairs and
# PAIR_COLUMNS stay importable from here: pipeline.py, the notebooks and the tests import them this way.
from dpo_lab.runs import (
    PAIR_COLUMNS,
    TRAINER_STATE,
    EvalFn,
    MetricsLog,
    Pairs,
    RunResult,
    batch_indices,
    check_run,
    checkpoint_path,
    finished_run,
    is_due,
    latest_checkpoint,
    load_weights,
    model_fingerprint,
    pair_columns,
    pair_examples,
    pairs_fingerprint,
    prune_checkpoints,
    quiet_hf_progress,
    read_metrics,
    resolve_device,
    rng_state,
    set_rng_state,
    tokenizer_fingerprint,
    truncate_metrics,
    warmup_lambda,
    write_result,
)
from dpo_lab.seed import seed_everything

Objective = Literal["dpo", "unlikelihood", "preferred_ft"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
_BAR_NAMES = {"dpo": "DPO", "unlikelihood": "Unlikelihood", "preferred_ft": "Preferred-FT"}
# Baseline-only metrics: mean -log pi(y_w|x), and mean -sum_t log(1 - pi(y_l,t)) (unlikelihood, before alpha).
_BASELINE_KEYS = ("nll/chosen", "unlikelihood/rejected")
# Settings that do not change the trajectory: a sweep list, or how often we look and save.
_NOT_IN_RUN_KEY = ("betas", "max_steps", "checkpoint_every", "eval_every")


@dataclass(frozen=True)
class DPOResult(RunResult):
    """A finished DPO (or baseline) run: checkpoint_dir (final policy, models.load_policy reads it),
    metrics_path, last_metrics, steps."""


# ------------------------------------------------------------------------------------------- pieces
def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (logprobs upcasts logits to fp32 before the softmax), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params: Sequence[nn.Parameter], config: DPOConfig) -> torch.optim.Optimizer:
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)  # the paper's optimizer (App. B), torch defaults
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # no decay: TRL's default
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'rmsprop' or 'adamw'")


def check_dpo_config(config: DPOConfig, beta: float, max_length: int) -> None:
    for name in ("batch_size", "micro_batch_size", "max_steps", "checkpoint_every", "eval_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"DPOConfig.{name} must be a positive integer, got {value!r}")
    if config.warmup_steps < 0:
        raise ValueError(f"DPOConfig.warmup_steps must be >= 0, got {config.warmup_steps}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"DPOConfig.lr must be a positive number, got {config.lr}")
    if not (config.max_grad_norm > 0):
        raise ValueError(f"DPOConfig.max_grad_norm must be > 0, got {config.max_grad_norm}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def _check_objective(objective: str, beta: float | None, alpha: float | None) -> float:
    """Validate objective/beta/alpha together; return the beta to use (1.0 for a baseline given none)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if objective == "dpo" and beta is None:
        raise ValueError("beta is required for objective='dpo' (the temperature of Eq. 7)")
    if objective == "unlikelihood":
        if alpha is None:
            raise ValueError("alpha is required for objective='unlikelihood' (the paper sweeps "
                             "0.05, 0.1, 0.5, 1)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} ({alpha!r})")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    elif alpha is not None:
        # An alpha that silently does nothing would mislabel a sweep.
        raise ValueError(f"alpha only applies to objective='unlikelihood', not {objective!r}; leave it None")
    # Baselines use beta only to log the implicit reward beta (log pi - log pi_ref); 1.0 reads it in nats.
    return 1.0 if beta is None else beta


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def concatenated_token_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor],
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of chosen and rejected from ONE forward pass over the stacked ``2B`` batch.

    Returns ``(chosen_token_logps, chosen_mask, rejected_token_logps, rejected_mask)``, each ``(B, T-1)``:
    ``log pi(y_t | x, y_<t)`` (fp32, 0 off the completion) and the shifted completion mask (1 where the
    logits predict a completion token). Summing a row under its mask gives ``logprobs.concatenated_logprobs``.
    """
    n_chosen = batch["chosen_input_ids"].shape[0]
    if batch["rejected_input_ids"].shape[0] != n_chosen:
        raise ValueError(f"batch has {n_chosen} chosen rows but "
                         f"{batch['rejected_input_ids'].shape[0]} rejected")
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def stack(key: str) -> torch.Tensor:  # right-pad both halves to one length; padding is masked out
        return torch.cat([F.pad(batch[f"{side}_{key}"], (0, length - batch[f"{side}_{key}"].shape[1]))
                          for side in ("chosen", "rejected")])

    input_ids, attention_mask, completion_mask = (stack(k) for k in ("input_ids", "attention_mask",
                                                                      "completion_mask"))
    if bool(completion_mask[:, 0].any()) or bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask must be 0 at position 0 and on padding")
    logps = token_logprobs(forward_logits(model, input_ids, attention_mask), input_ids)
    mask = completion_mask[:, 1:].long()
    logps = torch.where(mask.bool(), logps, 0.0)
    return logps[:n_chosen], mask[:n_chosen], logps[n_chosen:], mask[n_chosen:]


# ------------------------------------------------------------------------------------ reference log-probs
def reference_logprobs(
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    *,
    max_length: int,
    cache_dir: str | Path,
    batch_size: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    reference_fingerprint: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) of every pair, fp32 ``(N,)``, from the disk cache if present.

    The key hashes the reference weights, the pairs, the tokenizer, max_length, and the precision, so any
    change recomputes and nothing stale is reused. The reference runs in eval mode without gradients.
    ``reference_fingerprint`` (model_fingerprint of ``reference``) skips hashing the weights a second time.
    """
    device = resolve_device(device)
    cols = pair_columns(pairs)
    n = len(cols["prompt"])
    key = content_hash("ref-logps/v1", reference_fingerprint or model_fingerprint(reference),
                       pairs_fingerprint(cols), tokenizer_fingerprint(tokenizer), max_length, "sum",
                       device.type)
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        if cached["chosen"].shape != (n,) or cached["rejected"].shape != (n,):
            raise ValueError(f"reference cache {path} holds {cached['chosen'].shape[0]} pairs, expected {n}")
        return cached["chosen"], cached["rejected"]
    collator = PreferenceCollator(tokenizer, max_length)
    examples = pair_examples(cols)
    home = next(reference.parameters()).device
    was_training = reference.training
    reference.to(device).eval()
    chosen, rejected = [], []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="reference log-probs", disable=not progress,
                              leave=False):
                batch = _to(collator(examples[start:start + batch_size]), device)
                with autocast(device):
                    c, r = concatenated_logprobs(reference, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
    finally:
        reference.to(home).train(was_training)
    out = {"chosen": torch.cat(chosen).contiguous(), "rejected": torch.cat(rejected).contiguous()}
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        raise FloatingPointError("reference log-probs contain NaN or inf; check the reference model")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(out, tmp, metadata={"key": key, "n_pairs": str(n), "max_length": str(max_length)})
        os.replace(tmp, path)  # atomic: a reader sees no file or a complete one
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out["chosen"], out["rejected"]


# ------------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(out_dir: Path, step: int, policy: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     run_key: str, seed: int, n_pairs: int, batch_size: int, keep: int | None) -> Path:
    """Weights (safetensors) + tokenizer + optimizer/scheduler/RNG/data-order state, in one atomic write."""
    path = checkpoint_path(out_dir, step)
    with atomic_directory(path) as tmp, quiet_hf_progress():
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Tensors and plain types only, so torch.load(weights_only=True) can read it back.
        torch.save({"step": step, "run_key": run_key, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "data": {"seed": seed, "n_pairs": n_pairs, "batch_size": batch_size,
                             "pairs_seen": step * batch_size}},
                   tmp / TRAINER_STATE)
    prune_checkpoints(out_dir, keep, path)
    return path


# ------------------------------------------------------------------------------------------------- train
def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    *,
    beta: float | None = None,
    config: DPOConfig,
    out_dir: str | Path,
    seed: int,
    max_length: int,
    ref_cache_dir: str | Path,
    eval_fn: EvalFn | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    keep_checkpoints: int | None = 1,
    objective: Objective = "dpo",
    alpha: float | None = None,
) -> DPOResult:
    """Train ``policy`` in place with DPO (Eq. 7) against ``reference``; resumable, see module docstring.

    ``objective`` picks the loss: "dpo" (needs ``beta``; ``config.loss_type``/``label_smoothing`` apply),
    "unlikelihood" (needs ``alpha >= 0``) or "preferred_ft"; the baselines ignore the DPO-only config fields
    and use ``beta`` (default 1.0) only for the logged implicit rewards. ``eval_fn(policy, step)`` runs at
    step 0, every ``config.eval_every`` steps and at the end; its dict is merged into that step's metrics
    line. ``keep_checkpoints`` = how many latest checkpoints stay on disk (None keeps all). Raises
    FloatingPointError naming the step if the loss or gradient goes non-finite; the last good checkpoint is
    left untouched.
    """
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    beta = _check_objective(objective, beta, alpha)
    check_dpo_config(config, beta, max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    cols = pair_columns(pairs)
    n_pairs = len(cols["prompt"])
    run_fields = {
        "beta": float(beta), "seed": seed, "max_length": max_length,
        "config": {k: v for k, v in asdict(config).items() if k not in _NOT_IN_RUN_KEY},
        "reference": model_fingerprint(reference), "pairs": pairs_fingerprint(cols),
        "tokenizer": tokenizer_fingerprint(tokenizer), "device": device.type,
    }
    if objective != "dpo":
        # Only the baselines name their objective, so a DPO run keeps the key it had before they existed
        # (its out_dir still resumes); a baseline never matches a DPO run, nor another alpha.
        run_fields.update(objective=objective, alpha=None if alpha is None else float(alpha))
    run_key = check_run(out_dir, run_fields)
    metrics_path = out_dir / "metrics.jsonl"
    policy.to(device)

    finished = finished_run(out_dir, config.max_steps, DPOResult, policy)
    if finished is not None:
        return finished

    seed_everything(seed)
    ref_chosen, ref_rejected = reference_logprobs(
        reference, tokenizer, cols, max_length=max_length, cache_dir=ref_cache_dir,
        batch_size=config.micro_batch_size, device=device, progress=progress,
        reference_fingerprint=run_fields["reference"])
    collator = PreferenceCollator(tokenizer, max_length)
    policy.eval()  # dropout off; autograd works the same in eval mode
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))

    resume = latest_checkpoint(out_dir, run_key, config.max_steps)
    start, ckpt_dir = 0, None
    if resume is not None:
        start, ckpt_dir, state = resume
        load_weights(policy, ckpt_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    kept = truncate_metrics(metrics_path, start if resume is not None else None)

    train_keys = {"step", "lr", "grad_norm", "epoch", "loss", "rewards/chosen", "rewards/rejected",
                  "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", *_BASELINE_KEYS}
    with MetricsLog(metrics_path, eval_fn, train_keys, eval_every=config.eval_every,
                    max_steps=config.max_steps, last=kept[-1] if kept else None) as log:
        if start == 0:
            log.log_start(policy)
        desc = _BAR_NAMES[objective] + {"dpo": f" beta={beta:g}", "unlikelihood": f" alpha={alpha}"}.get(
            objective, "")
        bar = tqdm(range(start + 1, config.max_steps + 1), desc=desc, disable=not progress,
                   initial=start, total=config.max_steps)
        for step in bar:
            record = _train_step(policy, collator, cols, ref_chosen, ref_rejected, optimizer, scheduler,
                                 beta=beta, config=config, step=step, seed=seed, device=device,
                                 last_checkpoint=ckpt_dir, objective=objective, alpha=alpha)
            record["epoch"] = step * config.batch_size / n_pairs
            log.log_step(record, policy)
            bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['rewards/margins']:.3f}")
            if is_due(step, config.checkpoint_every, config.max_steps):
                ckpt_dir = _save_checkpoint(out_dir, step, policy, tokenizer, optimizer, scheduler, run_key,
                                            seed, n_pairs, config.batch_size, keep_checkpoints)
    if ckpt_dir is None:  # max_steps == start == 0 cannot happen (max_steps >= 1); kept for type checkers
        raise RuntimeError("training ended without a checkpoint")
    result = DPOResult(checkpoint_dir=ckpt_dir, metrics_path=metrics_path, last_metrics=log.last,
                       steps=config.max_steps)
    write_result(out_dir, result, run_key)
    return result


def _train_step(policy: nn.Module, collator: PreferenceCollator, cols: Mapping[str, Sequence[str]],
                ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, *, beta: float, config: DPOConfig,
                step: int, seed: int, device: torch.device, last_checkpoint: Path | None,
                objective: Objective = "dpo", alpha: float | None = None) -> dict[str, Any]:
    """One optimizer update over ``batch_size`` pairs; returns that step's metrics."""
    indices = batch_indices(len(cols["prompt"]), config.batch_size, step, seed)
    optimizer.zero_grad(set_to_none=True)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("losses", "cr", "rr", "pc", "pr", "nll", "ul")}
    where = f"at step {step} (last good checkpoint: {last_checkpoint or 'none'})"
    for m in range(0, len(indices), config.micro_batch_size):
        micro = indices[m:m + config.micro_batch_size]
        batch = _to(collator([{c: cols[c][i] for c in PAIR_COLUMNS} for i in micro]), device)
        idx = torch.tensor(micro)
        ref_c, ref_r = ref_chosen[idx].to(device), ref_rejected[idx].to(device)
        if objective == "dpo":
            with autocast(device):
                tok_c, _, tok_r, _ = concatenated_token_logprobs(policy, batch)
            policy_chosen, policy_rejected = tok_c.sum(-1), tok_r.sum(-1)  # Eq. 7 sums; 0 off completion
            _check_finite(policy_chosen, policy_rejected, where)
            losses, chosen_rewards, rejected_rewards = preference_loss(  # Eq. 7 (or a variant, per config)
                policy_chosen, policy_rejected, ref_c, ref_r,
                beta=beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)
        else:
            with autocast(device):
                tok_c, mask_c, tok_r, mask_r = concatenated_token_logprobs(policy, batch)
            policy_chosen, policy_rejected = tok_c.sum(-1), tok_r.sum(-1)  # 0 off the completion
            _check_finite(policy_chosen, policy_rejected, where)
            nll = preferred_ft_loss(tok_c, mask_c)  # -log pi(y_w|x)
            if objective == "unlikelihood":
                losses = unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha=float(alpha))
                with torch.no_grad():  # the alpha-free penalty -sum_t log(1 - pi(y_l,t)), for the log
                    parts["ul"].append(
                        (unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha=1.0) - nll).float().cpu())
            else:
                losses = nll
            parts["nll"].append(nll.detach().float().cpu())
            # Not in the loss: the implicit reward of Eq. 5 as a readout, comparable with DPO runs.
            chosen_rewards = beta * (policy_chosen - ref_c).detach()
            rejected_rewards = beta * (policy_rejected - ref_r).detach()
        # Sum / batch_size: the accumulated gradient is that of the mean over all batch_size pairs.
        (losses.sum() / len(indices)).backward()
        for k, t in zip(("losses", "cr", "rr", "pc", "pr"),
                        (losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected),
                        strict=True):
            parts[k].append(t.detach().float().cpu())
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    loss = cat["losses"].mean().item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite {_BAR_NAMES[objective]} loss {where}")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm))
    if not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {where}")
    lr = scheduler.get_last_lr()[0]  # the lr this update uses
    optimizer.step()
    scheduler.step()
    metrics = preference_metrics(cat["losses"], cat["cr"], cat["rr"], cat["pc"], cat["pr"])
    if "nll" in cat:
        metrics["nll/chosen"] = cat["nll"].mean().item()
    if "ul" in cat:
        metrics["unlikelihood/rejected"] = cat["ul"].mean().item()
    return {"step": step, "lr": lr, "grad_norm": grad_norm, **metrics}


def _check_finite(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(policy_chosen).all() and torch.isfinite(policy_rejected).all()):
        raise FloatingPointError(f"non-finite policy log-probs {where}; lower the lr or check the data")


train_pairwise = train_dpo  # the same trainer under an objective-neutral name, for the baselines


__all__ = ["DPOResult", "Objective", "OBJECTIVES", "autocast", "check_dpo_config", "warmup_lambda",
           "make_optimizer",
           "concatenated_token_logprobs", "reference_logprobs", "train_dpo", "train_pairwise",
           # re-exported from runs.py
           "EvalFn", "Pairs", "PAIR_COLUMNS", "batch_indices", "load_weights", "read_metrics",
           "model_fingerprint", "pairs_fingerprint", "tokenizer_fingerprint"]
