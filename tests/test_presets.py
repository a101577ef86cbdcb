import dataclasses
import json
import re
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from dpo_lab import presets
from dpo_lab.__main__ import main
from dpo_lab.presets import PRESETS, Preset, get_preset, parse_overrides


def test_every_preset_is_printable_and_named():
    for name, preset in PRESETS.items():
        assert preset.name == name
        text = preset.describe()
        assert text.startswith(f"preset {name}:") and "{}" not in text
        for section in (f.name for f in dataclasses.fields(Preset)[2:]):
            assert f"\n{section}: " in text  # every section has a titled group


def test_every_preset_sets_every_field_explicitly(tmp_path: Path):
    """presets.yaml names every field of every section of every preset; a file that leaves one out (so that
    its value would come from a dataclass default) or names an unknown one is refused, naming it."""
    raw = yaml.safe_load(presets.PRESETS_FILE.read_text())
    sections = {name: cls for name, cls in get_type_hints(Preset).items() if dataclasses.is_dataclass(cls)}
    assert list(raw) == list(PRESETS) == ["paper", "cpu", "smoke"]
    for name, entry in raw.items():
        assert set(entry) == {"seed", *sections}
        for section, cls in sections.items():
            assert set(entry[section]) == {f.name for f in dataclasses.fields(cls)}, (name, section)
    del raw["cpu"]["dpo"]["label_smoothing"]
    raw["smoke"]["ppo"]["gamma_typo"] = 1.0
    for broken, words in ((raw, "cpu.dpo must set every field; missing ['label_smoothing']"),
                          ({"smoke": raw["smoke"]}, "unknown ['gamma_typo']")):
        path = tmp_path / "presets.yaml"
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match=re.escape(words)):
            presets.load_presets(path)


def test_describe_reads_back_through_set():
    """Each printed ``key = value`` is what ``--set key=value`` reads back: set them all, get the preset."""
    for name, preset in PRESETS.items():
        lines = [line.split("#")[0].partition(" = ") for line in preset.describe().splitlines()
                 if line.startswith("  ")]
        pairs = [f"{key.strip()}={value.strip()}" for key, _, value in lines]
        assert len(pairs) == len(preset.settings())
        assert get_preset(name, **parse_overrides(pairs)) == preset


def test_describe_marks_values_that_differ_from_paper():
    lines = PRESETS["cpu"].describe().splitlines()
    cpu = {line.split("=")[0].strip(): line for line in lines if " = " in line}
    assert cpu["dpo.lr"].endswith("# paper: 1e-06")
    assert cpu["dpo.betas"].endswith("# paper: [0.05, 0.1, 1.0, 5.0]")
    assert "#" not in cpu["dpo.optimizer"]  # rmsprop in both
    assert cpu["policy.hub_name"].endswith("# unused with policy.source=scratch")
    paper = PRESETS["paper"].describe()
    assert "# paper:" not in paper and "unused with policy.source=hub" in paper
    assert "dpo.lr" in get_preset("paper", **{"dpo.lr": 1e-5}).describe().split("# paper: 1e-06")[0]


def test_cli_prints_the_description_or_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["preset", "cpu", "--set", "dpo.lr=1e-5"]) == 0
    assert capsys.readouterr().out.strip() == get_preset("cpu", **{"dpo.lr": 1e-5}).describe()
    assert main(["preset", "cpu", "--json", "--set", "dpo.lr=1e-5"]) == 0
    expected = json.loads(json.dumps(get_preset("cpu", **{"dpo.lr": 1e-5}).to_dict()))  # tuples as lists
    assert json.loads(capsys.readouterr().out) == expected


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
