"""reward_model.py: BT training learns an easy preference, splits by prompt, normalises, saves and reloads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_lab.batching import PreferenceCollator
from dpo_lab.losses import bradley_terry_loss
from dpo_lab.reward_model import (
    LearnedReward,
    RewardModelConfig,
    ScalarRewardModel,
    accuracy_by_gap,
    pair_rewards,
    split_by_prompt,
    train_reward_model,
)
from dpo_lab.run import cached_reward_model, load_reward_model

PROMPTS = ["This movie", "The film", "I think", "A story", "The acting", "Music is", "The plot",
           "An excellent", "The director", "The cast", "Worst", "I watched"]
FILLERS = [" and the story", " with the music", ", the acting", " twice", " and the ending"]


def easy_pairs() -> dict[str, list[str]]:
    """60 pairs over 12 prompts: y_w always says "great", y_l always says "awful"."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for p in PROMPTS:
        for f in FILLERS:
            rows["prompt"].append(p)
            rows["chosen"].append(f" was great{f}")
            rows["rejected"].append(f" was awful{f}")
    return rows


CONFIG = RewardModelConfig(epochs=4, max_steps=None, batch_size=8, lr=3e-3, warmup_steps=2, val_fraction=0.25,
                           eval_every=5, max_length=32)


def test_split_by_prompt_keeps_prompts_together() -> None:
    prompts = easy_pairs()["prompt"]
    train, val, test = split_by_prompt(prompts, 0.25, seed=0)
    assert sorted(train + val + test) == list(range(len(prompts)))
    sides = [{prompts[i] for i in part} for part in (train, val, test)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    assert len(sides[1]) == len(sides[2]) == 3  # ceil(0.25 * 12) each
    assert split_by_prompt(prompts, 0.25, seed=0) == (train, val, test)
    assert split_by_prompt(prompts, 0.25, seed=1) != (train, val, test)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_prompt(prompts, 0.5, seed=0)
    with pytest.raises(ValueError, match="distinct prompts"):
        split_by_prompt(["same"] * 4, 0.25, seed=0)


def test_reward_reads_the_last_real_token_whatever_the_padding(tiny_model) -> None:
    model = ScalarRewardModel.from_policy(tiny_model)
    torch.nn.init.normal_(model.head.weight)  # a non-zero head so rewards differ between inputs
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        r = model(ids, mask)
        alone = model(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(r[0], alone[0], rtol=1e-5, atol=1e-5)  # right padding
    torch.testing.assert_close(r[1], alone[0], rtol=1e-5, atol=1e-5)  # left padding
    assert not torch.isclose(r[2], alone[0])  # a longer text reads another token
    # The backbone is a copy: training the reward model leaves the policy untouched.
    assert model.backbone is not tiny_model.transformer
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        ScalarRewardModel.from_policy(torch.nn.Linear(2, 2))


def test_initial_loss_is_log2(tiny_model, tiny_tokenizer) -> None:
    model = ScalarRewardModel.from_policy(tiny_model)
    batch = PreferenceCollator(tiny_tokenizer, 32)([dict(zip(easy_pairs(), row, strict=True))
                                                   for row in zip(*easy_pairs().values(), strict=True)][:4])
    chosen, rejected = pair_rewards(model, batch)
    assert bradley_terry_loss(chosen, rejected).mean().item() == pytest.approx(math.log(2))


def test_training_learns_easy_preferences_and_round_trips(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    # CPU pinned: the save/load round trip below is compared bit for bit.
    reward = cached_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=CONFIG, seed=0,
                                 out_dir=tmp_path / "rm", progress=False, device="cpu")
    report = reward.report
    losses = report["train_losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert report["best_val_accuracy"] > 0.5
    assert report["val_history"][0]["step"] == 0 and report["val_history"][-1]["step"] == len(losses)
    history = report["val_history"]
    assert history[0]["val_accuracy"] == 0.5  # zero head: every pair ties
    best = max(history[1:], key=lambda h: (h["val_accuracy"], -h["val_loss"]))  # trained weights only
    assert report["best_step"] == best["step"] and report["best_val_accuracy"] == best["val_accuracy"]
    assert (report["n_train_pairs"], report["n_val_pairs"], report["n_test_pairs"]) == (30, 15, 15)
    assert report["test_accuracy"] > 0.5
    for k, v in tiny_model.state_dict().items():  # the policy is not trained
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)

    # Normalised: the mean over the training completions is ~0 (offset stored), and "great" beats "awful"
    # on prompts it never saw.
    texts = [p + c for p in PROMPTS for c in (" was great and the story", " was awful and the story")]
    scores = reward(texts)
    assert scores.shape == (len(texts),) and scores.dtype == np.float64
    np.testing.assert_allclose(reward.raw(texts) - reward.offset, scores)
    assert np.mean(scores[0::2] > scores[1::2]) > 0.5
    assert reward([]).shape == (0,)

    # save/load: identical scores, and a second call with the same inputs loads instead of training.
    loaded = load_reward_model(tmp_path / "rm")
    np.testing.assert_array_equal(loaded(texts), scores)
    assert loaded.offset == reward.offset
    again = cached_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=CONFIG, seed=0,
                                out_dir=tmp_path / "rm", progress=False)
    np.testing.assert_array_equal(again(texts), scores)
    with pytest.raises(ValueError, match="other inputs"):
        cached_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=CONFIG, seed=1,
                            out_dir=tmp_path / "rm", progress=False)


def test_accuracy_by_gap_bins_pairs_by_quantile_of_the_true_gap() -> None:
    gaps = [0.01, 0.02, 0.03, 0.04, 0.5, 0.6, 0.7, 0.8]
    correct = [0, 1, 0, 0, 1, 1, 1, 0.5]
    bins = accuracy_by_gap(correct, gaps, n_bins=2)
    assert [b["pairs"] for b in bins] == [4, 4]
    assert [b["accuracy"] for b in bins] == [0.25, 0.875]
    assert bins[0]["gap_from"] == 0.01 and bins[1]["gap_to"] == 0.8


def test_the_report_gives_rstar_ceiling_where_pairs_carry_its_scores(tiny_model, tiny_tokenizer) -> None:
    pairs = easy_pairs()
    n = len(pairs["prompt"])
    # r* separates every pair but the last five (a tie there): its own accuracy on them is 1, or 0.5 on a tie.
    pairs["chosen_reward"] = [0.9] * (n - 5) + [0.5] * 5
    pairs["rejected_reward"] = [0.1 + 0.01 * i for i in range(n - 5)] + [0.5] * 5
    report = train_reward_model(tiny_model, tiny_tokenizer, pairs, config=CONFIG, seed=0,
                                progress=False).report
    _, val_idx, test_idx = split_by_prompt(pairs["prompt"], CONFIG.val_fraction, 0)
    ties = sum(i >= n - 5 for i in test_idx)
    assert report["rstar_test_accuracy"] == pytest.approx(1 - 0.5 * ties / len(test_idx))
    assert sum(b["pairs"] for b in report["test_accuracy_by_gap"]) == report["n_test_pairs"] == len(test_idx)
    assert report["n_val_pairs"] == len(val_idx) and 0.0 <= report["test_accuracy"] <= 1.0
    plain = train_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=CONFIG, seed=0,
                               progress=False).report
    assert plain["rstar_test_accuracy"] is None and plain["test_accuracy_by_gap"] == []


def test_offset_centres_training_completions(tiny_model, tiny_tokenizer) -> None:
    config = RewardModelConfig(epochs=2, max_steps=8, batch_size=8, lr=3e-3, warmup_steps=0,
                               val_fraction=0.25, eval_every=4, max_length=32)
    reward = train_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=config, seed=0,
                                progress=False)
    pairs = easy_pairs()
    train, _, _ = split_by_prompt(pairs["prompt"], 0.25, seed=0)
    completions = sorted({(pairs["prompt"][i], pairs[s][i]) for i in train for s in ("chosen", "rejected")})
    centred = reward([p + c for p, c in completions])
    # Zero up to BPE merges across the prompt/completion boundary (none in these texts) and float error.
    assert abs(float(np.mean(centred))) < 1e-4
    assert reward.report["best_step"] > 0 and reward.offset != 0.0


def test_bad_inputs(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reward_model.batch_size must be >= 1, got 0"):
        train_reward_model(tiny_model, tiny_tokenizer, easy_pairs(), config=RewardModelConfig(batch_size=0),
                           seed=0, progress=False)
    with pytest.raises(ValueError, match="missing"):
        train_reward_model(tiny_model, tiny_tokenizer, {"prompt": ["a"], "chosen": ["b"]}, config=CONFIG,
                           seed=0, progress=False)
    reward = LearnedReward(ScalarRewardModel.from_policy(tiny_model), tiny_tokenizer)
    with pytest.raises(TypeError, match="single string"):
        reward("one text")
    with pytest.raises(FileNotFoundError, match="LearnedReward"):
        load_reward_model(tmp_path)
