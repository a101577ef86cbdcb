"""The audit (dpo_lab/audit.py) on toy texts: a word-order classifier, a fluency LM, distinct-word ratios."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dpo_lab.audit import FluencyLM, WordOrderSentiment, distinct_word_ratio
from dpo_lab.presets import AuditConfig, get_preset
from dpo_lab.rewards import RewardModel, TfidfSentimentReward, accuracy

TINY = AuditConfig(max_words=16, vocab_size=100, embed_dim=16, channels=16, epochs=12,
                   batch_size=16, lr=1e-2, lm_vocab_size=300, lm_n_layer=1, lm_n_head=2, lm_n_embd=32,
                   lm_steps=60, lm_batch_size=8, lm_lr=5e-3)
FILLER = "the movie film plot actor scene story was and it".split()


def toy(n: int, seed: int, *, order: bool) -> tuple[list[str], list[int]]:
    """Filler words around sentiment words. ``order=False``: one of good/great (1) or bad/awful (0).
    ``order=True``: every text holds "not", "good" and "bad"; "not good ... bad" is 0 and "good ... not bad"
    is 1, so the two classes have the same bag of words and only word order separates them."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=6))
        if order:
            first, second = (["good"], ["not", "bad"]) if label else (["not", "good"], ["bad"])
            words[1:1], words[5:5] = first, second
        else:
            word = rng.choice(["good", "great"] if label else ["bad", "awful"])
            words.insert(int(rng.integers(7)), str(word))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def judge() -> WordOrderSentiment:
    return WordOrderSentiment.fit(*toy(160, 0, order=True), TINY, seed=0)


def test_classifier_learns_a_separable_task():
    model = WordOrderSentiment.fit(*toy(160, 0, order=False), TINY, seed=0)
    assert isinstance(model, RewardModel)
    assert accuracy(model, *toy(100, 1, order=False)) > 0.9


def test_classifier_sees_word_order_that_a_bag_of_words_cannot(judge: WordOrderSentiment):
    texts, labels = toy(100, 1, order=True)
    assert accuracy(judge, texts, labels) > 0.9
    bag = TfidfSentimentReward(ngram_max=1, min_df=1).fit(*toy(160, 0, order=True))
    assert accuracy(bag, texts, labels) < 0.7  # same words in both classes


def test_classifier_is_deterministic_for_a_seed(judge: WordOrderSentiment):
    texts = toy(20, 2, order=True)[0] + [""]
    again = WordOrderSentiment.fit(*toy(160, 0, order=True), TINY, seed=0)
    assert np.array_equal(judge(texts), again(texts))
    other = WordOrderSentiment.fit(*toy(160, 0, order=True), TINY, seed=1)
    assert not np.array_equal(judge(texts), other(texts))
    assert judge([]).shape == (0,) and 0 < judge([""])[0] < 1  # no words: the bias alone


def test_classifier_round_trip_and_damaged_files(judge: WordOrderSentiment, tmp_path):
    texts = toy(20, 3, order=True)[0]
    path = judge.save(tmp_path / "judge")
    assert np.array_equal(WordOrderSentiment.load(path)(texts), judge(texts))
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(str(path / "model.safetensors"))):
        WordOrderSentiment.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors missing"):
        WordOrderSentiment.load(path)
    path = judge.save(tmp_path / "judge")
    (path / "config.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=re.escape(str(path / "config.json"))):
        WordOrderSentiment.load(path)


def test_fluency_lm_prefers_fluent_text_and_round_trips(tmp_path):
    corpus = ["This movie was great, I loved the acting and the story.",
              "A terrible film. The plot was boring and the actors were awful.",
              "I watched it twice; the music is wonderful and the ending is sad."] * 8
    lm = FluencyLM.fit(corpus, TINY, seed=0)
    prompts = ["This movie", "A terrible", "I watched", "", "This movie"]
    completions = [" was great, I loved the acting", " film. The plot was boring",
                   " acting loved the, great I was", " This movie was great", ""]
    scores = lm(prompts, completions)
    assert scores[0] > scores[2] + 1.0  # the same tokens, shuffled
    assert np.isfinite(scores[:4]).all() and np.isnan(scores[4])  # empty prompt: fine; empty completion: NaN
    again = FluencyLM.load(lm.save(tmp_path / "lm"))
    np.testing.assert_array_equal(again(prompts, completions), scores)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        lm(["a", "b"], [" c"])


def test_distinct_word_ratio_exact_values():
    ratios = distinct_word_ratio(["a b a b", "Great great GREAT!", "one", "", "!! ..."])
    np.testing.assert_array_equal(ratios[:3], [0.5, 1 / 3, 1.0])
    assert np.isnan(ratios[3:]).all()  # no word: undefined


@pytest.mark.parametrize("overrides, words", [
    ({"audit.lr": 0}, "audit.lr must be > 0, got 0.0"),
    ({"audit.epochs": 0}, "audit.epochs must be >= 1, got 0"),
    ({"audit.lm_vocab_size": 100}, "audit.lm_vocab_size must be >= 257, got 100"),
    ({"audit.lm_batch_size": 5000}, "audit.lm_batch_size must be <= data.audit_reviews (3000), got 5000"),
    ({"audit.lm_n_head": 3}, "audit.lm_n_embd (128) must be divisible by audit.lm_n_head (3)"),
])
def test_preset_validator_names_a_bad_audit_value(overrides, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        get_preset("cpu", **overrides)
