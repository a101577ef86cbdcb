"""The paper's TL;DR (§6.2) and Anthropic-HH (§6.3) tasks: human preference pairs and one DPO run on them
(what notebooks/templates/preference_dpo calls).

TL;DR: ``openai/summarize_from_feedback`` ``comparisons``, two summaries of a Reddit post and the preferred
one's index. HH: ``Anthropic/hh-rlhf``, two dialogues differing in the last assistant response. Rows come
from the hub or from local JSON-lines files (``.gz`` too) in the hub's schema; rows that cannot form a pair
are skipped and counted by reason, a malformed row is an error naming it (file and row).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lab.batching import PAIR_COLUMNS, pair_columns
from dpo_lab.dpo_trainer import pair_logprobs
from dpo_lab.losses import preference_loss, preference_metrics
from dpo_lab.models import build_policy, load_hub_policy, train_tokenizer
from dpo_lab.preferences import validate_preferences
from dpo_lab.presets import PolicyConfig, project_root
from dpo_lab.run import EvalFn, quiet_hf_progress, reference_logprobs

TASKS: tuple[str, ...] = ("tldr", "hh")
# The paper's settings per task (§6.2, §6.3, App. B): SFT policy, beta, and the held-out split.
PAPER: dict[str, dict[str, Any]] = {
    "tldr": {"model": "CarperAI/openai_summarize_tldr_sft", "beta": 0.5, "eval_split": "validation"},
    "hh": {"model": "EleutherAI/pythia-2.8b", "beta": 0.1, "eval_split": "test"},
}
# Each task's hub dataset (name, config) and the project's fixture files in the same schema.
HUB = {"tldr": ("openai/summarize_from_feedback", "comparisons"), "hh": ("Anthropic/hh-rlhf", None)}
FIXTURES = {"tldr": "data/fixtures/summarize_from_feedback/comparisons", "hh": "data/fixtures/hh_rlhf"}
# The paper's SFT lineage's prompt (TRLX summarize_rlhf); fields stripped, a summary after one space.
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
HUMAN_TAG, ASSISTANT_TAG = "\n\nHuman:", "\n\nAssistant:"
SKIP_REASONS = {"tldr": ("not_reddit", "empty_summary", "identical"),
                "hh": ("no_assistant_turn", "prompt_mismatch", "empty_response", "identical")}
LONG_PROMPTS: tuple[str, ...] = ("drop", "keep_end")
FIX = "; fix or replace the file"


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task


# ------------------------------------------------------------------------------------ rows to pairs
def read_jsonl(file: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (gzipped if it ends in .gz); a ValueError naming the file and line."""
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} cannot be read as UTF-8 text ({type(err).__name__}: {err}){FIX}") from err
    if not text.strip():
        raise ValueError(f"{file} is empty{FIX}")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} line {number} is not valid JSON ({err.msg}, column {err.colno})"
                             f"{FIX}") from err
        if not isinstance(rows[-1], dict):
            raise ValueError(f"{file} line {number} is not a JSON object: {type(rows[-1]).__name__}{FIX}")
    return rows


def _field(row: Any, key: str, where: str) -> Any:
    if not isinstance(row, Mapping) or key not in row:
        raise ValueError(f"{where} lacks field {key!r}")
    return row[key]


def _text(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__} ({value!r})")
    return value


def _tldr_pair(row: Any) -> tuple[str, str, str] | str:
    """(prompt = :data:`TLDR_PROMPT`, " " + the preferred summary, " " + the other) or why it is skipped."""
    info = _field(row, "info", "the row")
    fields = {k: _text(_field(info, k, "info"), f"info.{k}") for k in ("subreddit", "title", "post")}
    summaries, choice = _field(row, "summaries", "the row"), _field(row, "choice", "the row")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise ValueError(f"summaries must be a list of 2, got {summaries!r}")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"choice must be 0 or 1, got {choice!r}")
    texts = [(_text(_field(s, "text", f"summaries[{k}]"), f"summaries[{k}].text") or "").strip()
             for k, s in enumerate(summaries)]
    if None in fields.values():  # a CNN/DailyMail row
        return "not_reddit"
    if not all(texts):
        return "empty_summary"
    if texts[0] == texts[1]:
        return "identical"
    prompt = TLDR_PROMPT.format(**{k: v.strip() for k, v in fields.items()})
    return prompt, " " + texts[choice], " " + texts[1 - choice]


def split_dialogue(text: str) -> tuple[str, str] | None:
    """``(prompt, response)`` split after the last "\\n\\nAssistant:" (as the paper authors' code); None if
    there is no assistant turn."""
    cut = text.rfind(ASSISTANT_TAG)
    return None if cut < 0 else (text[:cut + len(ASSISTANT_TAG)], text[cut + len(ASSISTANT_TAG):])


def is_single_turn(prompt: str) -> bool:
    """One human message and the assistant tag that answers it: the paper's single-turn HH subset (§6.3)."""
    return prompt.count(HUMAN_TAG) == 1 and prompt.count(ASSISTANT_TAG) == 1


def _hh_pair(row: Any, single_turn_only: bool) -> tuple[str, str, str] | str:
    """(the shared prompt, the chosen and the rejected final response) or why it is skipped."""
    for side in ("chosen", "rejected"):
        if _text(row.get(side) if isinstance(row, Mapping) else None, side) is None:
            raise ValueError(f"lacks field {side!r} (or it is null)")
    chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
    if chosen is None or rejected is None:
        return "no_assistant_turn"
    if chosen[0] != rejected[0]:
        return "prompt_mismatch"
    if not chosen[1].strip() or not rejected[1].strip():
        return "empty_response"
    if chosen[1] == rejected[1]:
        return "identical"
    if single_turn_only and not is_single_turn(chosen[0]):
        return "multi_turn"
    return chosen[0], chosen[1], rejected[1]


def resolve_data_dir(task: str, data_dir: str) -> Path | None:
    """``""``: the hub (None); ``"fixtures"``: the project's hub-format fixtures; else local files."""
    check_task(task)
    if not isinstance(data_dir, str):
        raise TypeError(f"data_dir must be a string, got {type(data_dir).__name__}")
    if data_dir in ("", "fixtures"):
        return project_root() / FIXTURES[task] if data_dir else None
    path = next((p.resolve() for p in (Path(data_dir).expanduser(), project_root() / data_dir) if p.exists()),
                None)
    if path is None:
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist (nor under {project_root()})")
    return path


def _read(task: str, split: str, path: Path | None) -> tuple[list[tuple[str, Sequence]], str]:
    """(``[(label, rows)]``, source) of one split: the hub's, the file ``path``, or the files under ``path``
    named ``{split}.*`` or ``*-{split}.*`` (any depth: ``helpful-base/train.jsonl``)."""
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty string, got {split!r}")
    if path is None:
        name, config = HUB[task]
        return [(f"{name} {split!r} split", datasets.load_dataset(name, config, split=split))], name
    if not path.is_dir():
        return [(str(path), read_jsonl(path))], str(path)
    stems = {f: f.name.split(".")[0] for f in path.rglob("*")
             if f.is_file() and f.suffix in (".jsonl", ".json", ".gz")}
    if not (files := sorted(f for f, stem in stems.items() if stem == split or stem.endswith(f"-{split}"))):
        found = sorted(set(stems.values()))
        raise FileNotFoundError(f"no files for split {split!r} under {path}; found splits {found}")
    return [(str(file), read_jsonl(file)) for file in files], str(path)


def load_task_pairs(task: str, split: str, *, data_dir: str = "", max_pairs: int = 0, seed: int = 0,
                    hh_single_turn: bool = False, progress: bool = True) -> tuple[datasets.Dataset, dict]:
    """``(pairs, stats)`` of one split (``data_dir``: see :func:`resolve_data_dir`); ``max_pairs > 0`` keeps
    a seeded random subset of that size; ``hh_single_turn``: HH's single-turn dialogues only."""
    path = resolve_data_dir(task, data_dir)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be an int >= 0 (0 = all), got {max_pairs!r}")
    parts, source = _read(task, split, path)
    to_pair = _tldr_pair if task == "tldr" else functools.partial(_hh_pair, single_turn_only=hh_single_turn)
    skipped = dict.fromkeys(SKIP_REASONS[task] + ("multi_turn",) * (task == "hh" and hh_single_turn), 0)
    n_rows = sum(len(rows) for _, rows in parts)
    numbered = ((f"{label}, row {i}", row) for label, rows in parts for i, row in enumerate(rows))
    kept: dict[str, list[str]] = {c: [] for c in PAIR_COLUMNS}
    for where, row in tqdm(numbered, total=n_rows, desc=f"{HUB[task][0]} {split}", disable=not progress):
        try:
            made = to_pair(row)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        if isinstance(made, str):
            skipped[made] += 1
        else:
            for column, text in zip(PAIR_COLUMNS, made, strict=True):
                kept[column].append(text)
    pairs = datasets.Dataset.from_dict(kept, features=datasets.Features(
        {c: datasets.Value("string") for c in PAIR_COLUMNS}))
    if len(pairs) == 0:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n) or "no rows"
        raise ValueError(f"no pairs kept from {HUB[task][0]} {split!r} ({source}): {n_rows} rows read, "
                         f"skipped {why}")
    try:
        validate_preferences(pairs, require_rewards=False)  # human labels: no r* columns
    except ValueError as err:
        raise ValueError(f"pairs built from {source}: {err}") from err
    stats = {"dataset": HUB[task][0], "split": split, "source": source, "read": n_rows, "kept": len(pairs),
             "skipped": skipped, **({"single_turn_only": hh_single_turn} if task == "hh" else {})}
    if 0 < max_pairs < len(pairs):
        keep = np.random.default_rng([seed, len(pairs)]).choice(len(pairs), max_pairs, replace=False)
        pairs = pairs.select(np.sort(keep).tolist())
    return pairs, {**stats, "used": len(pairs)}


# ------------------------------------------------------------------------------------------ the run
def fit_prompts(pairs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_prompt_length: int,
                max_length: int, how: str = "drop") -> tuple[datasets.Dataset, int]:
    """(pairs whose prompt fits ``max_prompt_length`` tokens, how many did not): ``how="drop"`` drops the
    others, ``"keep_end"`` keeps their last tokens (the official code's rule for HH)."""
    if how not in LONG_PROMPTS:
        raise ValueError(f"how must be one of {list(LONG_PROMPTS)}, got {how!r}")
    for name, value in (("max_prompt_length", max_prompt_length), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) so "
                         "every completion keeps at least one token")
    prompts = pair_columns(pairs)["prompt"]
    unique = sorted(set(prompts))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
    long = {p for p, toks in ids.items() if len(toks) > max_prompt_length}
    n_changed = sum(p in long for p in prompts)
    if how == "keep_end":
        cut = {p: tokenizer.decode(ids[p][-max_prompt_length:]) for p in long}
        return pairs.map(lambda row: {"prompt": cut.get(row["prompt"], row["prompt"])}), n_changed
    if not (keep := [i for i, p in enumerate(prompts) if p not in long]):
        raise ValueError(f"every prompt is longer than max_prompt_length={max_prompt_length} tokens")
    return pairs.select(keep), n_changed


def load_models(model: str, *, tokenizer: str = "", revision: str = "", tiny_texts: Sequence[str] = (),
                max_length: int = 512, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """``(policy, reference, tokenizer)``: the SFT model (hub name or folder) and a frozen copy as π_ref;
    ``model=""``: a tiny random GPT-2 with a BPE trained on ``tiny_texts``, a dry run of the code path."""
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, got {type(model).__name__}")
    if model == "":
        if not tiny_texts:
            raise ValueError("model='' builds a tiny GPT-2 and needs tiny_texts to train its tokenizer on")
        tok = train_tokenizer(list(tiny_texts), vocab_size=512)
        shape = PolicyConfig(n_layer=2, n_head=2, n_embd=64, n_positions=max_length)
        policy = build_policy(tok, shape, seed=seed)
    else:
        found = next((p for p in (Path(model).expanduser(), project_root() / model)
                      if (p / "config.json").is_file()), None)
        if found is None and (model.count("/") > 1 or model.startswith((".", "/", "~"))):  # no hub id
            raise FileNotFoundError(f"model {model!r} is not a folder holding config.json (as given or under "
                                    f"{project_root()}), nor a hub name")
        with quiet_hf_progress():  # pad = eos: GPT-J and Pythia ship none; padding is masked out
            policy, tok = load_hub_policy(str(found.resolve()) if found else model, revision=revision or None,
                                          tokenizer_name=tokenizer or None)
    config = policy.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context ({context} tokens)")
    return policy, copy.deepcopy(policy).eval().requires_grad_(False), tok


def heldout_eval_fn(reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    pairs: datasets.Dataset | Mapping[str, Sequence[str]], *, beta: float, max_length: int,
                    cache_dir: str | Path, batch_size: int, device: torch.device | str | None = None,
                    ) -> EvalFn:
    """``eval_fn(policy, step)`` for ``train_dpo``: Eq. 7's loss and the implicit-reward metrics on held-out
    pairs, under TRL's names (``eval_loss``, ...); the reference's log-probs are computed (and cached) now."""
    cols = pair_columns(pairs)
    ref_chosen, ref_rejected = reference_logprobs(reference, tokenizer, cols, max_length=max_length,
                                                  cache_dir=cache_dir, batch_size=batch_size, device=device,
                                                  progress=False).unbind(1)

    def eval_fn(policy: nn.Module, step: int) -> dict[str, float]:
        pc, pr = pair_logprobs(policy, tokenizer, cols, max_length=max_length, batch_size=batch_size,
                               device=next(policy.parameters()).device).unbind(1)
        losses, cr, rr = preference_loss(pc, pr, ref_chosen, ref_rejected, beta=beta)  # Eq. 7
        return {f"eval_{k}": v for k, v in preference_metrics(losses, cr, rr, pc, pr).items()}

    return eval_fn


def run_summary(metrics: Sequence[Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
    """Scalars for ``result.json``: ``fields``, the first loss, the last 10% of steps' means, and the
    held-out metrics at the start and the end (NaN if never logged)."""
    if bad := {k: type(v).__name__ for k, v in fields.items()
               if not (v is None or isinstance(v, (bool, int, float, str)))}:
        raise TypeError(f"run_summary fields must be scalars; got {bad}")
    if not (train := [m for m in metrics if "loss" in m]):
        raise ValueError("no training steps in the metrics")
    out = {**fields, "steps": int(train[-1]["step"]), "loss_step1": float(train[0]["loss"])}
    tail = train[-max(1, len(train) // 10):]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        out["final_" + key.replace("/", "_")] = float(np.mean([m[key] for m in tail]))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        values = [float(m[key]) for m in metrics if key in m] or [math.nan]
        out[key.replace("/", "_") + "_start"], out[key.replace("/", "_") + "_end"] = values[0], values[-1]
    return out


def plot_training_curves(metrics: Sequence[Mapping[str, Any]], path: str | Path | None = None, *,
                         title: str = "") -> Figure:
    """Loss, reward margin and reward accuracy per step (train) with the held-out values as points."""
    train, evals = [m for m in metrics if "loss" in m], [m for m in metrics if "eval_loss" in m]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key in zip(axes, ("loss", "rewards/margins", "rewards/accuracies"), strict=True):
        ax.plot([m["step"] for m in train], [m[key] for m in train], lw=1, label="train (batch)")
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_" + key] for m in evals], "o-", ms=4,
                    label="held-out pairs")
        if key == "loss":
            ax.axhline(math.log(2), color="grey", ls=":", lw=1, label="log 2 (step 0)")
        ax.set(xlabel="step", title=key)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
