"""Human preference data of the paper's other two tasks as pairs (prompt, chosen, rejected).

* TL;DR summarisation (paper §6.2): ``openai/summarize_from_feedback``, config ``comparisons`` (Stiennon et
  al. 2020). Each row compares two summaries of one Reddit post; ``choice`` is the index of the preferred one.
* Anthropic-HH dialogue (paper §6.3): ``Anthropic/hh-rlhf``. Each row holds two full dialogues that share
  every turn but the last assistant response; the chosen one was preferred.

Both are human labels, not r* scores, so the pairs carry no ``chosen_reward``/``rejected_reward`` columns;
:func:`validate_pairs` runs the project's checks (``preferences.validate_preferences``) on the three text
columns. Rows that cannot form a usable pair are skipped and counted by reason, so the loss is visible.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_lab.batching import PAIR_COLUMNS
from dpo_lab.preferences import validate_preferences

# Hub schemas, confirmed with the search tool (docs corpus) on the dataset's own loading script,
# huggingface.co/datasets/openai/summarize_from_feedback/blob/main/summarize_from_feedback.py, config
# "comparisons": info{id, post, title, subreddit, site, article}, summaries[{text, policy, note}], choice
# (int32), worker, batch, split, extra{confidence}; hub splits "train" and "validation". CNN/DailyMail
# comparisons share the config with post/subreddit None (batch names like "batch0_cnndm").
TLDR_HUB_NAME = "openai/summarize_from_feedback"
TLDR_CONFIG = "comparisons"
# Prompt of the paper's SFT lineage (TRLX summarize_rlhf / CarperAI openai_summarize_tldr); fields and
# summaries are stripped and the summary gets one leading space, as that preprocessing does.
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
TLDR_SKIP_REASONS = ("not_reddit", "empty_summary", "identical")

# Anthropic/hh-rlhf rows are {"chosen": str, "rejected": str}, each a whole dialogue of "\n\nHuman: ..." and
# "\n\nAssistant: ..." turns (hub files helpful-base/train.jsonl.gz etc.; splits "train" and "test"). The
# prompt split follows the paper authors' reference code (eric-mitchell/direct-preference-optimization,
# extract_anthropic_prompt): everything up to and including the last "\n\nAssistant:".
HH_HUB_NAME = "Anthropic/hh-rlhf"
HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
HH_SKIP_REASONS = ("no_assistant_turn", "prompt_mismatch", "empty_response", "identical", "multi_turn")

_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet"}


def _split_files(path: Path, split: str) -> list[Path]:
    """Files of one split: ``path`` itself, or the files under it named ``{split}.*``/``*-{split}.*``."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no preference data at {path}")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _DATA_SUFFIXES
                   and (f.name.split(".")[0] == split or f.name.split(".")[0].endswith(f"-{split}")))
    if not files:
        present = sorted({f.name.split(".")[0] for f in path.rglob("*") if f.suffix in _DATA_SUFFIXES})
        raise FileNotFoundError(f"no files for split {split!r} under {path}; found splits {present}")
    return files


_FIX_FILE = "fix or replace the file"


def _file_problem(file: Path, builder: str) -> str | None:
    """Why one local data file cannot be read (``"line 3 is not valid JSON (...)"``), or None if it reads."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return "holds no rows" if pq.read_metadata(file).num_rows == 0 else None
        except Exception as err:  # pyarrow's errors for a damaged file vary
            return f"is not a readable parquet file ({type(err).__name__}: {err})"
    try:
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else
              open(file, encoding="utf-8")) as handle:
            text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        return f"cannot be read as UTF-8 text ({type(err).__name__}: {err})"
    if not text.strip():
        return "is empty"
    if file.name.removesuffix(".gz").endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass  # maybe JSON lines, as the json loader also accepts
        else:
            return "holds no rows" if whole in ([], {}) else None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number} is not a JSON object but {type(row).__name__}"
    return None


def _row_count(file: Path, builder: str) -> int | None:
    """Rows the json/parquet loader reads from one file (None if unknown): to name a row's file."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(file).num_rows
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else
              open(file, encoding="utf-8")) as handle:
            text = handle.read()
        if file.name.removesuffix(".gz").endswith(".json"):
            try:
                whole = json.loads(text)
                return len(whole) if isinstance(whole, list) else 1
            except json.JSONDecodeError:
                pass
        return sum(1 for line in text.splitlines() if line.strip())
    except Exception:  # only used to word an error: never hide the error itself
        return None


def read_data_files(files: Sequence[Path], builder: str) -> tuple[datasets.Dataset, Callable[[int], str]]:
    """Rows of local JSON-lines/JSON/parquet files (one format) and ``where(i)``, naming row ``i``'s file and
    its row there. An empty, undecodable or unreadable file, or files that hold no row, are a ValueError
    naming the file (and line)."""
    files = [Path(f) for f in files]
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"{file} is empty; {_FIX_FILE}")
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # the json loader fails with StopIteration, DatasetGenerationError, ...
        for file in files:
            problem = _file_problem(file, builder)
            if problem is not None:
                raise ValueError(f"{file} {problem}; {_FIX_FILE}") from err
        names = ", ".join(map(str, files))
        raise ValueError(f"cannot load {names} ({type(err).__name__}: {err}); check that every row has the "
                         "same fields with the same types") from err
    if len(ds) == 0:
        raise ValueError(f"{', '.join(map(str, files))} hold(s) no rows; {_FIX_FILE}")
    spans: list[tuple[Path, int]] | None = None

    def where(i: int) -> str:
        nonlocal spans
        if len(files) == 1:
            return f"{files[0]}, row {i}"
        if spans is None:
            counts = [_row_count(f, builder) for f in files]
            spans = ([(f, c) for f, c in zip(files, counts, strict=True)]
                     if None not in counts and sum(counts) == len(ds) else [])  # type: ignore[arg-type]
        for file, count in spans:
            if i < count:
                return f"{file}, row {i}"
            i -= count
        return f"{', '.join(map(str, files))}: row {i}"
    return ds, where


def _read(hub_name: str, config: str | None, split: str,
          path: str | Path | None) -> tuple[datasets.Dataset, str, Callable[[int], str]]:
    """The raw rows from the hub (``path=None``) or from local files in the hub's schema (tests, mirrors),
    the source's name and ``where(i)`` naming row ``i`` (its file, for local files)."""
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty string, got {split!r}")
    if path is None:
        ds = datasets.load_dataset(hub_name, config, split=split)
        return ds, hub_name, lambda i: f"{hub_name} {split!r} split, row {i}"
    files = _split_files(Path(path), split)
    builders = {_DATA_SUFFIXES[f.suffix] for f in files}
    if len(builders) != 1:
        raise ValueError(f"split {split!r} under {path} mixes file formats: {[f.name for f in files]}")
    ds, where = read_data_files(files, builders.pop())
    return ds, str(path), where


def _require_columns(ds: datasets.Dataset, required: Iterable[str], name: str, source: str = "") -> None:
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        where = f" ({source})" if source and source != name else ""
        raise ValueError(f"{name} rows{where} lack field(s) {missing}; they have {ds.column_names}")


def _text(value: Any, where: str) -> str | None:
    """A text field of a raw row: a string or None (missing), else a ValueError naming the row."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__} ({value!r})")
    return value


def _kept_some(pairs: datasets.Dataset, name: str, split: str, source: str, read: int,
               skipped: dict[str, int]) -> None:
    if len(pairs) == 0:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n) or "no rows"
        raise ValueError(f"no pairs kept from {name} {split!r} ({source}): {read} rows read, skipped {why}")


def _validated(pairs: datasets.Dataset, source: str) -> None:
    try:
        validate_pairs(pairs)
    except ValueError as err:
        raise ValueError(f"pairs built from {source}: {err}") from err


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(row, Mapping) or key not in row:
        raise ValueError(f"{where} lacks field {key!r}")
    return row[key]


def _stats(name: str, split: str, source: str, read: int, kept: int,
           skipped: dict[str, int]) -> dict[str, Any]:
    return {"dataset": name, "split": split, "source": source, "read": read, "kept": kept, "skipped": skipped}


def _to_dataset(rows: dict[str, list[str]]) -> datasets.Dataset:
    features = datasets.Features({c: datasets.Value("string") for c in PAIR_COLUMNS})
    return datasets.Dataset.from_dict(rows, features=features)


def validate_pairs(
    ds: datasets.Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
) -> None:
    """The project's pair checks (non-empty texts, chosen != rejected, prompt fits the context) for pairs with
    human labels only (no r* columns)."""
    validate_preferences(ds, tokenizer=tokenizer, max_length=max_length, require_rewards=False)


def tldr_prompt(info: Mapping[str, Any], where: str = "info") -> str | None:
    """The TL;DR prompt of one post, or None for a comparison that is not of a Reddit post (CNN/DM)."""
    fields = {k: _text(_field(info, k, where), f"{where}.{k}") for k in ("subreddit", "title", "post")}
    if any(v is None for v in fields.values()):
        return None
    return TLDR_PROMPT.format(**{k: str(v).strip() for k, v in fields.items()})


def _tldr_row(row: Mapping[str, Any]) -> tuple[str | None, list[str], int]:
    """(prompt or None for CNN/DM, the two stripped summaries, choice) of one raw comparison row."""
    prompt = tldr_prompt(row["info"], where="info")
    summaries, choice = row["summaries"], row["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise ValueError(f"summaries must be a list of 2, got {summaries!r}")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"choice must be 0 or 1, got {choice!r}")
    texts = [_text(_field(s, "text", f"summaries[{k}]"), f"summaries[{k}].text")
             for k, s in enumerate(summaries)]
    return prompt, [(t or "").strip() for t in texts], choice


def load_tldr_preferences(
    split: str = "train",
    *,
    path: str | Path | None = None,
    validate: bool = True,
    progress: bool = True,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """TL;DR comparisons as pairs: prompt = :data:`TLDR_PROMPT`, chosen = " " + the preferred summary.

    ``path=None`` loads ``openai/summarize_from_feedback`` ("comparisons") from the hub; otherwise a file, or
    a folder holding ``{split}.jsonl``/``.parquet`` files, in the hub's schema. Skipped, by reason: CNN/DM
    rows (``not_reddit``), an empty summary, identical summaries. Returns ``(pairs, stats)``."""
    ds, source, where = _read(TLDR_HUB_NAME, TLDR_CONFIG, split, path)
    _require_columns(ds, ("info", "summaries", "choice"), TLDR_HUB_NAME, source)
    rows: dict[str, list[str]] = {c: [] for c in PAIR_COLUMNS}
    skipped = dict.fromkeys(TLDR_SKIP_REASONS, 0)
    cols = ds.select_columns(["info", "summaries", "choice"])
    for i, row in enumerate(tqdm(cols, desc=f"TL;DR {split}", disable=not progress)):
        try:
            prompt, texts, choice = _tldr_row(row)
        except ValueError as err:  # name the row (and its file) only when one is bad
            raise ValueError(f"{where(i)}: {err}") from err
        if prompt is None:
            skipped["not_reddit"] += 1
        elif not all(texts):
            skipped["empty_summary"] += 1
        elif texts[0] == texts[1]:
            skipped["identical"] += 1
        else:
            rows["prompt"].append(prompt)
            rows["chosen"].append(" " + texts[choice])
            rows["rejected"].append(" " + texts[1 - choice])
    pairs = _to_dataset(rows)
    _kept_some(pairs, TLDR_HUB_NAME, split, source, len(ds), skipped)
    if validate:
        _validated(pairs, source)
    return pairs, _stats(TLDR_HUB_NAME, split, source, len(ds), len(pairs), skipped)


def split_dialogue(text: str) -> tuple[str, str] | None:
    """``(prompt, response)`` of an HH dialogue, split after its last "\\n\\nAssistant:" (the response keeps
    its leading space); None if there is no assistant turn."""
    if not isinstance(text, str):
        raise TypeError(f"dialogue must be a string, got {type(text).__name__}")
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


def is_single_turn(prompt: str) -> bool:
    """One human message and the assistant tag that answers it: the paper's single-turn HH subset (§6.3)."""
    return prompt.count(HUMAN_TAG) == 1 and prompt.count(ASSISTANT_TAG) == 1


def load_hh_preferences(
    split: str = "train",
    *,
    path: str | Path | None = None,
    single_turn_only: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Anthropic-HH dialogues as pairs: the shared prompt (through the last "\\n\\nAssistant:") and the two
    final responses.

    ``path=None`` loads ``Anthropic/hh-rlhf`` from the hub (all subsets); otherwise a file, or a folder whose
    ``{split}.jsonl[.gz]`` files (any depth, e.g. ``helpful-base/train.jsonl``) are read together, as the hub
    does. Skipped, by reason: no assistant turn, prompts that differ, an empty response, identical dialogues,
    and with ``single_turn_only`` multi-turn dialogues. Returns ``(pairs, stats)``."""
    ds, source, where = _read(HH_HUB_NAME, None, split, path)
    _require_columns(ds, ("chosen", "rejected"), HH_HUB_NAME, source)
    rows: dict[str, list[str]] = {c: [] for c in PAIR_COLUMNS}
    skipped = dict.fromkeys(HH_SKIP_REASONS, 0)
    if not single_turn_only:
        del skipped["multi_turn"]
    cols = ds.select_columns(["chosen", "rejected"])
    for i, row in enumerate(tqdm(cols, desc=f"HH {split}", disable=not progress)):
        for side in ("chosen", "rejected"):
            try:
                if _text(row[side], side) is None:
                    raise ValueError(f"lacks field {side!r} (or it is null)")
            except ValueError as err:
                raise ValueError(f"{where(i)}: {err}") from err
        chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
        if chosen is None or rejected is None:
            skipped["no_assistant_turn"] += 1
        elif chosen[0] != rejected[0]:
            skipped["prompt_mismatch"] += 1
        elif not chosen[1].strip() or not rejected[1].strip():
            skipped["empty_response"] += 1
        elif chosen[1] == rejected[1]:
            skipped["identical"] += 1
        elif single_turn_only and not is_single_turn(chosen[0]):
            skipped["multi_turn"] += 1
        else:
            rows["prompt"].append(chosen[0])
            rows["chosen"].append(chosen[1])
            rows["rejected"].append(rejected[1])
    pairs = _to_dataset(rows)
    _kept_some(pairs, HH_HUB_NAME, split, source, len(ds), skipped)
    if validate:
        _validated(pairs, source)
    stats = _stats(HH_HUB_NAME, split, source, len(ds), len(pairs), skipped)
    stats["single_turn_only"] = single_turn_only
    return pairs, stats


__all__ = ["ASSISTANT_TAG", "HH_HUB_NAME", "HUMAN_TAG", "TLDR_CONFIG", "TLDR_HUB_NAME", "TLDR_PROMPT",
           "is_single_turn", "load_hh_preferences", "load_tldr_preferences", "read_data_files",
           "split_dialogue", "tldr_prompt", "validate_pairs"]
