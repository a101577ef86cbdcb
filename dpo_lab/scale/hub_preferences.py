"""Human preference data of the paper's other two tasks as (prompt, chosen, rejected) pairs.

TL;DR (§6.2): ``openai/summarize_from_feedback`` ``comparisons``, two summaries of a Reddit post and the
preferred one's index. Anthropic-HH (§6.3): ``Anthropic/hh-rlhf``, two dialogues differing in the last
assistant response. ``path=None`` loads the hub split, else local files in the hub's schema; rows that
cannot form a pair are skipped and counted by reason, a malformed row is an error naming it and its file.
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from dpo_lab.batching import PAIR_COLUMNS
from dpo_lab.preferences import validate_preferences

TLDR_HUB_NAME, TLDR_CONFIG = "openai/summarize_from_feedback", "comparisons"
# The paper's SFT lineage's prompt (TRLX summarize_rlhf); fields stripped, a summary after one space.
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
HH_HUB_NAME = "Anthropic/hh-rlhf"
HUMAN_TAG, ASSISTANT_TAG = "\n\nHuman:", "\n\nAssistant:"
FIX = "; fix or replace the file"


def _file_rows(file: Path) -> list[Any]:
    """The rows of one .jsonl, .json(.gz) or .parquet file; a ValueError naming the file (and line)."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file).to_pylist()
        except Exception as err:  # pyarrow's errors for a damaged file vary
            why = f"{type(err).__name__}: {err}"
            raise ValueError(f"{file} is not a readable parquet file ({why}){FIX}") from err
    try:
        with (gzip.open if file.suffix == ".gz" else open)(file, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} cannot be read as UTF-8 text ({type(err).__name__}: {err}){FIX}") from err
    if not text.strip():
        raise ValueError(f"{file} is empty{FIX}")
    if file.name.removesuffix(".gz").endswith(".json"):
        try:
            whole = json.loads(text)
            return whole if isinstance(whole, list) else [whole]
        except json.JSONDecodeError:
            pass  # maybe JSON lines, which the .json suffix also holds
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} line {number} is not valid JSON ({err.msg}, column {err.colno})"
                             f"{FIX}") from err
        if line.strip() and not isinstance(rows[-1], dict):
            raise ValueError(f"{file} line {number} is not a JSON object: {type(rows[-1]).__name__}{FIX}")
    return rows


def read_rows(files: Sequence[Path]) -> tuple[list[Any], Callable[[int], str]]:
    """The rows of local files, in order, and ``where(i)`` naming row ``i``'s file and its row there."""
    rows: list[Any] = []
    starts = []
    for file in files:
        if not (got := _file_rows(Path(file))):
            raise ValueError(f"{file} holds no rows{FIX}")
        starts.append(len(rows))
        rows += got

    def where(i: int) -> str:
        k = bisect.bisect_right(starts, i) - 1
        return f"{files[k]}, row {i - starts[k]}"

    return rows, where


def _read(name: str, config: str | None, split: str, path: str | Path | None) -> tuple[Any, Callable, str]:
    """(rows, where, source) of one split: the hub's, ``path`` itself, or the files under ``path`` named
    ``{split}.*`` or ``*-{split}.*`` (any depth: ``helpful-base/train.jsonl``)."""
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty string, got {split!r}")
    if path is None:
        rows = datasets.load_dataset(name, config, split=split)
        return rows, lambda i: f"{name} {split!r} split, row {i}", name
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"no preference data at {path}")
        return *read_rows([path]), str(path)
    stems = {f: f.name.split(".")[0] for f in path.rglob("*")
             if f.is_file() and f.suffix in (".jsonl", ".json", ".gz", ".parquet")}
    if not (files := sorted(f for f, stem in stems.items() if stem == split or stem.endswith(f"-{split}"))):
        found = sorted(set(stems.values()))
        raise FileNotFoundError(f"no files for split {split!r} under {path}; found splits {found}")
    return *read_rows(files), str(path)


def _field(row: Any, key: str, where: str) -> Any:
    if not isinstance(row, Mapping) or key not in row:
        raise ValueError(f"{where} lacks field {key!r}")
    return row[key]


def _text(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__} ({value!r})")
    return value


def _load(name: str, config: str | None, split: str, path: str | Path | None,
          to_pair: Callable[[Any], tuple[str, str, str] | str], reasons: Sequence[str], *, validate: bool,
          progress: bool) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Pairs from one split's rows: ``to_pair(row)`` gives (prompt, chosen, rejected) or a skip reason."""
    rows, where, source = _read(name, config, split, path)
    pairs: dict[str, list[str]] = {c: [] for c in PAIR_COLUMNS}
    skipped = dict.fromkeys(reasons, 0)
    for i, row in enumerate(tqdm(rows, desc=f"{name} {split}", disable=not progress)):
        try:
            made = to_pair(row)
        except ValueError as err:
            raise ValueError(f"{where(i)}: {err}") from err
        if isinstance(made, str):
            skipped[made] += 1
        else:
            for column, text in zip(PAIR_COLUMNS, made, strict=True):
                pairs[column].append(text)
    ds = datasets.Dataset.from_dict(pairs, features=datasets.Features(
        {c: datasets.Value("string") for c in PAIR_COLUMNS}))
    if len(ds) == 0:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n) or "no rows"
        raise ValueError(f"no pairs kept from {name} {split!r} ({source}): {len(rows)} rows read, "
                         f"skipped {why}")
    if validate:
        try:
            validate_preferences(ds, require_rewards=False)  # human labels: no r* columns
        except ValueError as err:
            raise ValueError(f"pairs built from {source}: {err}") from err
    return ds, {"dataset": name, "split": split, "source": source, "read": len(rows), "kept": len(ds),
                "skipped": skipped}


def _tldr_pair(row: Any) -> tuple[str, str, str] | str:
    info = _field(row, "info", "the row")
    fields = {k: _text(_field(info, k, "info"), f"info.{k}") for k in ("subreddit", "title", "post")}
    summaries, choice = _field(row, "summaries", "the row"), _field(row, "choice", "the row")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise ValueError(f"summaries must be a list of 2, got {summaries!r}")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"choice must be 0 or 1, got {choice!r}")
    texts = [(_text(_field(s, "text", f"summaries[{k}]"), f"summaries[{k}].text") or "").strip()
             for k, s in enumerate(summaries)]
    if None in fields.values():
        return "not_reddit"
    if not all(texts):
        return "empty_summary"
    if texts[0] == texts[1]:
        return "identical"
    prompt = TLDR_PROMPT.format(**{k: v.strip() for k, v in fields.items()})
    return prompt, " " + texts[choice], " " + texts[1 - choice]


def load_tldr_preferences(split: str = "train", *, path: str | Path | None = None, validate: bool = True,
                          progress: bool = True) -> tuple[datasets.Dataset, dict[str, Any]]:
    """TL;DR comparisons as ``(pairs, stats)``: prompt = :data:`TLDR_PROMPT`, chosen = " " + the preferred
    summary. Skipped: CNN/DM rows (``not_reddit``), an empty summary, identical summaries."""
    reasons = ("not_reddit", "empty_summary", "identical")
    return _load(TLDR_HUB_NAME, TLDR_CONFIG, split, path, _tldr_pair, reasons, validate=validate,
                 progress=progress)


def split_dialogue(text: str) -> tuple[str, str] | None:
    """``(prompt, response)`` split after the last "\\n\\nAssistant:" (as the paper authors' code); None if
    there is no assistant turn."""
    if not isinstance(text, str):
        raise TypeError(f"dialogue must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT_TAG)
    return None if cut < 0 else (text[:cut + len(ASSISTANT_TAG)], text[cut + len(ASSISTANT_TAG):])


def is_single_turn(prompt: str) -> bool:
    """One human message and the assistant tag that answers it: the paper's single-turn HH subset (§6.3)."""
    return prompt.count(HUMAN_TAG) == 1 and prompt.count(ASSISTANT_TAG) == 1


def load_hh_preferences(split: str = "train", *, path: str | Path | None = None,
                        single_turn_only: bool = False, validate: bool = True,
                        progress: bool = True) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Anthropic-HH dialogues as ``(pairs, stats)``: the shared prompt and the two final responses. Skipped:
    no assistant turn, prompts that differ, an empty response, identical responses, and with
    ``single_turn_only`` multi-turn dialogues."""
    def to_pair(row: Any) -> tuple[str, str, str] | str:
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

    reasons = ("no_assistant_turn", "prompt_mismatch", "empty_response", "identical")
    pairs, stats = _load(HH_HUB_NAME, None, split, path, to_pair,
                         reasons + ("multi_turn",) * single_turn_only, validate=validate, progress=progress)
    return pairs, {**stats, "single_turn_only": single_turn_only}
