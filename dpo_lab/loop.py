"""What the four training loops (SFT, r_phi, DPO, PPO) share: the data order, when to evaluate, the optimiser
step, the two learning-rate schedules, and :class:`TrainLog`, where a loop reports its steps. Nothing here
touches the disk: ``run.Run`` is a TrainLog that also writes, checkpoints (``save``), resumes (``restore``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

EvalFn = Callable[[nn.Module, int], Mapping[str, float]]


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of optimizer step ``step`` (1-based): slices of one seeded permutation per epoch, a pure
    function of (seed, step), so a resumed run sees exactly the batches it would have."""
    start = (step - 1) * batch_size
    perms: dict[int, np.ndarray] = {}
    out = []
    for pos in range(start, start + batch_size):
        epoch = pos // n_items
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_items)
        out.append(int(perms[epoch][pos % n_items]))
    return out


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Evaluate or checkpoint at ``step``: every ``every`` steps and always at the last one."""
    return step % every == 0 or step == max_steps


# -------------------------------------------------------------------------------------- the optimiser step
def warmup_then_flat(warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR multiplier of update t: (t + 1) / (warmup + 1), then 1 (the official DPO code, App. B)."""
    return lambda t: min(1.0, (t + 1) / (warmup_steps + 1))


def warmup_then_cosine(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """SFT's lr: linear warmup from 0 over ``warmup`` steps, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(optimizer: torch.optim.Optimizer, params: Any, max_grad_norm: float, *,
                   loss: torch.Tensor | None = None, scheduler: Any = None, clip: Callable | None = None,
                   where: str = "") -> float:
    """Every loop's update: backward (given ``loss``), clip (``clip`` or torch's), step, schedule, zero grads.
    Returns the norm before clipping; a non-finite one raises before the step."""
    if loss is not None:
        loss.backward()
    grad_norm = float((clip or nn.utils.clip_grad_norm_)(params, max_grad_norm))
    if not math.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {where}".rstrip())
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ------------------------------------------------------------------------------------------- the log
def call_eval_fn(eval_fn: EvalFn, policy: nn.Module, step: int, taken: set[str]) -> dict[str, float]:
    """``eval_fn(policy, step)`` as a dict; its keys must not overwrite the training metrics ``taken``."""
    result = dict(eval_fn(policy, step))
    policy.eval()  # whatever eval_fn did, training continues without dropout
    clash = sorted(set(result) & taken)
    if clash:
        raise ValueError(f"eval_fn returned key(s) {clash} that clash with training metrics; rename them")
    return result


class TrainLog:
    """Where a loop reports (in memory): ``cost/*`` increments become running totals, and ``eval_fn``'s dict
    is merged in every ``eval_every`` steps and at the last. ``run.Run`` also saves and resumes."""

    def __init__(self, eval_fn: EvalFn | None = None, *, eval_every: int = 1, max_steps: int = 1,
                 progress: bool = True) -> None:
        self.eval_fn, self.eval_every, self.max_steps = eval_fn, eval_every, max_steps
        self.progress = progress  # whether the loop shows a progress bar
        self.records: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}

    def restore(self, modules: Mapping[str, nn.Module]) -> tuple[int, Path, dict[str, Any]] | None:
        """``(step, folder, state)`` of the checkpoint to go on from, its weights loaded into ``modules``
        (subfolder -> module); None: start afresh."""
        return None

    def save(self, step: int, write: Callable[[Path], None], state: Mapping[str, Any]) -> Path | None:
        """Checkpoint ``step``: ``write(folder)`` saves the weights, ``state`` the rest (optimizer, ...)."""
        return None

    def _append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.last = record

    def log_start(self, policy: nn.Module) -> None:
        """Step 0: the evaluation of the starting policy (nothing without an eval_fn)."""
        if self.eval_fn is not None:
            self._append({"step": 0, **call_eval_fn(self.eval_fn, policy, 0, {"step"})})

    def log(self, record: dict[str, Any], policy: nn.Module) -> dict[str, Any]:
        """Write one training step's ``record`` (evaluated first if due) and return it."""
        step = record["step"]
        for key in [k for k in record if k.startswith("cost/")]:
            record[key] = record[key] + self.last.get(key, 0)
        if self.eval_fn is not None and is_due(step, self.eval_every, self.max_steps):
            record.update(call_eval_fn(self.eval_fn, policy, step, set(record)))
        self._append(record)
        return record
