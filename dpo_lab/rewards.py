"""The ground-truth reward r*(x, y) of the IMDb task: the probability that a sentiment classifier gives to
"positive" for the prompt and completion read together (paper §6.1, App. C.1): :class:`TfidfSentimentReward`
(the `smoke` and `cpu` presets) or :class:`HubSentimentReward` (the `paper` preset)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from dpo_lab.data import validate_texts
from dpo_lab.presets import RewardConfig


@runtime_checkable
class RewardModel(Protocol):  # p(positive | text) for each text, shape (len(texts),)
    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def score_completions(reward: RewardModel, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """r*(x, y) for each pair: the reward of prompt + completion (which carries its own leading space)."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up")
    return reward([p + c for p, c in zip(prompts, completions, strict=True)])


def accuracy(reward: RewardModel, texts: Sequence[str], labels: Sequence[int]) -> float:
    labels = _check_labels(labels, len(texts))
    return float(np.mean((reward(texts) > 0.5) == (labels == 1)))


def first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def _check_labels(labels: Sequence[int], n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels (one per text), got shape {labels.shape}")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (negative) or 1 (positive), got values {np.unique(labels)[:10]}")
    return labels.astype(np.int64)


class TfidfSentimentReward:
    """``p = sigmoid(coef · normalise((1 + log tf) * idf) + intercept)``: word 1-to-``ngram_max``-gram TF-IDF
    and logistic regression fitted by scikit-learn, scored from its arrays alone (no pickle)."""

    def __init__(self, *, max_features: int = 50_000, ngram_max: int = 2, C: float = 4.0, min_df: int = 2):
        self.settings: dict[str, Any] = {  # all saved with the model
            "max_features": int(max_features), "ngram_max": int(ngram_max), "C": float(C),
            "min_df": int(min_df), "lowercase": True, "token_pattern": r"(?u)\b\w\w+\b", "sublinear_tf": True,
            "norm": "l2"}
        self.terms: list[str] | None = None  # then the fitted idf, coef and intercept, and the n-gram counter
        self.idf = self.coef = self.intercept = self._counter = None

    @classmethod
    def from_config(cls, config: RewardConfig) -> TfidfSentimentReward:
        return cls(max_features=config.max_features, ngram_max=config.ngram_max, C=config.C)

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> TfidfSentimentReward:
        texts = validate_texts(texts, name="training texts")
        labels = _check_labels(labels, len(texts))
        if len(np.unique(labels)) < 2:
            raise ValueError("training labels hold a single class; need both positive and negative reviews")
        s = self.settings
        vectorizer = TfidfVectorizer(ngram_range=(1, s["ngram_max"]), max_features=s["max_features"],
                                     min_df=s["min_df"], lowercase=s["lowercase"],
                                     token_pattern=s["token_pattern"], sublinear_tf=s["sublinear_tf"],
                                     norm=s["norm"], dtype=np.float64)
        features = vectorizer.fit_transform(texts)
        classifier = LogisticRegression(C=s["C"], max_iter=2000).fit(features, labels)
        terms = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)  # by column index
        return self.set_arrays(terms, vectorizer.idf_, classifier.coef_[0], float(classifier.intercept_[0]))

    def set_arrays(self, terms: list[str], idf: np.ndarray, coef: np.ndarray,
                   intercept: float) -> TfidfSentimentReward:
        """The fitted model: what :meth:`fit` computes, or what ``pipeline.load_tfidf_reward`` read."""
        self.terms, self.intercept = list(terms), float(intercept)
        self.idf, self.coef = np.asarray(idf, np.float64), np.asarray(coef, np.float64)
        # A CountVectorizer with a fixed vocabulary needs no fitting: it only tokenizes and counts n-grams.
        self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.terms)},
                                        ngram_range=(1, self.settings["ngram_max"]),
                                        lowercase=self.settings["lowercase"],
                                        token_pattern=self.settings["token_pattern"], dtype=np.float64)
        return self

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """p(positive | text) for each text, from TF-IDF features computed by hand."""
        texts = validate_texts(texts, allow_empty=True)
        if not texts:
            return np.zeros(0)
        if self._counter is None:
            raise RuntimeError("TfidfSentimentReward is not fitted: call fit() or set_arrays() first")
        counts = sp.csr_matrix(self._counter.transform(texts), dtype=np.float64)
        counts.data = 1.0 + np.log(counts.data)  # sublinear tf
        counts.data *= self.idf[counts.indices]
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0  # a text with no known term stays the zero vector
        return expit(sp.csr_matrix(sp.diags(1.0 / norms) @ counts) @ self.coef + self.intercept)

    def most_informative_features(self, k: int = 20) -> dict[str, list[tuple[str, float]]]:
        """The ``k`` n-grams with the largest positive, and with the largest negative, coefficients."""
        order = np.argsort(self.coef, kind="stable")
        return {"positive": [(self.terms[i], float(self.coef[i])) for i in order[::-1][:k]],
                "negative": [(self.terms[i], float(self.coef[i])) for i in order[:k]]}


class HubSentimentReward:
    """A hub classifier's p("POSITIVE") as r*, as the paper uses ``siebert/sentiment-roberta-large-english``
    (batch 16, truncated at 512 tokens: official repo, issue #27). ``name`` may be a local folder."""

    def __init__(self, name: str = "siebert/sentiment-roberta-large-english", device: Any = None,
                 batch_size: int = 16):
        from transformers import pipeline

        self.name, self.batch_size = name, batch_size
        self.pipe = pipeline("text-classification", model=name, tokenizer=name, device=device, top_k=None,
                             trust_remote_code=False)
        labels = [str(v) for v in self.pipe.model.config.id2label.values()]
        positive = [label for label in labels if label.lower() == "positive"]
        if len(positive) != 1:
            raise ValueError(f"model {name!r} has labels {labels}; expected exactly one named 'POSITIVE' "
                             "(any case)")
        self.positive_label = positive[0]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = validate_texts(texts, allow_empty=True)
        if not texts:
            return np.zeros(0)
        outputs = self.pipe(texts, batch_size=self.batch_size, truncation=True, max_length=512)
        return np.array([next(d["score"] for d in scores if d["label"] == self.positive_label)
                         for scores in outputs], dtype=np.float64)
