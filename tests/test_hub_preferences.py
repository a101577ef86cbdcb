"""TL;DR and Anthropic-HH pairs (hub_tasks.load_task_pairs), offline: fixture files in the hub's schema and a
patched load_dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pytest

from dpo_lab.batching import PAIR_COLUMNS
from dpo_lab.preferences import validate_preferences
from dpo_lab.scale import hub_tasks as ht

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
TLDR = FIXTURES / "summarize_from_feedback"
HH = FIXTURES / "hh_rlhf"


def _raw(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(task: str, split: str, path: Path | None = None, **kwargs: Any) -> tuple[datasets.Dataset, dict]:
    return ht.load_task_pairs(task, split, data_dir=str(path or ""), progress=False, **kwargs)


def _check_counts(stats: dict[str, Any], pairs: datasets.Dataset) -> None:
    assert stats["kept"] == len(pairs)
    assert stats["read"] == stats["kept"] + sum(stats["skipped"].values())


def test_tldr_fixture_schema_counts_and_choice() -> None:
    pairs, stats = _load("tldr", "train", TLDR)
    assert pairs.column_names == list(PAIR_COLUMNS)
    assert stats["read"] == 6 and stats["kept"] == 3
    assert stats["skipped"] == {"not_reddit": 1, "empty_summary": 1, "identical": 1}
    _check_counts(stats, pairs)
    # Independently rebuild each kept pair from the raw hub-schema rows: chosen is summaries[choice].
    expected = {}
    for row in _raw(TLDR / "comparisons" / "train.jsonl"):
        info, texts = row["info"], [s["text"].strip() for s in row["summaries"]]
        if info["post"] is None or not all(texts) or texts[0] == texts[1]:
            continue
        prompt = (f"SUBREDDIT: r/{info['subreddit'].strip()}\nTITLE: {info['title'].strip()}\n"
                  f"POST: {info['post'].strip()}\nTL;DR:")
        expected[prompt] = (" " + texts[row["choice"]], " " + texts[1 - row["choice"]])
    got = {r["prompt"]: (r["chosen"], r["rejected"]) for r in pairs}
    assert got == expected
    assert any(c == 1 for c in (r["choice"] for r in _raw(TLDR / "comparisons" / "train.jsonl")))


def test_tldr_validation_split_and_unknown_split() -> None:
    pairs, stats = _load("tldr", "validation", TLDR)
    assert (stats["split"], stats["read"], stats["kept"]) == ("validation", 2, 2)
    _check_counts(stats, pairs)
    with pytest.raises(FileNotFoundError, match="'test'"):
        _load("tldr", "test", TLDR)


def test_tldr_hub_path_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fixture = datasets.Dataset.from_list(_raw(TLDR / "comparisons" / "validation.jsonl"))

    def fake_load_dataset(name: str, config: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, config, kwargs))
        return fixture

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, stats = _load("tldr", "validation")
    assert calls == [("openai/summarize_from_feedback", "comparisons", {"split": "validation"})]
    assert stats["source"] == "openai/summarize_from_feedback" and len(pairs) == 2


def test_hh_fixture_schema_and_counts() -> None:
    pairs, stats = _load("hh", "train", HH)
    assert pairs.column_names == list(PAIR_COLUMNS)
    assert stats["read"] == 6 and stats["kept"] == 3
    assert stats["skipped"] == {"no_assistant_turn": 0, "prompt_mismatch": 1, "empty_response": 1,
                                "identical": 1}
    _check_counts(stats, pairs)
    raw = {r["chosen"]: r["rejected"] for r in _raw(HH / "helpful-base" / "train.jsonl")}
    for r in pairs:  # prompt + response gives back both original dialogues
        assert raw[r["prompt"] + r["chosen"]] == r["prompt"] + r["rejected"]
        assert r["prompt"].endswith("\n\nAssistant:") and "\n\nAssistant:" not in r["chosen"]


def test_hh_multi_turn_prompt_split() -> None:
    dialogue = ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: An apple.")
    prompt, response = ht.split_dialogue(dialogue)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant:"
    assert response == " An apple."
    assert not ht.is_single_turn(prompt) and ht.is_single_turn("\n\nHuman: Hi\n\nAssistant:")
    assert ht.split_dialogue("\n\nHuman: no reply") is None
    pairs, _ = _load("hh", "train", HH)
    multi = [r for r in pairs if r["prompt"].count("\n\nHuman:") == 2]
    assert len(multi) == 1 and multi[0]["chosen"] == " Try a classic detective novel."


def test_hh_single_turn_only_counts_multi_turn() -> None:
    pairs, stats = _load("hh", "train", HH, hh_single_turn=True)
    assert stats["skipped"]["multi_turn"] == 1 and stats["kept"] == 2 and stats["single_turn_only"]
    assert all(ht.is_single_turn(p) for p in pairs["prompt"])
    _check_counts(stats, pairs)
    test_pairs, test_stats = _load("hh", "test", HH, hh_single_turn=True)
    assert (test_stats["read"], len(test_pairs)) == (2, 1)


def test_hh_hub_path_and_no_assistant_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
    calls = []

    def fake_load_dataset(name: str, config: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, config, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, stats = _load("hh", "test")
    assert calls == [("Anthropic/hh-rlhf", None, {"split": "test"})]
    assert stats["skipped"]["no_assistant_turn"] == 1 and pairs["chosen"] == [" Hello!"]


def test_missing_fields_are_named(tmp_path: Path) -> None:
    row = _raw(TLDR / "comparisons" / "validation.jsonl")[0]
    no_choice = {k: v for k, v in row.items() if k != "choice"}
    with pytest.raises(ValueError, match="'choice'"):
        _load("tldr", "train", _write_jsonl(tmp_path / "a.jsonl", [no_choice]))
    no_subreddit = {**row, "info": {k: v for k, v in row["info"].items() if k != "subreddit"}}
    with pytest.raises(ValueError, match="row 0: info lacks field 'subreddit'"):
        _load("tldr", "train", _write_jsonl(tmp_path / "b.jsonl", [no_subreddit]))
    no_text = {**row, "summaries": [{"policy": "ref"}, {"policy": "sup2"}]}
    with pytest.raises(ValueError, match=r"summaries\[0\] lacks field 'text'"):
        _load("tldr", "train", _write_jsonl(tmp_path / "c.jsonl", [no_text]))
    with pytest.raises(ValueError, match="'rejected'"):
        _load("hh", "train", _write_jsonl(tmp_path / "d.jsonl", [{"chosen": "x"}]))


def test_bad_choice_raises(tmp_path: Path) -> None:
    row = {**_raw(TLDR / "comparisons" / "validation.jsonl")[0], "choice": 2}
    with pytest.raises(ValueError, match="choice must be 0 or 1"):
        _load("tldr", "train", _write_jsonl(tmp_path / "e.jsonl", [row]))


def test_outputs_pass_project_validation(tiny_tokenizer: Any) -> None:
    tldr, _ = _load("tldr", "train", TLDR)
    hh, _ = _load("hh", "train", HH)
    for pairs in (tldr, hh):
        validate_preferences(pairs, tokenizer=tiny_tokenizer, max_length=512, require_rewards=False)
        with pytest.raises(ValueError, match="prompt longer than the context"):
            validate_preferences(pairs, tokenizer=tiny_tokenizer, max_length=4, require_rewards=False)
    same = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [" a"], "rejected": [" a"]})
    with pytest.raises(ValueError, match="identical"):
        validate_preferences(same, require_rewards=False)
    no_rejected = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [" a"]})
    with pytest.raises(ValueError, match="missing|lack"):
        validate_preferences(no_rejected, require_rewards=False)


# ------------------------------------------------------------------- own loaders: bad files and rows named
HH_ROW = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}


@pytest.mark.parametrize("text, words", [
    ("", "is empty"),
    ("\n \n", "is empty"),
    (json.dumps(HH_ROW) + "\n{not json\n", "line 2 is not valid JSON"),
    (json.dumps(HH_ROW) + "\n[1, 2]\n", "line 2 is not a JSON object"),
])
def test_an_empty_or_undecodable_file_is_named(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(text)  # used to give a bare StopIteration or DatasetGenerationError
    with pytest.raises(ValueError, match=re.escape(f"{path} {words}")):
        _load("hh", "train", path)


def test_hh_row_with_a_missing_key_or_wrong_type_is_named(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", [HH_ROW, {"chosen": HH_ROW["chosen"]}])
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 1: lacks field 'rejected'")):
        _load("hh", "train", path)
    path = _write_jsonl(tmp_path / "b.jsonl", [HH_ROW, {**HH_ROW, "rejected": 3}])
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 1: rejected must be a string, got int")):
        _load("hh", "train", path)  # a TypeError with no row before


def test_a_bad_row_is_named_in_its_own_file(tmp_path: Path) -> None:
    for subset in ("harmless-base", "helpful-base"):
        (tmp_path / subset).mkdir()
    _write_jsonl(tmp_path / "harmless-base" / "train.jsonl", [HH_ROW] * 3)
    bad = _write_jsonl(tmp_path / "helpful-base" / "train.jsonl", [HH_ROW, {**HH_ROW, "chosen": None}])
    with pytest.raises(ValueError, match=re.escape(f"{bad}, row 1: lacks field 'chosen'")):
        _load("hh", "train", tmp_path)


def test_tldr_row_with_a_wrong_type_is_named(tmp_path: Path) -> None:
    row = _raw(TLDR / "comparisons" / "validation.jsonl")[0]
    bad_text = {**row, "summaries": [row["summaries"][0], {**row["summaries"][1], "text": 7}]}
    path = _write_jsonl(tmp_path / "a.jsonl", [row, bad_text])
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 1: summaries[1].text must be a string")):
        _load("tldr", "train", path)  # an AttributeError before
    bad_title = {**row, "info": {**row["info"], "title": ["a", "list"]}}
    path = _write_jsonl(tmp_path / "b.jsonl", [bad_title])
    with pytest.raises(ValueError, match=re.escape(f"{path}, row 0: info.title must be a string, got list")):
        _load("tldr", "train", path)


def test_a_load_that_keeps_no_pairs_is_an_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", [{**HH_ROW, "rejected": HH_ROW["chosen"]}] * 2)
    with pytest.raises(ValueError, match=re.escape(f"no pairs kept from Anthropic/hh-rlhf 'train' ({path}): "
                                                   "2 rows read, skipped 2 identical")):
        _load("hh", "train", path)
    row = _raw(TLDR / "comparisons" / "validation.jsonl")[0]
    cnn = {**row, "info": {**row["info"], "subreddit": None, "post": None}}
    with pytest.raises(ValueError, match=r"no pairs kept .*skipped 1 not_reddit"):
        _load("tldr", "train", _write_jsonl(tmp_path / "b.jsonl", [cnn]))


GOOD_PAIR = '{"prompt": "p", "chosen": " a", "rejected": " b"}\n'


@pytest.mark.parametrize("name, text, words", [
    ("p.jsonl", "", "p.jsonl is empty"),
    ("p.jsonl", GOOD_PAIR + "{oops\n", "p.jsonl line 2 is not valid JSON"),
    ("p.jsonl", GOOD_PAIR + '{"prompt": "p", "chosen": " a"}\n',
     "p.jsonl, row 1: rejected must be a string, got None"),
    ("p.jsonl", GOOD_PAIR + '{"prompt": "p", "chosen": 3, "rejected": " b"}\n',
     "p.jsonl, row 1: chosen must be a string, got 3"),
    ("p.jsonl", "[1, 2]\n", "p.jsonl line 1 is not a JSON object"),
])
def test_launch_load_pairs_names_the_file_and_row(tmp_path: Path, name: str, text: str, words: str) -> None:
    from dpo_lab.scale.launch import load_pairs

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(words)):
        load_pairs(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_pairs(tmp_path)
