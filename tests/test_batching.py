"""Tokenising (prompt, completion) pairs: exact boundary, truncation, padding and validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from dpo_lab.batching import PreferenceCollator, pad_rows, tokenize_completion

words = st.lists(st.sampled_from(["movie", "great", "awful", "the", "plot", "I", "loved", "!", ","]),
                 min_size=1, max_size=12).map(" ".join)


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_completion_tokenised_separately(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    row = tokenize_completion(tiny_tokenizer, "This movie", " was great", max_length=64)
    prompt, completion = _ids(tiny_tokenizer, "This movie"), _ids(tiny_tokenizer, " was great")
    assert row["input_ids"] == prompt + completion
    assert row["completion_mask"] == [0] * len(prompt) + [1] * len(completion)
    assert tiny_tokenizer.decode(row["input_ids"]) == "This movie was great"


@settings(max_examples=40, deadline=None)
@given(prompt=words, completion=words, max_length=st.integers(min_value=2, max_value=40))
def test_truncation_keeps_prompt_and_cuts_completion(tiny_tokenizer: PreTrainedTokenizerFast, prompt: str,
                                                     completion: str, max_length: int) -> None:
    n_prompt = len(_ids(tiny_tokenizer, prompt))
    full = _ids(tiny_tokenizer, " " + completion)
    if n_prompt >= max_length:
        with pytest.raises(ValueError, match="prompt longer than the context"):
            tokenize_completion(tiny_tokenizer, prompt, " " + completion, max_length=max_length)
        return
    row = tokenize_completion(tiny_tokenizer, prompt, " " + completion, max_length=max_length)
    assert len(row["input_ids"]) == min(max_length, n_prompt + len(full))
    assert row["input_ids"][n_prompt:] == full[: max_length - n_prompt]  # a prefix of the completion
    assert sum(row["completion_mask"]) >= 1 and row["completion_mask"][:n_prompt] == [0] * n_prompt


def test_empty_prompt_uses_bos(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    row = tokenize_completion(tiny_tokenizer, "", "great", max_length=16)
    assert row["input_ids"][0] == tiny_tokenizer.bos_token_id and row["completion_mask"][0] == 0


def test_pad_rows_right_and_left(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
            {"input_ids": [8], "completion_mask": [1]}]
    right = pad_rows(rows, pad_token_id=99)
    left = pad_rows(rows, pad_token_id=99, side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["completion_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [99, 99, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert all(t.dtype == torch.long for t in right.values())


def test_collator_shapes_and_contents(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    examples = [{"prompt": "This movie", "chosen": " was great", "rejected": " was awful and boring"},
                {"prompt": "I", "chosen": " loved it", "rejected": " hated it"}]
    batch = PreferenceCollator(tiny_tokenizer, max_length=32)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "rows"}
    assert batch["rows"].tolist() == [[0, 2], [1, 3]]  # every chosen row, then every rejected row
    for i, ex in enumerate(examples):
        for k, side in enumerate(("chosen", "rejected")):
            row = batch["rows"][i, k]
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            completion = batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist()
            assert tiny_tokenizer.decode(ids) == ex["prompt"] + ex[side]
            assert completion == _ids(tiny_tokenizer, ex[side])
    # Right padding: every row's real tokens start at position 0.
    assert batch["attention_mask"][:, 0].all()
    # A ranking's K rows are consecutive.
    ranked = PreferenceCollator(tiny_tokenizer, max_length=32)([{"prompt": "A",
                                                                 "completions": ["b", "c d", "e"]}] * 2)
    assert ranked["rows"].tolist() == [[0, 1, 2], [3, 4, 5]] and ranked["input_ids"].shape[0] == 6
    assert tiny_tokenizer.decode(ranked["input_ids"][4][ranked["completion_mask"][4].bool()]) == "c d"


def test_collator_and_tokenizer_validation(tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    collate = PreferenceCollator(tiny_tokenizer, max_length=8)
    with pytest.raises(KeyError, match="missing \\['rejected'\\]"):
        collate([{"prompt": "a", "chosen": " b"}])
    with pytest.raises(ValueError, match=r"pair 0 \(chosen\): completion is empty"):
        collate([{"prompt": "a", "chosen": "", "rejected": " b"}])
    with pytest.raises(ValueError, match="prompt longer than the context"):
        collate([{"prompt": "the plot " * 5, "chosen": " b", "rejected": " c"}])
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    with pytest.raises(ValueError, match=r"ranking 1 \(completion 0\): completion is empty"):
        collate([{"prompt": "a", "completions": [" b", " c"]}, {"prompt": "a", "completions": ["", " c"]}])
    with pytest.raises(ValueError, match="same number of completions"):
        collate([{"prompt": "a", "completions": [" b", " c"]}, {"prompt": "a", "completions": [" b"]}])
    with pytest.raises(TypeError, match="prompt must be a str"):
        tokenize_completion(tiny_tokenizer, None, " b", max_length=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        tokenize_completion(tiny_tokenizer, "a", " b", max_length=1)
    with pytest.raises(ValueError, match="side must be"):
        pad_rows([{"input_ids": [1], "completion_mask": [1]}], 0, side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_ids has 2 tokens but completion_mask has 1"):
        pad_rows([{"input_ids": [1, 2], "completion_mask": [1]}], 0)
    with pytest.raises(KeyError, match="completion_mask"):
        pad_rows([{"input_ids": [1, 2]}], 0)
    with pytest.raises(ValueError, match="at least one row"):
        pad_rows([], 0)
