"""The DPO trainer, written out: minimise paper Eq. 7 over a fixed set of preference pairs.

    L_DPO = -E[ log sigma( beta log pi(y_w|x)/pi_ref(y_w|x) - beta log pi(y_l|x)/pi_ref(y_l|x) ) ]

The same loop trains the paper's two non-RL baselines of the IMDb frontier (§6), chosen by ``objective``:

    "unlikelihood" (Welleck et al. 2019):  -log pi(y_w|x) - alpha sum_t log(1 - pi(y_l,t | x, y_l,<t))
    "preferred_ft" (SFT on the chosen completions):  -log pi(y_w|x)

One loop for one process or many (Hugging Face Accelerate; ``accelerate launch -m dpo_lab.scale.launch``),
as nanoGPT's ``train.py`` serves one GPU and DDP:

* Optimizer step ``s`` (App. B) sees the global batch ``run.batch_indices(n_pairs, batch_size, s, seed)``,
  whatever the process count. It is cut into micro-batches of ``micro_batch_size`` pairs; micro-batch ``i``
  goes to process ``i % P``, so each process accumulates ``batch_size / (micro_batch_size x P)`` of them
  (:func:`accumulation_steps` refuses a batch that does not divide). Each micro-batch backpropagates
  ``sum(losses) x P / batch_size``; DDP averages over processes, so the gradient is that of the mean over all
  ``batch_size`` pairs. Chosen and rejected share one forward pass (``logprobs.concatenated_forward``).
* Gradient clipped to ``max_grad_norm``; RMSprop (the paper) or AdamW; lr warmed up linearly over
  ``warmup_steps``, then constant. bf16 autocast on CUDA (log-probs from fp32 logits), fp32 on CPU.
* pi_ref's log-probs never change, so they are computed once, before training (sharded over processes), and
  cached on disk keyed by what produced them (reference weights, pairs, tokenizer, max_length, precision):
  every beta of a sweep shares them, and the reference model is not needed during training.
* Dropout stays off in the policy (as TRL's ``disable_dropout``): the implicit reward
  beta (log pi - log pi_ref) is then exactly 0 at step 0, and the first loss is log 2.
* ``out_dir`` is one :class:`run.Run`: ``metrics.jsonl`` (TRL names; eval_fn's keys merged in on evaluation
  steps; step 0 holds the evaluation of the starting policy), atomic checkpoints, resume from the last one
  (bit-identical weights on CPU to an uninterrupted run), and a finished run returns at once with its final
  weights loaded into ``policy``. Only the main process evaluates and writes.

The DPO variants of notebook 11 are settings of the same loop (``DPOConfig``): ``loss_type`` "ipo" / "hinge"
and ``label_smoothing`` (cDPO) go to ``losses.preference_loss``; ``average_logprobs`` scores completions by
their mean token log-prob (TRL's IPO); ``rpo_alpha`` adds the chosen completion's per-token NLL (RPO); and
``loss_type="plackett_luce"`` trains on rankings (prompt + K completions, best first) with the
Plackett-Luce loss of App. A.3: one forward pass over the B·K rows, reference log-probs cached as for pairs,
``batch_size`` counting rankings.

The baselines need per-token log-probs and no reference in the loss; the reference log-probs are still
loaded so every objective logs the same TRL metrics, with the implicit reward beta (log pi - log pi_ref) at
``beta`` (1.0 unless given) as a readout of how far the policy moved.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_lab.batching import PAIR_COLUMNS, Pairs, PreferenceCollator, pair_columns, pairs_fingerprint
from dpo_lab.cache import (
    atomic_write_tensors,
    content_hash,
    model_fingerprint,
    tensors_checksum,
    tokenizer_fingerprint,
)
from dpo_lab.logprobs import concatenated_forward
from dpo_lab.losses import (
    mean_token_nll,
    plackett_luce_loss,
    preference_loss,
    preference_metrics,
    preferred_ft_loss,
    unlikelihood_loss,
)
from dpo_lab.presets import DPOConfig
from dpo_lab.run import (
    EvalFn,
    Run,
    RunLockedError,
    RunResult,
    batch_indices,
    closes_runs,
    is_due,
    load_weights,
    resolve_device,
    warmup_lambda,
)
from dpo_lab.seed import seed_everything

if TYPE_CHECKING:  # importing accelerate takes a moment; the type is all this module needs up front
    from accelerate import Accelerator

Objective = Literal["dpo", "unlikelihood", "preferred_ft"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
MixedPrecision = Literal["no", "bf16"]
_BAR_NAMES = {"dpo": "DPO", "unlikelihood": "Unlikelihood", "preferred_ft": "Preferred-FT"}
_TRAIN_KEYS = {"step", "lr", "grad_norm", "epoch", "loss", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
               # Baseline-only: mean -log pi(y_w|x), and mean -sum_t log(1 - pi(y_l,t)) (before alpha).
               "nll/chosen", "unlikelihood/rejected",
               # RPO only: mean over the batch of -log pi(y_w|x) / |y_w| (before rpo_alpha).
               "nll/chosen_per_token",
               "cost/policy_forward_tokens", "cost/policy_backward_tokens", "cost/samples",
               "cost/reward_queries", "cost/optimizer_steps", "cost/wall_s"}
# Settings that do not change the trajectory: a sweep list, or how often we look and save.
_NOT_IN_RUN_KEY = ("betas", "max_steps", "checkpoint_every", "eval_every")


@dataclass(frozen=True)
class DPOResult(RunResult):
    """A finished DPO (or baseline) run: checkpoint_dir (final policy, models.load_policy reads it),
    metrics_path, last_metrics, steps."""


# ------------------------------------------------------------------------------------------- processes
def make_accelerator(device: torch.device | str | None = None, *,
                     mixed_precision: MixedPrecision | None = None) -> Accelerator:
    """The Accelerator the loop runs under: one per process of ``accelerate launch`` (or just this one).
    bf16 autocast on CUDA unless told otherwise, fp32 on CPU; ``device="cpu"`` keeps a GPU machine on CPU."""
    from accelerate import Accelerator

    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if mixed_precision is None:
        mixed_precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision not in get_args(MixedPrecision):
        raise ValueError(f"mixed_precision must be one of {list(get_args(MixedPrecision))}, "
                         f"got {mixed_precision!r}")
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def accumulation_steps(batch_size: int, micro_batch_size: int, num_processes: int) -> int:
    """Micro-batches each process accumulates per optimizer step:
    ``batch_size = micro_batch_size x num_processes x accumulation``; ValueError if that does not divide."""
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


def _broadcast_error(accelerator: Accelerator, error: Exception | None) -> None:
    """Raise ``error`` (found on the main process) there, and as ValueError with its message on every
    other process, so none is left waiting in a collective for a process that stopped."""
    message = None if error is None else str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [message]
        broadcast_object_list(box)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)


# ------------------------------------------------------------------------------------------------ checks
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
    if not (config.rpo_alpha >= 0 and math.isfinite(config.rpo_alpha)):
        raise ValueError(f"DPOConfig.rpo_alpha must be a finite number >= 0, got {config.rpo_alpha!r}")
    if config.loss_type == "plackett_luce" and (config.rpo_alpha or config.label_smoothing):
        raise ValueError("DPOConfig.rpo_alpha and label_smoothing apply to the pairwise losses, "
                         "not to loss_type 'plackett_luce'")


def _check_objective(objective: str, beta: float | None, alpha: float | None) -> float:
    """Validate objective/beta/alpha together; return the beta to use (1.0 for a baseline given none)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if objective == "dpo" and beta is None:
        raise ValueError("beta is required for objective='dpo' (the KL coefficient of Eqs. 3 and 7)")
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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (logprobs upcasts logits to fp32 before the softmax), plain fp32 on CPU:
    what :func:`make_accelerator` picks, for code that runs without an Accelerator."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------- log-probs of the pairs
def _collate(collator: PreferenceCollator, cols: Mapping[str, Sequence[Any]],
             indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """The collated batch of examples ``indices`` of ``cols``; the collator's errors name the pair (or
    ranking) by its row in the dataset rather than its place in the batch ("example 1 (chosen): ...")."""
    try:
        return collator([{c: cols[c][i] for c in cols} for i in indices])
    except ValueError as err:
        head, _, rest = str(err).partition(" ")
        number = rest.split(" ", 1)[0]
        if head != "example" or not number.isdigit() or int(number) >= len(indices):
            raise
        noun = "ranking" if "completions" in cols else "pair"
        raise ValueError(f"{noun} {indices[int(number)]}" + rest[len(number):]) from err


@torch.no_grad()
def pair_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Pairs, *, max_length: int,
                  batch_size: int, accelerator: Accelerator | None = None,
                  device: torch.device | str | None = None, progress: bool = False, desc: str = "log-probs",
                  average: bool = False) -> torch.Tensor:
    """``log π(y_k|x)`` of every completion of every pair (or ranking) under ``model``, fp32 ``(N, K)`` on
    the CPU: columns chosen, rejected (a ranking's: best first), summed over completion tokens (Eq. 7;
    ``average=True``: their mean). One forward pass per ``batch_size`` examples
    (``logprobs.concatenated_forward``), in eval mode without gradients; the model goes back where it was.

    With an ``accelerator`` of P processes, process p scores a contiguous 1/P of the examples under the
    training precision and the shards are summed across processes (each entry is non-zero on one process
    only, so the sum is exact); every process gets every value.
    """
    cols = pair_columns(pairs)
    n, k = len(cols["prompt"]), len(cols["completions"][0]) if "completions" in cols else 2
    collator = PreferenceCollator(tokenizer, max_length)
    if accelerator is not None:
        dev, cast = accelerator.device, accelerator.autocast
        rank, world = accelerator.process_index, accelerator.num_processes
    else:
        dev, rank, world = resolve_device(device), 0, 1

        def cast() -> contextlib.AbstractContextManager:
            return autocast(dev)
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = torch.zeros(n, k, device=dev)
    home, was_training = next(model.parameters()).device, model.training
    model.to(dev).eval()
    try:
        for start in tqdm(range(lo, hi, batch_size), desc=desc, leave=False,
                          disable=not progress or rank != 0):
            end = min(start + batch_size, hi)
            with cast():
                batch = {key: v.to(dev) for key, v in _collate(collator, cols, range(start, end)).items()}
                out[start:end] = concatenated_forward(model, batch, average=average)[0].float()
    finally:
        model.to(home).train(was_training)
    if world > 1:
        out = accelerator.reduce(out, reduction="sum")
    out = out.cpu()
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("log-probs contain NaN or inf; check the model")
    return out


def reference_logprobs(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Pairs, *,
                       max_length: int, cache_dir: str | Path, batch_size: int,
                       accelerator: Accelerator | None = None, device: torch.device | str | None = None,
                       progress: bool = True, reference_fingerprint: str | None = None,
                       average: bool = False) -> torch.Tensor:
    """:func:`pair_logprobs` of the frozen reference, ``(N, K)``, read from / written to the disk cache.

    The key hashes the reference weights, the pairs (or rankings), the tokenizer, max_length, sum or mean
    (``average``), the device type and the precision, so any change recomputes and nothing stale is
    reused. ``reference_fingerprint`` (``cache.model_fingerprint`` of ``reference``) skips hashing the
    weights a second time. The file holds one ``(N,)`` tensor per column, checked against its checksum.
    """
    cols = pair_columns(pairs)
    n, ranked = len(cols["prompt"]), "completions" in cols
    noun = "rankings" if ranked else "pairs"
    names = PAIR_COLUMNS[1:] if not ranked else tuple(f"completion{k}"
                                                      for k in range(len(cols["completions"][0])))
    dev = accelerator.device if accelerator is not None else resolve_device(device)
    precision = str(accelerator.mixed_precision) if accelerator is not None else (
        "bf16" if dev.type == "cuda" else "no")
    key = content_hash("ref-logps/v2", reference_fingerprint or model_fingerprint(reference),
                       pairs_fingerprint(cols), tokenizer_fingerprint(tokenizer), max_length,
                       "mean" if average else "sum", dev.type, precision)
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                cached = {name: handle.get_tensor(name) for name in names}
        except Exception as err:  # truncated or corrupt: what the reader raises varies
            raise ValueError(f"reference cache {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                             "delete it to recompute") from err
        checksum = tensors_checksum(*cached.values())
        if meta.get("key", key) != key or meta.get("sha256", checksum) != checksum:
            raise ValueError(f"reference cache {path} was changed after it was written (its key or checksum "
                             "does not match); delete it to recompute")
        if any(tuple(t.shape) != (n,) for t in cached.values()):
            raise ValueError(f"reference cache {path} holds {cached[names[0]].shape[0]} {noun}, expected "
                             f"{n}; delete it to recompute")
        return torch.stack(list(cached.values()), dim=1)
    logps = pair_logprobs(reference, tokenizer, cols, max_length=max_length, batch_size=batch_size,
                          accelerator=accelerator, device=dev, progress=progress, desc="reference log-probs",
                          average=average)
    if accelerator is None or accelerator.is_main_process:
        columns = {name: logps[:, k].contiguous() for k, name in enumerate(names)}
        atomic_write_tensors(path, columns, metadata={"key": key, f"n_{noun}": str(n), "max_length": str(
            max_length), "sha256": tensors_checksum(*columns.values())})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return logps


# ------------------------------------------------------------------------------------------------- train
@closes_runs  # the run folder's lock is released however training ends
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
    accelerator: Accelerator | None = None,
    keep_checkpoints: int | None = 1,
    objective: Objective = "dpo",
    alpha: float | None = None,
) -> DPOResult:
    """Train ``policy`` in place with DPO (Eq. 7) against ``reference``; see the module docstring.

    ``objective`` picks the loss: "dpo" (needs ``beta``; ``config.loss_type``, ``label_smoothing``,
    ``average_logprobs`` and ``rpo_alpha`` apply), "unlikelihood" (needs ``alpha >= 0``) or "preferred_ft";
    the baselines ignore the DPO-only config fields and use ``beta`` (default 1.0) only for the logged
    implicit rewards. With ``config.loss_type == "plackett_luce"``, ``pairs`` are rankings
    (``batching.pair_columns``) and each "pair" below is a ranking. ``config.batch_size`` is the GLOBAL
    batch. ``accelerator`` (default: :func:`make_accelerator` on ``device``): under ``accelerate launch``
    every process calls this with the same arguments. ``eval_fn(policy, step)`` runs on the main process at
    step 0, every ``config.eval_every`` steps and at the end; its dict is merged into that step's metrics
    line. ``keep_checkpoints`` = how many latest checkpoints stay on disk (None keeps all). Raises
    FloatingPointError naming the step if the loss or gradient goes non-finite; the last good checkpoint is
    left untouched.
    """
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    beta = _check_objective(objective, beta, alpha)
    check_dpo_config(config, beta, max_length)
    accelerator = accelerator if accelerator is not None else make_accelerator(device)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    accumulation_steps(config.batch_size, config.micro_batch_size, world)
    ranked = objective == "dpo" and config.loss_type == "plackett_luce"
    cols = pair_columns(pairs)
    if ranked != ("completions" in cols):
        raise ValueError("loss_type 'plackett_luce' trains on rankings (prompt, completions), the other "
                         f"objectives on pairs (prompt, chosen, rejected); got {sorted(cols)}")
    n_pairs = len(cols["prompt"])
    fields: dict[str, Any] = {
        "beta": float(beta), "seed": seed, "max_length": max_length,
        "config": {k: v for k, v in asdict(config).items() if k not in _NOT_IN_RUN_KEY},
        "reference": model_fingerprint(reference),
        "pairs": pairs_fingerprint(cols),
        "tokenizer": tokenizer_fingerprint(tokenizer), "device": accelerator.device.type,
        "mixed_precision": str(accelerator.mixed_precision), "objective": objective,
        "alpha": None if alpha is None else float(alpha),
    }
    error, run = None, None
    try:
        run = Run(out_dir, fields, writer=main)
    except (ValueError, RunLockedError) as err:  # another run's folder, or held past the lock timeout
        error = err
    _broadcast_error(accelerator, error)
    assert run is not None
    policy.to(accelerator.device)
    finished = run.finished(config.max_steps, DPOResult, policy)
    if finished is not None:
        return finished

    seed_everything(seed)
    ref_args = {"max_length": max_length, "cache_dir": ref_cache_dir, "batch_size": config.micro_batch_size,
                "accelerator": accelerator, "progress": progress, "average": config.average_logprobs,
                "reference_fingerprint": fields["reference"]}
    ref = reference_logprobs(reference, tokenizer, cols, **ref_args).to(accelerator.device)  # (N, K)
    collator = PreferenceCollator(tokenizer, max_length)
    policy.eval()  # dropout off; autograd works the same in eval mode
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))

    resume = run.resume(config.max_steps)
    start, ckpt_dir = 0, None
    if resume is not None:
        start, ckpt_dir, state = resume
        load_weights(policy, ckpt_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model = accelerator.prepare_model(policy)  # DDP on several processes; the policy itself on one

    def write_weights(folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)

    where = "at step {} (last good checkpoint: {})"
    with run.metrics(eval_fn, _TRAIN_KEYS, eval_every=config.eval_every, max_steps=config.max_steps,
                     start=start if resume is not None else None) as log:
        if start == 0:
            log.log_start(policy)
        variant = "" if objective != "dpo" or config.loss_type == "sigmoid" else f" ({config.loss_type})"
        desc = _BAR_NAMES[objective] + variant + {"dpo": f" beta={beta:g}",
                                                  "unlikelihood": f" alpha={alpha}"}.get(objective, "") + (
            f" x{world}" if world > 1 else "")
        bar = tqdm(range(start + 1, config.max_steps + 1), desc=desc, disable=not (progress and main),
                   initial=start, total=config.max_steps)
        for step in bar:
            indices = batch_indices(n_pairs, config.batch_size, step, seed)
            optimizer.zero_grad(set_to_none=True)
            mine = process_micro_batches(indices, config.micro_batch_size, rank, world)
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("losses", "cr", "rr", "pc", "pr", "nll",
                                                                     "ul", "nll_tok")}
            at = where.format(step, ckpt_dir or "none")
            started, tokens = time.perf_counter(), torch.zeros((), device=accelerator.device)
            for k, micro in enumerate(mine):
                batch = {key: v.to(accelerator.device) for key, v in _collate(collator, cols, micro).items()}
                idx = torch.tensor(micro, device=accelerator.device)
                tokens += sum(v.sum() for key, v in batch.items() if key.endswith("attention_mask"))
                # Gradients are all-reduced once per step, after this process's last micro-batch.
                sync = contextlib.nullcontext() if k == len(mine) - 1 else accelerator.no_sync(model)
                with sync:
                    out = _micro_batch_losses(model, batch, ref[idx], accelerator, objective=objective,
                                              beta=beta, alpha=alpha, config=config, where=at)
                    # x P / batch_size: with DDP's average over P processes, the mean over the global batch.
                    (out["losses"].sum() * world / len(indices)).backward()
                for key, t in out.items():
                    parts[key].append(t.detach().float())
            cat = {key: accelerator.gather(torch.cat(v)).cpu() for key, v in parts.items() if v}
            loss = cat["losses"].mean().item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite {_BAR_NAMES[objective]} loss {at}")
            grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm {at}")
            lr = scheduler.get_last_lr()[0]  # the lr this update uses
            optimizer.step()
            scheduler.step()
            record = {"step": step, "lr": lr, "grad_norm": grad_norm,
                      **preference_metrics(cat["losses"], cat["cr"], cat["rr"], cat["pc"], cat["pr"])}
            if "nll" in cat:
                record["nll/chosen"] = cat["nll"].mean().item()
            if "ul" in cat:
                record["unlikelihood/rejected"] = cat["ul"].mean().item()
            if "nll_tok" in cat:
                record["nll/chosen_per_token"] = cat["nll_tok"].mean().item()
            record["epoch"] = step * config.batch_size / n_pairs
            # What this step cost (run totals in the log): every token of the stacked batch goes through the
            # policy forward and backward once; the reference pass is shared by every run (not counted).
            tokens_all = int(accelerator.reduce(tokens, reduction="sum")) if world > 1 else int(tokens)
            record.update({"cost/policy_forward_tokens": tokens_all,
                           "cost/policy_backward_tokens": tokens_all, "cost/samples": 0,
                           "cost/reward_queries": 0, "cost/optimizer_steps": 1,
                           "cost/wall_s": time.perf_counter() - started})
            log.log_step(record, accelerator.unwrap_model(model))
            bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['rewards/margins']:.3f}")
            if is_due(step, config.checkpoint_every, config.max_steps):
                # A collective under FSDP/DeepSpeed: every process gathers, the main one writes.
                state_dict = accelerator.get_state_dict(model) if world > 1 else None
                ckpt_dir = run.save_checkpoint(
                    step, lambda folder, sd=state_dict: write_weights(folder, sd),
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data": {"seed": seed, "n_pairs": n_pairs, "batch_size": config.batch_size,
                              "pairs_seen": step * config.batch_size}},
                    keep=keep_checkpoints)
                accelerator.wait_for_everyone()
    if ckpt_dir is None:  # max_steps >= 1 always checkpoints at the last step; kept for type checkers
        raise RuntimeError("training ended without a checkpoint")
    result = run.finish(DPOResult(checkpoint_dir=ckpt_dir, metrics_path=run.metrics_path,
                                  last_metrics=log.last, steps=config.max_steps))
    accelerator.wait_for_everyone()
    policy.eval()
    return result


def _micro_batch_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], ref: torch.Tensor,
                        accelerator: Accelerator, *, objective: str, beta: float, alpha: float | None,
                        config: DPOConfig, where: str) -> dict[str, torch.Tensor]:
    """Per-example losses of one micro-batch of pairs (or, under Plackett-Luce, rankings) from one forward
    pass, with what the metrics need: the implicit rewards and log-probs of the first and the last
    completion (chosen and rejected; a ranking's best and worst). ``ref`` is ``(B, K)``."""
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
        nll_tok = mean_token_nll(tok[:, 0], mask[:, 0]) if config.rpo_alpha > 0 else None  # RPO's NLL term
        losses, chosen_rewards, rejected_rewards = preference_loss(  # Eq. 7 (or a variant, per config)
            policy_chosen, policy_rejected, ref[:, 0], ref[:, 1],
            beta=beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            rpo_alpha=config.rpo_alpha, chosen_nll=nll_tok)
        if nll_tok is not None:
            out["nll_tok"] = nll_tok
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


__all__ = ["DPOResult", "MixedPrecision", "Objective", "OBJECTIVES", "accumulation_steps", "autocast",
           "check_dpo_config", "make_accelerator", "make_optimizer", "pair_logprobs", "process_micro_batches",
           "reference_logprobs", "train_dpo"]
