"""The DPO trainer: minimise paper Eq. 7 over fixed preference pairs, or a §6 baseline ("unlikelihood",
Welleck et al. 2019; "preferred_ft", SFT on y_w) that logs its implicit reward (Eq. 5) at ``beta`` as a
readout. Notebook 11's variants are ``DPOConfig`` settings (IPO, hinge, cDPO, RPO; rankings, App. A.3).

One loop for one process or many (Accelerate), as nanoGPT's ``train.py``: step s's global batch
(``loop.batch_indices``) is dealt in micro-batches round-robin to the P processes. π_ref's log-probs come
precomputed (:func:`pair_logprobs`); dropout stays off, so step 0's loss is log 2. Checkpoints and resume go
through ``log`` (``loop.TrainLog``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_lab.batching import Pairs, PreferenceCollator, pair_columns
from dpo_lab.logprobs import concatenated_forward, eval_mode
from dpo_lab.loop import TrainLog, batch_indices, is_due, optimizer_step, resolve_device, warmup_then_flat
from dpo_lab.losses import (
    check_scalar,
    mean_token_nll,
    plackett_luce_loss,
    preference_loss,
    preference_metrics,
    preferred_ft_loss,
    unlikelihood_loss,
)
from dpo_lab.presets import DPOConfig
from dpo_lab.seed import seed_everything

if TYPE_CHECKING:  # importing accelerate takes a moment; the type is all this module needs up front
    from accelerate import Accelerator

Objective = Literal["dpo", "unlikelihood", "preferred_ft"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
_BAR_NAMES = {"dpo": "DPO", "unlikelihood": "Unlikelihood", "preferred_ft": "Preferred-FT"}


# ------------------------------------------------------------------------------------------- processes
def make_accelerator(device: torch.device | str | None = None, *,
                     mixed_precision: Literal["no", "bf16"] | None = None) -> Accelerator:
    """This process's Accelerator: bf16 autocast on CUDA unless told otherwise, fp32 on CPU."""
    from accelerate import Accelerator

    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if mixed_precision is None:
        mixed_precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)  # it names an unknown mode itself


def placement(device: Accelerator | torch.device | str | None,
              ) -> tuple[Accelerator | None, torch.device, str]:
    """``(accelerator or None, device, precision)`` of a device argument: an Accelerator's own, else
    make_accelerator's precision without one (bf16 autocast on CUDA, fp32 on CPU)."""
    if device is None or isinstance(device, (str, torch.device)):
        dev = resolve_device(device)
        return None, dev, "bf16" if dev.type == "cuda" else "no"
    return device, device.device, str(device.mixed_precision)


def accumulation_steps(batch_size: int, micro_batch_size: int, num_processes: int) -> int:
    """Micro-batches per process per step, ``batch_size / (micro_batch_size x num_processes)``, exact."""
    for name, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size),
                        ("num_processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_round = micro_batch_size * num_processes
    if batch_size % per_round:
        options = sorted(m for m in range(1, batch_size + 1) if batch_size % (m * num_processes) == 0)
        raise ValueError(
            f"global batch_size {batch_size} is not divisible by micro_batch_size {micro_batch_size} x "
            f"{num_processes} process(es) = {per_round}; with {num_processes} process(es) use a "
            f"micro_batch_size in {options}, or change batch_size")
    return batch_size // per_round


def process_micro_batches(indices: Sequence[int], micro_batch_size: int, process: int,
                          num_processes: int) -> list[list[int]]:
    """This process's share of one global batch: micro-batches ``process, process + P, ...``."""
    micro = [list(indices[m:m + micro_batch_size]) for m in range(0, len(indices), micro_batch_size)]
    return micro[process::num_processes]


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class DPOSettings:
    """One run's settings: the preset's ``DPOConfig`` and what a sweep varies, refused when made if bad
    (naming the field). A baseline given no ``beta`` gets 1.0: it only scales the logged implicit reward."""

    config: DPOConfig
    seed: int
    max_length: int
    beta: float | None = None
    objective: Objective = "dpo"
    alpha: float | None = None

    def __post_init__(self) -> None:
        objective, beta, alpha, config = self.objective, self.beta, self.alpha, self.config
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
        if objective == "dpo" and beta is None:
            raise ValueError("beta is required for objective='dpo' (the KL coefficient of Eqs. 3 and 7)")
        if objective == "unlikelihood":
            if alpha is None:
                raise ValueError("alpha is required for objective='unlikelihood' (the paper sweeps "
                                 "0.05, 0.1, 0.5, 1)")
            check_scalar("alpha", alpha, positive=False)
        elif alpha is not None:
            # An alpha that silently does nothing would mislabel a sweep.
            raise ValueError(f"alpha only applies to objective='unlikelihood', not {objective!r}; "
                             "leave it None")
        object.__setattr__(self, "beta", check_scalar("beta", 1.0 if beta is None else beta, positive=True))
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {self.max_length!r}")
        if config.loss_type == "plackett_luce" and (config.rpo_alpha or config.label_smoothing):
            raise ValueError("DPOConfig.rpo_alpha and label_smoothing apply to the pairwise losses, "
                             "not to loss_type 'plackett_luce'")

    def columns(self, pairs: Pairs) -> dict[str, list]:
        """``batching.pair_columns(pairs)``: rankings for loss_type 'plackett_luce', pairs for any other."""
        cols = pair_columns(pairs)
        if (self.objective == "dpo" and self.config.loss_type == "plackett_luce") != ("completions" in cols):
            raise ValueError("loss_type 'plackett_luce' trains on rankings (prompt, completions), the other "
                             f"objectives on pairs (prompt, chosen, rejected); got {sorted(cols)}")
        return cols


def make_optimizer(params: Sequence[nn.Parameter], config: DPOConfig) -> torch.optim.Optimizer:
    """RMSprop or AdamW, as ``config.optimizer`` says (the section refused any other name when made)."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)  # the paper's optimizer (App. B), torch defaults
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)  # no decay: TRL's default


# ---------------------------------------------------------------------------------- pair log-probs
def _collate(collator: PreferenceCollator, cols: Mapping[str, Sequence[Any]], indices: Sequence[int],
             device: torch.device) -> dict[str, torch.Tensor]:
    batch = collator([{c: cols[c][i] for c in cols} for i in indices], ids=indices)  # errors name the row
    return {key: v.to(device) for key, v in batch.items()}


@torch.no_grad()
def pair_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Pairs, *, max_length: int,
                  batch_size: int, device: Accelerator | torch.device | str | None = None,
                  progress: bool | str = False, average: bool = False) -> torch.Tensor:
    """``log π(y_k|x)`` (Eq. 7) of every pair's (or ranking's) completions, fp32 ``(N, K)`` on the CPU, in
    eval mode. Given an Accelerator of P processes, each scores 1/P and the (disjoint) shards are summed."""
    cols = pair_columns(pairs)
    n, k = len(cols["prompt"]), len(cols["completions"][0]) if "completions" in cols else 2
    collator = PreferenceCollator(tokenizer, max_length)
    accelerator, dev, precision = placement(device)
    if accelerator is not None:
        cast, rank, world = accelerator.autocast, accelerator.process_index, accelerator.num_processes
    else:
        cast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext
        rank, world = 0, 1
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = torch.zeros(n, k, device=dev)
    home = next(model.parameters()).device
    try:
        with eval_mode(model.to(dev)):
            desc = progress if isinstance(progress, str) else "log-probs"
            for start in tqdm(range(lo, hi, batch_size), desc=desc, leave=False,
                              disable=not progress or rank != 0):
                end = min(start + batch_size, hi)
                with cast():
                    batch = _collate(collator, cols, range(start, end), dev)
                    out[start:end] = concatenated_forward(model, batch, average=average)[0].float()
    finally:
        model.to(home)
    if world > 1:
        out = accelerator.reduce(out, reduction="sum")
    out = out.cpu()
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("log-probs contain NaN or inf; check the model")
    return out


# ------------------------------------------------------------------------------------------------- train
def train_dpo(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Pairs, ref_logps: torch.Tensor,
              settings: DPOSettings, *, accelerator: Accelerator | None = None, log: TrainLog | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Train ``policy`` in place with DPO (Eq. 7) or a baseline; return ``log.records``. ``ref_logps`` is
    ``(N, K)``, π_ref's :func:`pair_logprobs`. ``config.batch_size`` is the global batch; every process calls
    this alike. A non-finite loss or gradient raises FloatingPointError naming the step."""
    accelerator = accelerator if accelerator is not None else make_accelerator()
    world, config, seed = accelerator.num_processes, settings.config, settings.seed
    objective = settings.objective
    accumulation_steps(config.batch_size, config.micro_batch_size, world)
    log = log if log is not None else TrainLog(eval_every=config.eval_every)
    log.max_steps = config.max_steps
    cols = settings.columns(pairs)
    seed_everything(seed)
    ref = ref_logps.to(accelerator.device)
    collator = PreferenceCollator(tokenizer, settings.max_length)
    policy.to(accelerator.device).eval()  # dropout off; autograd works the same in eval mode
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_flat(config.warmup_steps))
    start, ckpt_dir, state = log.restore({"": policy}) or (0, None, None)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model = accelerator.prepare_model(policy)  # DDP on several processes; the policy itself on one
    if start == 0:
        log.log_start(policy)
    variant = "" if objective != "dpo" or config.loss_type == "sigmoid" else f" ({config.loss_type})"
    value = {"dpo": f" beta={settings.beta:g}", "unlikelihood": f" alpha={settings.alpha}"}.get(objective, "")
    bar = tqdm(range(start + 1, config.max_steps + 1), initial=start, total=config.max_steps,
               desc=_BAR_NAMES[objective] + variant + value + (f" x{world}" if world > 1 else ""),
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        where = f"at step {step} (last good checkpoint: {ckpt_dir or 'none'})"
        started = time.perf_counter()
        indices = batch_indices(len(cols["prompt"]), config.batch_size, step, seed)
        mine = process_micro_batches(indices, config.micro_batch_size, accelerator.process_index, world)
        cat, tokens = _accumulate(model, cols, mine, collator, ref, len(indices), accelerator,
                                  settings=settings, where=where)
        if not math.isfinite(cat["losses"].mean().item()):
            raise FloatingPointError(f"non-finite {_BAR_NAMES[objective]} loss {where}")
        lr = scheduler.get_last_lr()[0]  # the lr this update uses
        grad_norm = optimizer_step(optimizer, params, config.max_grad_norm, scheduler=scheduler,
                                   clip=accelerator.clip_grad_norm_, where=where)
        epoch = step * config.batch_size / len(cols["prompt"])
        record = log.log(_record(step, lr, grad_norm, cat, tokens, epoch, started),
                         accelerator.unwrap_model(model))
        bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['rewards/margins']:.3f}")
        if is_due(step, config.checkpoint_every, config.max_steps):
            # A collective under FSDP/DeepSpeed: every process gathers, the main one writes.
            state_dict = accelerator.get_state_dict(model) if world > 1 else None

            def write(folder: Any, sd: dict[str, torch.Tensor] | None = state_dict) -> None:
                accelerator.unwrap_model(model).save_pretrained(folder, state_dict=sd)
                tokenizer.save_pretrained(folder)
            ckpt_dir = log.save(step, write, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data": {"seed": seed, "n_pairs": len(cols["prompt"]), "batch_size": config.batch_size,
                         "pairs_seen": step * config.batch_size}})
            accelerator.wait_for_everyone()
    policy.eval()
    return log.records


def _accumulate(model: nn.Module, cols: Mapping[str, list], micro: list[list[int]],
                collator: PreferenceCollator, ref: torch.Tensor, n_global: int, accelerator: Accelerator,
                **loss_args: Any) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of this process's micro-batches of one step (gradients all-reduced once, at the
    last); every pair's outputs gathered from all processes, and the step's token count."""
    parts: dict[str, list[torch.Tensor]] = {}
    tokens = torch.zeros((), device=accelerator.device)
    for k, idx in enumerate(micro):
        batch = _collate(collator, cols, idx, accelerator.device)
        tokens += sum(v.sum() for key, v in batch.items() if key.endswith("attention_mask"))
        sync = nullcontext() if k == len(micro) - 1 else accelerator.no_sync(model)
        with sync:
            out = _micro_batch_losses(model, batch, ref[torch.tensor(idx, device=accelerator.device)],
                                      accelerator, **loss_args)
            # x P / batch_size: with DDP's average over P processes, the mean over the global batch.
            (out["losses"].sum() * accelerator.num_processes / n_global).backward()
        for key, t in out.items():
            parts.setdefault(key, []).append(t.detach().float())
    cat = {key: accelerator.gather(torch.cat(v)).cpu() for key, v in parts.items()}
    total = int(accelerator.reduce(tokens, reduction="sum")) if accelerator.num_processes > 1 else int(tokens)
    return cat, total


def _record(step: int, lr: float, grad_norm: float, cat: dict[str, torch.Tensor], tokens: int, epoch: float,
            started: float) -> dict[str, Any]:
    """One step's metrics (TRL's names) and cost; π_ref's pass is shared by every run, so not counted."""
    record = {"step": step, "lr": lr, "grad_norm": grad_norm,
              **preference_metrics(cat["losses"], cat["cr"], cat["rr"], cat["pc"], cat["pr"])}
    for key, name in (("nll", "nll/chosen"), ("ul", "unlikelihood/rejected"),
                      ("nll_tok", "nll/chosen_per_token")):
        if key in cat:
            record[name] = cat[key].mean().item()
    record["epoch"] = epoch
    record.update({"cost/policy_forward_tokens": tokens, "cost/policy_backward_tokens": tokens,
                   "cost/samples": 0, "cost/reward_queries": 0, "cost/optimizer_steps": 1,
                   "cost/wall_s": time.perf_counter() - started})
    return record


def _micro_batch_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], ref: torch.Tensor,
                        accelerator: Accelerator, *, settings: DPOSettings,
                        where: str) -> dict[str, torch.Tensor]:
    """Per-example losses of one micro-batch from one forward pass, and the implicit rewards and log-probs
    of its first and last completions (chosen, rejected) for the metrics. ``ref`` is ``(B, K)``."""
    objective, beta, alpha, config = settings.objective, settings.beta, settings.alpha, settings.config
    with accelerator.autocast():
        # Eq. 7 sums (0 off the completion); average_logprobs takes TRL's IPO per-token mean instead.
        logps, tok, mask = concatenated_forward(model, batch, average=config.average_logprobs)
    if not bool(torch.isfinite(logps).all()):
        raise FloatingPointError(f"non-finite policy log-probs {where}; lower the lr or check the data")
    policy_chosen, policy_rejected = logps[:, 0], logps[:, -1]
    out: dict[str, torch.Tensor] = {}
    if objective == "dpo" and config.loss_type == "plackett_luce":
        losses, rewards = plackett_luce_loss(logps, ref, beta=beta)  # App. A.3, Eq. 18
        chosen_rewards, rejected_rewards = rewards[:, 0], rewards[:, -1]
    elif objective == "dpo":
        losses, chosen_rewards, rejected_rewards = preference_loss(  # Eq. 7 (or a variant, per config)
            policy_chosen, policy_rejected, ref[:, 0], ref[:, 1],
            beta=beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)
        if config.rpo_alpha > 0:  # RPO (Pang et al. 2024): + alpha x the per-token NLL of y_w
            out["nll_tok"] = mean_token_nll(tok[:, 0], mask[:, 0])
            losses = losses + config.rpo_alpha * out["nll_tok"]
    else:
        (tok_c, tok_r), (mask_c, mask_r) = tok.unbind(1), mask.unbind(1)
        nll = preferred_ft_loss(tok_c, mask_c)  # -log pi(y_w|x)
        if objective == "unlikelihood":
            losses = unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha=float(alpha))
            with torch.no_grad():  # the alpha-free penalty -sum_t log(1 - pi(y_l,t)), for the log
                out["ul"] = unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha=1.0) - nll
        else:
            losses = nll
        out["nll"] = nll
        # Not in the loss: the implicit reward of Eq. 5 as a readout, comparable with DPO runs.
        chosen_rewards = beta * (policy_chosen - ref[:, 0]).detach()
        rejected_rewards = beta * (policy_rejected - ref[:, 1]).detach()
    out.update(losses=losses, cr=chosen_rewards, rr=rejected_rewards, pc=policy_chosen, pr=policy_rejected)
    return out
