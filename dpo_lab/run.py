"""One training run's folder, owned by a :class:`Run` (the DPO trainer and its baselines, PPO).

One run = one ``out_dir``:

    out_dir/run.json                    identity of the run (a hash of its settings and their values)
    out_dir/metrics.jsonl               one JSON object per line, one line per step (step 0: the start)
    out_dir/checkpoints/step-NNNNNN/    weights + tokenizer + trainer_state.pt, each written atomically
    out_dir/result.json                 written last: the run is finished
    out_dir/.run.lock(.json)            locked by the one process that owns the run; who that is

A rerun with the same settings resumes from the last checkpoint (metrics after it are dropped and recomputed)
or, if finished, returns at once; a rerun with other settings is refused, naming the fields that differ.

One process at a time: a :class:`Run` holds ``out_dir/.run.lock`` (an OS file lock, so a holder that dies,
even by kill -9, releases it) from ``Run(...)`` until it finishes, returns a finished result or is closed; its
pid, host and start time are in ``out_dir/.run.lock.json``. Another process on the same folder waits, then
finds the run finished or resumes it; ``DPO_LAB_LOCK_TIMEOUT`` (seconds) bounds the wait with an error naming
the holder. Readers of results (:func:`finished_metrics`) take the same lock and read finished runs only.

Schedules: how long a run goes is not part of its identity, so a finished run continues when asked for more
steps. Asked for FEWER steps than ``out_dir`` already holds (it was continued further), the shorter schedule
is kept apart in the sibling ``<out_dir>-steps<N>`` (with a message): seeded from ``out_dir``'s checkpoint at
step N when one was kept (and its step-N line holds the evaluation), else trained there from the start;
``out_dir`` itself is never cut back, so asking for the longer schedule again reuses it.

A trainer reads as its algorithm plus a few calls: ``Run(out_dir, fields)`` (identity), ``run.finished(...)``,
``run.resume(...)``, ``run.metrics(...)``, ``run.save_checkpoint(...)`` and ``run.finish(...)``. The module's
functions below are those steps one at a time (tested one at a time), and the small utilities every
trainer shares (data order, evaluation schedule, warmup, device).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TextIO, TypeVar

import numpy as np
import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging as hf_logging

from dpo_lab.cache import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    content_hash,
    read_json_object,
)

EvalFn = Callable[[nn.Module, int], Mapping[str, float]]
TRAINER_STATE = "trainer_state.pt"  # a checkpoint folder is complete once this file is in it


# ------------------------------------------------------------------------------------------------- lock
LOCK_FILE = ".run.lock"  # flock'ed by the one process that owns the folder
HOLDER_FILE = ".run.lock.json"  # who that is (pid, host, since), for the messages of whoever waits
LOCK_TIMEOUT_ENV = "DPO_LAB_LOCK_TIMEOUT"


class RunLockedError(TimeoutError):
    """Another process held a run folder for longer than the lock timeout."""


def lock_timeout() -> float | None:
    """Seconds to wait for a run folder another process holds: ``$DPO_LAB_LOCK_TIMEOUT``, else None (wait
    until it is free)."""
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={value!r}: expected seconds >= 0 (unset: wait until free)")
    return None if math.isinf(seconds) else seconds


def lock_holder(out_dir: Path) -> dict[str, Any] | None:
    """What the holder of ``out_dir``'s lock wrote about itself (pid, host, since), or None."""
    try:
        holder = json.loads((out_dir / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another process (it has not written .run.lock.json yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


def acquire_run_lock(out_dir: Path, timeout: float | None = None) -> FileLock:
    """Take ``out_dir``'s lock and write who holds it. If another process holds it, say so and wait for it,
    up to ``timeout`` seconds (None: :func:`lock_timeout`), then raise RunLockedError naming the holder.
    The OS drops the lock of a process that dies, so a crashed or killed holder never blocks anyone."""
    timeout = lock_timeout() if timeout is None else timeout
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = lock_holder(out_dir)
        me = (os.getpid(), socket.gethostname())
        if holder is not None and (holder.get("pid"), holder.get("host")) == me:
            raise RuntimeError(f"{out_dir} is already held by this process: a Run on it was not closed "
                               "(use `with Run(...)` or run.close())") from None
        limit = "" if timeout is None else f" (at most {timeout:g} s, {LOCK_TIMEOUT_ENV})"
        print(f"{out_dir} is in use by {_describe(holder)}; waiting for it{limit}", file=sys.stderr,
              flush=True)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise RunLockedError(
                f"{out_dir} is in use by {_describe(lock_holder(out_dir))}; gave up after {timeout:g} s "
                f"({LOCK_TIMEOUT_ENV}). Let that process finish or stop it (a holder that dies releases the "
                "lock at once), then rerun") from None
    try:
        atomic_write_json(out_dir / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    except BaseException:
        lock.release()
        raise
    return lock


def release_run_lock(out_dir: Path, lock: FileLock) -> None:
    """Undo :func:`acquire_run_lock`."""
    with contextlib.suppress(OSError):
        (out_dir / HOLDER_FILE).unlink()
    lock.release()


@contextlib.contextmanager
def run_lock(out_dir: str | Path, timeout: float | None = None) -> Iterator[Path]:
    """Hold ``out_dir``'s lock for the block (as :func:`acquire_run_lock`); yields the folder."""
    out_dir = Path(out_dir)
    lock = acquire_run_lock(out_dir, timeout)
    try:
        yield out_dir
    finally:
        release_run_lock(out_dir, lock)


# -------------------------------------------------------------------------------------------- identity
# A run's own files are written atomically: damage came from outside, and the checkpoints survive it.
_DAMAGED = "delete it and rerun: training resumes from the last checkpoint"


def check_run(out_dir: Path, run_fields: Mapping[str, Any]) -> str:
    """Claim ``out_dir`` for the run ``run_fields`` describe and return its key (their content hash).

    Refuses (ValueError naming the differing fields) to resume or reuse a run made with other settings or
    data. A run that never reached its first checkpoint has nothing to protect: new settings may replace it.
    """
    run_key = content_hash(run_fields)
    path = out_dir / "run.json"
    started = (out_dir / "result.json").is_file() or bool(checkpoint_dirs(out_dir))
    if path.is_file() and started:
        saved = read_json_object(path, ("run_key",), advice=_DAMAGED)
        if saved.get("run_key") != run_key:
            old = saved.get("fields", {})
            diff = sorted(k for k in set(old) | set(run_fields) if old.get(k) != run_fields.get(k))
            raise ValueError(f"{out_dir} holds a different run (differs in {diff}); use another out_dir")
        return run_key
    atomic_write_json(path, {"run_key": run_key, "fields": dict(run_fields)})
    return run_key


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of optimizer step ``step`` (1-based): consecutive slices of one seeded permutation per
    epoch. A pure function of (seed, step), so a resumed run sees exactly the batches it would have."""
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


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_path(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return out_dir / "checkpoints" / f"step-{step:06d}"


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():  # hidden ".step-*.tmp" folders are unfinished atomic writes: ignored
        if d.name.startswith("step-") and (d / TRAINER_STATE).is_file():
            found.append((int(d.name.removeprefix("step-")), d))
    return sorted(found)


def prune_checkpoints(out_dir: Path, keep: int | None, current: Path) -> None:
    """Delete all but the ``keep`` latest checkpoints (None keeps all); never ``current``."""
    if keep is None:
        return
    for _, old in checkpoint_dirs(out_dir)[:-keep]:
        if old != current:
            shutil.rmtree(old)


def latest_checkpoint(out_dir: Path, run_key: str, max_steps: int) -> tuple[int, Path, dict[str, Any]] | None:
    """``(step, folder, trainer state)`` of the checkpoint to resume from, or None to start afresh.

    The state is read with ``weights_only=True`` (tensors and plain types only, no pickled code).
    """
    checkpoints = checkpoint_dirs(out_dir)
    if not checkpoints:
        return None
    step, ckpt = checkpoints[-1]
    if step > max_steps:
        raise ValueError(f"{out_dir} already holds a checkpoint at step {step} > max_steps "
                         f"{max_steps}; use a new out_dir or a larger max_steps")
    try:
        state = torch.load(ckpt / TRAINER_STATE, weights_only=True, map_location="cpu")
    except Exception as err:  # a truncated or overwritten file: name it, and the way out
        raise ValueError(f"{ckpt / TRAINER_STATE} is truncated or corrupt ({type(err).__name__}); delete "
                         f"{ckpt} to resume from an earlier checkpoint (or from the start)") from err
    if state["run_key"] != run_key:
        raise ValueError(f"checkpoint {ckpt} belongs to another run (key {state['run_key']} != {run_key})")
    return step, ckpt, state


def schedule_dir(out_dir: Path, max_steps: int) -> Path:
    """Where the ``max_steps``-step schedule of the run in ``out_dir`` lives: ``out_dir`` itself, unless it
    holds a checkpoint beyond ``max_steps`` (the run was continued further): then ``<out_dir>-steps<N>``."""
    checkpoints = checkpoint_dirs(out_dir)
    if checkpoints and checkpoints[-1][0] > max_steps:
        base = out_dir if out_dir.name else out_dir.resolve()
        return base.with_name(f"{base.name}-steps{max_steps}")
    return out_dir


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoint files are never rewritten in place (atomic writes), so sharing is safe
    except OSError:
        shutil.copy2(src, dst)


def seed_schedule(source: Path, target: Path, steps: int) -> bool:
    """Start ``target``, the ``steps``-step schedule of the run in ``source``, from what ``source`` already
    computed: its checkpoint at ``steps`` (if one was kept) and its metrics up to that step, provided the line
    of ``steps`` holds the evaluation (every key of the step-0 line), as a run that ends there would have.
    The run resumed in ``target`` is then finished at once. False (nothing written) if that is not possible
    or ``target`` has started already."""
    ckpt = checkpoint_path(source, steps)
    if checkpoint_dirs(target) or (target / "result.json").is_file() or not (ckpt / TRAINER_STATE).is_file():
        return False
    records = [r for r in read_metrics(source / "metrics.jsonl")
               if isinstance(r.get("step"), int) and r["step"] <= steps]
    got = [r["step"] for r in records]
    if not records or got != list(range(got[0], steps + 1)) or got[0] not in (0, 1):
        return False
    if got[0] == 0 and not set(records[0]) <= set(records[-1]):
        return False  # step `steps` was not evaluated: the shorter run must end with an evaluation
    atomic_write_text(target / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    with atomic_directory(checkpoint_path(target, steps)) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)
    return True


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load save_pretrained safetensors into ``model`` in place; only tied weights may be absent."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as err:  # safetensors' own message names neither the file nor a way out
            raise ValueError(f"{f} is truncated or corrupt ({err}); delete {folder} (a checkpoint: training "
                             "resumes from an earlier one) and rerun") from err
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
               or ())
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")


def rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states, for a checkpoint (tensors only: weights_only loads it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (the CUDA part only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ metrics file
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] if there is none).

    A torn last line (no newline: a crash mid-write) is skipped; any other line that is not a JSON object
    raises ValueError naming the file and line, rather than silently losing steps.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                continue  # torn by a crash; a resume truncates it away
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}); the metrics file is "
                             "corrupt") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int | None) -> list[dict[str, Any]]:
    """Keep the records up to the checkpoint we resume from (None: none) and return them; later steps will
    be recomputed, so a resumed run has no duplicate lines."""
    kept = []
    if last_step is not None:
        for record in read_metrics(path):
            if not isinstance(record.get("step"), int):
                raise ValueError(f"{path}: a record has no integer 'step': {record}")
            if record["step"] <= last_step:
                kept.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def call_eval_fn(eval_fn: EvalFn, policy: nn.Module, step: int, taken: set[str]) -> dict[str, float]:
    """``eval_fn(policy, step)`` as a dict; its keys must not overwrite the training metrics ``taken``."""
    result = dict(eval_fn(policy, step))
    policy.eval()  # whatever eval_fn did, training continues without dropout
    clash = sorted(set(result) & taken)
    if clash:
        raise ValueError(f"eval_fn returned key(s) {clash} that clash with training metrics; rename them")
    return result


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl (flushed: a crash loses at most the line being
    written), merging ``eval_fn``'s dict into the lines of evaluation steps (step 0, every ``eval_every``
    steps, the last step). Use as a context manager; ``last`` is the latest record."""

    def __init__(self, path: Path | None, eval_fn: EvalFn | None, train_keys: set[str], *, eval_every: int,
                 max_steps: int, last: dict[str, Any] | None = None) -> None:
        self.path, self.eval_fn, self.train_keys = path, eval_fn, train_keys
        self.eval_every, self.max_steps = eval_every, max_steps
        self.last: dict[str, Any] = {} if last is None else last
        self._handle: TextIO | None = None

    def __enter__(self) -> MetricsLog:
        if self.path is not None:  # None: a process that writes nothing (all but the main one)
            self._handle = open(self.path, "a")  # closed in __exit__
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            if self._handle is None:
                raise RuntimeError("MetricsLog is not open; use it as a context manager")
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()
        self.last = record

    def log_start(self, policy: nn.Module) -> None:
        """Step 0: the evaluation of the starting policy (nothing without an eval_fn)."""
        if self.eval_fn is not None:
            self._append({"step": 0, **call_eval_fn(self.eval_fn, policy, 0, self.train_keys)})

    def log_step(self, record: dict[str, Any], policy: nn.Module) -> dict[str, Any]:
        """Write one training step's ``record`` (evaluated first if due) and return it. ``cost/*`` values
        are this step's increments; the line holds the run's running totals (a resume continues them)."""
        step = record["step"]
        for key in [k for k in record if k.startswith("cost/")]:
            record[key] = record[key] + self.last.get(key, 0)
        if self.eval_fn is not None and is_due(step, self.eval_every, self.max_steps):
            record.update(call_eval_fn(self.eval_fn, policy, step, self.train_keys))
        self._append(record)
        return record


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RunResult:
    checkpoint_dir: Path  # the final policy (save_pretrained + tokenizer): models.load_policy reads it
    metrics_path: Path  # metrics.jsonl, one line per step
    last_metrics: dict[str, float]
    steps: int


R = TypeVar("R", bound=RunResult)


def finished_run(out_dir: Path, max_steps: int, result_type: type[R],
                 policy: nn.Module | None = None) -> R | None:
    """The result of a run that already finished ``max_steps`` steps in ``out_dir``, else None (not
    finished, or finished with another ``max_steps``: train on from the last checkpoint). Given ``policy``,
    a finished run's final weights are loaded into it (in eval mode), as if it had just been trained."""
    path = out_dir / "result.json"
    if not path.is_file():
        return None
    saved = read_json_object(path, ("checkpoint_dir", "steps", "last_metrics"), advice=_DAMAGED)
    if saved["steps"] != max_steps:
        return None
    result = result_type(checkpoint_dir=out_dir / saved["checkpoint_dir"],
                         metrics_path=out_dir / "metrics.jsonl", last_metrics=saved["last_metrics"],
                         steps=saved["steps"])
    if policy is not None:
        load_weights(policy, result.checkpoint_dir)
        policy.eval()
    return result


def write_result(out_dir: Path, result: RunResult, run_key: str) -> None:
    """Mark the run finished (result.json, atomically; the checkpoint path is stored relative to out_dir)."""
    atomic_write_json(out_dir / "result.json", {
        "checkpoint_dir": str(result.checkpoint_dir.relative_to(out_dir)), "steps": result.steps,
        "last_metrics": result.last_metrics, "run_key": run_key})


@contextlib.contextmanager
def finished_metrics(result: RunResult, timeout: float | None = None) -> Iterator[Path]:
    """Yield ``result``'s metrics.jsonl to read, holding its run folder's lock, once the folder's result.json
    says the run finished ``result.steps`` steps: no other process can continue or cut back the run while its
    points are read, and a run in progress is never read as a result (RuntimeError naming the folder)."""
    out_dir = result.metrics_path.parent
    with run_lock(out_dir, timeout):
        path = out_dir / "result.json"
        saved = read_json_object(path, ("steps",), advice=_DAMAGED) if path.is_file() else None
        if saved is None or saved["steps"] != result.steps:
            state = "no result.json" if saved is None else f"its result.json says {saved['steps']} steps"
            raise RuntimeError(f"{out_dir} is not a finished {result.steps}-step run ({state}): another "
                               "process changed it after it finished here; rerun to read it again")
        yield result.metrics_path




def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """lr multiplier of update t (0-based): (t + 1) / (warmup + 1) until warmup is over, then 1 (as the
    official code: linear from ~0 over ``warmup_steps`` updates, App. B)."""
    return lambda t: min(1.0, (t + 1) / (warmup_steps + 1))


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' own bars ('Loading weights', 'Writing model shards') for local, small loads and
    saves: one per checkpoint would bury the training bar."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ the run
class Run:
    """A run's folder, from its identity to its result: the bookkeeping every trainer shares.

    ``Run(out_dir, fields)`` takes the folder's lock (waiting while another process holds it, see the module
    docstring), then claims the folder for the run that ``fields`` describe (a started run with other settings
    is refused, naming the fields that differ); ``key`` is their hash. The lock is held until :meth:`finish`,
    until :meth:`finished` returns a result, or until :meth:`close` (also as a context manager, and for every
    Run a :func:`closes_runs` trainer opened, when it returns or raises). With ``writer=False`` (every
    process but the main one of a multi-process run, whose main process holds the lock) it reads but never
    writes.

    ``dir`` is the folder that holds the asked schedule: ``out_dir``, or, if ``out_dir`` was continued beyond
    the ``max_steps`` first passed to :meth:`finished` or :meth:`resume`, its sibling ``<out_dir>-steps<N>``
    (:func:`schedule_dir`; seeded by :func:`seed_schedule` when ``out_dir`` kept the checkpoint at N). The
    longer run is never cut back, so each schedule stays finished and reusable in its own folder.
    """

    def __init__(self, out_dir: str | Path, fields: Mapping[str, Any], *, writer: bool = True,
                 lock_timeout: float | None = None) -> None:
        self.dir = Path(out_dir)
        self.fields = dict(fields)
        self.writer = writer
        self.lock_timeout = lock_timeout  # None: $DPO_LAB_LOCK_TIMEOUT, else wait until free
        self._lock: FileLock | None = None
        self._schedule: int | None = None  # the max_steps whose folder has been settled
        if writer:
            self._lock = acquire_run_lock(self.dir, lock_timeout)
            opened = _OPENED_RUNS.get()
            if opened is not None:
                opened.append(self)
            try:
                self.key = check_run(self.dir, self.fields)
            except BaseException:
                self.close()
                raise
        else:
            self.key = content_hash(self.fields)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def closed(self) -> bool:
        """True once a writer has released its folder (it may write nothing more)."""
        return self.writer and self._lock is None

    def close(self) -> None:
        """Release the folder's lock (idempotent)."""
        if self._lock is not None:
            lock, self._lock = self._lock, None
            release_run_lock(self.dir, lock)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the Run on {self.dir} is closed (its lock released); open a new one")

    def _settle_schedule(self, max_steps: int) -> None:
        """Move to :func:`schedule_dir`'s folder for ``max_steps`` (once, at the first call)."""
        if self._schedule is not None:
            return
        self._schedule = max_steps
        target = schedule_dir(self.dir, max_steps)
        if target == self.dir:
            return
        held = checkpoint_dirs(self.dir)[-1][0]
        if self.writer:
            self._check_open()
            # Taken while out_dir is still held, so the checkpoint to seed from cannot be pruned meanwhile.
            lock = acquire_run_lock(target, self.lock_timeout)
            try:
                check_run(target, self.fields)
                seeded = seed_schedule(self.dir, target, max_steps)
            except BaseException:
                release_run_lock(target, lock)
                raise
            self.close()
            self._lock = lock
            how = (f"from its checkpoint at step {max_steps}" if seeded else
                   "resumed there" if checkpoint_dirs(target) else "trained there from the start")
            print(f"{self.dir} holds this run continued to step {held} > max_steps {max_steps}: the "
                  f"{max_steps}-step schedule is kept apart in {target} ({how}); {self.dir} is left as it is",
                  file=sys.stderr, flush=True)
        self.dir = target

    def finished(self, max_steps: int, result_type: type[R], policy: nn.Module | None = None) -> R | None:
        """The result if this run already finished ``max_steps`` steps (weights loaded into ``policy``); the
        folder is then released. Settles which folder holds ``max_steps`` steps (see the class docstring)."""
        self._settle_schedule(max_steps)
        result = finished_run(self.dir, max_steps, result_type, policy)
        if result is not None:
            self.close()
        return result

    def resume(self, max_steps: int) -> tuple[int, Path, dict[str, Any]] | None:
        """``(step, folder, trainer state)`` of the last checkpoint (its RNG state restored), or None. From
        here the run is in progress: a result.json of another length is removed, so no reader takes the run
        for finished while it is continued."""
        self._settle_schedule(max_steps)
        found = latest_checkpoint(self.dir, self.key, max_steps)
        if found is not None and "rng" in found[2]:
            set_rng_state(found[2]["rng"])
        if self.writer:
            self._check_open()
            (self.dir / "result.json").unlink(missing_ok=True)
        return found

    def metrics(self, eval_fn: EvalFn | None, train_keys: set[str], *, eval_every: int, max_steps: int,
                start: int | None) -> MetricsLog:
        """The metrics log, cut back to step ``start`` (None: a fresh start) so no step is written twice.
        Only the writer evaluates and writes; other processes get a log that keeps ``last`` only."""
        if not self.writer:
            return MetricsLog(None, None, train_keys, eval_every=eval_every, max_steps=max_steps)
        self._check_open()
        kept = truncate_metrics(self.metrics_path, start)
        return MetricsLog(self.metrics_path, eval_fn, train_keys, eval_every=eval_every, max_steps=max_steps,
                          last=kept[-1] if kept else None)

    def save_checkpoint(self, step: int, write: Callable[[Path], None], state: Mapping[str, Any], *,
                        keep: int | None = 1) -> Path:
        """Checkpoint ``step`` atomically: ``write(folder)`` saves the weights (safetensors) and tokenizer,
        ``state`` (tensors and plain types only, so ``weights_only=True`` reads it) goes to trainer_state.pt
        with the step, the run key and the RNG state. Keeps the ``keep`` latest (None: all)."""
        path = checkpoint_path(self.dir, step)
        if self.writer:
            self._check_open()
            with atomic_directory(path) as tmp, quiet_hf_progress():
                write(tmp)
                torch.save({"step": step, "run_key": self.key, "rng": rng_state(), **state},
                           tmp / TRAINER_STATE)
            prune_checkpoints(self.dir, keep, path)
        return path

    def finish(self, result: R) -> R:
        """Mark the run finished (result.json), release the folder and return ``result``."""
        if self.writer:
            self._check_open()
            write_result(self.dir, result, self.key)
            self.close()
        return result


_OPENED_RUNS: contextvars.ContextVar[list[Run] | None] = contextvars.ContextVar("dpo_lab_opened_runs",
                                                                               default=None)
P = ParamSpec("P")
T = TypeVar("T")


def closes_runs(fn: Callable[P, T]) -> Callable[P, T]:
    """Decorate a trainer: every :class:`Run` it opens is closed (its folder's lock released) when it returns
    or raises, even while a traceback keeps its frame alive (a notebook's last error), so a failed run never
    blocks the next attempt."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        token = _OPENED_RUNS.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for run in _OPENED_RUNS.get() or []:
                run.close()
            _OPENED_RUNS.reset(token)

    return wrapper
