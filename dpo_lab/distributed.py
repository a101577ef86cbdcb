"""DPO (paper Eq. 7) on several processes or GPUs through Hugging Face Accelerate, and its memory cost.

Launch (one process per GPU; Accelerate picks DDP, or FSDP/DeepSpeed from ``accelerate config``):

    accelerate launch -m dpo_lab.distributed --preset paper --beta 0.1
    accelerate launch -m dpo_lab.distributed --pairs tldr-pairs/ --model EleutherAI/gpt-j-6b --beta 0.5 \\
        --out runs/tldr-gptj --gradient-checkpointing
    torchrun --nproc_per_node 2 -m dpo_lab.distributed --cpu ...      # several CPU processes (gloo)

How one optimizer step is split (the same update as ``dpo_trainer.train_dpo``, whatever the process count):

* The global batch of step ``s`` is ``runs.batch_indices(n_pairs, batch_size, s, seed)``, the very pairs the
  single-process trainer uses. It is cut into micro-batches of ``micro_batch_size`` pairs; micro-batch ``i``
  goes to process ``i % num_processes`` (Accelerate's ``BatchSamplerShard``), so each process runs
  ``accumulation = batch_size / (micro_batch_size x num_processes)`` micro-batches per step
  (:func:`accumulation_steps` refuses a batch that does not divide).
* Each micro-batch backpropagates its mean loss; ``accelerator.backward`` divides by the accumulation and
  DDP averages over processes, so the gradient is that of the mean over all ``batch_size`` pairs.
* ``accelerator.clip_grad_norm_`` clips the synchronised gradient; RMSprop/AdamW and the linear warmup are
  ``dpo_trainer.make_optimizer`` and ``runs.warmup_lambda``, stepped once per global step.
* bf16: ``Accelerator(mixed_precision="bf16")`` autocasts the forward on CUDA; weights, gradients and the
  optimizer state stay fp32, and log-probs are computed from fp32 logits (``logprobs.token_logprobs``).
* Metrics: per-pair losses, rewards and log-probs are gathered from every process, so the logged means are
  over the global batch (TRL names, as ``train_dpo``); only the main process writes ``metrics.jsonl``,
  checkpoints (``save_pretrained`` safetensors of the unwrapped model + tokenizer) and ``result.json``.

Reference log-probs: computed ONCE before training, sharded (process ``p`` scores a contiguous ``1/P`` of the
pairs) and summed across processes (every entry is written by exactly one process, so the sum is exact);
the reference then goes back to where it was and is not used again. With ``ref_cache_dir`` they are also
cached on disk, keyed by reference weights, pairs, tokenizer, max_length, device type and mixed precision
(a key of its own: ``train_dpo``'s cache is not shared, since its key does not name the precision).

Not supported (yet): resuming an interrupted run from its last checkpoint (a rerun with the same settings
starts again at step 0; a finished run returns at once), and the baselines' objectives (DPO only).
Checkpoints go through ``accelerator.get_state_dict``, which gathers FSDP shards; the loop itself is tested
with DDP on CPU (gloo) only.

Memory of DPO on gpt2-large (774,030,080 parameters) on one 80 GB GPU, from :func:`dpo_memory_estimate`
(GiB = 2**30 bytes; sequences of 512 tokens, bf16 autocast, SDPA attention; ``print(dpo_batch_plan())``
prints the whole table):

    policy weights fp32 2.9 | gradients fp32 2.9 | RMSprop state (1 buffer) 2.9, AdamW (2 buffers) 5.8
    autocast's bf16 weight copies 1.4 (0.2 with gradient checkpointing)
    frozen reference: bf16 1.4, fp32 2.9, or 0 when its log-probs are precomputed (what this module does)
    -> fixed part: 10.1 GiB with RMSprop, 13.0 GiB with AdamW (+ the reference if kept on the GPU)
    per PAIR of the micro-batch (chosen + rejected = 2 sequences of 512 tokens):
        no checkpointing: activations 2.6 + logits 0.5 = 3.2 GiB;  gradient checkpointing: 0.2 + 0.5 = 0.7 GiB
    -> the paper's batch 64 on one 80 GB GPU, RMSprop, no checkpointing: micro-batch 16 x accumulation 4
       (~61 GiB; 32 x 2 needs ~111); with gradient checkpointing 64 x 1 fits (~59 GiB), 32 x 2 ~34 GiB.
       AdamW adds 2.9 GiB, a resident bf16 reference 1.4 GiB: 16 x 4 still fits.

ACTIVATION_BYTES, LOGIT_BYTES and AUTOCAST_WEIGHT_BYTES were measured on CPU by counting what autograd saves
for backward under bf16 autocast (see their comments); CUDA autocast casts the same ops to bf16, but the
numbers are not GPU measurements, and the estimate ignores allocator fragmentation and CUDA/NCCL workspaces.
Rough check: a 64-pair DPO step of randomly initialised gpt2-large on an H200 was seen to peak at 31 GiB
(details unknown). IMDb pairs are ~70 tokens long (2-8 prompt tokens + 64 new ones): the estimate for 64
pairs of 64-72 tokens in one micro-batch is 35-39 GiB, the right size; at 512 tokens that step would not
fit in 80 GB without checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import GPT2Config, PreTrainedTokenizerBase

from dpo_lab.batching import PreferenceCollator
from dpo_lab.cache import atomic_directory, content_hash
from dpo_lab.dpo_trainer import DPOResult, check_dpo_config, make_optimizer
from dpo_lab.estimate import count_parameters
from dpo_lab.logprobs import concatenated_logprobs
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.presets import DPOConfig
from dpo_lab.runs import (
    TRAINER_STATE,
    EvalFn,
    MetricsLog,
    Pairs,
    batch_indices,
    check_run,
    checkpoint_path,
    finished_run,
    is_due,
    model_fingerprint,
    pair_columns,
    pair_examples,
    pairs_fingerprint,
    prune_checkpoints,
    quiet_hf_progress,
    tokenizer_fingerprint,
    truncate_metrics,
    warmup_lambda,
    write_result,
)
from dpo_lab.seed import seed_everything

if TYPE_CHECKING:  # importing accelerate is slow-ish and the memory estimate does not need it
    from accelerate import Accelerator

MixedPrecision = Literal["no", "bf16", "fp16"]
_TRAIN_KEYS = {"step", "lr", "grad_norm", "epoch", "loss", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}
# Same exclusions as train_dpo: a sweep list and how often we look or save do not change the trajectory.
_NOT_IN_RUN_KEY = ("betas", "max_steps", "checkpoint_every", "eval_every")
_PAIR_KEYS = ("policy_chosen", "policy_rejected", "losses", "chosen_rewards", "rejected_rewards")


# ------------------------------------------------------------------------------------- batch geometry
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


class StepBatches:
    """Micro-batches of pair indices, step after step: step ``s``'s global batch is
    ``batch_indices(n_items, batch_size, s, seed)`` (as in train_dpo), cut into consecutive micro-batches.

    A batch sampler for ``DataLoader(batch_sampler=...)``; Accelerate's ``BatchSamplerShard`` then deals
    micro-batch ``i`` to process ``i % num_processes`` (``batch_size``/``drop_last`` are what it reads)."""

    def __init__(self, n_items: int, batch_size: int, micro_batch_size: int, seed: int, first_step: int,
                 last_step: int) -> None:
        if batch_size % micro_batch_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size}")
        self.n_items, self.global_batch, self.seed = n_items, batch_size, seed
        self.first_step, self.last_step = first_step, last_step
        self.batch_size = micro_batch_size  # every micro-batch is full: nothing to pad or drop
        self.drop_last = True

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first_step, self.last_step + 1):
            indices = batch_indices(self.n_items, self.global_batch, step, self.seed)
            for m in range(0, self.global_batch, self.batch_size):
                yield indices[m:m + self.batch_size]

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1) * (self.global_batch // self.batch_size)


class _IndexedPairs(Dataset):
    """Pair ``i`` as ``(i, {prompt, chosen, rejected})``: the index finds its reference log-probs."""

    def __init__(self, examples: Sequence[Mapping[str, str]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, Mapping[str, str]]:
        return i, self.examples[i]


class _IndexedCollator:
    """PreferenceCollator's tensors plus ``index`` (the pairs' positions in the data set)."""

    def __init__(self, collator: PreferenceCollator) -> None:
        self.collator = collator

    def __call__(self, items: Sequence[tuple[int, Mapping[str, str]]]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor([i for i, _ in items]), **self.collator([e for _, e in items])}


# ------------------------------------------------------------------------------------ reference log-probs
def _reference_cache_key(reference_fingerprint: str, cols: Mapping[str, Sequence[str]],
                         tokenizer: PreTrainedTokenizerBase, max_length: int, device_type: str,
                         mixed_precision: str) -> str:
    return content_hash("ref-logps-accelerate/v1", reference_fingerprint, pairs_fingerprint(cols),
                        tokenizer_fingerprint(tokenizer), max_length, "sum", device_type, mixed_precision)


def sharded_reference_logprobs(
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    *,
    accelerator: Accelerator,
    max_length: int,
    batch_size: int,
    cache_dir: str | Path | None = None,
    reference_fingerprint: str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_ref(y_w|x), log pi_ref(y_l|x)) of every pair, fp32 ``(N,)`` on the CPU, on every process.

    Each process scores a contiguous ``1/P`` of the pairs under ``accelerator.autocast()`` (the training
    precision); the shards are summed across processes, which is exact since each entry is non-zero on one
    process only. With ``cache_dir`` the result is read from / written to (main process, atomically) a
    safetensors file keyed by what produced it. ``reference`` is moved back to its device afterwards.
    """
    cols = pair_columns(pairs)
    n = len(cols["prompt"])
    path = None
    if cache_dir is not None:
        key = _reference_cache_key(reference_fingerprint or model_fingerprint(reference), cols, tokenizer,
                                   max_length, accelerator.device.type, str(accelerator.mixed_precision))
        path = Path(cache_dir) / f"ref-logps-accelerate-{key}.safetensors"
        if path.is_file():
            cached = load_file(str(path))
            if cached["chosen"].shape != (n,) or cached["rejected"].shape != (n,):
                raise ValueError(f"reference cache {path} holds {cached['chosen'].shape[0]} pairs, "
                                 f"expected {n}")
            return cached["chosen"], cached["rejected"]
    examples = pair_examples(cols)
    collator = PreferenceCollator(tokenizer, max_length)
    rank, world = accelerator.process_index, accelerator.num_processes
    lo, hi = n * rank // world, n * (rank + 1) // world
    out = torch.zeros(2, n, device=accelerator.device)
    home = next(reference.parameters()).device
    was_training = reference.training
    reference.to(accelerator.device).eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(lo, hi, batch_size), desc="reference log-probs", leave=False,
                              disable=not (progress and accelerator.is_main_process)):
                end = min(start + batch_size, hi)
                batch = {k: v.to(accelerator.device) for k, v in collator(examples[start:end]).items()}
                with accelerator.autocast():
                    chosen, rejected = concatenated_logprobs(reference, batch)
                out[0, start:end] = chosen.float()
                out[1, start:end] = rejected.float()
    finally:
        reference.to(home).train(was_training)
    out = accelerator.reduce(out, reduction="sum").cpu()
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError("reference log-probs contain NaN or inf; check the reference model")
    chosen, rejected = out[0].contiguous(), out[1].contiguous()
    if path is not None and accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"chosen": chosen, "rejected": rejected}, tmp,
                      metadata={"n_pairs": str(n), "max_length": str(max_length)})
            os.replace(tmp, path)  # atomic: a reader sees no file or a complete one
        finally:
            Path(tmp).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return chosen, rejected


# ------------------------------------------------------------------------------------------------ train
def make_accelerator(*, mixed_precision: MixedPrecision | None = None, cpu: bool = False) -> Accelerator:
    """An Accelerator for :func:`train_dpo_accelerate`: bf16 on CUDA unless told otherwise, fp32 on CPU."""
    from accelerate import Accelerator

    if mixed_precision is None:
        use_bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use_bf16 else "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    # The scheduler is stepped by hand once per global step: Accelerate's default would step it once per
    # process (it assumes per-process batches), which would shorten the warmup P-fold.
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu or not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False)


def _broadcast_error(accelerator: Accelerator, message: str | None) -> None:
    """Raise ``message`` (found on the main process) as ValueError on every process, so none is left
    waiting in a collective for a process that stopped."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [message]
        broadcast_object_list(box)
        message = box[0]
    if message is not None:
        raise ValueError(message)


def _save_checkpoint(accelerator: Accelerator, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     out_dir: Path, step: int, run_key: str, keep: int | None) -> Path:
    """Main process: unwrapped weights (safetensors) + tokenizer + a small trainer_state.pt, atomically."""
    path = checkpoint_path(out_dir, step)
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        with atomic_directory(path) as tmp, quiet_hf_progress():
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            # Marks the folder complete for runs.checkpoint_dirs; plain types only (weights_only loads it).
            torch.save({"step": step, "run_key": run_key, "num_processes": accelerator.num_processes,
                        "mixed_precision": str(accelerator.mixed_precision)}, tmp / TRAINER_STATE)
        prune_checkpoints(out_dir, keep, path)
    accelerator.wait_for_everyone()
    return path


def train_dpo_accelerate(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Pairs,
    *,
    config: DPOConfig,
    beta: float,
    seed: int,
    out_dir: str | Path,
    max_length: int,
    accelerator: Accelerator | None = None,
    ref_cache_dir: str | Path | None = None,
    eval_fn: EvalFn | None = None,
    keep_checkpoints: int | None = 1,
    progress: bool = True,
) -> DPOResult:
    """Train ``policy`` with DPO (Eq. 7, ``config.loss_type``/``label_smoothing`` as train_dpo) on every
    process of ``accelerator`` (default: :func:`make_accelerator`); see the module docstring.

    Every process must call it with the same arguments. ``config.batch_size`` is the GLOBAL batch and
    ``config.micro_batch_size`` the pairs per process per forward pass. ``eval_fn(model, step)`` runs on the
    main process only (unwrapped model: fine for DDP, not for FSDP-sharded weights). Returns the same
    DPOResult on every process; ``policy`` holds the trained weights (DDP or one process).
    """
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    check_dpo_config(config, beta, max_length)
    accelerator = accelerator if accelerator is not None else make_accelerator()
    accum = accumulation_steps(config.batch_size, config.micro_batch_size, accelerator.num_processes)
    out_dir = Path(out_dir)
    cols = pair_columns(pairs)
    n_pairs = len(cols["prompt"])
    ref_fp = model_fingerprint(reference)
    run_fields = {
        "trainer": "accelerate", "beta": float(beta), "seed": seed, "max_length": max_length,
        "config": {k: v for k, v in asdict(config).items() if k not in _NOT_IN_RUN_KEY},
        "reference": ref_fp, "pairs": pairs_fingerprint(cols), "tokenizer": tokenizer_fingerprint(tokenizer),
        "device": accelerator.device.type, "mixed_precision": str(accelerator.mixed_precision),
    }
    run_key = content_hash(run_fields)
    error = None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_run(out_dir, run_fields)
        except ValueError as err:
            error = str(err)
    _broadcast_error(accelerator, error)
    metrics_path = out_dir / "metrics.jsonl"

    finished = finished_run(out_dir, config.max_steps, DPOResult, policy)
    if finished is not None:
        return finished

    seed_everything(seed)
    ref_chosen, ref_rejected = sharded_reference_logprobs(
        reference, tokenizer, cols, accelerator=accelerator, max_length=max_length,
        batch_size=config.micro_batch_size, cache_dir=ref_cache_dir, reference_fingerprint=ref_fp,
        progress=progress)
    ref_chosen, ref_rejected = ref_chosen.to(accelerator.device), ref_rejected.to(accelerator.device)

    policy.eval()  # dropout off (as train_dpo): the loss at step 1 is exactly log 2
    optimizer = make_optimizer([p for p in policy.parameters() if p.requires_grad], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    sampler = StepBatches(n_pairs, config.batch_size, config.micro_batch_size, seed, 1, config.max_steps)
    loader = DataLoader(_IndexedPairs(pair_examples(cols)), batch_sampler=sampler,
                        collate_fn=_IndexedCollator(PreferenceCollator(tokenizer, max_length)))
    # Whatever the caller's accelerator was set to: one scheduler step per global step, our accumulation.
    accelerator.step_scheduler_with_optimizer = False
    accelerator.gradient_accumulation_steps = accum
    model, optimizer, loader, scheduler = accelerator.prepare(policy, optimizer, loader, scheduler)
    accelerator.step = 0  # accumulate()'s micro-batch counter: start the first step at its first micro-batch

    main = accelerator.is_main_process
    if main:
        truncate_metrics(metrics_path, None)  # no resume: a restarted run writes its metrics afresh
    ckpt_dir: Path | None = None
    last: dict[str, Any] = {}
    batches = iter(loader)
    with MetricsLog(metrics_path, eval_fn, _TRAIN_KEYS, eval_every=config.eval_every,
                    max_steps=config.max_steps) if main else _NullLog() as log:
        log.log_start(accelerator.unwrap_model(model))
        bar = tqdm(range(1, config.max_steps + 1), desc=f"DPO beta={beta:g} x{accelerator.num_processes}",
                   disable=not (progress and main))
        for step in bar:
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in _PAIR_KEYS}
            for k in range(accum):
                batch = next(batches)
                with accelerator.accumulate(model):
                    policy_chosen, policy_rejected = concatenated_logprobs(model, batch)
                    idx = batch["index"]
                    losses, chosen_rewards, rejected_rewards = preference_loss(  # Eq. 7 (or a variant)
                        policy_chosen, policy_rejected, ref_chosen[idx], ref_rejected[idx],
                        beta=beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)
                    # backward() divides by the accumulation and DDP averages over processes: together the
                    # gradient of the mean over the global batch.
                    accelerator.backward(losses.mean())
                if accelerator.sync_gradients != (k == accum - 1):
                    raise RuntimeError(f"gradient sync out of step at micro-batch {k + 1}/{accum} of step "
                                       f"{step}; was the accelerator used for another loop?")
                for name, t in zip(_PAIR_KEYS, (policy_chosen, policy_rejected, losses, chosen_rewards,
                                                rejected_rewards), strict=True):
                    parts[name].append(t.detach().float())
            # Every pair of the global batch, on every process: the logged means are global.
            pc, pr, losses, cr, rr = (accelerator.gather(torch.cat(parts[k])).cpu() for k in _PAIR_KEYS)
            loss = losses.mean().item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite DPO loss at step {step}")
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm at step {step}")
            lr = scheduler.get_last_lr()[0]  # the lr this update uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step, "lr": lr, "grad_norm": grad_norm,
                      **preference_metrics(losses, cr, rr, pc, pr),
                      "epoch": step * config.batch_size / n_pairs}
            last = log.log_step(record, accelerator.unwrap_model(model))
            bar.set_postfix(loss=f"{loss:.4f}", margin=f"{record['rewards/margins']:.3f}")
            if is_due(step, config.checkpoint_every, config.max_steps):
                ckpt_dir = _save_checkpoint(accelerator, model, tokenizer, out_dir, step, run_key,
                                            keep_checkpoints)
    leftover = sum(1 for _ in batches)  # also lets the loader deregister from Accelerate's gradient state
    if leftover:
        raise RuntimeError(f"{leftover} micro-batches were left unused; the sampler and the loop disagree")
    if ckpt_dir is None:
        raise RuntimeError("training ended without a checkpoint")
    result = DPOResult(checkpoint_dir=ckpt_dir, metrics_path=metrics_path, last_metrics=last,
                       steps=config.max_steps)
    if main:
        write_result(out_dir, result, run_key)
    accelerator.wait_for_everyone()
    policy.eval()
    return result


class _NullLog:
    """MetricsLog's interface for processes that write nothing (all but the main one)."""

    def __enter__(self) -> _NullLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_start(self, policy: nn.Module) -> None:
        return None

    def log_step(self, record: dict[str, Any], policy: nn.Module) -> dict[str, Any]:
        return record


# ----------------------------------------------------------------------------------------- memory estimate
GiB = 2**30
# Bytes autograd keeps for backward per token, per layer, in units of the width h, for a GPT-2 block under
# bf16 autocast (fp32 residual stream and LayerNorms, bf16 matmuls), MEASURED on CPU (torch 2.13 autocast)
# by summing the unique non-parameter storages that torch.autograd.graph.saved_tensors_hooks sees in one
# forward pass, 3 blocks minus 1 block (h = 256..1280, 128..512 tokens; the test
# test_activation_coefficients_match_autograd re-measures them). SDPA: 60 h; eager attention adds 6 bytes per
# head per key (the s x s scores); with gradient checkpointing a block keeps only its fp32 input, 4 h.
# (Korthikanti et al. 2022 count 34 h for an all-16-bit block: autocast keeps several tensors in fp32.)
ACTIVATION_BYTES = {"block": 60, "eager_attention_per_head_key": 6, "checkpointed_block_input": 4}
# Per logit (token x vocabulary entry): 5 bytes saved for backward (measured as above: the fp32 copy that
# log-softmax reads, plus change) + 6 bytes of its gradient in backward (fp32, then the bf16 cast).
LOGIT_BYTES = 11
# Autocast keeps a bf16 copy of every weight it casts until backward has used it: 2 bytes per parameter
# (measured: the 24 h^2 bytes per block that the saved-tensor count above also finds, i.e. 2 x 12 h^2).
AUTOCAST_WEIGHT_BYTES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB of GPU memory for one DPO training step (see :func:`dpo_memory_estimate`)."""

    n_params: int
    micro_batch_pairs: int
    seq_len: int
    optimizer: str
    gradient_checkpointing: bool
    weights: float
    gradients: float
    optimizer_state: float
    reference: float
    autocast_weights: float
    activations: float
    logits: float
    total: float
    gpu_gib: float

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k):.1f}" for k in
                          ("weights", "gradients", "optimizer_state", "reference", "autocast_weights",
                           "activations", "logits"))
        return (f"micro-batch {self.micro_batch_pairs} pairs x {self.seq_len} tokens, {self.optimizer}, "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}: {parts} -> "
                f"{self.total:.1f} GiB of {self.gpu_gib:g}")


def gpt2_param_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a GPT-2 with tied embeddings (gpt2-large: 36, 1280, 50257, 1024 -> 774,030,080), counted
    by ``estimate.count_parameters`` from the config's shapes."""
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions)
    return count_parameters(config).total


def dpo_memory_estimate(
    *,
    micro_batch_pairs: int = 1,
    seq_len: int = 512,
    n_layer: int = 36,
    n_embd: int = 1280,
    n_head: int = 20,
    vocab_size: int = 50257,
    n_positions: int = 1024,
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop",
    reference: Literal["cached", "bf16", "fp32"] = "cached",
    gradient_checkpointing: bool = False,
    attention: Literal["sdpa", "eager"] = "sdpa",
    gpu_gib: float = 80.0,
) -> MemoryEstimate:
    """Estimated peak GPU memory (GiB) of one DPO micro-batch step; defaults are gpt2-large at 512 tokens.

    Fixed: fp32 policy weights, fp32 gradients, optimizer state (RMSprop 1 buffer, AdamW 2), the reference
    (``"cached"``: log-probs precomputed, nothing resident, as this project's trainers do). Activations:
    ``2 x micro_batch_pairs`` sequences (chosen and rejected in one forward pass) of ``seq_len`` tokens,
    ACTIVATION_BYTES per token per layer (plus the s^2 attention scores with eager attention), or with
    gradient checkpointing only every block's input plus one block recomputed at a time; the LM-head logits
    (LOGIT_BYTES per logit) are not checkpointed; autocast's bf16 weight copies (AUTOCAST_WEIGHT_BYTES).
    Not counted: allocator fragmentation, CUDA context and NCCL buffers (budget 1-3 GiB).
    """
    for name, value in (("micro_batch_pairs", micro_batch_pairs), ("seq_len", seq_len), ("n_layer", n_layer),
                        ("n_embd", n_embd), ("n_head", n_head), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len > n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context n_positions {n_positions}")
    buffers = {"rmsprop": 1, "adamw": 2}
    if optimizer not in buffers:
        raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {optimizer!r}")
    ref_bytes = {"cached": 0, "bf16": 2, "fp32": 4}
    if reference not in ref_bytes:
        raise ValueError(f"reference must be 'cached', 'bf16' or 'fp32', got {reference!r}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    n = gpt2_param_count(n_layer, n_embd, vocab_size, n_positions)
    tokens = 2 * micro_batch_pairs * seq_len  # chosen + rejected
    per_block = ACTIVATION_BYTES["block"] * n_embd
    if attention == "eager":  # the (heads x s x s) scores and softmax are kept
        per_block += ACTIVATION_BYTES["eager_attention_per_head_key"] * n_head * seq_len
    block_params = 12 * n_embd**2 + 13 * n_embd
    if gradient_checkpointing:  # every block's input, plus one block recomputed (activations and weights)
        activations = tokens * (n_layer * ACTIVATION_BYTES["checkpointed_block_input"] * n_embd + per_block)
        cast_params = vocab_size * n_embd + block_params
    else:
        activations = tokens * n_layer * per_block
        cast_params = vocab_size * n_embd + n_layer * block_params
    logits = tokens * vocab_size * LOGIT_BYTES
    fixed = {"weights": 4 * n, "gradients": 4 * n, "optimizer_state": 4 * n * buffers[optimizer],
             "reference": ref_bytes[reference] * n, "autocast_weights": AUTOCAST_WEIGHT_BYTES * cast_params}
    total = sum(fixed.values()) + activations + logits
    return MemoryEstimate(n_params=n, micro_batch_pairs=micro_batch_pairs, seq_len=seq_len,
                          optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                          **{k: v / GiB for k, v in fixed.items()}, activations=activations / GiB,
                          logits=logits / GiB, total=total / GiB, gpu_gib=gpu_gib)


def dpo_batch_plan(global_batch: int = 64, num_processes: int = 1, **estimate_kwargs: Any) -> str:
    """A table: for each micro-batch that divides ``global_batch`` over ``num_processes`` GPUs, the
    accumulation that reaches it and the estimated memory per GPU, with and without checkpointing."""
    lines = [f"global batch {global_batch} on {num_processes} GPU(s):",
             "micro x accumulation | GiB per GPU (no checkpointing) | GiB (gradient checkpointing)"]
    for micro in range(1, global_batch + 1):
        if global_batch % (micro * num_processes):
            continue
        accum = accumulation_steps(global_batch, micro, num_processes)
        plain = dpo_memory_estimate(micro_batch_pairs=micro, **estimate_kwargs)
        ckpt = dpo_memory_estimate(micro_batch_pairs=micro, gradient_checkpointing=True, **estimate_kwargs)
        lines.append(f"{micro:>5} x {accum:<13} | {plain.total:7.1f}{'' if plain.fits else ' (too big)':11}"
                     f"            | {ckpt.total:7.1f}{'' if ckpt.fits else ' (too big)'}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI
def _load_pairs(path: Path) -> Any:
    """Pairs from a ``save_to_disk`` folder (preferences.save_preferences, or a hub_preferences Dataset
    saved that way) or a .jsonl/.json/.parquet file with prompt/chosen/rejected columns."""
    import datasets

    from dpo_lab.hub_preferences import validate_pairs

    if path.is_dir():
        folder = path / "pairs" if (path / "pairs").is_dir() else path
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict with splits {list(ds)}; save one split of pairs")
    elif path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"--pairs {path}: expected a .jsonl, .json or .parquet file or a saved "
                             "Dataset folder")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        raise FileNotFoundError(f"--pairs {path} does not exist")
    validate_pairs(ds)
    return ds


def _parser() -> argparse.ArgumentParser:
    from dpo_lab.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="accelerate launch -m dpo_lab.distributed", description=__doc__.split("\n\n")[0],
        epilog="Preset mode builds the SFT policy and preference pairs on the main process first (others "
               "wait); for long stages build them beforehand with one process (python -m dpo_lab reproduce).")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="settings (DPOConfig, seed, policy); with --pairs only its DPO settings and "
                             "seed are used (default: $DPO_LAB_PRESET or 'cpu'; 'paper': App. B)")
    parser.add_argument("--beta", type=float, required=True, help="DPO temperature of Eq. 7")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset setting, e.g. --set dpo.micro_batch_size=8 (repeatable)")
    parser.add_argument("--pairs", type=Path, default=None,
                        help="preference pairs (saved Dataset folder or .jsonl/.parquet), e.g. TL;DR or HH")
    parser.add_argument("--model", default=None, help="with --pairs: hub name or folder of the SFT model "
                                                      "(policy and frozen reference)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens of prompt + completion (default: preset n_positions; 512 with --pairs)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (required with --pairs)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                        help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even where CUDA exists")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute block activations in backward (see dpo_memory_estimate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``accelerate launch -m dpo_lab.distributed``; prints the result on the main process."""
    from dpo_lab.__main__ import parse_overrides
    from dpo_lab.presets import get_preset

    parser = _parser()
    args = parser.parse_args(argv)
    if (args.pairs is None) != (args.model is None):
        parser.error("--pairs and --model go together (or give neither, to train on the preset's IMDb pairs)")
    if args.pairs is not None and args.out is None:
        parser.error("--out is required with --pairs")
    if args.max_length is not None and args.max_length < 2:
        parser.error(f"--max-length must be >= 2, got {args.max_length}")
    try:
        preset = get_preset(args.preset, **parse_overrides(args.overrides))
    except (KeyError, TypeError, ValueError) as err:
        parser.error(str(err).strip("'\""))
    try:
        accumulation_steps(preset.dpo.batch_size, preset.dpo.micro_batch_size,
                           int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        parser.error(str(err))
    accelerator = make_accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    progress = not args.no_progress
    if args.pairs is not None:
        from dpo_lab.models import load_hub_policy

        with quiet_hf_progress():
            policy, tokenizer = load_hub_policy(args.model)
        pairs = _load_pairs(args.pairs)
        context = getattr(policy.config, "n_positions", None) or getattr(policy.config,
                                                                         "max_position_embeddings", 512)
        max_length = args.max_length or min(512, int(context))
        out_dir, ref_cache = args.out, args.out / "reference-logps"
    else:
        from dpo_lab import pipeline
        from dpo_lab.paths import artifacts_dir

        with accelerator.main_process_first():  # build (main) or read (others) the cached stages
            policy, tokenizer, _ = pipeline.sft_policy(preset, progress=progress)
            pairs, _ = pipeline.preference_data(preset, progress=progress)
        max_length = args.max_length or preset.policy.n_positions
        default = pipeline.dpo_run_dir(preset, args.beta)
        out_dir = args.out or default.with_name(default.name + "-accelerate")
        ref_cache = artifacts_dir() / "reference-logps"
    reference = copy.deepcopy(policy)  # pi_theta starts at pi_SFT = pi_ref
    reference.requires_grad_(False)
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    result = train_dpo_accelerate(policy, reference, tokenizer, pairs, config=preset.dpo, beta=args.beta,
                                  seed=preset.seed, out_dir=out_dir, max_length=max_length,
                                  accelerator=accelerator, ref_cache_dir=ref_cache, progress=progress)
    if accelerator.is_main_process:
        print(f"finished {result.steps} steps on {accelerator.num_processes} process(es): "
              f"{result.checkpoint_dir}")
        print({k: round(v, 4) for k, v in result.last_metrics.items() if isinstance(v, float)})
    accelerator.end_training()
    return 0


__all__ = ["ACTIVATION_BYTES", "AUTOCAST_WEIGHT_BYTES", "LOGIT_BYTES", "MemoryEstimate", "StepBatches",
           "accumulation_steps", "dpo_batch_plan", "dpo_memory_estimate", "gpt2_param_count", "main",
           "make_accelerator", "sharded_reference_logprobs", "train_dpo_accelerate"]

if __name__ == "__main__":
    sys.exit(main())
