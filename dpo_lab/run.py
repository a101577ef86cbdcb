"""A training run on disk, between the pure training loops (``loop.TrainLog``) and the artifacts folder:

    out_dir/run.json, metrics.jsonl     the run's identity (a hash of its settings); one line per step
    out_dir/checkpoints/step-NNNNNN/    weights + tokenizer + trainer_state.pt, written atomically
    out_dir/result.json, .run.lock      written last: the run is finished; held by the one process running it

A rerun resumes from the last checkpoint with the same numbers, or returns at once if finished. How long a
run goes is not part of its identity (:data:`SCHEDULE_FIELDS`): asked for FEWER steps than ``out_dir``
holds, the shorter schedule trains in ``<out_dir>-steps<N>`` (:func:`schedule_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2Model,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from dpo_lab import dpo_trainer, ppo
from dpo_lab.batching import PAIR_COLUMNS, RANKING_COLUMNS, pair_columns
from dpo_lab.cache import (
    Lock,
    RunLockedError,
    atomic_directory,
    atomic_write_json,
    atomic_write_tensors,
    atomic_write_text,
    content_hash,
    model_fingerprint,
    naming_damaged_files,
    read_json_object,
    read_saved_config,
    tensors_checksum,
    tokenizer_fingerprint,
)
from dpo_lab.loop import EvalFn, TrainLog, resolve_device
from dpo_lab.models import load_hub_policy
from dpo_lab.reward_model import LearnedReward, ScalarRewardModel, train_reward_model

TRAINER_STATE = "trainer_state.pt"  # a checkpoint folder is complete once this file is in it
LOCK_FILE = ".run.lock"  # holds who runs it (pid, host, since) while locked
# A run's own files are written atomically: damage came from outside, and the checkpoints survive it.
_DAMAGED = "delete it and rerun: training resumes from the last checkpoint"
# Settings that do not change a run's trajectory (a sweep's list, how long, how often it is looked at or
# saved): left out of every run's identity, so a finished run continues when asked for more steps.
SCHEDULE_FIELDS = ("betas", "target_kls", "max_steps", "eval_every", "checkpoint_every")


def trajectory_settings(config: Any) -> dict:
    """The fields of a DPO or PPO config that key a run: all but :data:`SCHEDULE_FIELDS`."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SCHEDULE_FIELDS}


def run_lock(out_dir: str | Path, timeout: float | None = None) -> Lock:
    """``out_dir``'s lock, not yet taken (``with run_lock(out_dir): ...``)."""
    return Lock(Path(out_dir) / LOCK_FILE, Path(out_dir), timeout)


def check_run(out_dir: Path, run_fields: Mapping[str, Any]) -> str:
    """Claim ``out_dir`` for the run ``run_fields`` describe and return its key (their content hash); a
    started run (a checkpoint or a result) of other settings is refused, naming the differing fields."""
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


# ------------------------------------------------------------------------------------------- policies
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


def save_policy(model: PreTrainedModel, tokenizer: Any, path: str | Path) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer to ``path``, atomically: an
    interrupted save leaves the previous folder (or none), never a half-written one."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_policy(path: str | Path, *, advice: str | None = None) -> tuple[PreTrainedModel, Any]:
    """Reload what :func:`save_policy` wrote: ``(model, tokenizer)``, in eval mode, on the CPU. A truncated or
    corrupt file (weights, config, tokenizer) is a ValueError naming it, followed by ``advice`` (default:
    delete the folder and save the policy again)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no saved policy at {path} (config.json missing)")
    advice = advice or f"delete {path} and save the policy again"
    with naming_damaged_files(path, advice), quiet_hf_progress():
        return load_hub_policy(str(path))


def pairs_fingerprint(cols: Mapping[str, Sequence[Any]]) -> str:
    """Content hash of the pairs' (or rankings') text, in order."""
    ranked = "completions" in cols
    digest = hashlib.sha256(b"rankings" if ranked else b"")
    for c in RANKING_COLUMNS if ranked else PAIR_COLUMNS:
        digest.update(json.dumps(list(cols[c])).encode())
    return digest.hexdigest()[:16]


def broadcast_error(accelerator: Any, error: Exception | None) -> None:
    """Raise the main process's ``error`` on every process (others get a ValueError), so none hangs."""
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


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_path(out_dir: Path, step: int) -> Path:
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


def prune_checkpoints(out_dir: Path, current: Path) -> None:
    """Delete every checkpoint but ``current``, the one just saved (a resume needs only the latest)."""
    for _, old in checkpoint_dirs(out_dir):
        if old != current:
            shutil.rmtree(old)


def latest_checkpoint(out_dir: Path, run_key: str, max_steps: int) -> tuple[int, Path, dict[str, Any]] | None:
    """``(step, folder, trainer state)`` of the checkpoint to resume from, or None to start afresh. The state
    is read with ``weights_only=True`` (tensors and plain types only, no pickled code)."""
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


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load safetensors weights into ``model`` in place; only tied weights may be absent."""
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
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ metrics file
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] if none). A torn last line (a crash mid-write) is skipped; any
    other line that is not a JSON object is a ValueError naming file and line."""
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


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RunResult:
    checkpoint_dir: Path  # the final policy (save_pretrained + tokenizer): load_policy reads it
    metrics_path: Path  # metrics.jsonl, one line per step
    last_metrics: dict[str, float]
    steps: int


def finished_run(out_dir: Path, max_steps: int, policy: nn.Module | None = None) -> RunResult | None:
    """The result of a run that finished ``max_steps`` steps in ``out_dir`` (its result.json), else None.
    Given ``policy``, the final weights are loaded into it (in eval mode)."""
    path = out_dir / "result.json"
    if not path.is_file():
        return None
    saved = read_json_object(path, ("checkpoint_dir", "steps", "last_metrics"), advice=_DAMAGED)
    if saved["steps"] != max_steps:
        return None
    result = RunResult(out_dir / saved["checkpoint_dir"], out_dir / "metrics.jsonl", saved["last_metrics"],
                       saved["steps"])
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
    """Yield ``result``'s metrics.jsonl to read, holding its folder's lock, once its result.json says the run
    finished ``result.steps`` steps: a run in progress is never read as a result (RuntimeError)."""
    out_dir = result.metrics_path.parent
    with run_lock(out_dir, timeout):
        path = out_dir / "result.json"
        saved = read_json_object(path, ("steps",), advice=_DAMAGED) if path.is_file() else None
        if saved is None or saved["steps"] != result.steps:
            state = "no result.json" if saved is None else f"its result.json says {saved['steps']} steps"
            raise RuntimeError(f"{out_dir} is not a finished {result.steps}-step run ({state}): another "
                               "process changed it after it finished here; rerun to read it again")
        yield result.metrics_path


# ------------------------------------------------------------------------------------------------ the run
class Run(TrainLog):
    """A run's folder, from its identity to its result, and the ``log`` its loop reports to.

    It takes the folder's lock and claims the folder for the run ``fields`` describe (:func:`check_run`,
    ``key`` is their hash), until :meth:`finish`, a result from :meth:`finished`, or :meth:`close`. With
    ``writer=False`` (all but the main process of a multi-process run) it reads but never writes or evaluates.
    """

    def __init__(self, out_dir: str | Path, fields: Mapping[str, Any], *, writer: bool = True,
                 lock_timeout: float | None = None, eval_fn: EvalFn | None = None,
                 eval_every: int = 1, progress: bool = True) -> None:
        super().__init__(eval_fn if writer else None, eval_every=eval_every, progress=progress)
        self.dir, self.fields, self.writer = Path(out_dir), dict(fields), writer
        self.lock_timeout = lock_timeout
        self.checkpoint: Path | None = None  # the last checkpoint saved or resumed from
        self._schedule: int | None = None  # the max_steps whose folder has been settled
        self._lock: Lock | None = None
        if writer:
            self._lock = run_lock(self.dir, lock_timeout).acquire()
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
            lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the Run on {self.dir} is closed (its lock released); open a new one")

    def _settle_schedule(self, max_steps: int) -> None:
        """Move to :func:`schedule_dir`'s folder for ``max_steps`` (once, at the first call)."""
        if self._schedule is not None:
            return
        self._schedule = self.max_steps = max_steps
        source, target = self.dir, schedule_dir(self.dir, max_steps)
        if target == source:
            return
        self.dir = target
        if self.writer:
            self._check_open()
            self.close()
            self._lock = run_lock(target, self.lock_timeout).acquire()
            if not (target / "run.json").is_file():  # said once, when the schedule is first kept apart
                held = checkpoint_dirs(source)[-1][0]
                print(f"{source} holds this run continued to step {held} > max_steps {max_steps}: the "
                      f"{max_steps}-step schedule is kept apart in {target} (trained there from the start); "
                      f"{source} is left as it is", file=sys.stderr, flush=True)
            check_run(target, self.fields)

    def finished(self, max_steps: int, policy: nn.Module | None = None) -> RunResult | None:
        """The result if this run already finished ``max_steps`` steps (weights loaded into ``policy``); the
        folder is then released."""
        self._settle_schedule(max_steps)
        result = finished_run(self.dir, max_steps, policy)
        if result is not None:
            self.close()
        return result

    def resume(self, max_steps: int) -> tuple[int, Path, dict[str, Any]] | None:
        """``(step, folder, trainer state)`` of the last checkpoint (its RNG state restored), or None; the
        metrics after it are cut, and a result.json of another length removed: the run is in progress."""
        self._settle_schedule(max_steps)
        found = latest_checkpoint(self.dir, self.key, max_steps)
        if found is not None:
            self.checkpoint = found[1]
            if "rng" in found[2]:
                set_rng_state(found[2]["rng"])
        if self.writer:
            self._check_open()
            (self.dir / "result.json").unlink(missing_ok=True)
            kept = truncate_metrics(self.metrics_path, found[0] if found else None)
            self.records, self.last = kept, kept[-1] if kept else {}
        return found

    def restore(self, modules: Mapping[str, nn.Module]) -> tuple[int, Path, dict[str, Any]] | None:
        found = self.resume(self.max_steps)
        if found is not None:
            for sub, module in modules.items():
                load_weights(module, found[1] / sub)
        return found

    def _append(self, record: dict[str, Any]) -> None:
        if self.writer:
            self._check_open()
            with open(self.metrics_path, "a") as handle:  # one line at a time: a crash loses at most one
                handle.write(json.dumps(record) + "\n")
        super()._append(record)

    def save(self, step: int, write: Callable[[Path], None], state: Mapping[str, Any]) -> Path:
        """Checkpoint ``step`` atomically: ``write(folder)`` saves the weights and tokenizer; ``state``
        (tensors and plain types only) goes to trainer_state.pt with the step, run key and RNG state."""
        self.checkpoint = path = checkpoint_path(self.dir, step)
        if self.writer:
            self._check_open()
            with atomic_directory(path) as tmp, quiet_hf_progress():
                write(tmp)
                torch.save({"step": step, "run_key": self.key, "rng": rng_state(), **state},
                           tmp / TRAINER_STATE)
            prune_checkpoints(self.dir, path)
        return path

    def finish(self, result: RunResult | None = None) -> RunResult:
        """Mark the run finished (result.json), release the folder and return ``result`` (default: the last
        checkpoint and metrics)."""
        if result is None:
            if self.checkpoint is None:
                raise RuntimeError("training ended without a checkpoint")
            result = RunResult(self.checkpoint, self.metrics_path, self.last, self.max_steps)
        if self.writer:
            self._check_open()
            write_result(self.dir, result, self.key)
            self.close()
        return result


# ------------------------------------------------------------------------------- reference log-prob cache
def _read_reference_cache(path: Path, key: str, names: list[str], n: int) -> torch.Tensor:
    """The ``(n, K)`` log-probs in ``path``, checked against its key, its checksum and ``n``."""
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            columns = [handle.get_tensor(name) for name in names]
    except Exception as err:  # truncated or corrupt: what the reader raises varies
        raise ValueError(f"reference cache {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                         "delete it to recompute") from err
    if meta.get("key") != key or meta.get("sha256") != tensors_checksum(*columns):
        raise ValueError(f"reference cache {path} was changed after it was written (its key or checksum "
                         "does not match); delete it to recompute")
    if any(tuple(c.shape) != (n,) for c in columns):
        raise ValueError(f"reference cache {path} holds {columns[0].shape[0]} rows, expected {n}; delete it "
                         "to recompute")
    return torch.stack(columns, dim=1)


def reference_logprobs(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
                       cache_dir: str | Path, reference_fingerprint: str | None = None,
                       **score_args: Any) -> torch.Tensor:
    """:func:`dpo_trainer.pair_logprobs` of the frozen reference (``score_args``: its keyword arguments),
    ``(N, K)`` (pairs: chosen, rejected; rankings: best first), cached on disk (one ``(N,)`` tensor per
    column). The key hashes the reference weights (``reference_fingerprint`` if given), the pairs, the
    tokenizer, max_length, sum or mean, the device type and the precision: nothing stale is reused."""
    cols = pair_columns(pairs)
    n = len(cols["prompt"])
    names = ([f"completion{k}" for k in range(len(cols["completions"][0]))] if "completions" in cols
             else ["chosen", "rejected"])
    device, max_length = score_args.get("device"), score_args["max_length"]
    accelerator = None if device is None or isinstance(device, (str, torch.device)) else device
    dev = accelerator.device if accelerator is not None else resolve_device(device)
    precision = str(accelerator.mixed_precision) if accelerator is not None else (
        "bf16" if dev.type == "cuda" else "no")
    key = content_hash("ref-logps/v2", reference_fingerprint or model_fingerprint(reference),
                       pairs_fingerprint(cols), tokenizer_fingerprint(tokenizer), max_length,
                       "mean" if score_args.get("average") else "sum", dev.type, precision)
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        return _read_reference_cache(path, key, names, n)
    progress = "reference log-probs" if score_args.get("progress", True) else False
    logps = dpo_trainer.pair_logprobs(reference, tokenizer, cols, **{
        **score_args, "device": dev if accelerator is None else accelerator, "progress": progress})
    if accelerator is None or accelerator.is_main_process:
        columns = [c.clone() for c in logps.unbind(1)]  # safetensors stores no shared memory
        atomic_write_tensors(path, dict(zip(names, columns, strict=True)), metadata={
            "key": key, "max_length": str(max_length), "sha256": tensors_checksum(*columns)})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return logps


# ------------------------------------------------------------------------------------ the trainers' runs
def _check_frozen_copy(policy: nn.Module, reference: nn.Module) -> None:
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")


def dpo_run(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
            out_dir: str | Path, ref_cache_dir: str | Path, eval_fn: EvalFn | None = None,
            **settings: Any) -> RunResult:
    """:func:`dpo_trainer.train_dpo` (``settings``: the fields of its ``DPOSettings``, ``progress``, and
    ``device`` if no ``accelerator``) as one run in ``out_dir``: trained, resumed, or if finished its
    weights loaded into ``policy``. The reference log-probs are cached in ``ref_cache_dir``, shared by a
    sweep's runs. Under ``accelerate launch`` every process calls this alike; only the main one evaluates
    and writes."""
    _check_frozen_copy(policy, reference)
    device, accelerator = settings.pop("device", None), settings.pop("accelerator", None)
    accelerator = accelerator if accelerator is not None else dpo_trainer.make_accelerator(device)
    progress = settings.pop("progress", True)
    spec = dpo_trainer.DPOSettings(**settings)  # refused here, before any work
    config, alpha = spec.config, spec.alpha
    dpo_trainer.accumulation_steps(config.batch_size, config.micro_batch_size, accelerator.num_processes)
    cols = spec.columns(pairs)
    fields: dict[str, Any] = {
        "beta": float(spec.beta), "seed": spec.seed, "max_length": spec.max_length,
        "config": trajectory_settings(config), "reference": model_fingerprint(reference),
        "pairs": pairs_fingerprint(cols),
        "tokenizer": tokenizer_fingerprint(tokenizer), "device": accelerator.device.type,
        "mixed_precision": str(accelerator.mixed_precision), "objective": spec.objective,
        "alpha": None if alpha is None else float(alpha)}
    error, run = None, None
    try:
        run = Run(out_dir, fields, writer=accelerator.is_main_process, eval_fn=eval_fn,
                  eval_every=config.eval_every)
    except (ValueError, RunLockedError) as err:  # another run's folder, or held past the lock timeout
        error = err
    broadcast_error(accelerator, error)
    assert run is not None
    with run:
        policy.to(accelerator.device)
        finished = run.finished(config.max_steps, policy=policy)
        if finished is not None:
            return finished
        ref = reference_logprobs(  # (N, K)
            reference, tokenizer, cols, cache_dir=ref_cache_dir, reference_fingerprint=fields["reference"],
            max_length=spec.max_length, batch_size=config.micro_batch_size, device=accelerator,
            progress=progress, average=config.average_logprobs)
        dpo_trainer.train_dpo(policy, tokenizer, cols, ref, spec, accelerator=accelerator, log=run,
                              progress=progress)
        result = run.finish()
    accelerator.wait_for_everyone()
    return result


def ppo_run(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Any,
            score_fn: ppo.ScoreFn, *, out_dir: str | Path, eval_fn: EvalFn | None = None,
            **settings: Any) -> RunResult:
    """:func:`ppo.train_ppo` (``settings``: config, seed, device, progress) as one run in ``out_dir``, as
    :func:`dpo_run`. The policy's weights are not in the key: they change as it trains."""
    _check_frozen_copy(policy, reference)
    config = settings["config"]
    device = resolve_device(settings.pop("device", None))
    ppo.check_ppo_settings(config, prompts, tokenizer)
    fields = {"seed": settings["seed"], "config": trajectory_settings(config),
              "reference": model_fingerprint(reference), "prompts": content_hash(list(prompts)),
              "tokenizer": tokenizer_fingerprint(tokenizer), "device": device.type}
    with Run(out_dir, fields, eval_fn=eval_fn, eval_every=config.eval_every,
             progress=settings.pop("progress", True)) as run:
        finished = run.finished(config.max_steps, policy=policy)
        if finished is not None:
            return finished
        ppo.train_ppo(policy.to(device), reference, tokenizer, prompts, score_fn, log=run, **settings)
        return run.finish()


# ------------------------------------------------------------------------------------------------- r_phi
FORMAT, FORMAT_VERSION = "dpo_lab.LearnedReward", 1


def save_reward_model(reward: LearnedReward, path: str | Path) -> Path:
    """``model.safetensors`` (backbone + head), ``reward_config.json`` (GPT-2 config, offset, report), and
    the tokenizer; written atomically."""
    with atomic_directory(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in reward.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "offset": reward.offset,
                "max_length": reward.max_length, "batch_size": reward.batch_size,
                "gpt2_config": reward.model.backbone.config.to_dict(), "report": reward.report}
        (tmp / "reward_config.json").write_text(json.dumps(meta, indent=2))
        reward.tokenizer.save_pretrained(tmp)
    return Path(path)


def load_reward_model(path: str | Path) -> LearnedReward:
    """Rebuild a saved reward model (safetensors only; no pickle, no remote code), on the CPU."""
    path = Path(path)
    with naming_damaged_files(path, f"delete {path} to train the reward model again"):
        meta = read_saved_config(path, "LearnedReward", ("reward_config.json", "model.safetensors"), FORMAT,
                                 FORMAT_VERSION)
        model = ScalarRewardModel(GPT2Model(GPT2Config.from_dict(meta["gpt2_config"])))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return LearnedReward(model, tokenizer, offset=meta["offset"], max_length=meta["max_length"],
                         batch_size=meta["batch_size"], report=meta["report"])


def cached_reward_model(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
                        out_dir: str | Path, **settings: Any) -> LearnedReward:
    """:func:`reward_model.train_reward_model` (``settings``: its keyword arguments) saved in ``out_dir``;
    a later call with the same inputs loads it instead (another process waits under the folder's lock)."""
    out_dir, config, seed = Path(out_dir), settings["config"], settings["seed"]
    key = content_hash("reward-model/v1", model_fingerprint(policy), tokenizer_fingerprint(tokenizer),
                       pairs_fingerprint(pair_columns(pairs)), dataclasses.asdict(config), seed)
    with Lock(out_dir.parent / f".{out_dir.name}.lock", out_dir):
        if (out_dir / "reward_config.json").is_file():
            saved = load_reward_model(out_dir)
            if saved.report.get("run_key") != key:
                raise ValueError(f"{out_dir} holds a reward model trained with other inputs; use another "
                                 "out_dir")
            return saved
        reward = train_reward_model(policy, tokenizer, pairs, **settings)
        reward.report = {**reward.report, "run_key": key, "config": dataclasses.asdict(config)}
        save_reward_model(reward, out_dir)
        return reward
