"""A training run on disk, between the pure training loops (``loop.TrainLog``) and the artifacts folder:

    out_dir/run.json, metrics.jsonl     the run's identity (a hash of its settings); one line per step
    out_dir/checkpoints/step-NNNNNN/    the latest checkpoint: weights, tokenizer, trainer_state.pt
    out_dir/result.json, .run.lock      written last: the run is finished; held by the one process running it

A rerun resumes from the checkpoint with the same numbers, or returns at once if finished. Asked for FEWER
steps than ``out_dir`` holds, the shorter schedule trains in ``<out_dir>-steps<N>`` (:func:`schedule_dir`).
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
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from dpo_lab import cache, dpo_trainer, ppo
from dpo_lab.batching import PAIR_COLUMNS, RANKING_COLUMNS, pair_columns
from dpo_lab.cache import RunLockedError
from dpo_lab.loop import EvalFn, TrainLog, resolve_device
from dpo_lab.models import load_hub_policy
from dpo_lab.reward_model import LearnedReward, ScalarRewardModel, train_reward_model

TRAINER_STATE = "trainer_state.pt"  # a checkpoint folder is complete once this file is in it
LOCK_FILE = ".run.lock"  # holds who runs it (pid, host, since) while locked
# A run's own files are written atomically: damage came from outside, and the checkpoint survives it.
_DAMAGED = "delete it and rerun: training resumes from the last checkpoint"
# Settings that do not change a run's trajectory (a sweep's list, how long, how often it is looked at or
# saved): left out of every run's identity, so a finished run continues when asked for more steps.
SCHEDULE_FIELDS = ("betas", "target_kls", "max_steps", "eval_every", "checkpoint_every")


def trajectory_settings(config: Any) -> dict:
    """The fields of a DPO or PPO config that key a run: all but :data:`SCHEDULE_FIELDS`."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SCHEDULE_FIELDS}


def run_lock(out_dir: str | Path, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
    """Hold ``out_dir``'s lock: ``with run_lock(out_dir): ...``."""
    return cache.file_lock(Path(out_dir) / LOCK_FILE, Path(out_dir), timeout)


def check_run(out_dir: Path, run_fields: Mapping[str, Any]) -> str:
    """Claim ``out_dir`` for the run ``run_fields`` describe and return its key (their content hash); a
    started run (a checkpoint or a result) of other settings is refused, naming the differing fields."""
    run_key = cache.content_hash(run_fields)
    path = out_dir / "run.json"
    started = (out_dir / "result.json").is_file() or last_checkpoint(out_dir) is not None
    if path.is_file() and started:
        saved = cache.read_json_object(path, ("run_key",), advice=_DAMAGED)
        if saved.get("run_key") != run_key:
            old = saved.get("fields", {})
            diff = sorted(k for k in set(old) | set(run_fields) if old.get(k) != run_fields.get(k))
            raise ValueError(f"{out_dir} holds a different run (differs in {diff}); use another out_dir")
        return run_key
    cache.atomic_write_json(path, {"run_key": run_key, "fields": dict(run_fields)})
    return run_key


# ------------------------------------------------------------------------------------------- policies
@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' own bars ('Loading weights', ...) for local loads and saves: one per checkpoint
    would bury the training bar."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_policy(model: PreTrainedModel, tokenizer: Any, path: str | Path) -> Path:
    """Save weights (safetensors), config, generation config and tokenizer to ``path``, atomically."""
    with cache.atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def load_policy(path: str | Path, *, advice: str | None = None) -> tuple[PreTrainedModel, Any]:
    """What :func:`save_policy` wrote: ``(model, tokenizer)``, in eval mode, on the CPU. A damaged file is a
    ValueError naming it, then ``advice`` (default: delete the folder and save the policy again)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no saved policy at {path} (config.json missing)")
    advice = advice or f"delete {path} and save the policy again"
    with cache.naming_damaged_files(path, advice), quiet_hf_progress():
        return load_hub_policy(str(path))


def pairs_fingerprint(cols: Mapping[str, Sequence[Any]]) -> str:
    """Content hash of the pairs' (or rankings') text, in order."""
    ranked = "completions" in cols
    digest = hashlib.sha256(b"rankings" if ranked else b"")
    for c in RANKING_COLUMNS if ranked else PAIR_COLUMNS:
        digest.update(json.dumps(list(cols[c])).encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def last_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """``(step, folder)`` of the newest complete checkpoint (a ``.step-*.tmp`` is an unfinished write)."""
    found = [(int(d.name.removeprefix("step-")), d) for d in (out_dir / "checkpoints").glob("step-*")
             if (d / TRAINER_STATE).is_file()]
    return max(found, default=None)


def latest_checkpoint(out_dir: Path, run_key: str, max_steps: int) -> tuple[int, Path, dict[str, Any]] | None:
    """``(step, folder, trainer state)`` of the checkpoint to resume from, or None to start afresh. The state
    is read with ``weights_only=True`` (tensors and plain types only, no pickled code)."""
    found = last_checkpoint(out_dir)
    if found is None:
        return None
    step, ckpt = found
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
    found = last_checkpoint(out_dir)
    if found is not None and found[0] > max_steps:
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


# --------------------------------------------------------------------------------------------- results
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl ([] if none). A torn last line (a crash mid-write) is skipped; any
    other line that is not a JSON object with an integer ``step`` is a ValueError naming file and line."""
    lines = Path(path).read_text().split("\n") if Path(path).is_file() else []
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: torn by a crash (a resume truncates it away)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}); the metrics file is "
                             "corrupt") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: expected a JSON object with an integer 'step', got "
                             f"{line[:80]}")
        records.append(record)
    return records


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
    saved = cache.read_json_object(path, ("checkpoint_dir", "steps", "last_metrics"), advice=_DAMAGED)
    if saved["steps"] != max_steps:
        return None
    result = RunResult(out_dir / saved["checkpoint_dir"], out_dir / "metrics.jsonl", saved["last_metrics"],
                       saved["steps"])
    if policy is not None:
        load_weights(policy, result.checkpoint_dir)
        policy.eval()
    return result


@contextlib.contextmanager
def finished_metrics(result: RunResult) -> Iterator[Path]:
    """Yield ``result``'s metrics.jsonl to read, holding its folder's lock, once its result.json says the run
    finished ``result.steps`` steps: a run in progress is never read as a result (RuntimeError)."""
    out_dir = result.metrics_path.parent
    with run_lock(out_dir):
        path = out_dir / "result.json"
        saved = cache.read_json_object(path, ("steps",), advice=_DAMAGED) if path.is_file() else None
        if saved is None or saved["steps"] != result.steps:
            state = "no result.json" if saved is None else f"its result.json says {saved['steps']} steps"
            raise RuntimeError(f"{out_dir} is not a finished {result.steps}-step run ({state}): another "
                               "process changed it after it finished here; rerun to read it again")
        yield result.metrics_path


# ------------------------------------------------------------------------------------------------ the run
class Run(TrainLog):
    """A run's folder and the ``log`` its loop reports to. It holds the folder's lock and claims it for the
    run ``fields`` describe (:func:`check_run`; ``key`` is their hash) until :meth:`finish` or :meth:`close`;
    the ``max_steps``-step schedule trains in :func:`schedule_dir`. ``writer=False``: it only reads."""

    def __init__(self, out_dir: str | Path, fields: Mapping[str, Any], max_steps: int, *, writer: bool = True,
                 eval_fn: EvalFn | None = None, eval_every: int = 1, progress: bool = True) -> None:
        super().__init__(eval_fn if writer else None, eval_every=eval_every, max_steps=max_steps,
                         progress=progress)
        self.dir, self.fields, self.writer = Path(out_dir), dict(fields), writer
        self.key = cache.content_hash(self.fields)
        self.checkpoint: Path | None = None  # the last checkpoint saved or resumed from
        self._lock: contextlib.ExitStack | None = None
        if not writer:
            self.dir = schedule_dir(self.dir, max_steps)
            return
        try:
            self._hold(self.dir)
            check_run(self.dir, self.fields)
            target = schedule_dir(self.dir, max_steps)  # decided under the lock: no other writer moves it
            if target != self.dir:
                if not (target / "run.json").is_file():  # said once, when the schedule is first kept apart
                    held, _ = last_checkpoint(self.dir) or (0, None)
                    print(f"{self.dir} holds this run continued to step {held} > max_steps {max_steps}: the "
                          f"{max_steps}-step schedule is kept apart in {target} (trained there from the "
                          f"start); {self.dir} is left as it is", file=sys.stderr, flush=True)
                self._hold(target)
                check_run(target, self.fields)
        except BaseException:
            self.close()
            raise

    def _hold(self, folder: Path) -> None:
        """Release the folder held (if any) and hold ``folder``'s lock instead."""
        self.close()
        self.dir, self._lock = folder, contextlib.ExitStack()
        self._lock.enter_context(run_lock(folder))

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
            lock.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the Run on {self.dir} is closed (its lock released); open a new one")

    def restore(self, modules: Mapping[str, nn.Module]) -> tuple[int, Path, dict[str, Any]] | None:
        """``(step, folder, trainer state)`` of the last checkpoint, its weights loaded into ``modules`` and
        its RNG state restored (None: start afresh). The metrics after it (they will be recomputed) and a
        result.json of another length are removed: the run is in progress."""
        found = latest_checkpoint(self.dir, self.key, self.max_steps)
        if self.writer:
            self._check_open()
            (self.dir / "result.json").unlink(missing_ok=True)
            self.records = [r for r in read_metrics(self.metrics_path) if found and r["step"] <= found[0]]
            cache.atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
            self.last = self.records[-1] if self.records else {}
        if found is None:
            return None
        self.checkpoint = found[1]
        for sub, module in modules.items():
            load_weights(module, found[1] / sub)
        rng = found[2].get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return found

    def _append(self, record: dict[str, Any]) -> None:
        if self.writer:
            self._check_open()
            with open(self.metrics_path, "a") as handle:  # one line at a time: a crash loses at most one
                handle.write(json.dumps(record) + "\n")
        super()._append(record)

    def save(self, step: int, write: Callable[[Path], None], state: Mapping[str, Any]) -> Path:
        """Checkpoint ``step`` atomically in place of the last one: ``write(folder)`` saves the weights and
        tokenizer; ``state`` (tensors and plain types) goes to trainer_state.pt with the RNG states."""
        self.checkpoint = path = checkpoint_path(self.dir, step)
        if self.writer:
            self._check_open()
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            with cache.atomic_directory(path) as tmp, quiet_hf_progress():
                write(tmp)
                torch.save({"step": step, "run_key": self.key, "rng": rng, **state}, tmp / TRAINER_STATE)
            for old in path.parent.glob("step-*"):  # a resume needs only the latest
                if old != path:
                    shutil.rmtree(old)
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
            cache.atomic_write_json(self.dir / "result.json", {
                "checkpoint_dir": str(result.checkpoint_dir.relative_to(self.dir)), "steps": result.steps,
                "last_metrics": result.last_metrics, "run_key": self.key})
            self.close()
        return result


# ------------------------------------------------------------------------------- reference log-prob cache
def reference_logprobs(reference: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
                       cache_dir: str | Path, reference_fingerprint: str | None = None,
                       **score_args: Any) -> torch.Tensor:
    """:func:`dpo_trainer.pair_logprobs` of the frozen reference (``score_args``: its keyword arguments),
    ``(N, K)``, cached in ``cache_dir`` under a key of all they depend on: the reference weights
    (``reference_fingerprint`` if given), pairs, tokenizer, max_length, sum or mean, device, precision."""
    cols = pair_columns(pairs)
    names = ([f"completion{k}" for k in range(len(cols["completions"][0]))] if "completions" in cols
             else ["chosen", "rejected"])
    max_length = score_args["max_length"]
    accelerator, dev, precision = dpo_trainer.placement(score_args.get("device"))
    key = cache.content_hash("ref-logps/v2", reference_fingerprint or cache.model_fingerprint(reference),
                             pairs_fingerprint(cols), cache.tokenizer_fingerprint(tokenizer), max_length,
                             "mean" if score_args.get("average") else "sum", dev.type, precision)
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                columns = [handle.get_tensor(name) for name in names]
        except Exception as err:  # truncated or corrupt: what the reader raises varies
            raise ValueError(f"reference cache {path} is truncated or corrupt ({type(err).__name__}: {err}); "
                             "delete it to recompute") from err
        if meta.get("key") != key or meta.get("sha256") != cache.tensors_checksum(*columns):
            raise ValueError(f"reference cache {path} was changed after it was written (its key or checksum "
                             "does not match); delete it to recompute")
        return torch.stack(columns, dim=1)
    progress = "reference log-probs" if score_args.get("progress", True) else False
    logps = dpo_trainer.pair_logprobs(reference, tokenizer, cols, **{**score_args, "progress": progress})
    if accelerator is None or accelerator.is_main_process:
        columns = [c.clone() for c in logps.unbind(1)]  # one (N,) tensor per column: no shared memory
        cache.atomic_write_tensors(path, dict(zip(names, columns, strict=True)), metadata={
            "key": key, "max_length": str(max_length), "sha256": cache.tensors_checksum(*columns)})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return logps


# ------------------------------------------------------------------------------------ the trainers' runs
def dpo_run(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
            out_dir: str | Path, ref_cache_dir: str | Path, eval_fn: EvalFn | None = None,
            **settings: Any) -> RunResult:
    """:func:`dpo_trainer.train_dpo` (``settings``: the fields of its ``DPOSettings``, ``progress``, and
    ``device`` if no ``accelerator``) as one run in ``out_dir``: trained, resumed, or if finished its
    weights loaded into ``policy``. The reference log-probs are cached in ``ref_cache_dir``, shared by a
    sweep's runs. Under ``accelerate launch`` every process calls this alike; only the main one evaluates
    and writes."""
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    device, accelerator = settings.pop("device", None), settings.pop("accelerator", None)
    accelerator = accelerator if accelerator is not None else dpo_trainer.make_accelerator(device)
    progress = settings.pop("progress", True)
    spec = dpo_trainer.DPOSettings(**settings)  # refused here, before any work
    config, alpha = spec.config, spec.alpha
    dpo_trainer.accumulation_steps(config.batch_size, config.micro_batch_size, accelerator.num_processes)
    cols = spec.columns(pairs)
    fields: dict[str, Any] = {
        "beta": float(spec.beta), "seed": spec.seed, "max_length": spec.max_length,
        "config": trajectory_settings(config), "reference": cache.model_fingerprint(reference),
        "pairs": pairs_fingerprint(cols),
        "tokenizer": cache.tokenizer_fingerprint(tokenizer), "device": accelerator.device.type,
        "mixed_precision": str(accelerator.mixed_precision), "objective": spec.objective,
        "alpha": None if alpha is None else float(alpha)}
    run, error = None, None
    try:
        run = Run(out_dir, fields, config.max_steps, writer=accelerator.is_main_process, eval_fn=eval_fn,
                  eval_every=config.eval_every)
    except (ValueError, RunLockedError) as err:  # another run's folder, or held past the lock timeout
        error = err
    message = [None if error is None else str(error)]  # the main process's, so that no process hangs
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(message)
    if run is None or message[0] is not None:
        raise error or ValueError(message[0])
    with run:
        policy.to(accelerator.device)
        finished = finished_run(run.dir, config.max_steps, policy)
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
    if policy is reference:
        raise ValueError("policy and reference are the same object; pass a frozen copy as the reference")
    config = settings["config"]
    device = resolve_device(settings.pop("device", None))
    ppo.check_ppo_settings(config, prompts, tokenizer)
    fields = {"seed": settings["seed"], "config": trajectory_settings(config),
              "reference": cache.model_fingerprint(reference), "prompts": cache.content_hash(list(prompts)),
              "tokenizer": cache.tokenizer_fingerprint(tokenizer), "device": device.type}
    with Run(out_dir, fields, config.max_steps, eval_fn=eval_fn, eval_every=config.eval_every,
             progress=settings.pop("progress", True)) as run:
        finished = finished_run(run.dir, config.max_steps, policy)
        if finished is not None:
            return finished
        ppo.train_ppo(policy.to(device), reference, tokenizer, prompts, score_fn, log=run, **settings)
        return run.finish()


# ------------------------------------------------------------------------------------------------- r_phi
FORMAT, FORMAT_VERSION = "dpo_lab.LearnedReward", 1


def save_reward_model(reward: LearnedReward, path: str | Path) -> Path:
    """``model.safetensors`` (backbone + head), ``reward_config.json`` (GPT-2 config, offset, report), and
    the tokenizer; written atomically."""
    with cache.atomic_directory(path) as tmp:
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
    with cache.naming_damaged_files(path, f"delete {path} to train the reward model again"):
        meta = cache.read_saved_config(path, "LearnedReward", ("reward_config.json", "model.safetensors"),
                                       FORMAT, FORMAT_VERSION)
        config = transformers.GPT2Config.from_dict(meta["gpt2_config"])
        model = ScalarRewardModel(transformers.GPT2Model(config))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    return LearnedReward(model, tokenizer, offset=meta["offset"], max_length=meta["max_length"],
                         batch_size=meta["batch_size"], report=meta["report"])


def cached_reward_model(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Any, *,
                        out_dir: str | Path, **settings: Any) -> LearnedReward:
    """:func:`reward_model.train_reward_model` (``settings``: its keyword arguments) saved in ``out_dir``;
    a later call with the same inputs loads it instead (another process waits under the folder's lock)."""
    out_dir, config = Path(out_dir), settings["config"]
    key = cache.content_hash("reward-model/v1", cache.model_fingerprint(policy),
                             cache.tokenizer_fingerprint(tokenizer), pairs_fingerprint(pair_columns(pairs)),
                             dataclasses.asdict(config), settings["seed"])
    with cache.file_lock(out_dir.parent / f".{out_dir.name}.lock", out_dir):
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
