"""Preference data (strings) to padded tensors with a mask marking the completions' tokens. An example is a
prompt and K completions: a pair (``prompt``, ``chosen``, ``rejected``) or a ranking (``prompt``,
``completions``, best first; App. A.3). Prompt and completion are tokenised apart and no EOS is added, so
``log π(y|x)`` scores exactly the sampled tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import datasets
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
RANKING_COLUMNS = ("prompt", "completions")
# Pairs or rankings: a Dataset, a list of dicts or a dict of columns.
Pairs = datasets.Dataset | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
_ROW_KEYS = ("input_ids", "completion_mask")


# ----------------------------------------------------------------------------------- pairs and rankings
def pair_columns(pairs: Pairs) -> dict[str, list]:
    """The pair (or, given ``completions``, ranking) columns as plain lists, checked; others dropped."""
    rows = None if isinstance(pairs, (Mapping, datasets.Dataset)) else list(pairs)
    names = pairs.column_names if isinstance(pairs, datasets.Dataset) else list(rows[0] if rows else pairs)
    columns, noun = (RANKING_COLUMNS, "rankings") if "completions" in names else (PAIR_COLUMNS, "pairs")
    if rows is None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{noun} are missing column(s) {missing}; they have {sorted(names)}")
        cols = (pairs.select_columns(list(columns)).to_dict() if isinstance(pairs, datasets.Dataset)
                else {c: list(pairs[c]) for c in columns})
    else:
        for i, row in enumerate(rows):
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{noun[:-1]} {i} is missing key(s) {missing}")
        cols = {c: [row[c] for row in rows] for c in columns}
    if len({len(v) for v in cols.values()}) > 1:
        raise ValueError(f"{noun[:-1]} columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    if not cols["prompt"]:
        raise ValueError(f"no preference {noun} to train on")
    if noun == "rankings":
        cols["completions"] = [list(c) for c in cols["completions"]]
        sizes = {len(c) for c in cols["completions"]}
        if len(sizes) > 1 or min(sizes) < 2:
            raise ValueError(f"every ranking must hold the same number K >= 2 of completions, got sizes "
                             f"{sorted(sizes)}")
    return cols


def pair_examples(cols: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The columns of :func:`pair_columns` back as one dict per pair (or ranking)."""
    return [dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)]


def rankings_from_candidates(prompts: Sequence[str], completions: Sequence[Sequence[str]],
                             rewards: Sequence[Sequence[float]]) -> tuple[dict[str, list], dict[str, int]]:
    """Each prompt's samples sorted by r*, best first, dropping a prompt with a tie or a repeated or empty
    sample; returns the rankings and ``{"n_prompts", "n_rankings", "n_tied", "n_empty"}``."""
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completion lists, "
                         f"{len(rewards)} reward lists")
    out: dict[str, list] = {"prompt": [], "completions": []}
    n_tied = n_empty = 0
    for i, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards, strict=True)):
        if len(texts) != len(scores) or len(texts) < 2:
            raise ValueError(f"prompt {i} has {len(texts)} completions and {len(scores)} rewards; a ranking "
                             "needs the same number, at least 2")
        if not all(texts):
            n_empty += 1
        elif len(set(scores)) < len(scores) or len(set(texts)) < len(texts):
            n_tied += 1
        else:
            order = sorted(range(len(texts)), key=lambda k: -float(scores[k]))
            out["prompt"].append(prompt)
            out["completions"].append([texts[k] for k in order])
    stats = {"n_prompts": len(prompts), "n_rankings": len(out["prompt"]), "n_tied": n_tied,
             "n_empty": n_empty}
    return out, stats


# ------------------------------------------------------------------------------------------------ tokens
def tokenize_completion(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *,
                        max_length: int) -> dict[str, list[int]]:
    """Ids of ``prompt + completion`` and a 0/1 ``completion_mask``. Only the completion is cut to fit
    ``max_length``; an empty prompt becomes BOS, so the first completion token has a context."""
    for name, text in (("prompt", prompt), ("completion", completion)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (a prompt token and a completion token), "
                         f"got {max_length!r}")
    # add_special_tokens=False: we decide what goes in the sequence, not the tokenizer's template.
    prompt_ids, completion_ids = (list(tokenizer(text, add_special_tokens=False)["input_ids"])
                                  for text in (prompt, completion))
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
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def pad_rows(rows: Sequence[Mapping[str, list[int]]], pad_token_id: int,
             side: Literal["right", "left"] = "right") -> dict[str, Tensor]:
    """Rows of :func:`tokenize_completion` padded to ``input_ids``, ``attention_mask``, ``completion_mask``,
    each ``(B, T_max)`` (left padding for ``generate``; log-probs are the same either side)."""
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
    """Pairs or rankings -> ONE right-padded batch of all B·K completions, ``(B·K, T)``, for one forward
    pass, with ``rows`` ``(B, K)``: the row of example b's k-th completion. Pairs keep the official DPO code's
    layout (all chosen rows, then all rejected); a ranking's K rows are consecutive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        self.tokenizer, self.max_length, self.pad_token_id = tokenizer, max_length, int(pad)

    def __call__(self, examples: Sequence[Mapping[str, Any]],
                 ids: Sequence[int] | None = None) -> dict[str, Tensor]:
        """The batch; a bad example is named by its entry in ``ids`` (its row in the data set) if given."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        ranked = isinstance(examples[0], Mapping) and "completions" in examples[0]
        columns = RANKING_COLUMNS if ranked else PAIR_COLUMNS
        texts = []
        for i, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise TypeError(f"example {i} must be a mapping with keys {list(columns)}, "
                                f"got {type(example).__name__}")
            missing = [key for key in columns if key not in example]
            if missing:
                raise KeyError(f"example {i} is missing {missing}; it has {sorted(example)}")
            texts.append(list(example["completions"]) if ranked else [example["chosen"], example["rejected"]])
        b, k = len(texts), len(texts[0])
        if any(len(t) != k for t in texts):
            raise ValueError(f"every example needs the same number of completions, got "
                             f"{[len(t) for t in texts]}")
        order = [(i, j) for i in range(b) for j in range(k)] if ranked else [(i, j) for j in range(k)
                                                                             for i in range(b)]
        rows = []
        for i, j in order:
            try:
                rows.append(tokenize_completion(self.tokenizer, examples[i]["prompt"], texts[i][j],
                                                max_length=self.max_length))
            except ValueError as err:
                label = f"completion {j}" if ranked else PAIR_COLUMNS[1 + j]
                noun = "ranking" if ranked else "pair"
                raise ValueError(f"{noun} {i if ids is None else ids[i]} ({label}): {err}") from err
        index = torch.arange(b * k)
        return {**pad_rows(rows, self.pad_token_id),
                "rows": index.view(b, k) if ranked else index.view(k, b).T.contiguous()}
