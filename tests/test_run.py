"""runs.py: run identity, metrics.jsonl read/truncate/append, checkpoint listing and resume, RNG, results."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dpo_lab.batching import pair_columns, pair_examples, pairs_fingerprint
from dpo_lab.cache import model_fingerprint, tokenizer_fingerprint
from dpo_lab.run import (
    TRAINER_STATE,
    MetricsLog,
    RunResult,
    call_eval_fn,
    check_run,
    checkpoint_dirs,
    checkpoint_path,
    finished_run,
    is_due,
    latest_checkpoint,
    load_weights,
    prune_checkpoints,
    read_metrics,
    rng_state,
    set_rng_state,
    truncate_metrics,
    write_result,
)

FIELDS = {"beta": 0.1, "seed": 0, "config": {"lr": 1e-3}}


def _write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _fake_checkpoint(out_dir: Path, step: int, run_key: str = "k") -> Path:
    folder = checkpoint_path(out_dir, step)
    folder.mkdir(parents=True)
    torch.save({"step": step, "run_key": run_key}, folder / TRAINER_STATE)
    return folder


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
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        read_metrics(path)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(6)]
    _write_lines(path, records)
    path.write_text(path.read_text() + '{"step": 6, "lo')  # plus a torn line from the crash
    kept = truncate_metrics(path, 3)
    assert kept == records[:4]
    assert read_metrics(path) == records[:4]
    assert path.read_text().endswith("\n")  # no torn tail left to glue the next line onto
    assert truncate_metrics(path, None) == [] and path.read_text() == ""  # fresh start: nothing kept


def test_truncate_metrics_rejects_a_record_without_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"step": 1}, {"loss": 0.3}])
    with pytest.raises(ValueError, match="no integer 'step'"):
        truncate_metrics(path, 1)


def test_metrics_log_evaluates_at_start_on_schedule_and_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    policy = nn.Linear(2, 2)
    calls = []

    def eval_fn(model: nn.Module, step: int) -> dict[str, float]:
        calls.append(step)
        model.train()  # the log must put the policy back in eval mode
        return {"reward": float(step)}

    with MetricsLog(path, eval_fn, {"step", "loss"}, eval_every=2, max_steps=5) as log:
        log.log_start(policy)
        for step in range(1, 6):
            log.log_step({"step": step, "loss": 1.0}, policy)
            assert not policy.training
    assert calls == [0, 2, 4, 5]
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0] == {"step": 0, "reward": 0.0}
    assert "reward" not in records[1] and records[4] == {"step": 4, "loss": 1.0, "reward": 4.0}
    assert log.last == records[-1]


def test_metrics_log_without_eval_fn_and_closed_log(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, None, {"step"}, eval_every=1, max_steps=1, last={"step": 7})
    assert log.last == {"step": 7}
    with pytest.raises(RuntimeError, match="not open"):
        log.log_step({"step": 1}, nn.Linear(1, 1))
    with log:
        log.log_start(nn.Linear(1, 1))  # no eval_fn: writes nothing
        log.log_step({"step": 1}, nn.Linear(1, 1))
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
def test_checkpoint_listing_ignores_unfinished_folders_and_prunes(tmp_path: Path) -> None:
    assert checkpoint_dirs(tmp_path) == []
    for step in (10, 2, 100):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".step-000200.abc.tmp").mkdir()  # an interrupted atomic write
    (tmp_path / "checkpoints" / "step-000300").mkdir()  # no trainer state: incomplete
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [2, 10, 100]
    prune_checkpoints(tmp_path, None, checkpoint_path(tmp_path, 100))
    assert len(checkpoint_dirs(tmp_path)) == 3
    prune_checkpoints(tmp_path, 2, checkpoint_path(tmp_path, 100))
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [10, 100]
    # The checkpoint just written is never deleted, even if it is not the latest by step.
    prune_checkpoints(tmp_path, 1, checkpoint_path(tmp_path, 10))
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [10, 100]


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


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = torch.rand(5)
    torch.rand(3)  # move on
    set_rng_state(state)
    assert torch.equal(torch.rand(5), first)


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class _Result(RunResult):
    pass


def test_result_round_trip(tmp_path: Path) -> None:
    assert finished_run(tmp_path, 5, _Result) is None
    result = _Result(checkpoint_dir=tmp_path / "checkpoints" / "step-000005",
                     metrics_path=tmp_path / "metrics.jsonl", last_metrics={"step": 5, "loss": 0.1}, steps=5)
    write_result(tmp_path, result, "key")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["checkpoint_dir"] == "checkpoints/step-000005" and saved["run_key"] == "key"
    again = finished_run(tmp_path, 5, _Result)
    assert type(again) is _Result and again == result
    assert finished_run(tmp_path, 8, _Result) is None  # more steps asked for: train on


@pytest.mark.parametrize("damage, match", [
    (lambda t: t[: len(t) // 2], "truncated or corrupt"),
    (lambda t: "[]", "corrupt: expected a JSON object"),
    (lambda t: '{"steps": 5}', "corrupt: expected a JSON object with keys"),
])
def test_damaged_result_or_run_file_is_named(tmp_path: Path, damage, match: str) -> None:
    result = _Result(checkpoint_dir=tmp_path / "checkpoints" / "step-000005",
                     metrics_path=tmp_path / "metrics.jsonl", last_metrics={}, steps=5)
    write_result(tmp_path, result, "key")
    path = tmp_path / "result.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=f"result.json is {match}.*delete it and rerun"):
        finished_run(tmp_path, 5, _Result)
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
