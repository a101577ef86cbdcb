"""From (prompt, completion) strings to padded tensors with a mask that marks the completion's tokens.

The prompt and the completion are tokenised *separately* and concatenated, so the prompt/completion
boundary is exact: no BPE merge can straddle it and every completion token is scored (see
``logprobs.sequence_logprobs``). No EOS is appended: the completions of the IMDb task are samples cut at
``max_new_tokens``, and ``log π(y|x)`` must be the log-prob of exactly those tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize_completion", "pad_rows", "PreferenceCollator"]

_ROW_KEYS = ("input_ids", "completion_mask")
_EXAMPLE_KEYS = ("prompt", "chosen", "rejected")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # add_special_tokens=False: we decide what goes in the sequence, not the tokenizer's template.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *,
                        max_length: int) -> dict[str, list[int]]:
    """Token ids of ``prompt + completion`` and a 0/1 ``completion_mask`` (1 on completion tokens).

    The completion is truncated so the whole sequence fits ``max_length``; the prompt never is (a cut
    prompt would change what the completion is conditioned on). An empty prompt is replaced by the BOS
    token (GPT-2's unconditional start), since the first completion token needs a context to be scored.
    """
    for name, text in (("prompt", prompt), ("completion", completion)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (a prompt token and a completion token), "
                         f"got {max_length!r}")
    prompt_ids = _encode(tokenizer, prompt)
    completion_ids = _encode(tokenizer, completion)
    if not completion_ids:
        raise ValueError(f"completion is empty (after tokenisation): {completion!r}")
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("prompt is empty and the tokenizer has no BOS token to stand in for it")
        prompt_ids = [tokenizer.bos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt longer than the context: {len(prompt_ids)} prompt tokens leave no room "
                         f"for a completion token within max_length={max_length}")
    completion_ids = completion_ids[:room]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def pad_rows(rows: Sequence[Mapping[str, list[int]]], pad_token_id: int,
             side: Literal["right", "left"] = "right") -> dict[str, Tensor]:
    """Pad rows made by ``tokenize_completion`` into ``input_ids``, ``attention_mask``, ``completion_mask``.

    All three are ``(B, T_max)`` long tensors; padding has attention 0 and completion 0. Left padding is
    what ``generate`` needs; the log-prob code gives identical values for either side.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    if len(rows) == 0:
        raise ValueError("pad_rows needs at least one row")
    for i, row in enumerate(rows):
        for key in _ROW_KEYS:
            if key not in row:
                raise KeyError(f"row {i} is missing {key!r}; it has {sorted(row)}")
        if len(row["input_ids"]) != len(row["completion_mask"]):
            raise ValueError(f"row {i}: input_ids has {len(row['input_ids'])} tokens but completion_mask "
                             f"has {len(row['completion_mask'])}")
        if len(row["input_ids"]) == 0:
            raise ValueError(f"row {i} is empty")
    length = max(len(row["input_ids"]) for row in rows)
    out = {key: torch.zeros(len(rows), length, dtype=torch.long) for key in (*_ROW_KEYS, "attention_mask")}
    out["input_ids"].fill_(pad_token_id)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(0, n) if side == "right" else slice(length - n, length)
        out["input_ids"][i, span] = torch.tensor(row["input_ids"], dtype=torch.long)
        out["completion_mask"][i, span] = torch.tensor(row["completion_mask"], dtype=torch.long)
        out["attention_mask"][i, span] = 1
    return out


class PreferenceCollator:
    """Turn ``[{"prompt", "chosen", "rejected"}, ...]`` into right-padded chosen_* and rejected_* tensors.

    Output keys: ``{chosen,rejected}_{input_ids,attention_mask,completion_mask}``, ready for
    ``logprobs.concatenated_logprobs``. Usable as a ``DataLoader`` ``collate_fn``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = int(pad)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        out: dict[str, Tensor] = {}
        for side in ("chosen", "rejected"):
            rows = []
            for i, example in enumerate(examples):
                if not isinstance(example, Mapping):
                    raise TypeError(f"example {i} must be a mapping with keys {list(_EXAMPLE_KEYS)}, "
                                    f"got {type(example).__name__}")
                missing = [key for key in _EXAMPLE_KEYS if key not in example]
                if missing:
                    raise KeyError(f"example {i} is missing {missing}; it has {sorted(example)}")
                try:
                    rows.append(tokenize_completion(self.tokenizer, example["prompt"], example[side],
                                                    max_length=self.max_length))
                except ValueError as err:
                    raise ValueError(f"example {i} ({side}): {err}") from err
            for key, value in pad_rows(rows, self.pad_token_id, side="right").items():
                out[f"{side}_{key}"] = value
        return out
