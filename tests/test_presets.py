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
    assert list(raw) == list(PRESETS) == ["paper", "cpu", "smoke", "gpu"]
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
    lr = get_preset("smoke", **{"dpo.lr": 1}).dpo.lr
    assert lr == 1.0 and type(lr) is float  # stage keys hash 1 and 1.0 differently


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


# ------------------------------------------------------------------------- one validation, before any work
@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"dpo.betas": [-0.1]}, "dpo.betas[0] must be > 0, got -0.1"),
        ({"dpo.betas": [0.1, float("nan")]}, "dpo.betas[1] must be a finite number, got nan"),
        ({"dpo.betas": []}, "dpo.betas must list at least one value"),
        ({"dpo.lr": 0}, "dpo.lr must be > 0, got 0.0"),
        ({"dpo.lr": float("nan")}, "dpo.lr must be a finite number, got nan"),
        ({"ppo.lr": -1e-4}, "ppo.lr must be > 0"),
        ({"reward_model.lr": float("inf")}, "reward_model.lr must be a finite number"),
        ({"policy.sft_lr": 0.0}, "policy.sft_lr must be > 0"),
        ({"dpo.max_steps": 0}, "dpo.max_steps must be >= 1, got 0"),
        ({"baselines.max_steps": 0}, "baselines.max_steps must be >= 1 or null"),
        ({"dpo.batch_size": 0}, "dpo.batch_size must be >= 1"),
        ({"dpo.micro_batch_size": 5}, "dpo.micro_batch_size (5) must divide dpo.batch_size (16)"),
        ({"dpo.eval_every": 0}, "dpo.eval_every must be >= 1"),
        ({"ppo.checkpoint_every": 0}, "ppo.checkpoint_every must be >= 1"),
        ({"ppo.target_kls": [3.0, 0.0]}, "ppo.target_kls[1] must be > 0"),
        ({"ppo.target_kl": -1}, "ppo.target_kl must be > 0"),
        ({"baselines.unlikelihood_alphas": [-0.5]}, "baselines.unlikelihood_alphas[0] must be >= 0"),
        ({"data.test_fraction": 1.0}, "data.test_fraction must be > 0 and < 1, got 1.0"),
        ({"reward_model.val_fraction": 0}, "reward_model.val_fraction must be > 0 and < 0.5"),
        ({"preferences.prompt_min_tokens": 9}, "preferences.prompt_max_tokens must be >= "
                                                "preferences.prompt_min_tokens (9), got 8"),
        ({"policy.n_positions": 19, "reward_model.max_length": 19},
         "policy.n_positions must be >= preferences.prompt_max_tokens + preferences.max_new_tokens (20)"),
        ({"dpo.label_smoothing": 0.5}, "dpo.label_smoothing must be >= 0 and < 0.5"),
        ({"ppo.minibatch_size": 32}, "ppo.minibatch_size must be <= ppo.rollout_batch_size (16)"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(overrides, words):
    """Ranges, not just types, are checked by get_preset (so preset, sweep --dry-run, reproduce, execute and
    the notebooks refuse them up front), each error naming the field and the value."""
    with pytest.raises(ValueError, match=re.escape(words)):
        get_preset("smoke", **overrides)


def test_a_bad_value_in_a_list_is_the_only_error_named():
    with pytest.raises(ValueError) as error:
        get_preset("smoke", **{"dpo.betas": [0.1, -0.1]})
    assert str(error.value) == "dpo.betas[1] must be > 0, got -0.1"


def test_a_notebook_seed_may_come_as_a_whole_float():
    """frontier_run's ``value`` is a float parameter: Preferred-FT's seed 1 comes as 1.0; 1.5 is no seed."""
    assert presets.check_notebook_parameters({"preset": "smoke", "method": "Preferred-FT", "value": 1.0})
    with pytest.raises(TypeError, match=r"parameter 'value' expects int, got float \(1\.5\)"):
        presets.check_notebook_parameters({"preset": "smoke", "method": "Preferred-FT", "value": 1.5})


def test_every_preset_and_every_legitimate_override_validates():
    for preset in PRESETS.values():
        assert presets.validate(preset) is preset
    get_preset("smoke", **{"dpo.batch_size": 288, "dpo.micro_batch_size": 288, "ppo.target_kl": None,
                           "dpo.lr": 1, "dpo.max_grad_norm": float("inf"), "baselines.max_steps": None})


def test_an_absurd_batch_size_is_an_error_not_a_hang():
    """run.batch_indices wraps a batch larger than the pair set around it batch_size / n_pairs times: step 1
    then takes batch_size / micro_batch_size forward passes, so training sat at step 0 with no message."""
    words = ("dpo.batch_size must be <= the most pairs the preference stage can give (288 = "
             "preferences.n_prompts 48 x 6 pairs per prompt)")
    with pytest.raises(ValueError, match=re.escape(words)):
        get_preset("smoke", **{"dpo.batch_size": 8_000_000, "dpo.micro_batch_size": 8})
    with pytest.raises(ValueError, match=r"ppo\.rollout_batch_size must be <= preferences\.n_prompts \(48\)"):
        get_preset("smoke", **{"ppo.rollout_batch_size": 64})


def test_several_bad_values_are_named_together():
    with pytest.raises(ValueError, match=r"2 invalid settings: dpo\.lr must be > 0.*; ppo\.max_steps must"):
        get_preset("smoke", **{"dpo.lr": -1, "ppo.max_steps": 0})


def test_a_preset_built_by_hand_is_type_checked():
    smoke = PRESETS["smoke"]
    with pytest.raises(TypeError, match=r"dpo\.lr expects float, got str"):
        presets.validate(dataclasses.replace(smoke, dpo=dataclasses.replace(smoke.dpo, lr="1e-5")))
    with pytest.raises(TypeError, match=r"dpo\.betas expects"):
        presets.validate(dataclasses.replace(smoke, dpo=dataclasses.replace(smoke.dpo, betas=[0.1])))
    with pytest.raises(ValueError, match=r"eval\.batch_size must be >= 1"):
        presets.validate(dataclasses.replace(smoke, eval=dataclasses.replace(smoke.eval, batch_size=0)))


def test_a_section_checks_itself_when_made_or_replaced():
    """Trainers take sections built by hand (tests, notebook 06): each refuses a bad field when made, naming
    it and showing the value, and keeps every value as given (stage keys hash 1 and 1.0 differently)."""
    with pytest.raises(ValueError, match=re.escape("dpo.batch_size must be >= 1, got 0")):
        presets.DPOConfig(batch_size=0)
    with pytest.raises(ValueError, match=re.escape("2 invalid settings: ppo.target_kl must be > 0 or null, "
                                                   "got 0.0; ppo.lr must be > 0, got -1.0")):
        dataclasses.replace(presets.PPOConfig(), lr=-1, target_kl=0)
    with pytest.raises(TypeError, match=re.escape("reward_model.max_steps expects int | None, got float")):
        presets.RewardModelConfig(max_steps=1.5)
    assert type(presets.DPOConfig(lr=1).lr) is int and presets.DPOConfig(betas=(1, 2.0)).betas == (1, 2.0)


def test_presets_yaml_with_a_bad_range_names_the_file(tmp_path: Path):
    raw = yaml.safe_load(presets.PRESETS_FILE.read_text())
    raw["smoke"]["dpo"]["betas"] = [0.1, -1.0]
    path = tmp_path / "presets.yaml"
    path.write_text(yaml.safe_dump({"smoke": raw["smoke"]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: preset 'smoke': dpo.betas[1] must be > 0")):
        presets.load_presets(path)


def test_reproduce_and_sweep_refuse_a_bad_value_before_any_stage(monkeypatch, capsys):
    """``reproduce`` used to train SFT, build pairs and run DPO (minutes at cpu) before β ≤ 0 failed."""
    import time

    from dpo_lab import pipeline, reproduce
    from dpo_lab.scale import sweep

    def stage(*args, **kwargs):
        raise AssertionError("a stage ran before the configuration was checked")

    for name in ("sft_policy", "reward_model", "preference_data", "frontier", "result"):
        monkeypatch.setattr(pipeline, name, stage)
    monkeypatch.setattr(reproduce, "reproduce", stage)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--preset", "smoke", "--set", "dpo.betas=[0.1, -0.1]"])
    assert time.perf_counter() - start < 1.0
    assert exit_info.value.code == 2
    assert "dpo.betas[1] must be > 0, got -0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preset", "smoke", "--set", "dpo.max_steps=0"])
    assert "dpo.max_steps must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"dpo\.lr must be a finite number, got nan"):
        sweep.preset_spec("smoke", {"dpo.lr": float("nan")})  # what sweep --dry-run builds
