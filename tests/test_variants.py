"""The DPO variants of notebook 11 in the trainer: IPO on per-token means, RPO, Plackett-Luce on rankings;
their run and reference-cache keys, and the keys of runs made before they existed (unchanged)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from toy_pairs import BAD, CONFIG, GOOD, PAIRS, PROMPTS  # tests/ is on sys.path (pytest prepends it)

from dpo_lab import pipeline
from dpo_lab.batching import rankings_from_candidates
from dpo_lab.dpo_trainer import pair_logprobs
from dpo_lab.presets import get_preset
from dpo_lab.run import dpo_run, read_metrics, reference_logprobs

# Keys computed with the code as it was before average_logprobs and rpo_alpha existed (the cached runs'
# folders and run.json keys): they must not move. Update only with a deliberate change of a preset value.
# 8 rankings of K = 4, listed unsorted (the rewards decide the order): 2 per prompt.
_CANDIDATES = {
    "prompts": [p for p in PROMPTS for _ in range(2)],
    "completions": [[BAD[o], GOOD[o], BAD[o + 2], GOOD[o + 2]] for _ in PROMPTS for o in range(2)],
    "rewards": [[0.1, 0.9, 0.2, 0.8] for _ in PROMPTS for _ in range(2)],
}
RANKINGS, RANKING_STATS = rankings_from_candidates(_CANDIDATES["prompts"], _CANDIDATES["completions"],
                                                   _CANDIDATES["rewards"])
# Same completions a step as CONFIG's 4 pairs x 2: 2 rankings x 4.
PL_CONFIG = dataclasses.replace(CONFIG, loss_type="plackett_luce", batch_size=2, micro_batch_size=1)


def _train(policy, reference, tokenizer, data, tmp_path: Path, name: str, config, beta: float = 0.1):
    return dpo_run(policy, reference, tokenizer, data, beta=beta, config=config, seed=0, max_length=32,
                     out_dir=tmp_path / name, ref_cache_dir=tmp_path / "cache", progress=False, device="cpu")


# ------------------------------------------------------------------------------------------------- keys
def test_every_variant_setting_gets_its_own_run_folder() -> None:
    variants = [{}, {"dpo.loss_type": "ipo"}, {"dpo.loss_type": "ipo", "dpo.average_logprobs": True},
                {"dpo.average_logprobs": True}, {"dpo.rpo_alpha": 1.0}, {"dpo.rpo_alpha": 0.5},
                {"dpo.label_smoothing": 0.1}, {"dpo.loss_type": "hinge"},
                {"dpo.loss_type": "plackett_luce", "dpo.batch_size": 8, "dpo.micro_batch_size": 4}]
    names = [pipeline.run_dir(get_preset("smoke", **v), "DPO", 0.1).name for v in variants]
    assert len(set(names)) == len(names)
    same = get_preset("smoke", **{"dpo.rpo_alpha": 0, "dpo.average_logprobs": False})  # the defaults
    assert pipeline.run_dir(same, "DPO", 0.1).name == names[0]


def test_reference_cache_keys_sum_and_mean_apart(tiny_model, tiny_tokenizer, tmp_path):
    args = {"max_length": 32, "cache_dir": tmp_path, "batch_size": 8, "progress": False, "device": "cpu"}
    summed = reference_logprobs(tiny_model, tiny_tokenizer, PAIRS, **args)
    mean = reference_logprobs(tiny_model, tiny_tokenizer, PAIRS, average=True, **args)
    assert len(list(tmp_path.glob("ref-logps-*.safetensors"))) == 2
    for side, total, avg in (("chosen", summed[:, 0], mean[:, 0]), ("rejected", summed[:, 1], mean[:, 1])):
        lengths = torch.tensor([len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
                                for t in PAIRS[side]], dtype=torch.float32)
        torch.testing.assert_close(avg, total / lengths)


# -------------------------------------------------------------------------------------------- rankings
def test_rankings_sort_by_reward_and_drop_ties_and_empty_samples() -> None:
    assert RANKINGS["completions"][0] == [GOOD[0], GOOD[2], BAD[2], BAD[0]]
    assert RANKING_STATS == {"n_prompts": 8, "n_rankings": 8, "n_tied": 0, "n_empty": 0}
    rankings, stats = rankings_from_candidates(["a", "b", "c"], [["x", "y"], ["x", ""], ["x", "y"]],
                                               [[0.2, 0.2], [0.1, 0.9], [0.3, 0.7]])
    assert rankings == {"prompt": ["c"], "completions": [["y", "x"]]}
    assert stats == {"n_prompts": 3, "n_rankings": 1, "n_tied": 1, "n_empty": 1}


def test_ranking_logprobs_of_two_completions_are_the_pair_logprobs(tiny_model, tiny_tokenizer):
    rankings = {"prompt": PAIRS["prompt"], "completions": list(zip(PAIRS["chosen"], PAIRS["rejected"],
                                                                    strict=True))}
    ranked = pair_logprobs(tiny_model, tiny_tokenizer, rankings, max_length=32, batch_size=5, device="cpu")
    pairs = pair_logprobs(tiny_model, tiny_tokenizer, PAIRS, max_length=32, batch_size=5, device="cpu")
    assert ranked.shape == pairs.shape == (16, 2)
    torch.testing.assert_close(ranked, pairs, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ tiny training runs
def test_ipo_on_per_token_means_starts_at_its_target_and_learns(tiny_model, tiny_tokenizer, tmp_path):
    beta = 2.0  # target per-token margin 1/(2 beta) = 0.25 nats
    config = dataclasses.replace(CONFIG, loss_type="ipo", average_logprobs=True)
    result = _train(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, PAIRS, tmp_path, "ipo", config,
                    beta)
    records = read_metrics(result.metrics_path)
    assert records[0]["loss"] == pytest.approx(1 / (4 * beta**2), abs=1e-6)  # (0 - 1/(2 beta))^2 at step 1
    assert records[-1]["loss"] < records[0]["loss"]
    fields = json.loads((tmp_path / "ipo" / "run.json").read_text())["fields"]
    assert fields["config"]["average_logprobs"] is True and fields["config"]["rpo_alpha"] == 0.0
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 1  # the mean-keyed entry


def test_rpo_adds_the_per_token_nll_to_the_first_loss(tiny_model, tiny_tokenizer, tmp_path):
    alpha = 1.0
    config = dataclasses.replace(CONFIG, rpo_alpha=alpha)
    result = _train(tiny_model, copy.deepcopy(tiny_model), tiny_tokenizer, PAIRS, tmp_path, "rpo", config)
    first, last = read_metrics(result.metrics_path)[0], read_metrics(result.metrics_path)[-1]
    assert first["loss"] == pytest.approx(math.log(2) + alpha * first["nll/chosen_per_token"], abs=1e-5)
    assert last["nll/chosen_per_token"] < first["nll/chosen_per_token"]  # the NLL term pulls y_w up
    assert json.loads((tmp_path / "rpo" / "run.json").read_text())["fields"]["config"]["rpo_alpha"] == alpha


def test_plackett_luce_trains_on_rankings_with_a_cached_reference(tiny_model, tiny_tokenizer, tmp_path):
    reference = copy.deepcopy(tiny_model)
    result = _train(copy.deepcopy(tiny_model), reference, tiny_tokenizer, RANKINGS, tmp_path, "pl", PL_CONFIG)
    records = read_metrics(result.metrics_path)
    assert records[0]["loss"] == pytest.approx(math.log(24), abs=1e-5)  # uniform over the 4! orders
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["rewards/margins"] > 0
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 1

    def forbid(*_: object) -> None:
        raise AssertionError("the reference must come from the cache")
    reference.register_forward_pre_hook(forbid)
    _train(copy.deepcopy(tiny_model), reference, tiny_tokenizer, RANKINGS, tmp_path, "pl-b1", PL_CONFIG, 1.0)
    with pytest.raises(ValueError, match="not to loss_type 'plackett_luce'"):
        _train(tiny_model, reference, tiny_tokenizer, RANKINGS, tmp_path, "bad",
               dataclasses.replace(PL_CONFIG, rpo_alpha=1.0))
    for data, config in ((PAIRS, PL_CONFIG), (RANKINGS, CONFIG)):  # the data must match the loss
        with pytest.raises(ValueError, match="'plackett_luce' trains on rankings"):
            _train(tiny_model, reference, tiny_tokenizer, data, tmp_path, "mismatch", config)


def test_variant_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="dpo.rpo_alpha must be >= 0"):
        get_preset("smoke", **{"dpo.rpo_alpha": -1.0})
    with pytest.raises(ValueError, match="most rankings"):
        get_preset("smoke", **{"dpo.loss_type": "plackett_luce", "dpo.batch_size": 64,
                               "dpo.micro_batch_size": 8})
    with pytest.raises(ValueError, match="label_smoothing"):
        get_preset("smoke", **{"dpo.loss_type": "plackett_luce", "dpo.label_smoothing": 0.1})
    with pytest.raises(TypeError, match="average_logprobs"):
        get_preset("smoke", **{"dpo.average_logprobs": 1})


def test_likelihood_trace_refuses_rankings() -> None:
    with pytest.raises(ValueError, match="trains on rankings"):
        pipeline.likelihood_trace(get_preset("smoke", **{"dpo.loss_type": "plackett_luce"}), 0.1)
