"""The ground-truth reward r*(x, y) of the IMDb task: the probability that a sentiment classifier gives to
"positive" for the prompt and completion read together (paper §6.1, App. C.1).

Any ``RewardModel`` is a callable ``texts -> np.ndarray`` of p(positive | text) in [0, 1]:

* :class:`TfidfSentimentReward` (the `smoke` and `cpu` presets): TF-IDF + logistic regression trained here on
  IMDb labels, saved in safe formats (JSON + ``.npz``), scored by a few lines of NumPy;
* :class:`HubSentimentReward` (the `paper` preset): ``siebert/sentiment-roberta-large-english``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from dpo_lab.cache import atomic_directory
from dpo_lab.data import validate_texts
from dpo_lab.presets import RewardConfig

FORMAT_VERSION = 1


@runtime_checkable
class RewardModel(Protocol):
    """p(positive | text) for each text: an array of shape (len(texts),) with values in [0, 1]."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def score_completions(reward: RewardModel, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """r*(x, y) for each pair: the reward of the prompt and its completion concatenated as text (the
    completion's decoded text carries its own leading space, so the two are joined as they are)."""
    prompts = validate_texts(prompts, name="prompts", allow_empty=True)
    completions = validate_texts(completions, name="completions", allow_empty=True)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up")
    return reward([p + c for p, c in zip(prompts, completions, strict=True)])


def accuracy(reward: RewardModel, texts: Sequence[str], labels: Sequence[int]) -> float:
    """Share of texts whose label (1 positive, 0 negative) matches ``reward(text) > 0.5``."""
    labels = _check_labels(labels, len(texts))
    return float(np.mean((reward(texts) > 0.5) == (labels == 1)))


def first_words(text: str, n: int) -> str:
    """The first ``n`` whitespace-separated words: a review cut to the length of a completion."""
    return " ".join(text.split()[:n])


def _check_labels(labels: Sequence[int], n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels (one per text), got shape {labels.shape}")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (negative) or 1 (positive), got values {np.unique(labels)[:10]}")
    return labels.astype(np.int64)


class TfidfSentimentReward:
    """Word 1-to-``ngram_max``-gram TF-IDF (sublinear tf, l2 norm) + L2 logistic regression.

    Fitting uses scikit-learn; scoring uses only the fitted arrays (vocabulary, idf, coef, intercept), so a
    saved model needs no pickle: ``p = sigmoid(coef · normalise((1 + log tf) * idf) + intercept)``.
    """

    def __init__(self, *, max_features: int = 50_000, ngram_max: int = 2, C: float = 4.0, min_df: int = 2):
        if max_features < 1 or ngram_max < 1 or C <= 0 or min_df < 1:
            raise ValueError(f"need max_features >= 1, ngram_max >= 1, C > 0, min_df >= 1; got "
                             f"max_features={max_features}, ngram_max={ngram_max}, C={C}, min_df={min_df}")
        self.settings: dict[str, Any] = {
            "max_features": int(max_features), "ngram_max": int(ngram_max), "C": float(C),
            "min_df": int(min_df), "lowercase": True,
            "token_pattern": r"(?u)\b\w\w+\b", "sublinear_tf": True, "norm": "l2"}
        self.terms: list[str] | None = None
        self.idf: np.ndarray | None = None
        self.coef: np.ndarray | None = None
        self.intercept: float | None = None
        self._counter: CountVectorizer | None = None

    @classmethod
    def from_config(cls, config: RewardConfig) -> TfidfSentimentReward:
        return cls(max_features=config.max_features, ngram_max=config.ngram_max, C=config.C)

    # ------------------------------------------------------------------------------------------ fitting
    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> TfidfSentimentReward:
        """Fit on reviews and their labels (1 positive, 0 negative); returns self."""
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
        vocabulary = vectorizer.vocabulary_
        terms = [""] * len(vocabulary)
        for term, index in vocabulary.items():
            terms[index] = term
        self._set_arrays(terms, vectorizer.idf_, classifier.coef_[0], float(classifier.intercept_[0]))
        return self

    def _set_arrays(self, terms: list[str], idf: np.ndarray, coef: np.ndarray, intercept: float) -> None:
        if not len(terms) == len(idf) == len(coef):
            raise ValueError(f"inconsistent reward model: {len(terms)} terms, {len(idf)} idf values, "
                             f"{len(coef)} coefficients")
        self.terms, self.intercept = list(terms), float(intercept)
        self.idf, self.coef = np.asarray(idf, np.float64), np.asarray(coef, np.float64)
        # A CountVectorizer with a fixed vocabulary needs no fitting: it only tokenizes and counts n-grams.
        self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.terms)},
                                        ngram_range=(1, self.settings["ngram_max"]),
                                        lowercase=self.settings["lowercase"],
                                        token_pattern=self.settings["token_pattern"], dtype=np.float64)

    # ------------------------------------------------------------------------------------------ scoring
    def features(self, texts: Sequence[str]) -> sp.csr_matrix:
        """The TF-IDF matrix (n_texts, n_terms), computed by hand from the fitted arrays."""
        if self._counter is None:
            raise RuntimeError("TfidfSentimentReward is not fitted: call fit() or load() first")
        counts = sp.csr_matrix(self._counter.transform(texts), dtype=np.float64)
        counts.data = 1.0 + np.log(counts.data)  # sublinear tf
        counts.data *= self.idf[counts.indices]
        norms = np.sqrt(np.asarray(counts.multiply(counts).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0  # a text with no known term stays the zero vector
        return sp.csr_matrix(sp.diags(1.0 / norms) @ counts)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """log p(pos)/p(neg) for each text."""
        texts = validate_texts(texts, allow_empty=True)
        if not texts:
            return np.zeros(0)
        return self.features(texts) @ self.coef + self.intercept

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """p(positive | text) for each text."""
        return expit(self.logits(texts))

    def most_informative_features(self, k: int = 20) -> dict[str, list[tuple[str, float]]]:
        """The ``k`` n-grams with the largest positive and the largest negative coefficients."""
        if self.coef is None or self.terms is None:
            raise RuntimeError("TfidfSentimentReward is not fitted: call fit() or load() first")
        order = np.argsort(self.coef, kind="stable")
        terms, coef = self.terms, self.coef
        return {"positive": [(terms[i], float(coef[i])) for i in order[::-1][:k]],
                "negative": [(terms[i], float(coef[i])) for i in order[:k]]}

    # ------------------------------------------------------------------------------------ safe save/load
    def save(self, path: str | Path) -> Path:
        """``config.json`` (settings and vocabulary) + ``arrays.npz`` (idf, coef, intercept); no pickle."""
        if self.terms is None:
            raise RuntimeError("cannot save an unfitted TfidfSentimentReward")
        with atomic_directory(path) as tmp:
            meta = {"format": "dpo_lab.TfidfSentimentReward", "version": FORMAT_VERSION,
                    "settings": self.settings, "terms": self.terms}
            (tmp / "config.json").write_text(json.dumps(meta, ensure_ascii=False))
            np.savez(tmp / "arrays.npz", idf=self.idf, coef=self.coef, intercept=np.array([self.intercept]))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> TfidfSentimentReward:
        """Rebuild a saved model from JSON and ``.npz`` (``allow_pickle=False``)."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "arrays.npz").is_file():
            raise FileNotFoundError(f"no saved TfidfSentimentReward at {path} "
                                    "(config.json or arrays.npz missing)")
        meta = json.loads((path / "config.json").read_text())
        if meta.get("format") != "dpo_lab.TfidfSentimentReward" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} holds format {meta.get('format')!r} v{meta.get('version')}, expected "
                             f"'dpo_lab.TfidfSentimentReward' v{FORMAT_VERSION}")
        s = meta["settings"]
        model = cls(max_features=s["max_features"], ngram_max=s["ngram_max"], C=s["C"], min_df=s["min_df"])
        model.settings = s
        with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
            model._set_arrays(meta["terms"], arrays["idf"], arrays["coef"], float(arrays["intercept"][0]))
        return model


class HubSentimentReward:
    """A hub sentiment classifier as r*: p(label "POSITIVE") from a transformers text-classification pipeline.

    The paper uses ``siebert/sentiment-roberta-large-english`` with all scores returned, ``batch_size=16``,
    ``truncation=True, max_length=512`` (official repo, issue #27). ``name`` may also be a local folder.
    """

    def __init__(self, name: str = "siebert/sentiment-roberta-large-english", device: Any = None,
                 batch_size: int = 16, *, max_length: int = 512, revision: str | None = None):
        from transformers import pipeline

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        # .bin checkpoints (siebert has no safetensors on main) load with torch.load(weights_only=True).
        self.pipe = pipeline("text-classification", model=name, tokenizer=name, device=device, top_k=None,
                             revision=revision, trust_remote_code=False)
        labels = [str(v) for v in self.pipe.model.config.id2label.values()]
        positive = [label for label in labels if label.lower() == "positive"]
        if len(positive) != 1:
            raise ValueError(f"model {name!r} has labels {labels}; expected exactly one named 'POSITIVE' "
                             "(any case)")
        self.positive_label = positive[0]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """p(POSITIVE | text) for each text."""
        texts = validate_texts(texts, allow_empty=True)
        if not texts:
            return np.zeros(0)
        outputs = self.pipe(texts, batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        return np.array([next(d["score"] for d in scores if d["label"] == self.positive_label)
                         for scores in outputs], dtype=np.float64)
