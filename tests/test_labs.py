"""The research labs' runs (notebooks 12, 13): pairs from another labeller or sampler, a second round of DPO
from a trained policy, and the learned r_phi read beside r* at every evaluation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from dpo_lab import labs, pipeline
from dpo_lab.evaluate import evaluate_policy
from dpo_lab.frontier import evaluation_points
from dpo_lab.preferences import score_samples
from dpo_lab.presets import EvalConfig, get_preset
from dpo_lab.rewards import score_completions
from dpo_lab.run import read_metrics

PROXY_COLUMNS = ["proxy_reward_mean", "proxy_reward_se"]  # what evaluating with r_phi beside r* adds


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_LAB_ARTIFACTS", str(tmp_path_factory.mktemp("labs") / "artifacts"))
        mp.setenv("TQDM_DISABLE", "1")
        yield get_preset("smoke")


def test_label_agreement_counts_pairs_as_the_pairs_are_built() -> None:
    candidates = {"prompts": ["a", "b"], "completions": [["x", "y", "z"], ["u", "", "w"]],
                  "rewards": [[0.1, 0.5, 0.9], [0.3, 0.1, 0.3]]}
    scores = [[0.2, 0.1, 0.3],  # (x, y) reversed, (x, z) and (y, z) agree: 2 of 3
              [0.4, 0.5, 0.9]]  # (u, "") empty: skipped; (u, w) tied under r*: half
    assert labs.label_agreement(candidates, scores) == pytest.approx(2.5 / 4)
    assert labs.label_agreement(candidates, [[0.1, 0.5, 0.9], [0.3, 0.1, 0.2]]) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="no pair to compare"):
        labs.label_agreement({"prompts": ["a"], "completions": [["x", "y"]], "rewards": [[0.1, 0.2]]},
                             [[0.5, 0.5]])


def test_equal_count_is_a_seeded_subset_in_order() -> None:
    pairs = datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)]})
    subset = labs.equal_count(pairs, 4, seed=0)
    rows = subset["prompt"]
    assert len(rows) == 4 and rows == sorted(rows, key=lambda p: int(p[1:])) and len(set(rows)) == 4
    assert labs.equal_count(pairs, 4, seed=0)["prompt"] == rows
    assert labs.equal_count(pairs, 4, seed=1)["prompt"] != rows
    assert labs.equal_count(pairs, 10, seed=0)["prompt"] == pairs["prompt"]
    with pytest.raises(ValueError, match="only 10 pairs"):
        labs.equal_count(pairs, 11, seed=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        labs.equal_count(pairs, 0, seed=0)


def test_proxy_pairs_are_ordered_by_r_phi_on_the_same_samples(smoke) -> None:
    pairs, stats = labs.proxy_preference_data(smoke)
    r_phi = pipeline.learned_reward(smoke)
    chosen = score_completions(r_phi, pairs["prompt"], pairs["chosen"])
    rejected = score_completions(r_phi, pairs["prompt"], pairs["rejected"])
    assert (chosen > rejected).all()
    np.testing.assert_allclose(chosen, pairs["chosen_reward"], rtol=1e-6, atol=1e-6)
    candidates = pipeline.preference_candidates(smoke)
    assert {(p, c) for p, c in zip(pairs["prompt"], pairs["chosen"], strict=True)} <= {
        (p, c) for p, per in zip(candidates["prompts"], candidates["completions"], strict=True) for c in per}
    scores = score_samples(r_phi, candidates["prompts"], candidates["completions"])
    assert stats["agreement_with_r_star"] == pytest.approx(labs.label_agreement(candidates, scores))
    assert stats["n_pairs"] == len(pairs)


def test_evaluation_reads_the_proxy_on_the_same_samples(smoke) -> None:
    policy, tokenizer, _ = pipeline.sft_policy(smoke)
    reward, _ = pipeline.reward_model(smoke)
    r_phi = pipeline.learned_reward(smoke)
    test_prompts = pipeline.prompts(smoke, tokenizer, "test")[:6]
    args = {"config": EvalConfig(samples_per_prompt=2, max_new_tokens=8, batch_size=4), "seed": 3}
    plain = evaluate_policy(policy, policy, tokenizer, test_prompts, reward, **args)
    scorers = {"proxy_reward": lambda p, c: score_completions(r_phi, p, c)}
    both = evaluate_policy(policy, policy, tokenizer, test_prompts, reward, **args, scorers=scorers)
    assert set(both) - set(plain) == set(PROXY_COLUMNS)
    assert {k: both[k] for k in plain} == plain  # reading r_phi changes nothing else
    as_reward = evaluate_policy(policy, policy, tokenizer, test_prompts, r_phi, **args)  # r_phi in r*'s place
    assert both["proxy_reward_mean"] == pytest.approx(as_reward["reward_mean"])
    assert both["proxy_reward_se"] == pytest.approx(as_reward["reward_se"])


def test_proxy_runs_log_both_rewards_and_ppo_keeps_a_fixed_coefficient(smoke) -> None:
    proxy_pairs, _ = labs.proxy_preference_data(smoke)
    run = labs.lab_dpo(smoke, proxy_pairs, 0.1, proxy=True)
    points = evaluation_points(run.metrics_path)
    assert points[PROXY_COLUMNS].notna().all().all() and len(points) >= 2
    plain = labs.lab_dpo(smoke, proxy_pairs, 0.1)
    assert plain.checkpoint_dir.parent.parent != run.checkpoint_dir.parent.parent
    assert not set(PROXY_COLUMNS) & set(evaluation_points(plain.metrics_path).columns)

    ppo = labs.lab_ppo(get_preset("smoke", **{"ppo.init_kl_coef": 0.03}), None)
    metrics = read_metrics(ppo.metrics_path)
    assert {m["kl_coef"] for m in metrics if "kl_coef" in m} == {0.03}
    assert evaluation_points(ppo.metrics_path)[PROXY_COLUMNS].notna().all().all()
    adaptive = labs.lab_ppo(get_preset("smoke", **{"ppo.init_kl_coef": 0.03}), 1.0)
    assert len({m["kl_coef"] for m in read_metrics(adaptive.metrics_path) if "kl_coef" in m}) > 1


def test_a_second_round_starts_where_the_first_ended(smoke) -> None:
    first = pipeline.dpo(smoke, 0.1)
    fresh, stats = labs.resampled_preference_data(smoke, first)
    assert stats["n_pairs"] == len(fresh) > 0
    second = labs.lab_dpo(smoke, fresh, 0.1, start=first)
    start, end = (evaluation_points(r.metrics_path) for r in (second, first))
    # The same evaluation (seed, prompts, KL to pi_SFT) of the same weights: the same point.
    cols = ["reward_mean", "kl_mean", "kl_se"]
    assert start.iloc[0][cols].tolist() == end.iloc[-1][cols].tolist() and start.iloc[0].kl_mean > 0
    from_sft = labs.lab_dpo(smoke, fresh, 0.1)
    assert evaluation_points(from_sft.metrics_path).iloc[0].kl_mean == 0


def test_sibling_pairs_come_from_another_seeds_sft(smoke) -> None:
    with pytest.raises(ValueError, match="is the preset's own seed"):
        labs.sibling_preference_data(smoke, smoke.seed)
    pairs, _ = labs.sibling_preference_data(smoke, smoke.seed + 1)
    on_policy, _ = pipeline.preference_data(smoke)
    assert set(pairs["prompt"]) <= set(pipeline.preference_candidates(smoke)["prompts"])
    assert set(pairs["chosen"]) != set(on_policy["chosen"])
    # The sibling shares pi_SFT's split and tokenizer; only its initialisation and data order differ.
    other = dataclasses.replace(smoke, seed=smoke.seed + 1)
    assert Path(pipeline.stage_dir("sft", pipeline.sft_key(other))).is_dir()
    assert pipeline.sft_key(other) != pipeline.sft_key(smoke)
    sibling, sibling_tok, _ = pipeline.sft_policy(other)
    sft, sft_tok, _ = pipeline.sft_policy(smoke)
    assert sibling_tok.get_vocab() == sft_tok.get_vocab()
    assert not torch.equal(sibling.transformer.wte.weight, sft.transformer.wte.weight)


def test_final_samples_are_scored_by_every_reward(smoke) -> None:
    first = pipeline.dpo(smoke, 0.1)
    _, tokenizer, _ = pipeline.sft_policy(smoke)
    reward, _ = pipeline.reward_model(smoke)
    shown = pipeline.prompts(smoke, tokenizer, "test")[:2]
    rows = labs.final_samples(smoke, {"a": first, "b": first}, tokenizer, 2, {"r*": reward, "twice": reward})
    assert [r["run"] for r in rows] == ["a", "a", "b", "b"]
    assert all(r["text"].startswith(p) for r, p in zip(rows, shown * 2, strict=True))
    assert rows[:2] == [{**r, "run": "a"} for r in rows[2:]]  # the same policy and seed: the same samples
    assert [r["r*"] for r in rows] == [float(s) for s in reward([r["text"] for r in rows])]
    assert all(r["twice"] == r["r*"] for r in rows)

