"""implicit_reward.py: pair accuracy, calibration and best-of-n against hand-made answers; log-probs
against the evaluation routine; the likelihood trace inside a real (tiny) DPO run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_evaluate import PROMPTS, length_reward  # tests/ is on sys.path (pytest prepends it)

from dpo_lab.implicit_reward import (
    HeldOut,
    best_of_n,
    calibration,
    draw_heldout,
    likelihood_fn,
    pair_margins,
    ranking_accuracy,
)
from dpo_lab.kl_estimators import kl_estimates
from dpo_lab.logprobs import completion_logprobs
from dpo_lab.presets import DPOConfig
from dpo_lab.run import dpo_run, read_metrics

RSTAR = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.2]])  # prompt 1 has a tie: it forms 2 pairs, not 3


def test_pairs_are_same_prompt_and_ties_are_dropped():
    margin, gap = pair_margins(RSTAR, RSTAR)
    assert margin.size == 5  # 3 + 2
    np.testing.assert_allclose(np.sort(gap), np.sort([0.8, 0.4, 0.4, 0.5, 0.5]))
    assert (margin > 0).all()  # r* ranks its own pairs perfectly


def test_ranking_accuracy_right_wrong_and_ties():
    assert ranking_accuracy(RSTAR, RSTAR) == 1.0
    assert ranking_accuracy(-RSTAR, RSTAR) == 0.0
    assert ranking_accuracy(np.zeros_like(RSTAR), RSTAR) == 0.5  # pi = pi_ref: every r-hat is 0
    # Only prompt 0's pair (1, 2) flipped: 4 of 5 right.
    scores = np.array([[0.0, 0.5, 0.9], [1.0, 0.0, 0.0]])
    assert ranking_accuracy(scores, RSTAR) == pytest.approx(4 / 5)
    # A constant per prompt (beta log Z(x)) changes nothing: ranking is within a prompt.
    assert ranking_accuracy(scores + np.array([[100.0], [-7.0]]), RSTAR) == pytest.approx(4 / 5)


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match="prompts, samples"):
        ranking_accuracy(np.zeros(3), RSTAR)
    with pytest.raises(ValueError, match="finite"):
        ranking_accuracy(np.full_like(RSTAR, np.nan), RSTAR)
    with pytest.raises(ValueError, match="no held-out pair"):
        ranking_accuracy(np.zeros((2, 2)), np.ones((2, 2)))


def test_calibration_of_a_calibrated_bradley_terry_model():
    """Labels drawn from Bradley-Terry with the scores themselves: observed matches predicted per bin."""
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 2, size=(20000, 2))
    prefer_first = rng.random(20000) < 1 / (1 + np.exp(-(scores[:, 0] - scores[:, 1])))
    rstar = np.where(prefer_first[:, None], [[1.0, 0.0]], [[0.0, 1.0]])
    table = calibration(scores, rstar, n_bins=5)
    assert table.n.sum() == 40000  # each pair in both orders
    assert np.all(np.abs(table.observed - table.predicted) < 4 * table.se + 0.01)
    # Symmetric by construction: bin b and bin n-1-b mirror each other.
    np.testing.assert_allclose(table.observed.to_numpy(), 1 - table.observed.to_numpy()[::-1])
    # An overconfident model (scores x 5) is not calibrated: its top bin predicts more than it observes.
    over = calibration(5 * scores, rstar, n_bins=5)
    assert over.predicted.iloc[-1] - over.observed.iloc[-1] > 0.05


def test_best_of_n_picks_the_top_score():
    assert best_of_n(RSTAR, RSTAR)[0] == pytest.approx((0.9 + 0.7) / 2)
    assert best_of_n(-RSTAR, RSTAR)[0] == pytest.approx((0.1 + 0.2) / 2)
    mean, se = best_of_n(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), RSTAR)
    assert mean == pytest.approx((0.9 + 0.7) / 2) and se == pytest.approx(0.1)


def test_completion_logprobs_of_held_out_samples_match_the_evaluation_routine(tiny_model, tiny_tokenizer):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    held = draw_heldout(tiny_model, tiny_tokenizer, PROMPTS, length_reward, n_per_prompt=3, max_new_tokens=5,
                        batch_size=4, seed=0)
    assert held.shape == (4, 3) and held.rstar.shape == (4, 3)
    pad = tiny_tokenizer.pad_token_id
    a = completion_logprobs(other, held.prompt_ids, held.completion_ids, batch_size=5, pad_token_id=pad)
    b = completion_logprobs(tiny_model, held.prompt_ids, held.completion_ids, batch_size=12, pad_token_id=pad)
    assert a.shape == b.shape == (4, 3)
    xs = [p for p, per in zip(held.prompt_ids, held.completion_ids, strict=True) for _ in per]
    ys = [c for per in held.completion_ids for c in per]
    logratio = kl_estimates(other, tiny_model, xs, ys, batch_size=7, pad_token_id=pad).k1
    np.testing.assert_allclose((a - b).reshape(-1), logratio, atol=1e-4)
    assert (a < 0).all()
    with pytest.raises(ValueError, match=">= 2"):
        draw_heldout(tiny_model, tiny_tokenizer, PROMPTS, length_reward, n_per_prompt=1, max_new_tokens=5,
                     batch_size=4, seed=0)


def test_likelihood_trace_in_a_dpo_run(tiny_model, tiny_tokenizer, tmp_path):
    """Step 0 (pi = pi_ref): log-ratios 0 and accuracy exactly 0.5; after training: the trainer's own
    chosen-over-rejected margin grows on the training pairs, and the trace's numbers move."""
    reference = copy.deepcopy(tiny_model)
    held = draw_heldout(reference, tiny_tokenizer, PROMPTS, length_reward, n_per_prompt=3, max_new_tokens=5,
                        batch_size=4, seed=1)
    assert isinstance(held, HeldOut)
    pairs = {"prompt": ["This movie was"] * 4 + ["A terrible"] * 4,
             "chosen": [" great", " wonderful", " moving", " fine"] * 2,
             "rejected": [" awful", " boring", " weak", " sad"] * 2}
    config = DPOConfig(betas=(0.5,), loss_type="sigmoid", label_smoothing=0.0, optimizer="rmsprop", lr=1e-2,
                       warmup_steps=1, batch_size=4, micro_batch_size=4, max_steps=6, max_grad_norm=10.0,
                       checkpoint_every=3, eval_every=3)
    fn = likelihood_fn(reference, tiny_tokenizer, held, beta=0.5, max_new_tokens=5, batch_size=8, seed=0)
    dpo_run(tiny_model, reference, tiny_tokenizer, pairs, beta=0.5, config=config, out_dir=tmp_path / "run",
            seed=0, max_length=32, ref_cache_dir=tmp_path / "ref", eval_fn=fn, progress=False)
    evals = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "heldout/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    start, end = evals[0], evals[-1]
    assert start["heldout/accuracy"] == 0.5
    assert start["heldout/logratio/chosen"] == pytest.approx(0, abs=1e-5)
    assert start["fresh/logps"] == pytest.approx(start["fresh/ref_logps"], abs=1e-5)
    assert end["heldout/logps/all"] != pytest.approx(start["heldout/logps/all"], abs=1e-3)
    assert end["fresh/logps"] - end["fresh/ref_logps"] != pytest.approx(0, abs=1e-3)
