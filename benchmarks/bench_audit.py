"""The audit models at a preset's size (issue #21 item 2): training times, the classifier's held-out
accuracy (full reviews and their first 40 words, beside r*'s TF-IDF fitted on the same reviews), the LM's
per-token log-likelihood on held-out review openings, and a word-spam sanity check.

    DPO_LAB_ARTIFACTS=/tmp/audit-artifacts .venv/bin/python benchmarks/bench_audit.py [--preset cpu]

Fits on the preset's audit reviews (``pipeline.imdb(preset)["audit"]``), measures on its test reviews.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dpo_lab import pipeline
from dpo_lab.audit import FluencyLM, WordOrderSentiment, distinct_word_ratio
from dpo_lab.presets import get_preset
from dpo_lab.rewards import TfidfSentimentReward, accuracy, first_words, score_completions

PAIRS = [  # (prompt, completion): word spam as PPO-GT learns it, fluent text, the fluent text shuffled
    ("I watched this movie and", " great excellent film and but it for it is great friends, with a excellent "
                                 "work scenery"),
    ("I watched this movie and", " it was a delight from start to finish, with a moving story and wonderful "
                                 "performances."),
    ("I watched this movie and", " story from delight a finish, start with and wonderful was a moving it to "
                                 "performances."),
    ("I watched this movie and", " it was a waste of time, with a dull story and terrible acting."),
    ("I watched this movie and", " it was not good, not funny and not worth seeing."),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="cpu")
    preset = get_preset(parser.parse_args().preset)
    config, data = preset.audit, pipeline.imdb(preset)
    train, test = data["audit"][:], data["test"][:]
    print(f"torch threads {torch.get_num_threads()}; {len(train['text'])} train, "
          f"{len(test['text'])} test reviews")
    start = time.perf_counter()
    sentiment = WordOrderSentiment.fit(train["text"], train["label"], config, seed=0)
    t_cls = time.perf_counter() - start
    start = time.perf_counter()
    fluency = FluencyLM.fit(train["text"], config, seed=0)
    t_lm = time.perf_counter() - start
    print(f"fit seconds: classifier {t_cls:.1f}, LM {t_lm:.1f}, total {t_cls + t_lm:.1f}")
    tfidf = TfidfSentimentReward().fit(train["text"], train["label"])
    short = [first_words(t, 40) for t in test["text"]]
    for name, judge in (("audit CNN", sentiment), ("TF-IDF (same reviews)", tfidf)):
        print(f"{name:>22}: accuracy full {accuracy(judge, test['text'], test['label']):.3f}, "
              f"first 40 words {accuracy(judge, short, test['label']):.3f}")
    prompts = [first_words(t, 5) for t in test["text"]]
    openings = [" " + " ".join(t.split()[5:40]) for t in test["text"]]
    print(f"LM mean log p per token, held-out openings (words 6-40 after 5): "
          f"{np.nanmean(fluency(prompts, openings)):.3f}")
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    scores = {"audit_sentiment": score_completions(sentiment, prompts, completions),
              "audit_fluency": fluency(prompts, completions),
              "distinct_words": distinct_word_ratio(completions)}
    r_star = tfidf([p + c for p, c in PAIRS])
    for i, (_, c) in enumerate(PAIRS):
        print(f"r* {r_star[i]:.3f} audit {scores['audit_sentiment'][i]:.3f} fluency "
              f"{scores['audit_fluency'][i]:.2f} distinct {scores['distinct_words'][i]:.2f} |{c[:60]}")


if __name__ == "__main__":
    main()
