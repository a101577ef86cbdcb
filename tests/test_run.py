"""runs.py: run identity, metrics.jsonl read/truncate/append, checkpoint listing and resume, RNG, results."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from toy_pairs import CONFIG, PAIRS  # tests/ is on sys.path (pytest prepends it)

from dpo_lab import pipeline
from dpo_lab.batching import pair_columns, pair_examples
from dpo_lab.cache import lock_timeout, model_fingerprint, tokenizer_fingerprint
from dpo_lab.loop import TrainLog, call_eval_fn, is_due
from dpo_lab.presets import Preset, get_preset, project_root
from dpo_lab.run import (
    LOCK_FILE,
    TRAINER_STATE,
    Run,
    RunLockedError,
    RunResult,
    check_run,
    checkpoint_path,
    dpo_run,
    finished_metrics,
    finished_run,
    last_checkpoint,
    latest_checkpoint,
    load_weights,
    pairs_fingerprint,
    read_metrics,
    run_lock,
    schedule_dir,
)

FIELDS = {"beta": 0.1, "seed": 0, "config": {"lr": 1e-3}}


def _write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _fake_checkpoint(out_dir: Path, step: int, run_key: str = "k") -> Path:
    folder = checkpoint_path(out_dir, step)
    folder.mkdir(parents=True)
    torch.save({"step": step, "run_key": run_key}, folder / TRAINER_STATE)
    return folder


def _write_result(out_dir: Path, steps: int) -> RunResult:
    """Finish the run of FIELDS in ``out_dir`` at ``steps`` (as a trainer's last call does)."""
    result = RunResult(checkpoint_dir=checkpoint_path(out_dir, steps), metrics_path=out_dir / "metrics.jsonl",
                       last_metrics={"step": steps}, steps=steps)
    with Run(out_dir, FIELDS, steps) as run:
        return run.finish(result)


# ------------------------------------------------------------------------------------------ metrics file
def test_read_metrics_skips_only_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no file yet
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # crash mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]


def test_corrupt_metrics_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        read_metrics(path)
    # A broken last line that DOES end in a newline was written whole: corruption, not a torn write.
    path.write_text('{"step": 1}\n{"step": 2, oops}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object with an integer 'step', got \[1"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"loss": 0.3}\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object with an integer 'step'"):
        read_metrics(path)


def test_a_resume_keeps_the_metrics_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(6)]
    _write_lines(path, records)
    path.write_text(path.read_text() + '{"step": 6, "lo')  # plus a torn line from the crash
    with Run(tmp_path, FIELDS, 6) as run:
        _fake_checkpoint(tmp_path, 3, run.key)
        assert run.restore({})[0] == 3 and run.records == records[:4] and run.last == records[3]
    assert read_metrics(path) == records[:4]
    assert path.read_text().endswith("\n")  # no torn tail left to glue the next line onto
    shutil.rmtree(tmp_path / "checkpoints")
    with Run(tmp_path, FIELDS, 6) as run:
        assert run.restore({}) is None and run.records == []
    assert path.read_text() == ""  # fresh start: nothing kept


def test_metrics_log_evaluates_at_start_on_schedule_and_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    policy = nn.Linear(2, 2)
    calls = []

    def eval_fn(model: nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        model.train()  # the log must put the policy back in eval mode
        return {"reward": float(step)}

    with Run(tmp_path, FIELDS, 5, eval_fn=eval_fn, eval_every=2) as log:
        log.restore({})  # a fresh start: the metrics file is begun anew
        log.log_start(policy)
        for step in range(1, 6):
            log.log({"step": step, "loss": 1.0}, policy)
            assert not policy.training
    assert calls == [0, 2, 4, 5]
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0] == {"step": 0, "reward": 0.0}
    assert "reward" not in records[1] and records[4] == {"step": 4, "loss": 1.0, "reward": 4.0}
    assert log.last == records[-1]


def test_metrics_log_without_eval_fn_and_closed_log(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    memory = TrainLog()  # a loop's default log: nothing on disk, cost/* as running totals
    memory.log({"step": 1, "cost/samples": 2}, nn.Linear(1, 1))
    assert memory.log({"step": 2, "cost/samples": 3}, nn.Linear(1, 1)) == {"step": 2, "cost/samples": 5}
    log = Run(tmp_path, FIELDS, 1)
    log.restore({})
    log.log_start(nn.Linear(1, 1))  # no eval_fn: writes nothing
    log.log({"step": 1}, nn.Linear(1, 1))
    log.close()
    with pytest.raises(RuntimeError, match="is closed"):
        log.log({"step": 2}, nn.Linear(1, 1))
    assert read_metrics(path) == [{"step": 1}]


def test_eval_keys_may_not_overwrite_training_metrics() -> None:
    with pytest.raises(ValueError, match=r"key\(s\) \['loss'\] that clash with training metrics"):
        call_eval_fn(lambda m, s: {"loss": 0.0, "reward": 1.0}, nn.Linear(1, 1), 0, {"step", "loss"})


def test_is_due() -> None:
    assert [s for s in range(1, 8) if is_due(s, 3, 7)] == [3, 6, 7]


# -------------------------------------------------------------------------------------------- identity
def test_check_run_refuses_a_started_run_naming_the_differing_fields(tmp_path: Path) -> None:
    key = check_run(tmp_path, FIELDS)
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_key": key, "fields": FIELDS}
    # Not started yet (no checkpoint, no result): other settings may take the folder over.
    other = {**FIELDS, "beta": 0.5}
    other_key = check_run(tmp_path, other)
    assert other_key != key
    _fake_checkpoint(tmp_path, 1, other_key)
    assert check_run(tmp_path, other) == other_key  # same settings: resume
    with pytest.raises(ValueError, match=r"holds a different run \(differs in \['beta', 'seed'\]\)"):
        check_run(tmp_path, {**FIELDS, "seed": 1})
    with pytest.raises(ValueError, match=r"differs in \['alpha'\]"):  # a field only one side has
        check_run(tmp_path, {**other, "alpha": 0.1})


def test_check_run_counts_a_finished_run_as_started(tmp_path: Path) -> None:
    check_run(tmp_path, FIELDS)
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(ValueError, match=r"differs in \['config'\]"):
        check_run(tmp_path, {**FIELDS, "config": {"lr": 2e-3}})


# ------------------------------------------------------------------------------------------ checkpoints
def test_the_last_checkpoint_ignores_unfinished_folders(tmp_path: Path) -> None:
    assert last_checkpoint(tmp_path) is None
    for step in (10, 2, 100):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".step-000200.abc.tmp").mkdir()  # an interrupted atomic write
    (tmp_path / "checkpoints" / "step-000300").mkdir()  # no trainer state: incomplete
    assert last_checkpoint(tmp_path) == (100, checkpoint_path(tmp_path, 100))


def test_latest_checkpoint_checks_steps_and_run_key(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path, "k", 5) is None
    _fake_checkpoint(tmp_path, 2)
    folder = _fake_checkpoint(tmp_path, 4)
    step, ckpt, state = latest_checkpoint(tmp_path, "k", 5)
    assert (step, ckpt, state) == (4, folder, {"step": 4, "run_key": "k"})
    with pytest.raises(ValueError, match=r"checkpoint at step 4 > max_steps 3"):
        latest_checkpoint(tmp_path, "k", 3)
    with pytest.raises(ValueError, match=r"belongs to another run \(key k != other\)"):
        latest_checkpoint(tmp_path, "other", 5)


def test_load_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_weights(target, tmp_path)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    load_weights(target, tmp_path)
    assert all(torch.equal(source.state_dict()[k], v) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match=r"does not match the model: missing \['weight'\]"):
        load_weights(nn.Linear(3, 2), _only_bias(tmp_path, source))


def _only_bias(tmp_path: Path, source: nn.Linear) -> Path:
    folder = tmp_path / "bias_only"
    folder.mkdir()
    save_file({"bias": source.bias.detach().contiguous()}, str(folder / "model.safetensors"))
    return folder


def test_a_checkpoint_keeps_the_rng_state_and_replaces_the_one_before(tmp_path: Path) -> None:
    with Run(tmp_path, FIELDS, 5) as run:
        run.save(1, lambda folder: None, {})
        run.save(2, lambda folder: None, {})
        first = torch.rand(5)
    assert last_checkpoint(tmp_path)[0] == 2 and len(list((tmp_path / "checkpoints").iterdir())) == 1
    torch.rand(3)  # move on
    with Run(tmp_path, FIELDS, 5) as run:
        assert run.restore({})[0] == 2
        assert torch.equal(torch.rand(5), first)


# --------------------------------------------------------------------------------------------- results
def test_result_round_trip(tmp_path: Path) -> None:
    assert finished_run(tmp_path, 5) is None
    result = _write_result(tmp_path, 5)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["checkpoint_dir"] == "checkpoints/step-000005"
    assert saved["run_key"] == check_run(tmp_path, FIELDS)
    again = finished_run(tmp_path, 5)
    assert again == result
    assert finished_run(tmp_path, 8) is None  # more steps asked for: train on


@pytest.mark.parametrize("damage, match", [
    (lambda t: t[: len(t) // 2], "truncated or corrupt"),
    (lambda t: "[]", "corrupt: expected a JSON object"),
    (lambda t: '{"steps": 5}', "corrupt: expected a JSON object with keys"),
])
def test_damaged_result_or_run_file_is_named(tmp_path: Path, damage, match: str) -> None:
    _write_result(tmp_path, 5)
    path = tmp_path / "result.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=f"result.json is {match}.*delete it and rerun"):
        finished_run(tmp_path, 5)
    (tmp_path / "run.json").write_text('{"run_key": ')  # and run.json of a started run
    with pytest.raises(ValueError, match="run.json is truncated or corrupt"):
        check_run(tmp_path, {"beta": 0.1})


# ------------------------------------------------------------------------------------- pairs/fingerprints
def test_pair_columns_accept_three_formats_with_one_fingerprint() -> None:
    cols = {"prompt": ["a", "b"], "chosen": [" x", " y"], "rejected": [" z", " w"]}
    rows = pair_examples(cols)
    assert rows[1] == {"prompt": "b", "chosen": " y", "rejected": " w"}
    extra = {**cols, "score": [1, 2]}  # extra columns are ignored
    for pairs in (cols, extra, rows, datasets.Dataset.from_dict(extra)):
        assert pair_columns(pairs) == cols
    assert pairs_fingerprint(pair_columns(rows)) == pairs_fingerprint(cols)
    assert pairs_fingerprint({**cols, "chosen": [" y", " x"]}) != pairs_fingerprint(cols)  # order matters


@pytest.mark.parametrize(("pairs", "match"), [
    ({"prompt": ["a"], "chosen": ["b"]}, r"missing column\(s\) \['rejected'\]"),
    ({"prompt": ["a"], "chosen": ["b"], "rejected": []}, "differ in length"),
    ([{"prompt": "a", "chosen": "b"}], r"pair 0 is missing key\(s\) \['rejected'\]"),
    ([], "no preference pairs"),
])
def test_pair_columns_errors(pairs: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pair_columns(pairs)


def test_fingerprints_track_weights_and_tokens_only(tiny_tokenizer, tiny_model) -> None:
    before = model_fingerprint(tiny_model)
    assert model_fingerprint(tiny_model) == before
    with torch.no_grad():
        next(tiny_model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(tiny_model) != before
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the fixture is shared by the session: do not touch it
    tok_before = tokenizer_fingerprint(tokenizer)
    tokenizer(["a", "a longer text"], padding=True, truncation=True, max_length=4)  # padding state only
    assert tokenizer_fingerprint(tokenizer) == tok_before
    tokenizer.add_tokens(["<new>"])
    assert tokenizer_fingerprint(tokenizer) != tok_before


# -------------------------------------------------------------------------------------------- run lock
# A process that holds a run folder (as a trainer does while it trains), then finishes the run.
_HOLDER = """
import sys, time
from pathlib import Path
from dpo_lab.run import Run, RunResult
out = Path(sys.argv[1])
run = Run(out, {"beta": 0.1}, 5)
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
run.finish(RunResult(out / "checkpoints" / "step-000005", out / "metrics.jsonl", {"step": 5}, 5))
"""


def _start_holder(out_dir: Path, hold_s: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DPO_LAB_LOCK_TIMEOUT"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out_dir), str(hold_s)], cwd=project_root(),
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_process_waits_for_the_run_then_finds_it_finished(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    holder = _start_holder(out, 2.0)
    try:
        started = time.monotonic()
        with Run(out, {"beta": 0.1}, 5) as run:  # blocks until the holder has finished the run
            waited = time.monotonic() - started
            result = finished_run(run.dir, 5)
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0 and waited > 0.5
    assert result is not None and result.steps == 5 and run.closed
    err = capsys.readouterr().err
    assert f"{out} is in use by pid {holder.pid} on host {socket.gethostname()} since " in err
    assert "waiting for it" in err


def test_lock_timeout_names_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    holder = _start_holder(out, 120)
    try:
        monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", "0.2")
        named = rf"in use by pid {holder.pid} on host \S+ since \d{{4}}-\d\d-\d\d .*gave up after 0.2 s"
        with pytest.raises(RunLockedError, match=named + r" \(DPO_LAB_LOCK_TIMEOUT\)"):
            Run(out, {"beta": 0.1}, 5)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_blocks_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 leaves .run.lock naming the dead holder, but the OS dropped the lock with the process."""
    out = tmp_path / "run"
    holder = _start_holder(out, 120)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", "0")  # RunLockedError if still held
    with Run(out, {"beta": 0.1}, 5) as run:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - started < 5.0 and run.closed
    assert (out / LOCK_FILE).read_text() == ""  # released: it names nobody


def test_a_run_releases_its_folder_however_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", "0")  # a folder still held fails at once instead of waiting

    with pytest.raises(RuntimeError, match="boom"), Run(tmp_path, FIELDS, 5):
        raise RuntimeError("boom")
    leaked = Run(tmp_path, FIELDS, 5)  # free again; this one is never closed by a trainer...
    with pytest.raises(RuntimeError, match="already held by this process: a Run on it was not closed"):
        Run(tmp_path, FIELDS, 5)  # ...which is named rather than waited for forever
    leaked.close()
    leaked.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        leaked.restore({})
    with Run(tmp_path, FIELDS, 5) as run:
        assert not run.closed
    assert run.closed
    run = Run(tmp_path, FIELDS, 5)
    result = RunResult(checkpoint_dir=tmp_path / "checkpoints" / "step-000005",
                     metrics_path=tmp_path / "metrics.jsonl", last_metrics={}, steps=5)
    assert run.finish(result) == result and run.closed
    with pytest.raises(ValueError, match="holds a different run"):  # refused: the folder is not kept
        Run(tmp_path, {**FIELDS, "beta": 0.5}, 5)
    with run_lock(tmp_path):
        pass


@pytest.mark.parametrize(("value", "seconds"), [("", None), ("2.5", 2.5), ("0", 0.0), ("inf", None)])
def test_lock_timeout_setting(monkeypatch: pytest.MonkeyPatch, value: str, seconds: float | None) -> None:
    monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", value)
    assert lock_timeout() == seconds


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_bad_lock_timeout_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"DPO_LAB_LOCK_TIMEOUT='{value}': expected seconds >= 0"):
        lock_timeout()


def test_results_are_read_from_finished_runs_only(tmp_path: Path) -> None:
    result = RunResult(checkpoint_dir=checkpoint_path(tmp_path, 5), metrics_path=tmp_path / "metrics.jsonl",
                       last_metrics={"step": 5}, steps=5)
    _write_lines(tmp_path / "metrics.jsonl", [{"step": 5}])
    with pytest.raises(RuntimeError, match=r"is not a finished 5-step run \(no result.json\)"):
        with finished_metrics(result):
            pass
    _write_result(tmp_path, 4)
    with pytest.raises(RuntimeError, match="its result.json says 4 steps"):
        with finished_metrics(result):
            pass
    assert _write_result(tmp_path, 5) == result
    with finished_metrics(result) as path:
        assert read_metrics(path) == [{"step": 5}]
        with pytest.raises(RuntimeError, match="already held by this process"):  # read under the run's lock
            with run_lock(tmp_path, 0):
                pass


def test_a_continued_run_is_not_finished_while_it_runs(tmp_path: Path) -> None:
    with Run(tmp_path, FIELDS, 5) as run:
        _fake_checkpoint(tmp_path, 5, run.key)
    _write_result(tmp_path, 5)
    with Run(tmp_path, FIELDS, 8) as run:
        assert finished_run(run.dir, 8) is None  # more steps asked for: train on...
        assert run.restore({})[0] == 5
        assert not (tmp_path / "result.json").exists()  # ...and no reader takes it for a finished 5-step run


def _train(model: nn.Module, reference: nn.Module, tokenizer, out_dir: Path, max_steps: int, **kw):
    return dpo_run(copy.deepcopy(model), reference, tokenizer, PAIRS, beta=0.1,
                     config=replace(CONFIG, max_steps=max_steps), seed=0, max_length=32, out_dir=out_dir,
                     ref_cache_dir=out_dir.parent / "cache", progress=False, device="cpu", **kw)


def _probe(policy: nn.Module, step: int) -> dict[str, float]:
    return {"probe": float(step)}


def _no_eval(policy: nn.Module, step: int) -> dict[str, float]:
    raise AssertionError("a finished or reused run must not be evaluated again")


def _no_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("wall_s") and not k.startswith("time/")}
            for r in records]


def test_trainer_releases_its_folder_when_it_fails(tiny_model, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DPO_LAB_LOCK_TIMEOUT", "0")

    def dies(policy: nn.Module, step: int) -> dict[str, float]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _train(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "run", 4, eval_fn=dies)
    with run_lock(tmp_path / "run"):  # not left held by the failed trainer
        pass


# ------------------------------------------------------------------------------------------- schedules
def test_schedule_dir_keeps_a_shorter_schedule_apart(tmp_path: Path) -> None:
    source = tmp_path / "run"
    assert schedule_dir(source, 3) == source  # nothing held yet
    _fake_checkpoint(source, 4)
    assert schedule_dir(source, 4) == source and schedule_dir(source, 9) == source
    assert schedule_dir(source, 3) == tmp_path / "run-steps3"  # holds more steps than asked: kept apart


def test_fewer_steps_than_the_folder_holds_are_kept_apart(tiny_model, tiny_tokenizer, tmp_path, capsys):
    """Issue 11, fault 5: a run continued to 6 steps and then asked for 3 failed for good ("already holds a
    checkpoint at step 6 > max_steps 3; use a new out_dir"). Now each schedule gets its own folder."""
    reference, out = copy.deepcopy(tiny_model), tmp_path / "run"
    long = _train(tiny_model, reference, tiny_tokenizer, out, 6, eval_fn=_probe)
    kept = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "result.json")}
    capsys.readouterr()
    short = _train(tiny_model, reference, tiny_tokenizer, out, 3, eval_fn=_probe)
    err = capsys.readouterr().err
    assert f"{out} holds this run continued to step 6 > max_steps 3" in err and "trained there" in err
    assert short.steps == 3 and short.metrics_path == tmp_path / "run-steps3" / "metrics.jsonl"
    records = read_metrics(short.metrics_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[-1]["probe"] == 3.0
    assert _no_clock(records[:3]) == _no_clock(read_metrics(long.metrics_path)[:3])  # the same trajectory
    assert {p: p.read_bytes() for p in kept} == kept  # the longer run is left as it was
    # From now on each schedule is reused at once, the longer one from its own folder.
    assert _train(tiny_model, reference, tiny_tokenizer, out, 6, eval_fn=_no_eval) == long
    assert _train(tiny_model, reference, tiny_tokenizer, out, 3, eval_fn=_no_eval) == short
    assert "holds this run continued" not in capsys.readouterr().err  # said once, not at every reuse


@pytest.mark.slow
def test_smoke_reproduction_schedule_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """The default reproduction's DPO run continued to 14 steps, then asked for 12 again (failed for good
    before), then for 14 again: each schedule finishes and is reused from its own folder."""
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path / "artifacts"))

    def preset(steps: int) -> Preset:
        return get_preset("smoke", **{"dpo.max_steps": steps, "dpo.betas": [0.1]})

    folder = pipeline.run_dir(preset(12), "DPO", 0.1)
    assert pipeline.run_dir(preset(14), "DPO", 0.1) == folder  # how long a run goes is not in its key
    long = pipeline.dpo(preset(14), 0.1, progress=False)
    assert long.steps == 14 and long.metrics_path.parent == folder
    kept = {p: p.read_bytes() for p in (folder / "metrics.jsonl", folder / "result.json")}
    capsys.readouterr()
    short = pipeline.dpo(preset(12), 0.1, progress=False)
    assert "continued to step 14 > max_steps 12" in capsys.readouterr().err
    assert short.steps == 12 and short.metrics_path.parent == folder.with_name(f"{folder.name}-steps12")
    records = read_metrics(short.metrics_path)
    assert [r["step"] for r in records] == list(range(13))
    assert _no_clock(records) == _no_clock(read_metrics(long.metrics_path)[:13])  # as the 14-step run went
    points = pipeline.frontier(preset(12), ("DPO",), progress=False)  # the table reads the 12-step folder
    assert points.step.tolist() == [0, 6, 12]
    assert pipeline.dpo(preset(14), 0.1, progress=False) == long  # reused: nothing retrained
    assert pipeline.dpo(preset(12), 0.1, progress=False) == short
    assert {p: p.read_bytes() for p in kept} == kept
