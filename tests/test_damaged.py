"""Damaged files: every read of a truncated, corrupt or edited file names the file and says what to do."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
from safetensors.torch import save_file

from dpo_lab import pipeline
from dpo_lab.cache import cached_directory, write_manifest
from dpo_lab.pipeline import load_candidates, load_preferences, save_preferences
from dpo_lab.preferences import FEATURES
from dpo_lab.presets import get_preset
from dpo_lab.reward_model import LearnedReward, ScalarRewardModel
from dpo_lab.run import load_policy, load_reward_model, reference_logprobs, save_policy, save_reward_model


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("victim", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_truncated_saved_policy_names_the_file(tiny_model, tiny_tokenizer, tmp_path: Path, victim: str):
    folder = save_policy(tiny_model, tiny_tokenizer, tmp_path / "policy")
    _truncate(folder / victim)
    with pytest.raises(ValueError, match=re.escape(f"{folder / victim} is truncated or corrupt")) as info:
        load_policy(folder)
    assert f"delete {folder} and save the policy again" in str(info.value)
    with pytest.raises(ValueError, match="delete the stage"):
        load_policy(folder, advice="delete the stage")


# ------------------------------------------------------------------------------------------------ pairs
def _pairs() -> datasets.Dataset:
    rows = {"prompt": ["The film", "A movie"] * 20, "chosen": [" great", " fine"] * 20,
            "rejected": [" bad", " awful"] * 20, "chosen_reward": [0.9, 0.8] * 20,
            "rejected_reward": [0.1, 0.2] * 20}
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def test_a_truncated_arrow_file_of_the_pairs_is_named(tmp_path: Path):
    path = save_preferences(_pairs(), tmp_path / "prefs")
    (arrow,) = (path / "pairs").glob("*.arrow")
    _truncate(arrow)
    with pytest.raises(ValueError, match=re.escape(f"{arrow} is truncated or corrupt")) as info:
        load_preferences(path)
    assert f"delete {path} and build the pairs again" in str(info.value)
    path = save_preferences(_pairs(), tmp_path / "prefs")
    _truncate(path / "pairs" / "state.json")
    with pytest.raises(ValueError, match=re.escape("state.json is truncated or corrupt")):
        load_preferences(path, advice="delete it")


def test_a_bad_row_of_saved_pairs_names_the_folder_and_row(tmp_path: Path):
    rows = _pairs().to_dict()
    rows["chosen"][3] = None
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad'}: row 3: chosen is missing (None)")):
        load_preferences(tmp_path / "bad")


def test_truncated_candidates_are_named(tmp_path: Path):
    candidates = {"prompts": ["p"], "completions": [[" a", " b"]], "rewards": [[0.1, 0.2]]}
    path = save_preferences(_pairs(), tmp_path / "prefs", candidates=candidates)
    _truncate(path / "candidates.json")
    with pytest.raises(ValueError, match=re.escape(f"{path / 'candidates.json'} is truncated or corrupt")):
        load_candidates(path)


# ------------------------------------------------------------------------------- reference log-prob cache
def _reference_cache(tiny_model, tiny_tokenizer, cache: Path) -> tuple[Path, Callable[[], object]]:
    pairs = {"prompt": ["The film", "A movie"], "chosen": [" great", " fine"], "rejected": [" bad", " awful"]}
    args = {"max_length": 32, "cache_dir": cache, "batch_size": 2, "device": "cpu", "progress": False}
    reference_logprobs(tiny_model, tiny_tokenizer, pairs, **args)
    (path,) = cache.glob("ref-logps-*.safetensors")
    return path, lambda: reference_logprobs(tiny_model, tiny_tokenizer, pairs, **args)


def test_a_truncated_reference_cache_is_named(tiny_model, tiny_tokenizer, tmp_path: Path):
    path, read = _reference_cache(tiny_model, tiny_tokenizer, tmp_path / "cache")
    read()  # intact: read back
    _truncate(path)
    with pytest.raises(ValueError, match=re.escape(f"reference cache {path} is truncated or corrupt")) as err:
        read()
    assert "delete it to recompute" in str(err.value)


def test_an_edited_reference_cache_is_refused(tiny_model, tiny_tokenizer, tmp_path: Path):
    """A valid safetensors file with other values (same size) is caught by the checksum in its metadata."""
    from safetensors import safe_open

    path, read = _reference_cache(tiny_model, tiny_tokenizer, tmp_path / "cache")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file({**tensors, "chosen": tensors["chosen"] + 1.0}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=re.escape(f"reference cache {path} was changed after it was")):
        read()


# ------------------------------------------------------------------------------------- pipeline stages
@pytest.fixture()
def artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DPO_LAB_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def test_a_damaged_sft_stage_says_which_folder_to_delete(tiny_model, tiny_tokenizer, artifacts: Path):
    preset = get_preset("smoke")

    def build(folder: Path) -> None:  # what pipeline.sft_policy's build writes, from the tiny model
        save_policy(tiny_model, tiny_tokenizer, folder / "policy")
        (folder / "report.json").write_text(json.dumps({"parameters": 1}))

    folder = cached_directory(pipeline.stage_dir("sft", pipeline.sft_key(preset)), build)
    _, _, report = pipeline.sft_policy(preset)  # intact: reused as is
    assert report == {"parameters": 1}
    _truncate(folder / "policy" / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"delete {folder} to rebuild it")) as info:
        pipeline.sft_policy(preset)  # the manifest catches it, before the weights are read
    assert "model.safetensors is truncated" in str(info.value)
    write_manifest(folder)  # damage the manifest does not see (written after it): the loader names it
    with pytest.raises(ValueError, match=re.escape(f"delete {folder} to rebuild the SFT stage")) as info:
        pipeline.sft_policy(preset)
    assert "model.safetensors is truncated or corrupt" in str(info.value)


def _start_eval(monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[int]]:
    calls = []

    def make_eval_fn(*args, **kwargs):
        def evaluate(policy, step):
            calls.append(step)
            return {"reward_mean": np.float64(0.25), "kl_mean": 0.0, "n": 4}
        return evaluate

    monkeypatch.setattr(pipeline, "reward_model", lambda preset: (None, {}))
    monkeypatch.setattr(pipeline, "prompts", lambda *args: [])
    monkeypatch.setattr(pipeline, "make_eval_fn", make_eval_fn)
    return pipeline.run_eval_fn(get_preset("smoke"), None, None), calls


def test_the_start_evaluation_is_stored_with_a_checksum(monkeypatch: pytest.MonkeyPatch, artifacts: Path):
    eval_fn, calls = _start_eval(monkeypatch)
    first = eval_fn(None, 0)
    assert eval_fn(None, 0) == first and calls == [0]  # evaluated once, then read back
    (path,) = (artifacts / "start-eval").glob("*.json")
    saved = json.loads(path.read_text())
    assert saved["point"] == {"reward_mean": 0.25, "kl_mean": 0.0, "n": 4} and path.stem == saved["key"]
    # Edited but valid JSON: used silently before; now refused, naming the file.
    path.write_text(json.dumps({**saved, "point": {**saved["point"], "reward_mean": 0.99}}))
    with pytest.raises(ValueError, match=re.escape(f"{path} was changed after it was written")) as info:
        eval_fn(None, 0)
    assert "delete it to evaluate the start again" in str(info.value)
    path.write_text(json.dumps(saved)[:20])  # truncated
    with pytest.raises(ValueError, match=re.escape(f"{path} is truncated or corrupt")):
        eval_fn(None, 0)
    path.write_text(json.dumps(saved["point"]))  # valid JSON without its key and checksum
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt: expected a JSON object with keys")):
        eval_fn(None, 0)
    path.unlink()  # as the message says: evaluated again and rewritten
    assert eval_fn(None, 0) == first and calls == [0, 0]
    assert json.loads(path.read_text()) == saved


# ------------------------------------------------------------------------------------------ figures folder
def test_a_read_only_figures_folder_fails_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from dpo_lab import reproduce

    figures = tmp_path / "figures"
    figures.mkdir()
    figures.chmod(0o555)
    monkeypatch.setenv("DPO_LAB_FIGURES", str(figures))
    if os.access(figures, os.W_OK):  # root writes anywhere: stand in for a read-only file system
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)

    def stage(*args, **kwargs):
        raise AssertionError("a stage ran before the figures folder was checked")

    monkeypatch.setattr(pipeline, "sft_policy", stage)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"cannot write to {figures}")) as info:
            reproduce.reproduce(get_preset("smoke"), progress=False)
    finally:
        figures.chmod(0o755)
    assert "set DPO_LAB_FIGURES to a folder you can write" in str(info.value)


def test_a_truncated_checkpoint_is_named_with_what_to_do(tmp_path) -> None:
    import torch
    from torch import nn

    from dpo_lab.run import TRAINER_STATE, checkpoint_path, latest_checkpoint, load_weights

    folder = checkpoint_path(tmp_path, 3)
    folder.mkdir(parents=True)
    torch.save({"step": 3, "run_key": "k"}, folder / TRAINER_STATE)
    (folder / TRAINER_STATE).write_bytes((folder / TRAINER_STATE).read_bytes()[:20])
    with pytest.raises(ValueError, match=r"trainer_state.pt is truncated or corrupt.*delete"):
        latest_checkpoint(tmp_path, "k", 5)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(ValueError, match=r"model.safetensors is truncated or corrupt.*delete"):
        load_weights(nn.Linear(2, 2), folder)


@pytest.mark.parametrize("victim", ["model.safetensors", "reward_config.json", "tokenizer.json"])
def test_a_truncated_reward_model_names_the_file(tiny_model, tiny_tokenizer, tmp_path: Path, victim: str):
    folder = tmp_path / "reward-model"
    save_reward_model(LearnedReward(ScalarRewardModel.from_policy(tiny_model), tiny_tokenizer), folder)
    _truncate(folder / victim)
    with pytest.raises(ValueError, match=re.escape(f"{folder / victim} is truncated or corrupt")) as info:
        load_reward_model(folder)
    assert f"delete {folder} to train the reward model again" in str(info.value)


# ------------------------------------------------------------------------------ r* and r_phi in reproduce
def _reproduce_stops_naming(monkeypatch, capsys, words: list[str]) -> None:
    """``python -m dpo_lab reproduce`` ends with one line naming the file and what to delete: exit 1, no
    traceback (a worker's error used to end it as a chain of tracebacks led by the raw SafetensorError)."""
    from dpo_lab.__main__ import main

    monkeypatch.setenv("DPO_LAB_FIGURES", str(Path(os.environ["DPO_LAB_ARTIFACTS"]).parent / "figures"))
    assert main(["reproduce", "--preset", "smoke", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err


def test_a_damaged_rstar_classifier_ends_reproduce_naming_it(artifacts: Path, monkeypatch, capsys):
    from dpo_lab.rewards import TfidfSentimentReward

    preset = get_preset("smoke")

    def build(folder: Path) -> None:  # what pipeline.reward_model's build writes, from six reviews
        texts = ["a great movie", "an awful film", "great acting", "awful plot", "a great cast", "awful"] * 2
        reward = TfidfSentimentReward.from_config(preset.reward).fit(texts, [1, 0] * 6)
        pipeline.save_tfidf_reward(reward, folder / "reward")
        (folder / "report.json").write_text(json.dumps({"n_test": 0}))

    folder = cached_directory(pipeline.stage_dir("reward", pipeline.reward_key(preset)), build)
    _truncate(folder / "reward" / "arrays.npz")
    monkeypatch.setattr(pipeline, "sft_policy", lambda *args, **kwargs: (None, None, {}))
    _reproduce_stops_naming(monkeypatch, capsys, [f"{folder / 'reward' / 'arrays.npz'} is truncated",
                                                  f"delete {folder} to rebuild it"])


def test_a_truncated_reward_model_ends_reproduce_naming_it(tiny_model, tiny_tokenizer, artifacts: Path,
                                                           monkeypatch, capsys):
    import pickle

    folder = artifacts / "reward-model-0123456789abcdef"
    save_reward_model(LearnedReward(ScalarRewardModel.from_policy(tiny_model), tiny_tokenizer), folder)
    _truncate(folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        load_reward_model(folder)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # as a worker process sends it

    def stage(*args, **kwargs):  # r_phi is loaded inside a frontier worker; its error reaches main as is
        raise info.value

    monkeypatch.setattr(pipeline, "sft_policy", stage)
    _reproduce_stops_naming(monkeypatch, capsys, [f"{folder / 'model.safetensors'} is truncated",
                                                  f"delete {folder} to train the reward model again"])
