"""preferences.py: all C(k,2) pairs per prompt, ties counted, validation, the sampling pipeline; and their
save/load in pipeline.py."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_lab.pipeline import load_candidates, load_preferences, save_preferences
from dpo_lab.preferences import (
    build_preference_pairs,
    generate_preference_data,
    score_samples,
    validate_preferences,
)
from dpo_lab.presets import PreferenceConfig

POSITIVE = ("great", "loved", "wonderful", "excellent", "brilliant")


def word_reward(texts: Sequence[str]) -> np.ndarray:
    """Test double for r*: share of positive words, plus a tiny text-dependent term to break ties."""
    out = []
    for t in texts:
        words = t.lower().split()
        share = sum(w.strip(".,;!") in POSITIVE for w in words) / max(len(words), 1)
        out.append(0.9 * share + 0.1 * (sum(map(ord, t)) % 997) / 997)
    return np.asarray(out)


def test_all_six_pairs_with_the_winner_first():
    completions = [[" a", " b", " c", " d"]]
    ds, stats = build_preference_pairs(["x"], completions, [[0.2, 0.9, 0.5, 0.1]])
    assert len(ds) == 6 and stats.n_pairs == 6 and stats.n_ties == 0 and stats.n_candidates == 6
    assert ds.column_names == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]
    assert all(w > l for w, l in zip(ds["chosen_reward"], ds["rejected_reward"], strict=True))
    order = {" b": 0, " c": 1, " a": 2, " d": 3}  # by reward, best first
    assert {(c, r) for c, r in zip(ds["chosen"], ds["rejected"], strict=True)} == \
        {(a, b) if order[a] < order[b] else (b, a) for a, b in combinations(order, 2)}
    assert stats.gap_quantiles["q1"] == pytest.approx(0.8) and stats.gap_quantiles["q0"] == pytest.approx(0.1)


def test_ties_identical_and_empty_are_dropped_and_counted():
    completions = [[" a", " b", " c", " d"], [" same", " same", "", " e"]]
    rewards = [[0.5, 0.5, 0.7, 0.1], [0.3, 0.4, 0.9, 0.2]]
    ds, stats = build_preference_pairs(["x", "y"], completions, rewards)
    assert stats.n_ties == 1 and stats.n_identical == 1 and stats.n_empty == 3
    assert stats.n_pairs == len(ds) == 12 - 5
    assert "" not in list(ds["chosen"]) + list(ds["rejected"])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=2, max_size=5), min_size=1,
                max_size=4))
def test_pair_accounting_property(rewards):
    completions = [[f" c{i}-{j}" for j in range(len(r))] for i, r in enumerate(rewards)]
    ds, stats = build_preference_pairs([f"p{i}" for i in range(len(rewards))], completions, rewards)
    ties = sum(a == b for r in rewards for a, b in combinations(r, 2))
    assert stats.n_ties == ties
    candidates = sum(len(r) * (len(r) - 1) // 2 for r in rewards)
    assert stats.n_pairs + stats.n_ties == stats.n_candidates == candidates
    assert all(w > l for w, l in zip(ds["chosen_reward"], ds["rejected_reward"], strict=True))


@pytest.mark.parametrize(("completions", "rewards", "match"), [
    ([[" a", " b"]], [[0.1]], "prompt 0 has 2 completions but 1 rewards"),
    ([[" a", " b"], [" c"]], [[0.1, 0.2]], "rewards has 1 entries but there are 1 prompts|completions has 2"),
    ([[" a", " b"]], [[0.1, float("nan")]], "non-finite reward"),
])
def test_build_rejects_inconsistent_input(completions, rewards, match):
    with pytest.raises(ValueError, match=match):
        build_preference_pairs(["x"], completions, rewards)


def test_save_load_round_trip(tmp_path):
    ds, stats = build_preference_pairs(["x", "y"], [[" a", " b", " c"], [" d", " e", " f"]],
                                       [[0.1, 0.2, 0.3], [0.6, 0.5, 0.4]])
    path = save_preferences(ds, tmp_path / "prefs", stats=stats)
    assert (path / "stats.json").is_file()
    back = load_preferences(path)
    assert back.to_dict() == ds.to_dict()


def _bad(tmp_path, drop: str | None = None, **changes) -> str:
    rows = {"prompt": ["The film", "A movie"], "chosen": [" great", " fine"], "rejected": [" bad", " awful"],
            "chosen_reward": [0.9, 0.8], "rejected_reward": [0.1, 0.2]}
    rows.update(changes)
    rows.pop(drop or "", None)
    path = tmp_path / "bad"
    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(("changes", "match"), [
    ({"drop": "chosen_reward"}, r"missing column\(s\) \['chosen_reward'\]"),
    ({"rejected": [" bad", ""]}, "row 1: empty rejected"),
    ({"prompt": ["", "A movie"]}, "row 0: empty prompt"),
    ({"rejected": [" great", " awful"]}, "row 0: chosen is identical to rejected"),
    ({"rejected_reward": [0.1, 0.95]}, "row 1: chosen_reward 0.8 < rejected_reward 0.95"),
])
def test_load_names_the_problem(tmp_path, changes, match):
    path = _bad(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        load_preferences(path)


def test_validate_checks_prompt_length_against_the_context(tmp_path, tiny_tokenizer):
    ds = load_preferences(_bad(tmp_path, prompt=["The film", "A movie that goes on and on and on and on"]))
    validate_preferences(ds, tokenizer=tiny_tokenizer, max_length=64)
    with pytest.raises(ValueError, match="row 1: prompt longer than the context"):
        validate_preferences(ds, tokenizer=tiny_tokenizer, max_length=6)
    with pytest.raises(TypeError, match="both tokenizer and max_length"):
        validate_preferences(ds, tokenizer=tiny_tokenizer)


def test_save_refuses_invalid_data_and_writes_nothing(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["x"], "chosen": [" a"], "rejected": [" a"],
                                     "chosen_reward": [0.5], "rejected_reward": [0.4]})
    with pytest.raises(ValueError, match="row 0: chosen is identical"):
        save_preferences(ds, tmp_path / "prefs")
    assert not (tmp_path / "prefs").exists()
    assert list(tmp_path.iterdir()) == []


def test_score_samples_scores_prompt_plus_completion():
    seen: list[str] = []

    def reward(texts):
        seen.extend(texts)
        return np.linspace(0, 1, len(texts))

    scores = score_samples(reward, ["A", "B"], [[" x", " y"], [" z"]])
    assert seen == ["A x", "A y", "B z"] and scores == [[0.0, 0.5], [1.0]]
    with pytest.raises(ValueError, match="returned 2 scores for 3 texts"):
        score_samples(lambda t: np.zeros(2), ["A", "B"], [[" x", " y"], [" z"]])


def test_generate_preference_data(tiny_model, tiny_tokenizer):
    config = PreferenceConfig(samples_per_prompt=4, max_new_tokens=4, sample_batch_size=8)
    prompts = ["This movie was", "A terrible", "The music"]
    ds, stats, candidates = generate_preference_data(tiny_model, tiny_tokenizer, prompts, word_reward, config,
                                                     seed=0, progress=False)
    assert [len(c) for c in candidates["completions"]] == [4, 4, 4]
    first = prompts[0] + candidates["completions"][0][0]
    assert candidates["rewards"][0][0] == pytest.approx(word_reward([first])[0])
    assert stats.n_prompts == 3 and stats.n_candidates == 18
    assert stats.n_pairs + stats.n_ties + stats.n_identical + stats.n_empty == 18 and stats.n_pairs > 10
    assert set(ds["prompt"]) <= set(prompts)
    np.testing.assert_allclose(word_reward([p + c for p, c in zip(ds["prompt"], ds["chosen"], strict=True)]),
                               ds["chosen_reward"])
    again, _, _ = generate_preference_data(tiny_model, tiny_tokenizer, prompts, word_reward, config, seed=0,
                                        progress=False)
    assert again.to_dict() == ds.to_dict()


def test_candidates_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    config = PreferenceConfig(samples_per_prompt=4, max_new_tokens=4, sample_batch_size=8)
    ds, stats, candidates = generate_preference_data(tiny_model, tiny_tokenizer, ["This movie was"],
                                                     word_reward, config, seed=0, progress=False)
    with pytest.raises(FileNotFoundError, match="candidates.json"):
        load_candidates(save_preferences(ds, tmp_path / "without", stats=stats))
    assert load_candidates(save_preferences(ds, tmp_path / "with", candidates=candidates)) == candidates


def test_pairs_without_rewards_validate_only_when_asked():
    ds = datasets.Dataset.from_dict({"prompt": ["A"], "chosen": [" good"], "rejected": [" bad"]})
    with pytest.raises(ValueError, match="chosen_reward"):
        validate_preferences(ds)
    validate_preferences(ds, require_rewards=False)
    same = datasets.Dataset.from_dict({"prompt": ["A"], "chosen": [" x"], "rejected": [" x"]})
    with pytest.raises(ValueError, match="identical"):
        validate_preferences(same, require_rewards=False)


def test_a_missing_or_mistyped_text_is_named_as_such():
    """A None or a number used to be reported as an "empty" text."""
    rows = {"prompt": ["x", "y"], "chosen": [" a", None], "rejected": [" b", " c"]}
    with pytest.raises(ValueError, match=r"row 1: chosen is missing \(None\)"):
        validate_preferences(datasets.Dataset.from_dict(rows), require_rewards=False)
    rows = {"prompt": ["x", "y"], "chosen": [" a", " d"], "rejected": [" b", " c"],
            "chosen_reward": [0.9, None], "rejected_reward": [0.1, 0.2]}
    with pytest.raises(ValueError, match=r"row 1: rewards must be numbers, got chosen None"):
        validate_preferences(datasets.Dataset.from_dict(rows))
