"""The paper's non-RL baselines in dpo_trainer: Unlikelihood and Preferred-FT (objective=...)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from toy_pairs import CONFIG, PAIRS  # tests/ is on sys.path (pytest prepends it)

from dpo_lab.batching import PreferenceCollator, pad_rows, tokenize_completion
from dpo_lab.logprobs import completion_token_logprobs, concatenated_forward
from dpo_lab.loop import batch_indices
from dpo_lab.losses import preferred_ft_loss, unlikelihood_loss
from dpo_lab.run import dpo_run, load_weights, read_metrics

MAX_LENGTH = 32
COLLATOR_ROWS = [dict(zip(PAIRS, row, strict=True)) for row in zip(*PAIRS.values(), strict=True)]


def _run(policy, reference, tokenizer, out_dir: Path, cache: Path, pairs=PAIRS, **kw):
    # CPU pinned: bit-exact resume is promised there.
    args = {"config": CONFIG, "seed": 0, "max_length": MAX_LENGTH, "progress": False, "device": "cpu", **kw}
    return dpo_run(policy, reference, tokenizer, pairs, out_dir=out_dir, ref_cache_dir=cache, **args)


def _probe(tokenizer):
    """eval_fn: mean log pi(y_w|x) and log pi(y_l|x) over all 16 pairs (the same text at every step)."""
    batch = PreferenceCollator(tokenizer, MAX_LENGTH)(COLLATOR_ROWS)

    def eval_fn(policy, step):
        with torch.no_grad():
            chosen, rejected = concatenated_forward(policy, batch)[0].unbind(1)
        return {"probe/chosen": chosen.mean().item(), "probe/rejected": rejected.mean().item()}
    return eval_fn


def _step1_token_logps(model, tokenizer):
    """Token log-probs of step 1's pairs, chosen and rejected in SEPARATE forward passes (independent of
    the trainer's stacking)."""
    indices = batch_indices(len(PAIRS["prompt"]), CONFIG.batch_size, 1, seed=0)
    with torch.no_grad():
        return [t for side in ("chosen", "rejected") for t in completion_token_logprobs(model, **pad_rows(
            [tokenize_completion(tokenizer, COLLATOR_ROWS[i]["prompt"], COLLATOR_ROWS[i][side],
                                 max_length=MAX_LENGTH) for i in indices], tokenizer.pad_token_id))]


def test_token_logprobs_of_one_pass_sum_to_sequence_logprobs(tiny_model, tiny_tokenizer):
    batch = PreferenceCollator(tiny_tokenizer, MAX_LENGTH)(COLLATOR_ROWS[:5])
    with torch.no_grad():
        (seq_c, seq_r), (tok_c, tok_r), (mask_c, mask_r) = (t.unbind(1) for t in concatenated_forward(
            tiny_model, batch))
    assert tok_c.shape == mask_c.shape == tok_r.shape == mask_r.shape
    assert torch.equal(mask_c, batch["completion_mask"][:5, 1:])
    torch.testing.assert_close(tok_c.sum(-1), seq_c)
    torch.testing.assert_close(tok_r.sum(-1), seq_r)
    assert bool((tok_c[mask_c == 0] == 0).all()) and bool((tok_c[mask_c == 1] < 0).all())


def test_preferred_ft_starts_at_the_chosen_nll_and_raises_chosen(tiny_model, tiny_tokenizer, tmp_path):
    init = copy.deepcopy(tiny_model)
    result = _run(tiny_model, init, tiny_tokenizer, tmp_path / "pft", tmp_path / "cache",
                  objective="preferred_ft", eval_fn=_probe(tiny_tokenizer))
    records = read_metrics(result.metrics_path)
    first, last = records[1], records[-1]
    tok_c, mask_c, _, _ = _step1_token_logps(init, tiny_tokenizer)
    expected = preferred_ft_loss(tok_c, mask_c).mean().item()
    # Preferred-FT's first loss is the mean summed NLL of y_w: -logps/chosen, and the losses module's value.
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["loss"] == pytest.approx(-first["logps/chosen"], rel=1e-6)
    assert first["nll/chosen"] == pytest.approx(first["loss"], rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1
    assert "unlikelihood/rejected" not in first
    assert last["probe/chosen"] > records[0]["probe/chosen"] + 3.0  # log pi(y_w|x) went up, in nats
    run = json.loads((tmp_path / "pft" / "run.json").read_text())["fields"]
    assert run["objective"] == "preferred_ft" and run["alpha"] is None and run["beta"] == 1.0


def test_baseline_beta_only_scales_the_logged_rewards(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    short = dataclasses.replace(CONFIG, max_steps=3)
    one = _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "b1", tmp_path / "cache",
               objective="preferred_ft", config=short)
    half = _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / "b05", tmp_path / "cache",
                objective="preferred_ft", config=short, beta=0.5)
    a, b = one.last_metrics, half.last_metrics
    assert a["loss"] == b["loss"] and a["logps/rejected"] == b["logps/rejected"]  # same trajectory
    assert abs(a["rewards/chosen"]) > 0.1
    assert b["rewards/chosen"] == pytest.approx(0.5 * a["rewards/chosen"], rel=1e-5)
    assert b["rewards/margins"] == pytest.approx(0.5 * a["rewards/margins"], rel=1e-5)


def test_unlikelihood_first_loss_matches_the_losses_module(tiny_model, tiny_tokenizer, tmp_path):
    init = copy.deepcopy(tiny_model)
    alpha = 0.5
    result = _run(tiny_model, init, tiny_tokenizer, tmp_path / "ul", tmp_path / "cache",
                  objective="unlikelihood", alpha=alpha, config=dataclasses.replace(CONFIG, max_steps=2))
    first = read_metrics(result.metrics_path)[0]
    tok_c, mask_c, tok_r, mask_r = _step1_token_logps(init, tiny_tokenizer)
    expected = unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha=alpha).mean().item()
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["nll/chosen"] == pytest.approx(preferred_ft_loss(tok_c, mask_c).mean().item(), rel=1e-5)
    assert first["unlikelihood/rejected"] > 0
    assert first["loss"] == pytest.approx(first["nll/chosen"] + alpha * first["unlikelihood/rejected"],
                                          rel=1e-5)


@pytest.fixture()
def likes_rejected(tiny_model, tiny_tokenizer, tmp_path) -> torch.nn.Module:
    """A start that gives the rejected completions high probability, so the unlikelihood term has work to
    do (a random init gives every token ~1/300 and log(1 - p) ~ 0)."""
    swapped = {**PAIRS, "chosen": PAIRS["rejected"], "rejected": PAIRS["chosen"]}
    policy = copy.deepcopy(tiny_model)
    _run(policy, tiny_model, tiny_tokenizer, tmp_path / "warm", tmp_path / "cache", pairs=swapped,
         objective="preferred_ft", config=dataclasses.replace(CONFIG, max_steps=30, lr=1e-2))
    return policy


def test_unlikelihood_raises_chosen_and_pushes_rejected_below_preferred_ft(likes_rejected, tiny_tokenizer,
                                                                          tmp_path):
    probe = _probe(tiny_tokenizer)
    ends = {}
    for objective, alpha in (("unlikelihood", 1.0), ("preferred_ft", None)):
        result = _run(copy.deepcopy(likes_rejected), likes_rejected, tiny_tokenizer, tmp_path / objective,
                      tmp_path / "cache", objective=objective, alpha=alpha, eval_fn=probe)
        records = read_metrics(result.metrics_path)
        start, ends[objective] = records[0], records[-1]
        assert ends[objective]["probe/chosen"] > start["probe/chosen"] + 10.0
    ul, pft = ends["unlikelihood"], ends["preferred_ft"]
    assert ul["probe/rejected"] < start["probe/rejected"] - 5.0
    # The alpha term is what separates the two objectives: it pushes y_l further down than SFT on y_w does.
    assert ul["probe/rejected"] < pft["probe/rejected"] - 2.0
    assert ul["rewards/rejected"] < pft["rewards/rejected"] < 0


def test_objective_and_alpha_are_part_of_the_run_identity(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    short = dataclasses.replace(CONFIG, max_steps=2)

    def run(name, **kw):
        return _run(copy.deepcopy(tiny_model), reference, tiny_tokenizer, tmp_path / name, tmp_path / "cache",
                    config=short, **kw)

    run("pft", objective="preferred_ft")
    with pytest.raises(ValueError, match=r"differs in \['alpha', 'objective'\]"):
        run("pft", objective="unlikelihood", alpha=0.5)
    run("ul", objective="unlikelihood", alpha=0.5)
    with pytest.raises(ValueError, match=r"differs in \['alpha'\]"):
        run("ul", objective="unlikelihood", alpha=1.0)
    run("dpo", beta=1.0)
    with pytest.raises(ValueError, match=r"differs in \['objective'\]"):  # alpha is None in both
        run("dpo", objective="preferred_ft")
    fields = json.loads((tmp_path / "dpo" / "run.json").read_text())["fields"]
    assert (fields["objective"], fields["alpha"], fields["mixed_precision"]) == ("dpo", None, "no")


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"objective": "unlikelihood", "alpha": -0.1}, ValueError, r"alpha must be >= 0, got -0.1"),
    ({"objective": "unlikelihood", "alpha": float("inf")}, ValueError, r"alpha must be finite, got inf"),
    ({"objective": "unlikelihood", "alpha": "1"}, TypeError, r"alpha must be a real number"),
    ({"objective": "unlikelihood"}, ValueError, r"alpha is required for objective='unlikelihood'"),
    ({"objective": "preferred_ft", "alpha": 0.5}, ValueError, r"alpha only applies to objective='unlik"),
    ({"beta": 0.1, "alpha": 0.5}, ValueError, r"alpha only applies"),
    ({}, ValueError, r"beta is required for objective='dpo'"),
    ({"objective": "ppo"}, ValueError, r"unknown objective 'ppo'"),
    ({"objective": "preferred_ft", "beta": -1.0}, ValueError, r"beta must be > 0, got -1.0"),
])
def test_bad_objective_arguments_are_named(tiny_model, tiny_tokenizer, tmp_path, kw, error, match):
    with pytest.raises(error, match=match):
        _run(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path / "r", tmp_path / "c", **kw)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_unlikelihood_gradient_accumulation_matches_one_big_batch(tiny_model, tiny_tokenizer, tmp_path):
    one = dataclasses.replace(CONFIG, max_steps=1, micro_batch_size=4)
    acc = dataclasses.replace(CONFIG, max_steps=1, micro_batch_size=1)
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    kw = {"objective": "unlikelihood", "alpha": 0.5}
    ra = _run(a, tiny_model, tiny_tokenizer, tmp_path / "a", tmp_path / "cache", config=one, **kw)
    rb = _run(b, tiny_model, tiny_tokenizer, tmp_path / "b", tmp_path / "cache", config=acc, **kw)
    assert ra.last_metrics["loss"] == pytest.approx(rb.last_metrics["loss"], rel=1e-5)
    assert ra.last_metrics["grad_norm"] == pytest.approx(rb.last_metrics["grad_norm"], rel=1e-4)
    # RMSprop's first step divides each gradient element by its own size, so an element whose gradient is
    # rounding noise moves by up to ~lr either way: weights agree to a few rounding-sized steps, not to 1e-6
    # (the loss and gradient norm above carry the exact check; a wrong-direction update would be ~lr off).
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_interrupted_unlikelihood_run_resumes_to_identical_weights(tiny_model, tiny_tokenizer, tmp_path):
    init, reference = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    kw = {"objective": "unlikelihood", "alpha": 0.1}
    probe = _probe(tiny_tokenizer)
    full = _run(copy.deepcopy(init), reference, tiny_tokenizer, tmp_path / "full", tmp_path / "cache",
                eval_fn=probe, **kw)

    def crashing(policy, step):
        if step == 4:
            raise KeyboardInterrupt("simulated interrupt")
        return probe(policy, step)

    with pytest.raises(KeyboardInterrupt):
        _run(copy.deepcopy(init), reference, tiny_tokenizer, tmp_path / "cut", tmp_path / "cache",
             eval_fn=crashing, **kw)
    resumed_policy = copy.deepcopy(init)  # weights must come from the step-2 checkpoint
    resumed = _run(resumed_policy, reference, tiny_tokenizer, tmp_path / "cut", tmp_path / "cache",
                   eval_fn=probe, **kw)
    expected = copy.deepcopy(init)
    load_weights(expected, full.checkpoint_dir)
    for (name, a), b in zip(resumed_policy.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _no_clock(read_metrics(resumed.metrics_path)) == _no_clock(read_metrics(full.metrics_path))
    assert [r["step"] for r in read_metrics(resumed.metrics_path)] == list(range(7))


def _no_clock(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock cost (the one value a resumed run cannot reproduce)."""
    return [{k: v for k, v in r.items() if k != "cost/wall_s"} for r in records]
