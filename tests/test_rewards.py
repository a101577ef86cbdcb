"""Ground-truth rewards r*: the TF-IDF classifier (fit, hand-built scorer, safe save/load) and the hub
pipeline wrapper (on a tiny random RoBERTa saved locally)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import RobertaConfig, RobertaForSequenceClassification

from dpo_lab.data import load_imdb
from dpo_lab.pipeline import load_tfidf_reward, save_tfidf_reward
from dpo_lab.presets import RewardConfig
from dpo_lab.rewards import (
    HubSentimentReward,
    RewardModel,
    TfidfSentimentReward,
    accuracy,
    first_words,
    score_completions,
)

SMALL = {"max_features": 5000, "ngram_max": 2, "C": 4.0}


@pytest.fixture(scope="module")
def imdb_small() -> dict[str, list]:
    """2,000 train and 400 held-out IMDb reviews with labels."""
    imdb = load_imdb("offline")
    train, test = imdb["train"].select(range(2000)), imdb["test"].select(range(400))
    return {"train_texts": list(train["text"]), "train_labels": list(train["label"]),
            "test_texts": list(test["text"]), "test_labels": list(test["label"])}


@pytest.fixture(scope="module")
def tfidf(imdb_small) -> TfidfSentimentReward:
    return TfidfSentimentReward(**SMALL).fit(imdb_small["train_texts"], imdb_small["train_labels"])


def test_tfidf_learns_sentiment(tfidf, imdb_small) -> None:
    assert isinstance(tfidf, RewardModel)
    scores = tfidf(imdb_small["test_texts"])
    assert scores.shape == (400,) and scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    assert accuracy(tfidf, imdb_small["test_texts"], imdb_small["test_labels"]) > 0.78
    short = [first_words(t, 40) for t in imdb_small["test_texts"]]
    assert accuracy(tfidf, short, imdb_small["test_labels"]) > 0.62
    great, awful = tfidf(["A great, wonderful, excellent film.", "An awful, boring, terrible waste."])
    assert great > 0.8 and awful < 0.2


def test_hand_built_scorer_equals_sklearn(tfidf, imdb_small) -> None:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), max_features=5000, min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(imdb_small["train_texts"])
    classifier = LogisticRegression(C=4.0, max_iter=2000).fit(features, imdb_small["train_labels"])
    expected = classifier.predict_proba(vectorizer.transform(imdb_small["test_texts"]))[:, 1]
    np.testing.assert_allclose(tfidf(imdb_small["test_texts"]), expected, rtol=1e-9, atol=1e-12)


def test_save_load_is_safe_and_exact(tmp_path: Path, tfidf, imdb_small) -> None:
    path = save_tfidf_reward(tfidf, tmp_path / "r_star")
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "config.json"]
    with np.load(path / "arrays.npz", allow_pickle=False) as arrays:  # plain arrays: no pickled objects
        assert set(arrays.files) == {"idf", "coef", "intercept"}
    assert json.loads((path / "config.json").read_text())["settings"]["ngram_max"] == 2
    loaded = load_tfidf_reward(path)
    np.testing.assert_array_equal(loaded(imdb_small["test_texts"]), tfidf(imdb_small["test_texts"]))
    assert loaded.most_informative_features(5) == tfidf.most_informative_features(5)
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved TfidfSentimentReward"):
        load_tfidf_reward(tmp_path / "bad")


def test_most_informative_features(tfidf) -> None:
    top = tfidf.most_informative_features(25)
    pos_terms, neg_terms = [t for t, _ in top["positive"]], [t for t, _ in top["negative"]]
    pos_w, neg_w = [w for _, w in top["positive"]], [w for _, w in top["negative"]]
    assert len(pos_terms) == len(neg_terms) == 25
    assert pos_w == sorted(pos_w, reverse=True) and min(pos_w) > 0
    assert neg_w == sorted(neg_w) and max(neg_w) < 0
    assert {"great", "excellent", "best"} & set(pos_terms) and {"bad", "worst", "awful"} & set(neg_terms)


def test_input_validation(tfidf) -> None:
    assert tfidf([]).shape == (0,)
    with pytest.raises(TypeError, match="must be a str"):
        tfidf(["fine", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single str"):
        tfidf("a single review")
    assert tfidf(["zzzz qqqq"])[0] == pytest.approx(1 / (1 + np.exp(-tfidf.intercept)))  # no known term
    with pytest.raises(RuntimeError, match="not fitted"):
        TfidfSentimentReward()(["text"])
    with pytest.raises(ValueError, match="single class"):
        TfidfSentimentReward().fit(["a good film", "a fine film"], [1, 1])
    with pytest.raises(ValueError, match="expected 2 labels"):
        TfidfSentimentReward().fit(["a good film", "a bad film"], [1])
    config_model = TfidfSentimentReward.from_config(RewardConfig(max_features=123, ngram_max=1, C=2.0))
    assert (config_model.settings["max_features"], config_model.settings["ngram_max"]) == (123, 1)


def test_score_completions_concatenates(tfidf) -> None:
    prompts, completions = ["This movie", "I thought it"], [" was wonderful and moving.", " was a dull mess."]
    joined = ["This movie was wonderful and moving.", "I thought it was a dull mess."]
    np.testing.assert_array_equal(score_completions(tfidf, prompts, completions), tfidf(joined))
    with pytest.raises(ValueError, match="pair up"):
        score_completions(tfidf, prompts, completions[:1])
    assert score_completions(tfidf, [], []).shape == (0,)


def _tiny_classifier(path: Path, tokenizer, id2label: dict[int, str]) -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=600,
                           type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id, num_labels=2, id2label=id2label,
                           label2id={v: k for k, v in id2label.items()})
    model = RobertaForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("id2label", [{0: "NEGATIVE", 1: "POSITIVE"}, {0: "positive", 1: "negative"}])
def test_hub_reward_returns_p_positive(tmp_path: Path, tiny_tokenizer, id2label) -> None:
    model = _tiny_classifier(tmp_path / "clf", tiny_tokenizer, id2label)
    reward = HubSentimentReward(str(tmp_path / "clf"), batch_size=2)
    texts = ["This movie was great.", "A terrible film, boring.", "I watched it twice.", "Worst movie ever"]
    scores = reward(texts)
    assert isinstance(reward, RewardModel) and scores.shape == (4,)
    positive = next(i for i, name in id2label.items() if name.lower() == "positive")
    with torch.no_grad():
        for text, score in zip(texts, scores, strict=True):
            enc = tiny_tokenizer(text, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            assert score == pytest.approx(logits.softmax(-1)[0, positive].item(), abs=1e-5)
    assert reward([]).shape == (0,)
    with pytest.raises(TypeError, match="must be a str"):
        reward([None])  # type: ignore[list-item]


def test_hub_reward_without_positive_label(tmp_path: Path, tiny_tokenizer) -> None:
    _tiny_classifier(tmp_path / "clf", tiny_tokenizer, {0: "LABEL_0", 1: "LABEL_1"})
    with pytest.raises(ValueError, match="POSITIVE"):
        HubSentimentReward(str(tmp_path / "clf"))
