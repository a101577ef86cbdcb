import dataclasses

import pytest

from dpo_lab.presets import PRESETS, get_preset


def test_every_preset_is_printable_and_named():
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert f'"name": "{name}"' in preset.describe()


def test_dotted_override_changes_only_that_field():
    base = get_preset("cpu")
    changed = get_preset("cpu", **{"dpo.lr": 5e-5, "seed": 3})
    assert changed.dpo.lr == 5e-5 and changed.seed == 3
    assert dataclasses.replace(changed.dpo, lr=base.dpo.lr) == base.dpo
    assert changed.policy == base.policy


def test_int_is_accepted_for_a_float_field():
    assert get_preset("smoke", **{"dpo.lr": 1}).dpo.lr == 1.0


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"dpo.lrr": 1e-4}, KeyError, "dpo.lrr"),
        ({"nonsense.lr": 1e-4}, KeyError, "nonsense"),
        ({"dpo.max_steps": "ten"}, TypeError, "dpo.max_steps"),
        ({"dpo.max_steps": 1.5}, TypeError, "dpo.max_steps"),
        ({"dpo.loss_type": "squared"}, ValueError, "dpo.loss_type"),
        ({"lr": 1e-4}, KeyError, "lr"),
    ],
)
def test_bad_override_names_the_parameter(overrides, error, words):
    with pytest.raises(error, match=words):
        get_preset("cpu", **overrides)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("tiny")


def test_fixtures_build(tiny_tokenizer, tiny_model):
    ids = tiny_tokenizer("a great movie")["input_ids"]
    assert tiny_tokenizer.decode(ids) == "a great movie"
    assert tiny_model.config.vocab_size == len(tiny_tokenizer)


def test_optional_and_tuple_fields_are_typed():
    preset = get_preset("cpu", **{"ppo.target_kl": None, "reward_model.max_steps": 10,
                                  "baselines.preferred_ft_seeds": [0, 1, 2]})
    assert preset.ppo.target_kl is None and preset.reward_model.max_steps == 10
    assert preset.baselines.preferred_ft_seeds == (0, 1, 2)
    assert get_preset("cpu", **{"ppo.target_kl": 3}).ppo.target_kl == 3.0
    with pytest.raises(TypeError, match="preferred_ft_seeds"):
        get_preset("cpu", **{"baselines.preferred_ft_seeds": [0.5]})
    with pytest.raises(TypeError, match=r"max_train_reviews.*int \| None"):
        get_preset("cpu", **{"data.max_train_reviews": 1.5})
