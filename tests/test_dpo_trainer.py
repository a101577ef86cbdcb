"""dpo_trainer.py: learns, caches pi_ref once per sweep, resumes exactly, stops on non-finite losses."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from toy_pairs import CONFIG, PAIRS  # tests/ is on sys.path (pytest prepends it)

from dpo_lab.loop import batch_indices
from dpo_lab.run import dpo_run, load_weights, read_metrics, reference_logprobs


def _run(policy, reference, tokenizer, out_dir: Path, cache: Path, **kw):
    # CPU pinned: bit-exact resume is promised there (CUDA kernels need not be deterministic).
    args = {"beta": 0.1, "config": CONFIG, "seed": 0, "max_length": 32, "progress": False, "device": "cpu",
            **kw}
    return dpo_run(policy, reference, tokenizer, PAIRS, out_dir=out_dir, ref_cache_dir=cache, **args)


def _forbid_forward(model: torch.nn.Module) -> None:
    def hook(*_: object) -> None:
        raise AssertionError("this model must not be run")
    model.register_forward_pre_hook(hook)


def _count_forward(model: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1
    model.register_forward_pre_hook(hook)
    return calls


def test_starts_at_log2_learns_and_logs_trl_names(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    result = _run(tiny_model, reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache",
                  config=CONFIG.__class__(**{**CONFIG.__dict__, "max_steps": 10}))
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 11))  # no eval_fn: no step-0 line
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "loss", "grad_norm", "lr"):
        assert key in last
    assert last["loss"] < 0.6 and last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.5
    assert result.last_metrics == last and result.steps == 10
    assert (result.checkpoint_dir / "model.safetensors").is_file()
    assert (result.checkpoint_dir / "tokenizer.json").is_file()
    state = torch.load(result.checkpoint_dir / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10 and state["data"]["pairs_seen"] == 40
    # What the run cost, as running totals: one optimizer step a step, every batch token forward and back.
    assert [r["cost/optimizer_steps"] for r in records] == list(range(1, 11))
    tokens = [r["cost/policy_backward_tokens"] for r in records]
    assert tokens[0] > 0 and all(b > a for a, b in zip(tokens, tokens[1:], strict=False))
    assert tokens == [r["cost/policy_forward_tokens"] for r in records]
    assert last["cost/samples"] == last["cost/reward_queries"] == 0 and last["cost/wall_s"] > 0


def test_lr_warms_up_linearly_then_stays(tiny_model, tiny_tokenizer, tmp_path):
    result = _run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "run", tmp_path / "cache",
                  config=CONFIG.__class__(**{**CONFIG.__dict__, "optimizer": "rmsprop", "max_steps": 4}))
    lrs = [r["lr"] for r in read_metrics(result.metrics_path)]
    assert lrs == pytest.approx([CONFIG.lr / 3, 2 * CONFIG.lr / 3, CONFIG.lr, CONFIG.lr])


def test_reference_runs_once_per_sweep(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    calls = _count_forward(reference)
    _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "b0.1", tmp_path / "cache")
    assert calls[0] == 8  # 16 pairs / micro_batch 2, chosen+rejected in one pass
    _forbid_forward(reference)
    _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "b1", tmp_path / "cache", beta=1.0)
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 1
    # A different max_length is a different cache entry (and would need the reference again).
    with pytest.raises(AssertionError, match="must not be run"):
        reference_logprobs(reference, tiny_tokenizer, PAIRS, max_length=12, cache_dir=tmp_path / "cache",
                           batch_size=4, progress=False)


def test_reference_cache_values_match_a_direct_computation(tiny_model, tiny_tokenizer, tmp_path):
    logps = reference_logprobs(tiny_model, tiny_tokenizer, PAIRS, max_length=32, cache_dir=tmp_path,
                               batch_size=5, progress=False)
    again = reference_logprobs(tiny_model, tiny_tokenizer, PAIRS, max_length=32, cache_dir=tmp_path,
                               batch_size=16, progress=False)
    assert logps.shape == (16, 2) and torch.equal(logps, again)  # columns: chosen, rejected
    chosen = logps[:, 0]
    ids = tiny_tokenizer(PAIRS["prompt"][3] + "", add_special_tokens=False)["input_ids"]
    completion = tiny_tokenizer(PAIRS["chosen"][3], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(input_ids=torch.tensor([ids + completion])).logits[0], -1)
    direct = sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(completion))
    assert chosen[3].item() == pytest.approx(direct.item(), abs=1e-4)


def test_interrupted_run_resumes_to_identical_weights(tiny_model, tiny_tokenizer, tmp_path):
    init = copy.deepcopy(tiny_model)
    reference = copy.deepcopy(tiny_model)
    evals: list[int] = []

    def eval_fn(policy, step):
        evals.append(step)
        return {"probe": float(step)}

    full = _run(copy.deepcopy(init), reference, tiny_tokenizer, tmp_path / "full", tmp_path / "cache",
                eval_fn=eval_fn)
    assert evals == [0, 2, 4, 6]

    def crashing_eval(policy, step):
        if step == 4:
            raise KeyboardInterrupt("simulated interrupt")
        return eval_fn(policy, step)

    with pytest.raises(KeyboardInterrupt):
        _run(copy.deepcopy(init), reference, tiny_tokenizer, tmp_path / "cut", tmp_path / "cache",
             eval_fn=crashing_eval)
    assert not (tmp_path / "cut" / "result.json").exists()
    # Resume with a fresh copy of the starting policy: weights come from the step-2 checkpoint.
    resumed_policy = copy.deepcopy(init)
    resumed = _run(resumed_policy, reference, tiny_tokenizer, tmp_path / "cut", tmp_path / "cache",
                   eval_fn=eval_fn)
    final_full = torch.load(full.checkpoint_dir / "trainer_state.pt", weights_only=True)
    final_cut = torch.load(resumed.checkpoint_dir / "trainer_state.pt", weights_only=True)
    assert final_full["step"] == final_cut["step"] == 6
    sd_full = _load_fresh(init, full.checkpoint_dir).state_dict()
    for name, tensor in resumed_policy.state_dict().items():
        assert torch.equal(tensor, sd_full[name]), name
    steps = [r["step"] for r in read_metrics(resumed.metrics_path)]
    assert steps == list(range(7)), steps  # no duplicates, nothing missing
    full_records = _no_clock(read_metrics(full.metrics_path))
    assert _no_clock(read_metrics(resumed.metrics_path)) == full_records
    assert len(list((tmp_path / "cut" / "checkpoints").iterdir())) == 1  # only the latest is kept


def _load_fresh(init: torch.nn.Module, folder: Path) -> torch.nn.Module:
    model = copy.deepcopy(init)
    load_weights(model, folder)
    return model


def test_max_steps_limited_call_then_longer_call_matches(tiny_model, tiny_tokenizer, tmp_path):
    init, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    full_policy = copy.deepcopy(init)
    _run(full_policy, reference, tiny_tokenizer, tmp_path / "full", tmp_path / "cache")
    short = CONFIG.__class__(**{**CONFIG.__dict__, "max_steps": 3})
    part_policy = copy.deepcopy(init)
    _run(part_policy, reference, tiny_tokenizer, tmp_path / "part", tmp_path / "cache", config=short)
    _run(part_policy, reference, tiny_tokenizer, tmp_path / "part", tmp_path / "cache")
    for (name, a), b in zip(full_policy.state_dict().items(), part_policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == list(range(1, 7))


def test_finished_run_does_nothing_but_restore_its_weights(tiny_model, tiny_tokenizer, tmp_path):
    init, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    trained = copy.deepcopy(init)
    first = _run(trained, reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache")
    _forbid_forward(reference)
    again_policy = copy.deepcopy(init)
    _forbid_forward(again_policy)  # no training step either
    second = _run(again_policy, reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache",
                  eval_fn=lambda p, s: pytest.fail("eval_fn must not run for a finished run"))
    assert second == first
    for a, b in zip(trained.state_dict().values(), again_policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    calls = [0]

    def poison(module, inputs, output):
        calls[0] += 1
        if calls[0] > 4:  # 2 micro-batches per step: step 3 is the first poisoned one
            output.logits = output.logits * float("nan")
        return output

    tiny_model.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"at step 3 \(last good checkpoint: .*step-000002\)"):
        _run(tiny_model, reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    model = _load_fresh(reference, ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "result.json").exists()


def test_gradient_accumulation_matches_one_big_batch(tiny_model, tiny_tokenizer, tmp_path):
    one = CONFIG.__class__(**{**CONFIG.__dict__, "max_steps": 1, "micro_batch_size": 4})
    acc = CONFIG.__class__(**{**CONFIG.__dict__, "max_steps": 1, "micro_batch_size": 1})
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    ra = _run(a, tiny_model, tiny_tokenizer, tmp_path / "a", tmp_path / "cache", config=one)
    rb = _run(b, tiny_model, tiny_tokenizer, tmp_path / "b", tmp_path / "cache", config=acc)
    assert ra.last_metrics["grad_norm"] == pytest.approx(rb.last_metrics["grad_norm"], rel=1e-4)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_data_order_is_seeded_and_covers_each_epoch():
    order = [i for step in range(1, 5) for i in batch_indices(16, 4, step, seed=0)]
    assert sorted(order) == list(range(16))
    assert order == [i for step in range(1, 5) for i in batch_indices(16, 4, step, seed=0)]
    assert order != [i for step in range(1, 5) for i in batch_indices(16, 4, step, seed=1)]
    wrap = batch_indices(6, 4, 2, seed=0)  # positions 4..7 straddle epochs 0 and 1
    assert wrap[:2] == [i for i in batch_indices(6, 6, 1, seed=0)][4:]


def test_out_dir_of_another_run_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ValueError, match=r"holds a different run \(differs in \['beta'\]\)"):
        _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "run", tmp_path / "cache",
             beta=0.5)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["fields"]["beta"] == 0.1
    # A run that died before its first checkpoint protects nothing: new settings may take its place.
    def dies(policy, step):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "early", tmp_path / "cache",
             eval_fn=dies)
    _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "early", tmp_path / "cache",
         beta=0.5)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"beta": 0.0}, ValueError, r"beta must be > 0, got 0.0"),
    ({"max_length": 1}, ValueError, "max_length"),
])
def test_bad_arguments_are_named(tiny_model, tiny_tokenizer, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        _run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "r", tmp_path / "c", **kw)


def test_same_object_as_policy_and_reference_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="same object"):
        _run(tiny_model, tiny_model, tiny_tokenizer, tmp_path / "r", tmp_path / "c")


def test_missing_pair_column_is_named(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        dpo_run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer,
                  {"prompt": PAIRS["prompt"], "chosen": PAIRS["chosen"]}, beta=0.1, config=CONFIG,
                  out_dir=tmp_path / "r", seed=0, max_length=32, ref_cache_dir=tmp_path / "c", progress=False)


def _no_clock(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock cost (the one value a resumed run cannot reproduce)."""
    return [{k: v for k, v in r.items() if k != "cost/wall_s"} for r in records]


def test_a_bad_pair_is_named_by_its_dataset_row(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """A micro-batch's bad pair is named by its row in the data set, not in the micro-batch."""
    from dpo_lab import run

    bad = {**PAIRS, "prompt": list(PAIRS["prompt"])}
    bad["prompt"][10] = "a prompt far too long for the context " * 20
    assert batch_indices(16, CONFIG.batch_size, 1, 0)[3] == 10  # step 1, 2nd micro-batch, its 2nd example
    with pytest.raises(ValueError, match=r"^pair 10 \(chosen\): prompt longer than the context"):
        dpo_run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, bad, beta=0.1, config=CONFIG,
                  out_dir=tmp_path / "a", seed=0, max_length=32, ref_cache_dir=tmp_path / "c",
                  progress=False, device="cpu")  # found by the reference pass
    monkeypatch.setattr(run, "reference_logprobs", lambda *a, **k: torch.zeros(16, 2))
    with pytest.raises(ValueError, match=r"^pair 10 \(chosen\): prompt longer than the context"):
        dpo_run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, bad, beta=0.1, config=CONFIG,
                  out_dir=tmp_path / "b", seed=0, max_length=32, ref_cache_dir=tmp_path / "c",
                  progress=False, device="cpu")  # found by the training loop
