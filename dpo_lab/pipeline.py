"""The IMDb controlled-sentiment reproduction as cached stages (docs/design.md's data flow): IMDb -> SFT
policy (pi_ref) -> prompts -> samples -> r* -> pairs -> runs, evaluated on held-out test prompts. Each stage
lives in ``artifacts/<stage>-<key>/``, the key hashing every setting (and upstream key) that produced it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo_lab.audit import FluencyLM, WordOrderSentiment, distinct_word_ratio
from dpo_lab.batching import rankings_from_candidates
from dpo_lab.cache import (
    atomic_directory,
    atomic_write_json,
    cached_directory,
    content_hash,
    naming_damaged_files,
    read_json_object,
    read_saved_config,
)
from dpo_lab.data import load_imdb, make_prompts
from dpo_lab.evaluate import Scorer, make_eval_fn
from dpo_lab.frontier import evaluation_points
from dpo_lab.implicit_reward import HeldOut, draw_heldout, likelihood_fn
from dpo_lab.loop import resolve_device
from dpo_lab.models import build_policy, load_hub_policy, train_sft, train_tokenizer
from dpo_lab.preferences import (
    Candidates,
    PairStats,
    check_nested,
    generate_preference_data,
    validate_preferences,
)
from dpo_lab.presets import DataConfig, Preset, artifacts_dir
from dpo_lab.reward_model import LearnedReward, split_by_prompt
from dpo_lab.rewards import (
    HubSentimentReward,
    RewardModel,
    TfidfSentimentReward,
    accuracy,
    first_words,
    score_completions,
)
from dpo_lab.run import (
    RunResult,
    cached_reward_model,
    dpo_run,
    finished_metrics,
    finished_run,
    load_policy,
    ppo_run,
    read_metrics,
    save_policy,
    schedule_dir,
    trajectory_settings,
)
from dpo_lab.sampling import Samples, sample
from dpo_lab.seed import seed_everything

if TYPE_CHECKING:
    from accelerate import Accelerator

# Progress bars on by default, off where TQDM_DISABLE is set (tests, CI): tqdm lets an explicit
# ``disable=`` argument win over that variable, so the stages read it themselves.
SHOW_PROGRESS = os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")

# Completion-length texts for the classifier's short-text accuracy (about what 32 new tokens decode to).
SHORT_TEXT_WORDS = 40


# ------------------------------------------------------------------------------------------------ keys
def sft_key(preset: Preset) -> str:
    return content_hash("sft", preset.seed, preset.data, preset.tokenizer, preset.policy)


def reward_key(preset: Preset) -> str:  # r* and the audit read only the split: one for every seed
    return content_hash("reward", preset.data, preset.reward)


def audit_key(preset: Preset) -> str:
    return content_hash("audit", preset.data, preset.audit)


def preferences_key(preset: Preset) -> str:
    return content_hash("preferences", sft_key(preset), reward_key(preset), preset.preferences)


def reward_model_key(preset: Preset) -> str:
    return content_hash("reward-model", preferences_key(preset), preset.reward_model, preset.seed)


def stage_dir(stage: str, key: str) -> Path:
    return artifacts_dir() / f"{stage}-{key}"


# ---------------------------------------------------------------------------------------------- stages
SPLITS = ("train", "audit", "validation", "test")


def imdb(preset: Preset) -> datasets.DatasetDict:
    """The split every seed shares: ``train`` (SFT, r*, preference prompts), ``audit`` (the audit's judges
    only), the held-out reviews halved into ``validation`` (choosing settings) and ``test`` (the frontier)."""
    return _imdb(preset.data)


@functools.lru_cache(maxsize=4)  # every stage and run reads it
def _imdb(d: DataConfig) -> datasets.DatasetDict:
    # A stage of its own: parsing and cleaning the CSV took ~3.7 s in every process that read it (each run of
    # a pool or a sweep); the stored split is memory-mapped.
    def build(folder: Path) -> None:
        seed, n_audit = d.split_seed, d.audit_reviews
        dataset = load_imdb(d.source, test_fraction=d.test_fraction, seed=seed)  # type: ignore[arg-type]
        train = dataset["train"].shuffle(seed=seed)
        if n_audit >= len(train):
            raise ValueError(f"data.audit_reviews ({n_audit}) must be below the {len(train)} train reviews")
        held_out = dataset["test"].train_test_split(test_size=0.5, stratify_by_column="label", seed=seed)
        rest = train.select(range(n_audit, len(train)))
        datasets.DatasetDict({
            "train": rest.select(range(min(len(rest), d.max_train_reviews or len(rest)))),
            "audit": train.select(range(n_audit)),
            "validation": held_out["train"], "test": held_out["test"]}).save_to_disk(str(folder / "splits"))

    folder = cached_directory(stage_dir("imdb", content_hash("imdb", d)), build)
    with naming_damaged_files(folder, f"delete {folder} to split the reviews again"):
        return datasets.load_from_disk(str(folder / "splits"))


def sft_policy(preset: Preset, *, progress: bool = SHOW_PROGRESS,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """pi_SFT (= pi_ref, every run's start), its tokenizer and training report; another ``preset.seed``
    trains a sibling (same split and recipe, another initialisation and review order)."""

    def build(folder: Path) -> None:
        seed_everything(preset.seed)
        data = imdb(preset)
        train_texts = data["train"]["text"]
        if preset.policy.source == "scratch":
            tokenizer = train_tokenizer(train_texts, preset.tokenizer.vocab_size)
            model = build_policy(tokenizer, preset.policy, seed=preset.seed)
        else:
            model, tokenizer = load_hub_policy(preset.policy.hub_name)
        report = train_sft(model, tokenizer, train_texts, preset.policy, seed=preset.seed,
                           held_out_texts=data["test"]["text"], progress=progress)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        report["vocab_size"] = len(tokenizer)
        save_policy(model, tokenizer, folder / "policy")
        (folder / "report.json").write_text(json.dumps(report))

    folder = cached_directory(stage_dir("sft", sft_key(preset)), build)
    rebuild = f"delete {folder} to rebuild the SFT stage"
    model, tokenizer = load_policy(folder / "policy", advice=rebuild)
    return model, tokenizer, read_json_object(folder / "report.json", advice=rebuild)


TFIDF_FORMAT, TFIDF_VERSION = "dpo_lab.TfidfSentimentReward", 1


def save_tfidf_reward(reward: TfidfSentimentReward, path: str | Path) -> Path:
    """``config.json`` (settings, vocabulary) and ``arrays.npz`` (idf, coef, intercept): no pickle."""
    if reward.terms is None:
        raise RuntimeError("cannot save an unfitted TfidfSentimentReward")
    with atomic_directory(path) as tmp:
        meta = {"format": TFIDF_FORMAT, "version": TFIDF_VERSION, "settings": reward.settings,
                "terms": reward.terms}
        (tmp / "config.json").write_text(json.dumps(meta, ensure_ascii=False))
        np.savez(tmp / "arrays.npz", idf=reward.idf, coef=reward.coef, intercept=np.array([reward.intercept]))
    return Path(path)


def load_tfidf_reward(path: str | Path) -> TfidfSentimentReward:
    path = Path(path)
    meta = read_saved_config(path, "TfidfSentimentReward", ("config.json", "arrays.npz"), TFIDF_FORMAT,
                             TFIDF_VERSION)
    model = TfidfSentimentReward()
    model.settings = meta["settings"]
    with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
        return model.set_arrays(meta["terms"], arrays["idf"], arrays["coef"], float(arrays["intercept"][0]))


def reward_model(preset: Preset) -> tuple[RewardModel, dict]:
    """The ground-truth reward r*(x, y) = p(positive | x + y) and its held-out accuracy report."""
    if preset.reward.source == "hub":
        reward = HubSentimentReward(preset.reward.hub_name, device=resolve_device())
        return reward, {"source": preset.reward.hub_name}

    def build(folder: Path) -> None:
        data = imdb(preset)
        reward = TfidfSentimentReward.from_config(preset.reward).fit(data["train"]["text"],
                                                                      data["train"]["label"])
        report = {**_short_text_accuracies(reward, data["test"]), "n_test": len(data["test"]),
                  "n_features": len(reward.terms or [])}
        save_tfidf_reward(reward, folder / "reward")
        (folder / "report.json").write_text(json.dumps(report))

    folder = cached_directory(stage_dir("reward", reward_key(preset)), build)
    return load_tfidf_reward(folder / "reward"), json.loads((folder / "report.json").read_text())


def _short_text_accuracies(reward: RewardModel, test: datasets.Dataset) -> dict[str, float]:
    short = [first_words(t, SHORT_TEXT_WORDS) for t in test["text"]]
    return {"accuracy_full_reviews": accuracy(reward, test["text"], test["label"]),
            f"accuracy_first_{SHORT_TEXT_WORDS}_words": accuracy(reward, short, test["label"])}


def audit_judges(preset: Preset, *, progress: bool = SHOW_PROGRESS,
                 ) -> tuple[WordOrderSentiment, FluencyLM, dict]:
    """The audit (docs/design.md): a word-order sentiment classifier and a fluency LM, trained on the audit
    reviews; they score every frontier point beside r* and no method trains against them."""

    def build(folder: Path) -> None:
        data = imdb(preset)
        reviews, seed = data["audit"], preset.data.split_seed
        sentiment = WordOrderSentiment.fit(reviews["text"], reviews["label"], preset.audit, seed=seed,
                                           progress=progress)
        fluency = FluencyLM.fit(reviews["text"], preset.audit, seed=seed, progress=progress)
        report = {**_short_text_accuracies(sentiment, data["test"]), "n_reviews": len(reviews)}
        sentiment.save(folder / "sentiment")
        fluency.save(folder / "fluency")
        (folder / "report.json").write_text(json.dumps(report))

    folder = cached_directory(stage_dir("audit", audit_key(preset)), build)
    rebuild = f"delete {folder} to rebuild the audit stage"
    return (WordOrderSentiment.load(folder / "sentiment"), FluencyLM.load(folder / "fluency"),
            read_json_object(folder / "report.json", advice=rebuild))


def prompts(preset: Preset, tokenizer: PreTrainedTokenizerBase, split: str) -> list[str]:
    """Prefixes of 2-8 tokens of ``split``'s reviews, drawn once for every seed."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    cfg = preset.preferences
    n = cfg.n_prompts if split == "train" else preset.eval.n_prompts
    texts = imdb(preset)[split]["text"]
    return make_prompts(texts, tokenizer, n, min_tokens=cfg.prompt_min_tokens,
                        max_tokens=cfg.prompt_max_tokens, seed=preset.data.split_seed)


def save_preferences(ds: datasets.Dataset, path: str | Path, *, stats: PairStats | None = None,
                     candidates: Candidates | None = None) -> Path:
    """Validate, then write (``save_to_disk``, stats.json, candidates.json) in one atomic rename."""
    validate_preferences(ds)
    with atomic_directory(path) as tmp:
        ds.save_to_disk(str(tmp / "pairs"))
        if stats is not None:
            atomic_write_json(tmp / "stats.json", dataclasses.asdict(stats))
        if candidates is not None:
            atomic_write_json(tmp / "candidates.json", candidates)
    return Path(path)


def load_candidates(path: str | Path) -> Candidates:
    file = Path(path) / "candidates.json"
    if not file.is_file():
        raise FileNotFoundError(f"no candidates.json in {path}: the pairs were saved without their samples")
    candidates = read_json_object(file, ("prompts", "completions", "rewards"),
                                  advice=f"delete {path} and build the pairs again")
    check_nested("completions", candidates["completions"], len(candidates["prompts"]))
    check_nested("rewards", candidates["rewards"], len(candidates["prompts"]))
    return candidates


def load_preferences(path: str | Path, *, advice: str | None = None) -> datasets.Dataset:
    """What :func:`save_preferences` wrote, validated; a damaged file or bad row is a ValueError naming the
    file (and ``advice``, by default: delete ``path`` and build the pairs again)."""
    path = Path(path)
    folder = path / "pairs" if (path / "pairs").is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"no preference data at {path}")
    with naming_damaged_files(folder, advice or f"delete {path} and build the pairs again"):
        ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict with splits {list(ds)}; expected one Dataset of pairs")
    try:
        validate_preferences(ds)
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from err
    return ds


def sampled_pairs_folder(preset: Preset, progress: bool, stage: str = "preferences", key: str = "",
                         sampler: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> Path:
    """A preference stage's pairs folder, built if needed: ``samples_per_prompt`` completions of each train
    prompt from ``sampler`` (a model and its tokenizer; pi_SFT if None), labelled by r*."""

    def build(folder: Path) -> None:
        policy, tokenizer, _ = sft_policy(preset, progress=progress)
        reward, _ = reward_model(preset)
        model, model_tokenizer = sampler or (policy, tokenizer)
        pairs, stats, candidates = generate_preference_data(model, model_tokenizer,
                                                            prompts(preset, tokenizer, "train"), reward,
                                                            preset.preferences, seed=preset.seed,
                                                            progress=progress)
        save_preferences(pairs, folder / "pairs", stats=stats, candidates=candidates)

    return cached_directory(stage_dir(stage, key or preferences_key(preset)), build) / "pairs"


def load_pair_stage(folder: Path) -> tuple[datasets.Dataset, dict]:
    """A preference stage's pairs and stats.json; a damaged file is named with the folder to delete."""
    advice = f"delete {folder.parent} to build these pairs again"
    return load_preferences(folder, advice=advice), read_json_object(folder / "stats.json", advice=advice)


def preference_data(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> tuple[datasets.Dataset, dict]:
    """All 6 pairs per train prompt from 4 pi_SFT samples, labelled by r* (ties dropped and counted)."""
    return load_pair_stage(sampled_pairs_folder(preset, progress))


def preference_candidates(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> Candidates:
    """Every sample of every train prompt with its r* (ties included): what the pairs were built from."""
    return load_candidates(sampled_pairs_folder(preset, progress))


def preference_rankings(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> tuple[dict[str, list], dict]:
    """Each train prompt's samples ranked by r*, best first (Plackett-Luce, App. A.3); prompts with a tie or
    an empty sample dropped."""
    candidates = preference_candidates(preset, progress=progress)
    return rankings_from_candidates(candidates["prompts"], candidates["completions"], candidates["rewards"])


# ------------------------------------------------------------------------------------- runs (Fig. 2)
# One run per (method, hyperparameter value), as in the paper's sweep. PPO methods optimise Eq. 3 with a
# reward (learned r_phi or ground-truth r*); the rest learn from the fixed preference pairs.
PAIRWISE_METHODS = {"DPO": "beta", "Unlikelihood": "alpha", "Preferred-FT": "seed"}
PPO_METHODS = ("PPO", "PPO-GT")
METHODS = (*PAIRWISE_METHODS, *PPO_METHODS)


def hyperparameter_name(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return PAIRWISE_METHODS.get(method, "target_kl")


def frontier_runs(preset: Preset, methods: tuple[str, ...] = METHODS) -> list[tuple[str, float]]:
    """Every (method, value) of the preset's sweeps, in the paper's legend order."""
    values = {"DPO": preset.dpo.betas, "Unlikelihood": preset.baselines.unlikelihood_alphas,
              "Preferred-FT": preset.baselines.preferred_ft_seeds, "PPO": preset.ppo.target_kls,
              "PPO-GT": preset.ppo.target_kls}
    for method in methods:
        hyperparameter_name(method)
    return [(m, float(v)) for m in methods for v in values[m]]


def run_dir(preset: Preset, method: str, value: float, split: str = "test") -> Path:
    """One run's folder; its key hashes the stages it reads, its method's settings and a non-test split."""
    name = hyperparameter_name(method)
    trajectory = trajectory_settings(preset.ppo if method in PPO_METHODS else preset.dpo)
    key = content_hash(method, preferences_key(preset), audit_key(preset), trajectory, preset.reward_model,
                       preset.eval, value, *((split,) if split != "test" else ()))
    return artifacts_dir() / "training" / f"{method.lower()}-{name}{value:g}-{key}"


def learned_reward(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> LearnedReward:
    """r_phi for PPO: the SFT transformer + a scalar head, fit to the pairs by the BT loss (Eq. 2)."""
    policy, tokenizer, _ = sft_policy(preset, progress=progress)
    pairs, _ = preference_data(preset, progress=progress)
    folder = stage_dir("reward-model", reward_model_key(preset))

    def report(step: int, total: int) -> None:  # read by the frontier's progress bar in another process
        if step % 10 == 0 or step == total:
            atomic_write_json(_reward_model_progress(preset), {"step": step, "total": total})

    # Trained once for every PPO run (and every process sharing the artifacts folder), then loaded.
    return cached_reward_model(policy, tokenizer, pairs, out_dir=folder, config=preset.reward_model,
                               seed=preset.seed, progress=progress, on_step=report)


def audit_pair_accuracy(preset: Preset) -> float:
    """How often the audit classifier agrees with r* on r_phi's test pairs (ties count one half)."""
    pairs, _ = preference_data(preset, progress=False)
    _, _, test = split_by_prompt(pairs["prompt"], preset.reward_model.val_fraction, preset.seed)
    sentiment, _, _ = audit_judges(preset, progress=False)
    rows = pairs.select(test)
    chosen = score_completions(sentiment, rows["prompt"], rows["chosen"])
    rejected = score_completions(sentiment, rows["prompt"], rows["rejected"])
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def _reward_model_progress(preset: Preset) -> Path:
    folder = stage_dir("reward-model", reward_model_key(preset))
    return folder.parent / f".{folder.name}.progress"


def run_eval_fn(preset: Preset, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                proxy: bool = False, from_sft: bool = True, split: str = "test"):
    """A run's ``eval_fn(policy, step)``: KL to ``reference``, r* and the audit on ``split``'s prompts (and
    r_phi if ``proxy``); ``from_sft=False`` for a run whose step 0 is not pi_SFT's cached point."""
    reward, _ = reward_model(preset)
    sentiment, fluency, _ = audit_judges(preset, progress=False)
    # The audit reads p(positive), the completion's per-token log-likelihood and its distinct-word ratio.
    scorers: dict[str, Scorer] = {"audit_sentiment": functools.partial(score_completions, sentiment),
                                  "audit_fluency": fluency,
                                  "distinct_words": lambda _, c: distinct_word_ratio(c)}
    if proxy:
        r_phi = learned_reward(preset, progress=False)
        scorers["proxy_reward"] = functools.partial(score_completions, r_phi)
    evaluate = make_eval_fn(reference, tokenizer, prompts(preset, tokenizer, split), reward, preset.eval,
                            seed=preset.seed, scorers=scorers)
    if not from_sft:
        return evaluate
    # Every run starts at pi_SFT and evaluation samples from its own seeded RNG, so step 0 gives the same
    # point in every run of a sweep: compute it once (19 evaluations -> 1 at the cpu preset).
    key = content_hash(sft_key(preset), reward_key(preset), audit_key(preset), preset.eval, preset.seed,
                       split, *(("proxy", reward_model_key(preset)) if proxy else ()))
    start_path = artifacts_dir() / "start-eval" / f"{key}.json"

    def eval_fn(policy: PreTrainedModel, step: int) -> dict[str, float]:
        if step == 0 and start_path.is_file():
            # The point is stored with its key and a checksum, so a damaged or edited file is named, not used.
            saved = read_json_object(start_path, ("key", "point", "checksum"),
                                     advice="delete it to evaluate the start again")
            if saved["key"] != key or saved["checksum"] != content_hash(key, saved["point"]):
                raise ValueError(f"{start_path} was changed after it was written (its key or checksum "
                                 "does not match); delete it to evaluate the start again")
            return saved["point"]
        point = evaluate(policy, step)
        if step == 0:
            stored = json.loads(json.dumps(point))  # as it reads back (numpy scalars as plain numbers)
            checksum = content_hash(key, stored)
            atomic_write_json(start_path, {"key": key, "point": stored, "checksum": checksum})
        return point
    return eval_fn


def pairwise(preset: Preset, method: str, value: float, *, progress: bool = SHOW_PROGRESS,
             accelerator: Accelerator | None = None, gradient_checkpointing: bool = False,
             split: str = "test") -> RunResult:
    """A DPO (value = beta), Unlikelihood (alpha) or Preferred-FT (seed) run from pi_SFT, on every process
    of ``accelerator`` if given; "plackett_luce" DPO trains on :func:`preference_rankings`."""
    if method not in PAIRWISE_METHODS:
        raise ValueError(f"{method!r} is not a pairwise method; choose from {list(PAIRWISE_METHODS)}")
    reference, tokenizer, _ = sft_policy(preset, progress=progress)
    policy = copy.deepcopy(reference)  # pi_theta starts at pi_SFT = pi_ref
    if gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if method == "DPO" and preset.dpo.loss_type == "plackett_luce":
        pairs, _ = preference_rankings(preset, progress=progress)
    else:
        pairs, _ = preference_data(preset, progress=progress)
    objective = {"DPO": "dpo", "Unlikelihood": "unlikelihood", "Preferred-FT": "preferred_ft"}[method]
    config = dataclasses.replace(preset.dpo, max_steps=run_steps(preset, method))
    return dpo_run(policy, reference, tokenizer, pairs, out_dir=run_dir(preset, method, value, split),
                   ref_cache_dir=artifacts_dir() / "reference-logps",
                   eval_fn=run_eval_fn(preset, reference, tokenizer, split=split), accelerator=accelerator,
                   config=config, objective=objective, beta=value if method == "DPO" else None,
                   alpha=value if method == "Unlikelihood" else None,
                   seed=int(value) if method == "Preferred-FT" else preset.seed,
                   max_length=preset.policy.n_positions, progress=progress)


def dpo(preset: Preset, beta: float, *, progress: bool = SHOW_PROGRESS) -> RunResult:
    """One DPO run from pi_SFT at KL coefficient ``beta`` (Eq. 3), evaluated every ``eval_every`` steps."""
    return pairwise(preset, "DPO", beta, progress=progress)


def ppo(preset: Preset, method: str, target_kl: float, *, progress: bool = SHOW_PROGRESS,
        split: str = "test") -> RunResult:
    """A PPO run on the learned reward r_phi ("PPO") or the ground truth r* ("PPO-GT")."""
    if method not in PPO_METHODS:
        raise ValueError(f"{method!r} is not a PPO method; choose from {list(PPO_METHODS)}")
    reference, tokenizer, _ = sft_policy(preset, progress=progress)
    policy = copy.deepcopy(reference)  # pi_theta starts at pi_SFT = pi_ref
    score_fn = learned_reward(preset, progress=progress) if method == "PPO" else reward_model(preset)[0]
    config = dataclasses.replace(preset.ppo, target_kl=target_kl)
    return ppo_run(policy, reference, tokenizer, prompts(preset, tokenizer, "train"), score_fn,
                   out_dir=run_dir(preset, method, target_kl, split),
                   eval_fn=run_eval_fn(preset, reference, tokenizer, split=split), config=config,
                   seed=preset.seed, progress=progress)


def result(preset: Preset, method: str, value: float, *, progress: bool = SHOW_PROGRESS,
           split: str = "test") -> RunResult:
    """One run of any method, evaluated on ``split``'s prompts; a finished run read from its result.json."""
    steps = run_steps(preset, method)
    finished = finished_run(schedule_dir(run_dir(preset, method, value, split), steps), steps)
    if finished is not None:
        return finished
    if method in PPO_METHODS:
        return ppo(preset, method, value, progress=progress, split=split)
    return pairwise(preset, method, value, progress=progress, split=split)


def sample_test_prompts(preset: Preset, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        n_prompts: int, *, n_per_prompt: int = 1) -> Samples:
    """Completions of the first ``n_prompts`` test prompts drawn as the evaluation draws them (its length, the
    preset's seed), in one batch: every policy sampled gets the same random numbers."""
    shown = prompts(preset, tokenizer, "test")[:n_prompts]
    return sample(policy, tokenizer, shown, n_per_prompt=n_per_prompt, batch_size=len(shown) * n_per_prompt,
                  max_new_tokens=preset.eval.max_new_tokens, seed=preset.seed, progress=False)


def heldout(preset: Preset, *, progress: bool = SHOW_PROGRESS) -> HeldOut:
    """K pi_SFT samples of every test prompt scored by r*: pairs no run trained on (another seed)."""
    reference, tokenizer, _ = sft_policy(preset, progress=progress)
    reward, _ = reward_model(preset)
    return draw_heldout(reference, tokenizer, prompts(preset, tokenizer, "test"), reward,
                        n_per_prompt=preset.preferences.samples_per_prompt,
                        max_new_tokens=preset.preferences.max_new_tokens,
                        batch_size=preset.preferences.sample_batch_size, seed=preset.seed + 1000)


def likelihood_trace(preset: Preset, beta: float, *, progress: bool = SHOW_PROGRESS) -> RunResult:
    """:func:`dpo`'s run at ``beta`` again (same trajectory), in its own folder, looked at 10 times with
    ``implicit_reward.likelihood_fn``: what DPO does to the likelihoods of held-out pairs and its samples."""
    if preset.dpo.loss_type == "plackett_luce":
        raise ValueError("likelihood_trace follows the chosen and rejected completions of pairs; "
                         "dpo.loss_type 'plackett_luce' trains on rankings: trace a pairwise loss_type")
    reference, tokenizer, _ = sft_policy(preset, progress=progress)
    pairs, _ = preference_data(preset, progress=progress)
    every = max(1, preset.dpo.max_steps // 10)
    config = dataclasses.replace(preset.dpo, eval_every=every)
    key = content_hash("likelihood-trace", preferences_key(preset), preset.dpo, beta, every)
    eval_fn = likelihood_fn(reference, tokenizer, heldout(preset, progress=progress), beta=beta,
                            max_new_tokens=preset.eval.max_new_tokens, batch_size=preset.eval.batch_size,
                            seed=preset.seed)
    return dpo_run(copy.deepcopy(reference), reference, tokenizer, pairs,
                   out_dir=artifacts_dir() / "training" / f"trace-beta{beta:g}-{key}",
                   ref_cache_dir=artifacts_dir() / "reference-logps", eval_fn=eval_fn, config=config,
                   beta=beta, seed=preset.seed, max_length=preset.policy.n_positions, progress=progress)


# ---------------------------------------------------------------------------------------------- results
def _train_in_worker(preset: Preset, method: str, value: float) -> float:
    """One run in a worker process of :func:`frontier`, on one thread; its wall seconds."""
    import torch

    # Two single-thread runs side by side keep both cores busy through the sequential parts of a run
    # (sampling, Python, small kernels) that leave the second thread of one run idle (docs/performance.md).
    torch.set_num_threads(1)
    start = time.perf_counter()
    result(preset, method, value, progress=False)
    return time.perf_counter() - start


def default_workers() -> int:
    """Frontier runs side by side by default: one single-thread run per usable core (docs/performance.md);
    two on a CUDA machine, so that one run's kernels fill the gaps while the other runs Python."""
    import torch

    if torch.cuda.is_available():
        return 2
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_steps(preset: Preset, method: str) -> int:
    """How many optimizer steps one run of ``method`` takes at ``preset``."""
    if method in PPO_METHODS:
        return preset.ppo.max_steps
    return preset.dpo.max_steps if method == "DPO" else preset.baselines.max_steps or preset.dpo.max_steps


def run_work(preset: Preset, method: str) -> float:
    """One run's work in token passes (sampled or scored tokens 1, trained ones 3), evaluations included: its
    weight in the frontier's progress bar (every method runs at about one FLOP rate, docs/performance.md)."""
    pref, ev, policy = preset.preferences, preset.eval, preset.policy
    prompt = (pref.prompt_min_tokens + pref.prompt_max_tokens) / 2
    pairs = pref.n_prompts * math.comb(pref.samples_per_prompt, 2)
    # r_phi's passes skip the LM head: they cost 24 L d^2 of a token's 24 L d^2 + 2 d V matmul FLOPs.
    layers = 12 * policy.n_layer * policy.n_embd
    body = layers / (layers + preset.tokenizer.vocab_size)
    if method == "r_phi":  # 3 epochs over the training pairs, each validation over the held-out ones
        rm = preset.reward_model
        steps = rm.max_steps or rm.epochs * math.ceil(pairs * (1 - 2 * rm.val_fraction) / rm.batch_size)
        val_pairs = min(pairs * rm.val_fraction, rm.max_val_pairs or pairs)
        passes = steps * rm.batch_size * 3 + (steps // rm.eval_every + rm.epochs) * val_pairs
        return passes * 2 * (prompt + pref.max_new_tokens) * body
    steps = run_steps(preset, method)
    every = preset.ppo.eval_every if method in PPO_METHODS else preset.dpo.eval_every
    # An evaluation samples with the reference stepping alongside; step 0 is evaluated once per sweep.
    work = math.ceil(steps / every) * ev.n_prompts * ev.samples_per_prompt * (prompt + ev.max_new_tokens) * 2
    if method in PPO_METHODS:  # a rollout: sampled, policy+value, reference (and r_phi) passes; updates
        ppo = preset.ppo
        per_rollout = (prompt + ppo.max_new_tokens) * (3 + body * (method == "PPO") + 3 * ppo.ppo_epochs)
        return work + steps * ppo.rollout_batch_size * per_rollout
    return work + steps * preset.dpo.batch_size * 2 * (prompt + pref.max_new_tokens) * 3


Item = tuple[str, float]  # (method, hyperparameter value) of a run
R_PHI: Item = ("r_phi", 0.0)  # trained by the first PPO run before its first step, billed once


class _PoolProgress:
    """The frontier pool's bar: the share of the stage's work done (:func:`run_work`, counted from each run's
    last logged step and r_phi's reports; work done before the stage not counted), an ETA from the mean rate
    so far, and the step each running run has reached."""

    def __init__(self, preset: Preset, runs: list[Item], *, disable: bool) -> None:
        self.preset, self.finished = preset, set[Item]()
        self.logs = {r: schedule_dir(run_dir(preset, *r), run_steps(preset, r[0])) / "metrics.jsonl"
                     for r in runs}
        self.weights = {r: run_work(preset, r[0]) for r in runs}
        if any(method == "PPO" for method, _ in runs):
            self.weights[R_PHI] = run_work(preset, "r_phi")
        self.start = self._done()[1]
        # smoothing=0: the ETA extrapolates the average rate since the start, not the last few seconds'.
        self.bar = tqdm(total=max(sum(self.weights.values()) - self.start, 1.0), desc="frontier runs",
                        smoothing=0, disable=disable,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def _done(self) -> tuple[dict[Item, int], float]:
        """Each run's last logged step (a line a worker is still writing is skipped), and the work done."""
        steps = {r: run_steps(self.preset, r[0]) if r in self.finished
                 else (read_metrics(log) or [{"step": 0}])[-1]["step"] for r, log in self.logs.items()}
        done = sum(self.weights[r] * min(1.0, s / run_steps(self.preset, r[0])) for r, s in steps.items())
        if R_PHI in self.weights:  # its trainer writes its step every 10 steps
            path = _reward_model_progress(self.preset)
            report = json.loads(path.read_text()) if path.is_file() else {"step": 0, "total": 1}
            trained = any(step > 0 for (method, _), step in steps.items() if method == "PPO")
            done += self.weights[R_PHI] * (1.0 if trained else report["step"] / report["total"])
        return steps, done

    def update(self, running: list[Item], finished: set[Item]) -> None:
        self.finished |= finished
        steps, done = self._done()
        self.bar.n = min(self.bar.total, max(0.0, done - self.start))
        self.bar.set_postfix_str(" · ".join(
            f"{m} {hyperparameter_name(m)}={v:g}: {steps[(m, v)]}/{run_steps(self.preset, m)}"
            for m, v in running), refresh=False)
        self.bar.refresh()


def _worker_order(runs: list[Item]) -> list[Item]:
    """Longest first, so the pool ends on short runs: one PPO run (it trains r_phi, which every PPO run
    reads), the PPO-GT runs while r_phi trains, the other PPO runs, then DPO and the baselines."""
    ppo = [r for r in runs if r[0] == "PPO"]
    gt = [r for r in runs if r[0] == "PPO-GT"]
    return ppo[:1] + gt + ppo[1:] + [r for r in runs if r[0] not in PPO_METHODS]


def frontier(preset: Preset, methods: tuple[str, ...] = METHODS, *, progress: bool = SHOW_PROGRESS,
             timings: dict[str, float] | None = None, workers: int = 1) -> pd.DataFrame:
    """Every evaluation point (step 0 included) of every run of ``methods``, read from finished runs under
    their locks; ``timings`` collects wall seconds per method. ``workers > 1`` trains that many runs at a
    time in one-thread processes (numbers then agree with one process's to float rounding)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    runs = frontier_runs(preset, methods)
    seconds: dict[tuple[str, float], float] = {}
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_train_in_worker, preset, m, v): (m, v) for m, v in _worker_order(runs)}
            watch = _PoolProgress(preset, list(futures.values()), disable=not progress)
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=2.0,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    seconds[futures[future]] = future.result()  # a failed run raises here, named by its error
                # The pool queues a call ahead of its workers, so the first `workers` are the ones training.
                running = [futures[f] for f in futures if f in pending and f.running()][:workers]
                watch.update(running, {futures[f] for f in done})
            watch.bar.close()
    frames = []
    for method, value in runs:
        start = time.perf_counter()
        run = result(preset, method, value, progress=progress)  # trained above: read from its result.json
        seconds[(method, value)] = seconds.get((method, value), 0.0) + time.perf_counter() - start
        label = f"{hyperparameter_name(method)}={value:g}"
        with finished_metrics(run) as metrics:
            frames.append(evaluation_points(metrics, method=method, hyperparameter=label))
    if timings is not None:
        for (method, _), spent in seconds.items():
            timings[method] = timings.get(method, 0.0) + spent
    return pd.concat(frames, ignore_index=True)
