"""From (prompt, completion) strings to padded tensors with a mask that marks the completion's tokens.

The prompt and the completion are tokenised *separately* and concatenated, so the prompt/completion
boundary is exact: no BPE merge can straddle it and every completion token is scored (see
``logprobs.sequence_logprobs``). No EOS is appended: the completions of the IMDb task are samples cut at
``max_new_tokens``, and ``log π(y|x)`` must be the log-prob of exactly those tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

__all__ = ["PAIR_COLUMNS", "Pairs", "pair_columns", "pair_examples", "pairs_fingerprint",
           "tokenize_completion", "pad_rows", "completion_batches", "PreferenceCollator", "stack_pairs",
           "RANKING_COLUMNS", "Rankings", "rankings_from_candidates", "ranking_columns",
           "rankings_fingerprint", "RankingCollator"]

Pairs = datasets.Dataset | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[str]]
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# A ranking: one prompt and its K completions, best first (Plackett-Luce DPO, paper App. A.3).
Rankings = datasets.Dataset | Mapping[str, Sequence[Any]]
RANKING_COLUMNS = ("prompt", "completions")
_ROW_KEYS = ("input_ids", "completion_mask")


# ------------------------------------------------------------------------------------------ pair columns
def pair_columns(pairs: Pairs) -> dict[str, list[str]]:
    """prompt/chosen/rejected as plain lists, from a Dataset, a list of dicts or a dict of columns."""
    if isinstance(pairs, Mapping):
        missing = [c for c in PAIR_COLUMNS if c not in pairs]
        if missing:
            raise ValueError(f"pairs are missing column(s) {missing}; they have {sorted(pairs)}")
        cols = {c: list(pairs[c]) for c in PAIR_COLUMNS}
        if len({len(v) for v in cols.values()}) > 1:
            raise ValueError(f"pair columns differ in length: { {c: len(v) for c, v in cols.items()} }")
    elif isinstance(pairs, datasets.Dataset):
        missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
        if missing:
            raise ValueError(f"pairs are missing column(s) {missing}; they have {pairs.column_names}")
        cols = pairs.select_columns(list(PAIR_COLUMNS)).to_dict()
    else:
        for i, row in enumerate(pairs):
            missing = [c for c in PAIR_COLUMNS if c not in row]
            if missing:
                raise ValueError(f"pair {i} is missing key(s) {missing}")
        cols = {c: [row[c] for row in pairs] for c in PAIR_COLUMNS}
    if not cols["prompt"]:
        raise ValueError("no preference pairs to train on")
    return cols


def pair_examples(cols: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """The columns of :func:`pair_columns` back as one ``{prompt, chosen, rejected}`` dict per pair."""
    return [dict(zip(PAIR_COLUMNS, row, strict=True))
            for row in zip(*(cols[c] for c in PAIR_COLUMNS), strict=True)]


def pairs_fingerprint(cols: Mapping[str, Sequence[str]]) -> str:
    """Content hash of the pairs' text, in order (an in-memory and a reloaded Dataset hash the same)."""
    digest = hashlib.sha256()
    for c in PAIR_COLUMNS:
        digest.update(json.dumps(list(cols[c])).encode())
    return digest.hexdigest()[:16]




# ------------------------------------------------------------------------------------------------ rankings
def rankings_from_candidates(prompts: Sequence[str], completions: Sequence[Sequence[str]],
                             rewards: Sequence[Sequence[float]]) -> tuple[dict[str, list], dict[str, int]]:
    """Each prompt's samples sorted by r*, best first: ``{"prompt": [...], "completions": [[K texts], ...]}``.

    A ranking is kept only if it is strict and every sample can be scored, so a prompt is dropped when two of
    its samples tie on r* (or repeat a text) or one is empty; the pairs stage drops just those pairs, so the
    rankings cover fewer prompts. Returns the rankings and ``{"n_prompts", "n_rankings", "n_tied",
    "n_empty"}`` (a prompt with both counts as empty)."""
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


def ranking_columns(rankings: Rankings) -> dict[str, list]:
    """prompt/completions as plain lists (from a dict of columns or a Dataset), all rankings of one K >= 2."""
    if isinstance(rankings, datasets.Dataset):
        rankings = rankings.to_dict()
    if not isinstance(rankings, Mapping):
        raise TypeError(f"rankings must be a dict of columns or a Dataset, got {type(rankings).__name__}")
    missing = [c for c in RANKING_COLUMNS if c not in rankings]
    if missing:
        raise ValueError(f"rankings are missing column(s) {missing}; they have {sorted(rankings)}")
    cols = {"prompt": list(rankings["prompt"]), "completions": [list(c) for c in rankings["completions"]]}
    if len(cols["prompt"]) != len(cols["completions"]):
        raise ValueError(f"{len(cols['prompt'])} prompts but {len(cols['completions'])} rankings")
    if not cols["prompt"]:
        raise ValueError("no rankings to train on")
    sizes = {len(c) for c in cols["completions"]}
    if len(sizes) > 1 or min(sizes) < 2:
        raise ValueError("every ranking must hold the same number K >= 2 of completions, got sizes "
                         f"{sorted(sizes)}")
    return cols


def rankings_fingerprint(cols: Mapping[str, Sequence[Any]]) -> str:
    """Content hash of the rankings' text, in order."""
    digest = hashlib.sha256(b"rankings")
    for c in RANKING_COLUMNS:
        digest.update(json.dumps(list(cols[c])).encode())
    return digest.hexdigest()[:16]


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


def completion_batches(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                       batch_size: int, pad_token_id: int) -> Iterator[dict[str, Tensor]]:
    """Exact token ids ``prompt + completion`` (never re-tokenised text), ``batch_size`` rows at a time,
    padded by :func:`pad_rows` with ``completion_mask`` = 1 on the completion's tokens."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for start in range(0, len(prompt_ids), batch_size):
        end = start + batch_size
        rows = [{"input_ids": [*p, *c], "completion_mask": [0] * len(p) + [1] * len(c)}
                for p, c in zip(prompt_ids[start:end], completion_ids[start:end], strict=True)]
        yield pad_rows(rows, pad_token_id)


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
                    raise TypeError(f"example {i} must be a mapping with keys {list(PAIR_COLUMNS)}, "
                                    f"got {type(example).__name__}")
                missing = [key for key in PAIR_COLUMNS if key not in example]
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


def stack_pairs(batch: Mapping[str, Tensor], keys: Sequence[str] = ("input_ids", "attention_mask",
                                                                    "completion_mask")) -> dict[str, Tensor]:
    """The chosen rows then the rejected rows of a :class:`PreferenceCollator` batch as ONE ``(2B, T)``
    batch (both halves right-padded to a common length with zeros, which every mask marks as padding), so
    that chosen and rejected share one forward pass (the official DPO code's ``concatenated_inputs``)."""
    for side in ("chosen", "rejected"):
        for key in keys:
            if f"{side}_{key}" not in batch:
                raise KeyError(f"batch is missing {side}_{key!s}; it has {sorted(batch)}")
    n_chosen = batch[f"chosen_{keys[0]}"].shape[0]
    if batch[f"rejected_{keys[0]}"].shape[0] != n_chosen:
        raise ValueError(f"batch has {n_chosen} chosen rows but "
                         f"{batch[f'rejected_{keys[0]}'].shape[0]} rejected")
    width = max(batch[f"chosen_{keys[0]}"].shape[1], batch[f"rejected_{keys[0]}"].shape[1])
    return {key: torch.cat([F.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]))
                            for side in ("chosen", "rejected")]) for key in keys}


class RankingCollator:
    """Turn ``[{"prompt", "completions": [K texts]}, ...]`` into ONE right-padded ``(B·K, T)`` batch.

    Keys ``input_ids``, ``attention_mask``, ``completion_mask``; row ``b·K + k`` is example b's k-th
    completion, so ``.view(B, K)`` of per-row log-probs gives the ranking's columns. All B·K rows share one
    forward pass, as chosen and rejected do for pairs.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.pairs = PreferenceCollator(tokenizer, max_length)  # the same checks, tokenizer and padding id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        rows = []
        for i, example in enumerate(examples):
            if not isinstance(example, Mapping) or any(c not in example for c in RANKING_COLUMNS):
                raise KeyError(f"example {i} must be a mapping with keys {list(RANKING_COLUMNS)}")
            for k, completion in enumerate(example["completions"]):
                try:
                    rows.append(tokenize_completion(self.pairs.tokenizer, example["prompt"], completion,
                                                    max_length=self.pairs.max_length))
                except ValueError as err:
                    raise ValueError(f"example {i} (completion {k}): {err}") from err
        return pad_rows(rows, self.pairs.pad_token_id, side="right")
